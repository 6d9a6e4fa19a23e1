"""Fault soak: producers at a steady rate while faults rotate; then proof that nothing was lost
or reordered, and what each fault cost (issue 15, point 3).

    .venv/bin/python bench/fault_soak.py --minutes 30 --rate 500 --fault-every 120 --mode notify
    .venv/bin/python bench/fault_soak.py --minutes 6 --fault-every 60 --cut-seconds 30   # a try

By default everything runs against a PostgreSQL cluster and a RabbitMQ node the script starts
for itself (bench/private_services.py) and removes at the end, also on Ctrl-C: the soak restarts
them, and the shared services belong to everyone. ``--use-shared-services`` soaks existing
ones instead (``--admin-url``, ``--broker-url``, ``--restart-postgres``, ``--restart-broker``).

The relay is ``outbox-relay serve`` (the installed CLI), restarted within a second whenever it
exits, as a supervisor would. It reaches PostgreSQL and RabbitMQ through the freezing TCP proxy
of tests/faults.py (a black hole is a link that hangs without closing). Producers (a process,
bench/producers.py) insert ``--rate`` events/s, each the next step of one of ``--aggregates``
aggregates, recorded in an application table in the same transaction. A consumer (a process,
bench/consumer.py) writes down every delivery. After a quiet ``--warmup``, one fault per
``--fault-every`` seconds, in turn: a second relay for ``--cut-seconds`` (then SIGTERM), the
relay↔PostgreSQL link black-holed for ``--cut-seconds``, the relay↔RabbitMQ link likewise, a
broker restart, a PostgreSQL restart (fast shutdown), the relay SIGKILLed. Then the producers
stop and the relay drains.

Verdicts: lost (committed, never delivered) = 0, reordered first deliveries = 0 (per aggregate,
in step order), none delivered that never committed. Per fault window: duplicates (copies the
relay published again; the broker's own redeliveries to the consumer after a broker restart are
counted apart), the longest publishing pause (the longest time during which some committed event
waited and nothing new was delivered), relay exits. Relay RSS every ``--sample-seconds``: first,
last, peak and its slope within each relay process's life. Prints a table, writes
bench/results/fault-soak-<mode>-latest.json, exits 1 if anything was lost, reordered or
undelivered after the drain. See bench/README.md.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from bench_setup import BenchEnv, bench_env
from consumer import DeliveryRecorder
from memory_bench import CLI, _status_kib
from private_services import PrivatePostgres, PrivateRabbitMQ
from producers import SEQUENCED_TABLE, SequencedProducers
from relay_bench import code_version, log, uptime

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.faults import HangingProxy

RESULTS = Path(__file__).parent / "results"
RESTART_DELAY = 1.0  # a supervisor's restart delay (systemd's RestartSec is 0.1 s; k8s backs off)
FAULTS = (
    "second relay",
    "black hole relay-PostgreSQL",
    "black hole relay-RabbitMQ",
    "broker restart",
    "PostgreSQL restart",
    "relay SIGKILL",
)


def via(url: str, port: int) -> str:
    """``url`` with its host and port replaced by 127.0.0.1:``port`` (a proxy)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo + '@' if userinfo else ''}127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def url_port(url: str, default: int) -> int:
    return urlsplit(url).port or default


@dataclass
class Exit:
    at: float
    pid: int
    code: int | None
    expected: bool  # killed by the soak (SIGKILL fault) or stopped by it


@dataclass
class Sample:
    at: float
    pid: int
    rss_mib: float


class RelaySupervisor:
    """The relay under test, restarted ``RESTART_DELAY`` after any exit; its RSS sampled every
    ``sample_seconds``; and a second relay on request. Each relay's output goes to its own log."""

    def __init__(self, variables: dict[str, str], log_dir: Path, sample_seconds: float) -> None:
        self._variables = variables
        self._log_dir = log_dir
        self._sample_seconds = sample_seconds
        self._lock = threading.Lock()
        self._primary: subprocess.Popen[bytes] | None = None
        self._second: subprocess.Popen[bytes] | None = None
        self._killed: set[int] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self.exits: list[Exit] = []
        self.samples: list[Sample] = []
        self.starts: list[tuple[float, int]] = []

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        variables = self._variables | {"OUTBOX_RELAY_RELAY_NAME": name}
        with (self._log_dir / f"{name}.log").open("ab") as out:
            # A session of its own: Ctrl-C on the soak reaches the soak only, which stops it.
            return subprocess.Popen(
                [str(CLI), "serve"],
                env=variables,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self) -> None:
        with self._lock:
            self._primary = self._spawn("soak-1")
            self.starts.append((time.time(), self._primary.pid))
        self._thread.start()

    def _watch(self) -> None:
        # The first sample a full interval in: a relay still importing is not its working size.
        next_sample = time.time() + self._sample_seconds
        while not self._stopping.wait(0.2):
            with self._lock:
                primary = self._primary
            if primary is None:
                continue
            code = primary.poll()
            if code is not None:
                self.exits.append(
                    Exit(time.time(), primary.pid, code, expected=primary.pid in self._killed)
                )
                if self._stopping.wait(RESTART_DELAY):
                    return
                with self._lock:
                    self._primary = self._spawn("soak-1")
                    self.starts.append((time.time(), self._primary.pid))
                next_sample = max(next_sample, time.time() + self._sample_seconds)
                continue
            if time.time() >= next_sample:
                with contextlib.suppress(OSError, RuntimeError):
                    rss = _status_kib(primary.pid, "VmRSS") / 1024
                    self.samples.append(Sample(time.time(), primary.pid, round(rss, 1)))
                next_sample += self._sample_seconds

    def kill(self) -> None:
        """SIGKILL the relay (the watcher restarts it)."""
        with self._lock:
            if self._primary is not None and self._primary.poll() is None:
                self._killed.add(self._primary.pid)
                self._primary.kill()

    def start_second(self) -> None:
        self._second = self._spawn("soak-2")

    def stop_second(self, timeout: float = 60) -> int | None:
        """SIGTERM the second relay, as a scale-down does; its exit code."""
        second, self._second = self._second, None
        if second is None:
            return None
        second.terminate()
        try:
            return second.wait(timeout)
        except subprocess.TimeoutExpired:
            second.kill()
            return second.wait(10)

    def close(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.stop_second()
        with self._lock:
            primary, self._primary = self._primary, None
        if primary is not None and primary.poll() is None:
            self._killed.add(primary.pid)
            primary.terminate()
            try:
                primary.wait(30)
            except subprocess.TimeoutExpired:
                primary.kill()
                primary.wait(10)


class Deliveries:
    """The recorder's file, read as it grows: every delivery in arrival order."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self.rows: list[tuple[str, str, int, float, bool]] = []
        self.first_seen: set[str] = set()

    def read(self) -> int:
        """Read what was appended since; returns how many distinct events arrived so far."""
        with self._path.open("rb") as source:
            source.seek(self._offset)
            chunk = source.read()
        complete = chunk.rfind(b"\n") + 1
        self._offset += complete
        for line in chunk[:complete].decode().splitlines():
            event_id, aggregate, seq, at, redelivered = line.split("\t")
            self.rows.append((event_id, aggregate, int(seq), float(at), redelivered == "1"))
            self.first_seen.add(event_id)
        return len(self.first_seen)


@dataclass
class Window:
    fault: str
    start: float
    end: float
    detail: dict[str, Any] = field(default_factory=dict)


class Services:
    """Where PostgreSQL and RabbitMQ are, and how to restart each."""

    def __init__(
        self,
        admin_url: str,
        broker_url: str,
        restart_postgres: Callable[[], None],
        restart_broker: Callable[[], None],
    ) -> None:
        self.admin_url = admin_url
        self.broker_url = broker_url
        self.restart_postgres = restart_postgres
        self.restart_broker = restart_broker


@contextlib.contextmanager
def services(args: argparse.Namespace, workdir: Path) -> Iterator[Services]:
    if args.use_shared_services:

        def command(line: str) -> Callable[[], None]:
            return lambda: subprocess.run(line, shell=True, check=True, timeout=300)

        yield Services(
            args.admin_url,
            args.broker_url,
            command(args.restart_postgres),
            command(args.restart_broker),
        )
        return
    log("starting a private PostgreSQL cluster and RabbitMQ node")
    with PrivatePostgres(workdir) as postgres, PrivateRabbitMQ(workdir) as rabbit:
        log(f"private PostgreSQL on {postgres.port}, RabbitMQ node {rabbit.node} on {rabbit.port}")
        yield Services(postgres.admin_url, rabbit.url, postgres.restart, rabbit.restart)


def relay_variables(
    env: BenchEnv, args: argparse.Namespace, pg_proxy: HangingProxy, amqp_proxy: HangingProxy
) -> dict[str, str]:
    variables = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_")}
    variables |= {
        "OUTBOX_RELAY_DATABASE_URL": via(env.database_url, pg_proxy.port),
        "OUTBOX_RELAY_BROKER_URL": via(env.broker_url, amqp_proxy.port),
        "OUTBOX_RELAY_EXCHANGE": env.exchange,
        "OUTBOX_RELAY_MODE": args.mode,
        "OUTBOX_RELAY_LOG_LEVEL": "info",
    }
    if args.mode == "cdc":
        variables |= {
            "OUTBOX_RELAY_SLOT_NAME": slot_name(env),
            "OUTBOX_RELAY_PUBLICATION": slot_name(env),
        }
    return variables


def slot_name(env: BenchEnv) -> str:
    return f"soak_{env.database.removeprefix('bench_')}"


def prepare(env: BenchEnv, args: argparse.Namespace) -> None:
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        conn.execute(SEQUENCED_TABLE)
    if args.mode == "cdc":
        name = slot_name(env)
        subprocess.run(
            [str(CLI), "migrate", "--cdc", "--slot-name", name, "--publication", name],
            env={k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_")}
            | {"OUTBOX_RELAY_DATABASE_URL": env.database_url},
            check=True,
            timeout=120,
            stdout=subprocess.DEVNULL,
        )


def run_fault(
    fault: str,
    supervisor: RelaySupervisor,
    svc: Services,
    pg_proxy: HangingProxy,
    amqp_proxy: HangingProxy,
    cut: float,
) -> dict[str, Any]:
    """Inflict ``fault``; returns what is worth noting (how long it took)."""
    started = time.time()
    detail: dict[str, Any] = {}
    if fault == "second relay":
        supervisor.start_second()
        time.sleep(cut)
        detail["second_relay_exit_code"] = supervisor.stop_second()
    elif fault.startswith("black hole"):
        proxy = pg_proxy if "PostgreSQL" in fault else amqp_proxy
        proxy.freeze()
        try:
            time.sleep(cut)
        finally:
            proxy.thaw()
    elif fault == "broker restart":
        svc.restart_broker()
    elif fault == "PostgreSQL restart":
        svc.restart_postgres()
    elif fault == "relay SIGKILL":
        supervisor.kill()
    detail["fault_seconds"] = round(time.time() - started, 1)
    return detail


def committed_steps(database_url: str) -> dict[str, tuple[str, int, float]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT event_id::text, aggregate_id, seq, extract(epoch FROM committed_at)::float8"
            " FROM soak_steps"
        ).fetchall()
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


def count_committed(database_url: str) -> int | None:
    try:
        with psycopg.connect(database_url, connect_timeout=5) as conn:
            row = conn.execute("SELECT count(*) FROM soak_steps").fetchone()
            return int(row[0]) if row else 0
    except psycopg.OperationalError:
        return None  # restarting


def outbox_left(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE dead_at IS NULL), count(*) FILTER (WHERE dead_at IS NOT"
            " NULL) FROM outbox WHERE published_at IS NULL"
        ).fetchone()
    assert row is not None
    return {"pending": int(row[0]), "dead": int(row[1])}


def analyse(
    committed: dict[str, tuple[str, int, float]],
    rows: list[tuple[str, str, int, float, bool]],
    windows: list[Window],
) -> dict[str, Any]:
    starts = [w.start for w in windows]

    def window_of(at: float) -> int:
        return max(0, bisect.bisect_right(starts, at) - 1)

    per = [
        {
            "committed": 0,
            "duplicates": 0,
            "broker_redeliveries": 0,
            "longest_pause_s": 0.0,
            "pause_at_s": None,
            "pause_end_s": None,
            "longest_commit_gap_s": 0.0,
        }
        for _ in windows
    ]
    for _aggregate, _seq, at in committed.values():
        per[window_of(at)]["committed"] += 1

    first: dict[str, float] = {}
    fresh: set[str] = set()
    last_seq: dict[str, int] = {}
    reordered = 0
    mismatched = 0
    examples: list[dict[str, Any]] = []
    for event_id, aggregate, seq, at, redelivered in rows:
        if redelivered:
            per[window_of(at)]["broker_redeliveries"] += 1
        elif event_id in fresh:
            per[window_of(at)]["duplicates"] += 1
        else:
            fresh.add(event_id)
        if event_id in first:
            continue
        first[event_id] = at
        truth = committed.get(event_id)
        if truth is not None and truth[:2] != (aggregate, seq):
            mismatched += 1
        if seq < last_seq.get(aggregate, 0):
            reordered += 1
            if len(examples) < 10:
                examples.append(
                    {"aggregate": aggregate, "seq": seq, "after": last_seq[aggregate], "at": at}
                )
        last_seq[aggregate] = max(seq, last_seq.get(aggregate, 0))

    lost = sorted(set(committed) - set(first))
    unknown = sorted(set(first) - set(committed))

    # Publishing pauses: between two consecutive first deliveries, the time during which some
    # committed event was already waiting (the earliest commit among those delivered later).
    order = sorted((at, committed[e][2]) for e, at in first.items() if e in committed)
    waiting_since = [0.0] * len(order)
    earliest = float("inf")
    for i in range(len(order) - 1, -1, -1):
        earliest = min(earliest, order[i][1])
        waiting_since[i] = earliest
    for i in range(len(order) - 1):
        began = max(order[i][0], waiting_since[i + 1])
        pause = order[i + 1][0] - began
        slot = per[window_of(began)]
        if pause > slot["longest_pause_s"]:
            slot["longest_pause_s"] = pause
            slot["pause_at_s"] = round(began - windows[window_of(began)].start, 1)
            slot["pause_end_s"] = round(order[i + 1][0] - windows[window_of(began)].start, 1)
    # The producers' own gaps (a PostgreSQL restart stops them too): context for the pauses.
    commits = sorted(at for _a, _s, at in committed.values())
    for a, b in itertools.pairwise(commits):
        slot = per[window_of(a)]
        slot["longest_commit_gap_s"] = max(slot["longest_commit_gap_s"], b - a)
    for slot in per:
        slot["longest_pause_s"] = round(slot["longest_pause_s"], 2)
        slot["longest_commit_gap_s"] = round(slot["longest_commit_gap_s"], 2)
    return {
        "committed": len(committed),
        "delivered_distinct": len(first),
        "deliveries": len(rows),
        "lost": len(lost),
        "lost_examples": lost[:10],
        "reordered": reordered,
        "reordered_examples": examples,
        "delivered_never_committed": len(unknown),
        "mismatched_payloads": mismatched,
        "duplicates": sum(slot["duplicates"] for slot in per),
        "broker_redeliveries": sum(slot["broker_redeliveries"] for slot in per),
        "windows": per,
    }


def memory(samples: list[Sample]) -> dict[str, Any]:
    """First, last and peak RSS, and the slope within each relay process's life (pooled least
    squares with one intercept per process: a restart's fresh heap is not growth)."""
    if not samples:
        return {}
    by_pid: dict[int, list[Sample]] = {}
    for sample in samples:
        by_pid.setdefault(sample.pid, []).append(sample)
    num = den = 0.0
    for group in by_pid.values():
        if len(group) < 2:
            continue
        mean_t = sum(s.at for s in group) / len(group)
        mean_r = sum(s.rss_mib for s in group) / len(group)
        num += sum((s.at - mean_t) * (s.rss_mib - mean_r) for s in group)
        den += sum((s.at - mean_t) ** 2 for s in group)
    return {
        "first_mib": samples[0].rss_mib,
        "last_mib": samples[-1].rss_mib,
        "peak_mib": max(s.rss_mib for s in samples),
        "slope_mib_per_hour": round(num / den * 3600, 2) if den else None,
        "processes": [
            {
                "pid": pid,
                "samples": len(group),
                "first_mib": group[0].rss_mib,
                "peak_mib": max(s.rss_mib for s in group),
                "last_mib": group[-1].rss_mib,
                "minutes": round((group[-1].at - group[0].at) / 60, 1),
            }
            for pid, group in by_pid.items()
        ],
    }


def soak(args: argparse.Namespace, svc: Services, log_dir: Path) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        env = stack.enter_context(bench_env(svc.admin_url, svc.broker_url))
        prepare(env, args)
        pg_proxy = stack.enter_context(HangingProxy(url_port(svc.admin_url, 5432)))
        amqp_proxy = stack.enter_context(HangingProxy(url_port(svc.broker_url, 5672)))
        recording = log_dir / "deliveries.tsv"
        recorder = DeliveryRecorder(env.broker_url, env.queue, str(recording))
        stack.callback(recorder.kill)
        deliveries = Deliveries(recording)
        supervisor = RelaySupervisor(
            relay_variables(env, args, pg_proxy, amqp_proxy), log_dir, args.sample_seconds
        )
        stack.callback(supervisor.close)
        supervisor.start()
        producers = SequencedProducers(
            env.database_url, args.rate, args.connections, args.aggregates
        )
        stack.callback(producers.kill)
        began = time.time()
        windows = [Window("none (warm-up)", began, began + args.warmup)]
        fault_count = max(1, round(args.minutes * 60 / args.fault_every))
        for number in range(fault_count):
            start = began + args.warmup + number * args.fault_every
            windows.append(Window(FAULTS[number % len(FAULTS)], start, start + args.fault_every))

        def progress(label: str) -> None:
            delivered = deliveries.read()
            rss = supervisor.samples[-1].rss_mib if supervisor.samples else None
            log(
                f"{(time.time() - began) / 60:5.1f} min {label}: committed "
                f"{count_committed(env.database_url)}, delivered {delivered}, relay RSS {rss} MiB"
            )

        for window in windows:
            time.sleep(max(0.0, window.start - time.time()))
            if window is not windows[0]:
                progress(f"fault: {window.fault}")
                window.detail = run_fault(
                    window.fault, supervisor, svc, pg_proxy, amqp_proxy, args.cut_seconds
                )
            while time.time() < window.end - 1:
                time.sleep(min(30.0, max(0.0, window.end - time.time() - 1)))
                deliveries.read()
        time.sleep(max(0.0, windows[-1].end - time.time()))
        producer_errors = producers.stop()
        stopped = time.time()
        windows[-1].end = stopped
        committed_count = count_committed(env.database_url) or 0
        log(f"producers stopped: {committed_count} committed; draining")
        deadline = stopped + args.drain_timeout
        while deliveries.read() < committed_count and time.time() < deadline:
            time.sleep(1)
        drained = time.time() - stopped
        time.sleep(2)  # late duplicates, if any, still count
        supervisor.close()
        recorder.stop()
        deliveries.read()
        committed = committed_steps(env.database_url)
        with (log_dir / "committed.tsv").open("w") as out:  # the truth, kept for a second look
            for event_id, (aggregate, seq, at) in committed.items():
                out.write(f"{event_id}\t{aggregate}\t{seq}\t{at:.6f}\n")
        left = outbox_left(env.database_url)
        analysis = analyse(committed, deliveries.rows, windows)
    exits = supervisor.exits
    for window, slot in zip(windows, analysis["windows"], strict=True):
        slot["fault"] = window.fault
        slot["start_minute"] = round((window.start - began) / 60, 2)
        slot["relay_exits"] = sum(1 for e in exits if window.start <= e.at < window.end)
        slot["unexpected_relay_exits"] = sum(
            1 for e in exits if window.start <= e.at < window.end and not e.expected
        )
        slot.update(window.detail)
        # A fault that lasts (a black hole, a restart): how long after it ended publishing
        # resumed, when the window's longest pause was still on at its end.
        paused, end = slot["pause_at_s"], slot["pause_end_s"]
        lasted = window.detail.get("fault_seconds")
        slot["resumed_after_fault_s"] = (
            round(max(0.0, end - lasted), 1)
            if paused is not None and end is not None and lasted and paused <= lasted <= end + 0.5
            else None
        )
    return {
        **analysis,
        "drain_seconds": round(drained, 1),
        "outbox_left": left,
        "producer_errors_ridden_out": len(producer_errors),
        "relay_exits": [
            {"minute": round((e.at - began) / 60, 2), "code": e.code, "expected": e.expected}
            for e in exits
        ],
        "memory": memory(supervisor.samples),
        "rss_samples": [
            {"minute": round((s.at - began) / 60, 2), "pid": s.pid, "rss_mib": s.rss_mib}
            for s in supervisor.samples
        ],
    }


def render(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    run = results["run"]
    table = Table(title=f"Fault soak, --mode {results['meta']['mode']}")
    for column in (
        "min",
        "fault",
        "committed",
        "duplicates",
        "broker redeliv.",
        "longest pause s",
        "resumed after s",
        "producers' gap s",
        "relay exits",
    ):
        table.add_column(column, justify="left" if column == "fault" else "right")
    for slot in run["windows"]:
        table.add_row(
            f"{slot['start_minute']:.1f}",
            slot["fault"],
            str(slot["committed"]),
            str(slot["duplicates"]),
            str(slot["broker_redeliveries"]),
            f"{slot['longest_pause_s']:.1f}",
            "-"
            if slot["resumed_after_fault_s"] is None
            else f"{slot['resumed_after_fault_s']:.1f}",
            f"{slot['longest_commit_gap_s']:.1f}",
            f"{slot['relay_exits']}"
            + (
                f" ({slot['unexpected_relay_exits']} unexpected)"
                if slot["unexpected_relay_exits"]
                else ""
            ),
        )
    console = Console(width=150)
    console.print(table)
    mem = run["memory"]
    console.print(
        f"committed {run['committed']}, lost {run['lost']}, reordered {run['reordered']}, "
        f"delivered but never committed {run['delivered_never_committed']}, duplicates "
        f"{run['duplicates']} (+{run['broker_redeliveries']} broker redeliveries), drained in "
        f"{run['drain_seconds']} s, outbox left {run['outbox_left']}; relay RSS first "
        f"{mem.get('first_mib')} MiB, last {mem.get('last_mib')} MiB, peak "
        f"{mem.get('peak_mib')} MiB, slope {mem.get('slope_mib_per_hour')} MiB/h"
    )


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=30, help="of faults (30)")
    parser.add_argument("--rate", type=float, default=500, help="producer events/s (500)")
    parser.add_argument("--fault-every", type=float, default=120, help="seconds per fault (120)")
    parser.add_argument(
        "--cut-seconds", type=float, default=60, help="black holes and the second relay (60)"
    )
    parser.add_argument("--mode", choices=("notify", "poll", "cdc"), default="notify")
    parser.add_argument("--warmup", type=float, default=30, help="seconds before the first fault")
    parser.add_argument("--connections", type=int, default=4, help="producer threads (4)")
    parser.add_argument("--aggregates", type=int, default=1000, help="aggregate ids (1,000)")
    parser.add_argument("--sample-seconds", type=float, default=30, help="relay RSS (30)")
    parser.add_argument("--drain-timeout", type=float, default=300, help="seconds (300)")
    parser.add_argument(
        "--use-shared-services",
        action="store_true",
        help="soak the services at --admin-url / --broker-url (they get restarted!)",
    )
    parser.add_argument(
        "--admin-url",
        default=os.environ.get(
            "OUTBOX_RELAY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="with --use-shared-services: a superuser's maintenance database",
    )
    parser.add_argument(
        "--broker-url",
        default=os.environ.get(
            "OUTBOX_RELAY_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"
        ),
    )
    parser.add_argument(
        "--restart-postgres",
        default="pg_ctlcluster --skip-systemctl-redirect 15 main restart -- -m fast",
        help="with --use-shared-services: shell command",
    )
    parser.add_argument(
        "--restart-broker",
        default="rabbitmqctl stop_app && rabbitmqctl start_app",
        help="with --use-shared-services: shell command",
    )
    parser.add_argument("--log-dir", type=Path, help="relay logs and deliveries (a temp dir)")
    parser.add_argument(
        "--output", type=Path, help="JSON (bench/results/fault-soak-<mode>-latest.json)"
    )
    args = parser.parse_args(argv)
    if args.cut_seconds >= args.fault_every:
        parser.error("--cut-seconds must be shorter than --fault-every")
    if min(args.minutes, args.rate, args.fault_every, args.sample_seconds) <= 0:
        parser.error("--minutes, --rate, --fault-every and --sample-seconds must be positive")
    output = args.output or RESULTS / f"fault-soak-{args.mode}-latest.json"
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="fault-soak-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)

    started = time.time()
    meta: dict[str, Any] = {
        "started_at": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bench/fault_soak.py", *(argv if argv is not None else sys.argv[1:])]),
        "mode": args.mode,
        "minutes": args.minutes,
        "rate": args.rate,
        "fault_every": args.fault_every,
        "cut_seconds": args.cut_seconds,
        "aggregates": args.aggregates,
        "private_services": not args.use_shared_services,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "relay_version": code_version(),
        "uptime_before": uptime(),
        "log_dir": str(log_dir),
    }
    workdir = Path(tempfile.mkdtemp(prefix="fault-soak-"))
    workdir.chmod(0o755)  # the servers run as their own users
    try:
        with services(args, workdir) as svc:
            run = soak(args, svc, log_dir)
    except KeyboardInterrupt:
        log("interrupted: private services stopped and removed")
        return 130
    finally:
        with contextlib.suppress(OSError):
            workdir.rmdir()
    meta["uptime_after"] = uptime()
    meta["seconds"] = round(time.time() - started, 1)
    results = {"meta": meta, "run": run}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    render(results)
    log(f"wrote {output}; relay logs and deliveries in {log_dir}")
    failed = run["lost"] or run["reordered"] or run["delivered_never_committed"]
    return 1 if failed or run["mismatched_payloads"] else 0


if __name__ == "__main__":
    sys.exit(main())
