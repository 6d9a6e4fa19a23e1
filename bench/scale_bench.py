"""Several active relays on one outbox (issue 13): drain rate with 1, 2 and 3 relays against a raw
publisher, take-over after a SIGKILL, and the pause a rebalance causes.

    .venv/bin/python bench/scale_bench.py            # full run, about 15 minutes
    .venv/bin/python bench/scale_bench.py --quick    # smaller sizes, about 2 minutes

Every relay is a real ``outbox-relay serve`` process (the console script next to this Python),
configured only through OUTBOX_RELAY_* variables, each with its own --relay-name. Creates its own
database, exchange and queue (bench/bench_setup.py), prints a table, writes
bench/results/scale-latest.json and removes what it created. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psycopg
from bench_setup import BenchEnv, bench_env
from cpu_usage import CpuMeter
from producers import (
    PacedProducers,
    PublishedCounter,
    ServiceRestarted,
    insert_backlog_at_once,
    pending,
)
from relay_bench import (
    DEFAULT_ADMIN_URL,
    DEFAULT_BROKER_URL,
    QUICK,
    RESULTS,
    Bench,
    code_version,
    log,
    median,
    quiet_database,
    uptime,
)

RELAY_COUNTS = (1, 2, 3)
RAW_WINDOW = 1000
# Aggregates of the take-over and rebalance phases: about 16 per partition, so every partition
# publishes all the time and a pause shows.
AGGREGATES = 1000
PROFILES = {"distinct": 0, "1000": 1000}  # drain profiles: aggregates (0: one per event)
TARGET_SCALE_RATIO = 0.95  # 2 and 3 relays vs 1
TARGET_TAKEOVER_S = 10.0
TARGET_REBALANCE_S = 2.0
# What limits a drain: the broker when its CPU reaches this share of its CPU under the raw
# publisher; a relay when one process uses this much of a core; the machine when all cores are
# this busy.
BROKER_BOUND_SHARE = 0.9
RELAY_BOUND_PERCENT = 85.0
MACHINE_BOUND_PERCENT = 90.0
PREFETCH = 100  # the gap consumer's unacknowledged deliveries (bounds its hidden lag)


@dataclass(frozen=True)
class Sizes:
    events: int  # each drain backlog and its raw run
    rounds: int
    takeover_events: int  # the backlog during which a relay is killed
    kill_at: float  # share of that backlog published when the relay is killed
    rebalance_rate: int  # events/s produced during the rebalance phase
    rebalance_seconds: float


FULL = Sizes(100_000, 3, 100_000, 0.3, 2000, 20.0)
QUICK_SIZES = Sizes(10_000, 1, 20_000, 0.3, 1000, 12.0)


def relay_command() -> list[str]:
    beside = Path(sys.executable).with_name("outbox-relay")
    if beside.exists():
        return [str(beside)]
    return [shutil.which("outbox-relay") or "outbox-relay"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def split(partitions: int, relays: int) -> list[int]:
    """The fair shares (relay/leases.py fair_share), largest first."""
    return [partitions // relays + (1 if n < partitions % relays else 0) for n in range(relays)]


# -- relays as `outbox-relay serve` processes -------------------------------------------------


class ServeRelay:
    """One ``outbox-relay serve`` child, configured through OUTBOX_RELAY_* variables only;
    JSON logs to a file, Prometheus metrics on a port of its own (unless metrics are off)."""

    def __init__(
        self,
        env: BenchEnv,
        name: str,
        log_dir: Path,
        *,
        metrics: bool,
        batch_size: int | None,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = free_port() if metrics else None
        self.log_path = log_dir / f"{env.database}-{name}-{time.time_ns()}.log"
        settings = {
            "DATABASE_URL": env.database_url,
            "BROKER_URL": env.broker_url,
            "EXCHANGE": env.exchange,
            "MODE": "notify",
            "RELAY_NAME": name,
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "info",
        }
        if self.port is not None:
            settings["METRICS_PORT"] = str(self.port)
        if batch_size is not None:
            settings["BATCH_SIZE"] = str(batch_size)
        settings.update(extra or {})
        child_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_RELAY_", "OTEL_"))
        }
        child_env.update({f"OUTBOX_RELAY_{k}": v for k, v in settings.items()})
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [*relay_command(), "serve"],
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.signalled: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def terminate(self) -> None:
        if self.alive():
            self.signalled = "SIGTERM"
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.alive():
            self.signalled = "SIGKILL"
            self.process.kill()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def published(self) -> float | None:
        """outbox_relay_events_published_total, from its /metrics."""
        if self.port is None or not self.alive():
            return None
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}/metrics", timeout=5
            ) as response:
                text = response.read().decode()
        except OSError:
            return None
        return sum(
            float(match[1])
            for match in re.finditer(
                r"^outbox_relay_events_published_total\{[^}]*\} (\S+)$", text, re.M
            )
        )

    def log_entries(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entries.append({"level": "raw", "message": line})
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# Relay -> partitions leased to it, counting only live relays: a member whose session still
# exists (a relay killed a moment ago keeps unexpired lease rows until the others notice).
HOLDERS = """
SELECT l.relay, count(*) FROM outbox_relay_leases AS l
JOIN outbox_relay_members AS m ON m.relay = l.relay
WHERE l.scope = 'partition' AND l.expires_at > now()
  AND EXISTS (SELECT FROM pg_stat_activity AS a
              WHERE a.pid = m.pid AND a.backend_start = m.backend_start)
GROUP BY l.relay
"""

# Lines that mean a shared service went away under the relay: the run's figures are void.
_SERVICE_TROUBLE = ("disconnected", "cannot connect", "lease heartbeat failed")
# What the timeline keeps from the relays' logs.
_TIMELINE = (
    "joined the relays",
    "holding",
    "removed a relay",
    "received",
    "stopped",
    "shutdown timed out",
)


class Fleet:
    """The relays of one measurement; all are stopped (SIGKILL if need be) at the end."""

    def __init__(
        self,
        env: BenchEnv,
        log_dir: Path,
        *,
        metrics: bool,
        batch_size: int | None,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.env = env
        self.log_dir = log_dir
        self.metrics = metrics
        self.batch_size = batch_size
        self.extra = extra or {}
        self.relays: dict[str, ServeRelay] = {}
        self._conn: psycopg.Connection[Any] | None = None

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for relay in self.relays.values():
            relay.kill()
        for relay in self.relays.values():
            relay.wait(10)
        if self._conn is not None:
            self._conn.close()

    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.env.database_url, autocommit=True)
        return self._conn

    def start(self, *names: str) -> None:
        for name in names:
            self.relays[name] = ServeRelay(
                self.env,
                name,
                self.log_dir,
                metrics=self.metrics,
                batch_size=self.batch_size,
                extra=self.extra,
            )

    def pids(self) -> set[int]:
        return {relay.pid for relay in self.relays.values()}

    def holders(self) -> dict[str, int]:
        """Relay -> partitions it holds a live lease on."""
        try:
            rows = self.conn.execute(HOLDERS).fetchall()
        except psycopg.OperationalError as exc:
            raise ServiceRestarted(f"PostgreSQL connection lost: {exc}") from exc
        return {str(relay): int(count) for relay, count in rows}

    def partitions(self) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM outbox_relay_leases WHERE scope = 'partition'"
        ).fetchone()
        return int(row[0]) if row else 0

    def member(self, name: str) -> bool:
        row = self.conn.execute(
            "SELECT EXISTS (SELECT FROM outbox_relay_members WHERE relay = %s)", (name,)
        ).fetchone()
        return bool(row and row[0])

    def leases_of(self) -> dict[str, list[int]]:
        rows = self.conn.execute(
            "SELECT relay, array_agg(partition ORDER BY partition) FROM outbox_relay_leases"
            " WHERE scope = 'partition' AND relay IS NOT NULL GROUP BY relay"
        ).fetchall()
        return {str(relay): list(parts) for relay, parts in rows}

    def wait_balanced(self, names: list[str], timeout: float = 60) -> float:
        """Until exactly ``names`` hold fair shares of every partition; returns time.time()."""
        expected = sorted(split(self.partitions(), len(names)))
        deadline = time.monotonic() + timeout
        while True:
            self.check_running()
            held = self.holders()
            if set(held) == set(names) and sorted(held.values()) == expected:
                return time.time()
            if time.monotonic() > deadline:
                raise RuntimeError(f"relays {names} not balanced after {timeout:.0f}s: {held}")
            time.sleep(0.02)

    def wait_member(self, name: str, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while not self.member(name):
            self.check_running()
            if time.monotonic() > deadline:
                raise RuntimeError(f"relay {name} did not join within {timeout:.0f}s")
            time.sleep(0.02)
        return time.time()

    def check_running(self) -> None:
        """Every relay not stopped on purpose still runs, and none lost a shared service."""
        for relay in self.relays.values():
            if relay.signalled is None and not relay.alive():
                raise RuntimeError(
                    f"relay {relay.name} exited with {relay.process.returncode}:\n{relay.tail()}"
                )

    def check_logs(self) -> None:
        for relay in self.relays.values():
            for entry in relay.log_entries():
                message = str(entry.get("message", ""))
                if entry.get("level") in {"warning", "error"} and message.startswith(
                    _SERVICE_TROUBLE
                ):
                    raise ServiceRestarted(f"relay {relay.name}: {message}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM every relay still running, then wait for each."""
        for relay in self.relays.values():
            relay.terminate()
        for relay in self.relays.values():
            if relay.wait(timeout) is None:
                relay.kill()
                relay.wait(10)
                raise RuntimeError(f"relay {relay.name} ignored SIGTERM for {timeout:.0f}s")

    def published(self, expected: int) -> dict[str, float | None]:
        """Each relay's own count of events published (its metrics), once they add up to
        ``expected``: a relay counts a batch just after committing it, so a moment after the
        outbox says all are sent (2 s at most)."""
        deadline = time.monotonic() + 2
        while True:
            counts = {name: relay.published() for name, relay in self.relays.items()}
            total = sum(count or 0 for count in counts.values())
            if total >= expected or time.monotonic() > deadline:
                return counts
            time.sleep(0.05)

    def timeline(self, since: float) -> list[dict[str, Any]]:
        """The relays' own account (their JSON logs): joins, shares, take-overs, stops."""
        events = []
        for relay in self.relays.values():
            for entry in relay.log_entries():
                message = str(entry.get("message", ""))
                if not message.startswith(_TIMELINE) or "ts" not in entry:
                    continue
                at = dt.datetime.fromisoformat(str(entry["ts"])).timestamp()
                item = {"t": round(at - since, 3), "relay": relay.name, "message": message}
                for key in ("gained", "lost", "gone"):
                    if key in entry:
                        item[key] = entry[key]
                events.append(item)
        return sorted(events, key=lambda item: float(item["t"]))


class LeaseWatcher:
    """Samples who holds how many partitions every 50 ms; keeps the changes."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-leases", daemon=True)

    def __enter__(self) -> LeaseWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self._url, autocommit=True)
                rows = conn.execute(HOLDERS).fetchall()
                held = {str(relay): int(count) for relay, count in rows}
                if not self.samples or self.samples[-1][1] != held:
                    self.samples.append((time.time(), held))
            except psycopg.Error:
                conn = None
            self._stop.wait(0.05)
        if conn is not None:
            conn.close()

    def first(self, after: float, condition: Any) -> float | None:
        """The first sampled time >= ``after`` at which ``condition(holders)`` held."""
        state: dict[str, int] = {}
        for at, held in self.samples:
            if at > after:
                break
            state = held
        if condition(state):
            return after
        for at, held in self.samples:
            if at > after and condition(held):
                return at
        return None

    def changes(self, since: float) -> list[dict[str, Any]]:
        return [{"t": round(at - since, 3), "holders": held} for at, held in self.samples]


# -- the gap consumer ------------------------------------------------------------------------


def _consume(url: str, queue: str, pipe: Connection) -> None:
    """Child process: note every delivery's arrival time, aggregate and message id."""
    times: list[float] = []
    aggregates: list[str] = []
    ids: list[str] = []
    distinct: set[str] = set()
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        channel.basic_qos(prefetch_count=PREFETCH)
        last_tag = [0, 0]  # delivery tag to acknowledge, unacknowledged count

        def on_message(ch: Any, method: Any, properties: Any, _body: bytes) -> None:
            times.append(time.time())
            headers = properties.headers or {}
            aggregate = headers.get("aggregate_id", "")
            if isinstance(aggregate, bytes):
                aggregate = aggregate.decode()
            aggregates.append(str(aggregate))
            ids.append(str(properties.message_id))
            distinct.add(str(properties.message_id))
            last_tag[0] = method.delivery_tag
            last_tag[1] += 1
            if last_tag[1] >= PREFETCH // 4:
                ch.basic_ack(method.delivery_tag, multiple=True)
                last_tag[1] = 0

        channel.basic_consume(queue, on_message)
        pipe.send(("ready", None))
        expected: int | None = None
        deadline = float("inf")
        complete_at: float | None = None
        while True:
            connection.process_data_events(time_limit=0.02)
            if last_tag[1]:
                channel.basic_ack(last_tag[0], multiple=True)
                last_tag[1] = 0
            if pipe.poll():
                _, expected, timeout = pipe.recv()
                deadline = time.time() + timeout
            if expected is not None:
                if complete_at is None and len(distinct) >= expected:
                    complete_at = time.time()
                # Once complete, a moment more for duplicates still on their way.
                if (complete_at is not None and time.time() > complete_at + 0.5) or (
                    time.time() > deadline
                ):
                    break
        connection.close()
        pipe.send(("done", (times, aggregates, ids)))
    except Exception as exc:
        pipe.send(("error", repr(exc)))
    finally:
        pipe.close()


class GapConsumer:
    def __init__(self, env: BenchEnv) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(
            target=_consume, args=(env.broker_url, env.queue, child_end), name="bench-gaps"
        )
        self._process.start()
        child_end.close()
        if not self._pipe.poll(60):
            self.kill()
            raise RuntimeError("the gap consumer did not start")
        kind, value = self._pipe.recv()
        if kind != "ready":
            raise RuntimeError(f"gap consumer: {value}")

    def finish(self, expected: int, timeout: float) -> tuple[list[float], list[str], list[str]]:
        """Arrival times, aggregates and message ids once ``expected`` distinct ids arrived."""
        self._pipe.send(("expect", expected, timeout))
        if not self._pipe.poll(timeout + 60):
            raise RuntimeError("the gap consumer did not report")
        kind, value = self._pipe.recv()
        self._process.join(10)
        if kind != "done":
            raise RuntimeError(f"gap consumer: {value}")
        times, aggregates, ids = value
        return times, aggregates, ids

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)


class DepthSampler:
    """The bench queue's depth (messages not yet delivered) every 100 ms."""

    def __init__(self, env: BenchEnv) -> None:
        self._env = env
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-depth", daemon=True)

    def __enter__(self) -> DepthSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        connection: Any = None
        while not self._stop.is_set():
            try:
                if connection is None or not connection.is_open:
                    connection = pika.BlockingConnection(pika.URLParameters(self._env.broker_url))
                    channel = connection.channel()
                frame = channel.queue_declare(self._env.queue, passive=True)
                self.samples.append((time.time(), int(frame.method.message_count)))
            except pika.exceptions.AMQPError:
                connection = None
            self._stop.wait(0.1)
        if connection is not None and connection.is_open:
            connection.close()


# -- gaps ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gap:
    seconds: float
    partition: int
    start: float  # arrival before the gap (time.time())
    end: float  # arrival after it


def partition_of(database_url: str, aggregates: set[str], partitions: int) -> dict[str, int]:
    """Each aggregate's partition, computed by PostgreSQL with the relay's formula."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT a, mod(hashtext(a) & 1023, %s) FROM unnest(%s::text[]) AS a",
            (partitions, sorted(aggregates)),
        ).fetchall()
    return {str(a): int(p) for a, p in rows}


def gaps_by_partition(
    times: list[float], aggregates: list[str], partition: dict[str, int]
) -> dict[int, list[Gap]]:
    """Per partition, the time between each two consecutive arrivals (duplicates count: a
    re-published event is the partition publishing)."""
    arrivals: dict[int, list[float]] = {}
    for at, aggregate in zip(times, aggregates, strict=True):
        arrivals.setdefault(partition[aggregate], []).append(at)
    gaps: dict[int, list[Gap]] = {}
    for part, seen in arrivals.items():
        seen.sort()
        gaps[part] = [Gap(b - a, part, a, b) for a, b in itertools.pairwise(seen)]
    return gaps


def longest(
    gaps: dict[int, list[Gap]],
    start: float,
    end: float,
    partitions: set[int] | None = None,
    *,
    inside: bool = False,
) -> Gap | None:
    """The longest gap overlapping [start, end) (``inside``: lying wholly within it)."""
    best: Gap | None = None
    for part, found in gaps.items():
        if partitions is not None and part not in partitions:
            continue
        for gap in found:
            if inside:
                if gap.start < start or gap.end > end:
                    continue
            elif gap.end <= start or gap.start >= end:
                continue
            if best is None or gap.seconds > best.seconds:
                best = gap
    return best


def gap_counts(
    gaps: dict[int, list[Gap]], start: float, end: float, *, inside: bool = False
) -> dict[str, int]:
    """Gaps overlapping [start, end) (``inside``: within it): all, and those over 0.5 and 1 s."""
    found = [
        gap
        for part in gaps.values()
        for gap in part
        if (
            (gap.start >= start and gap.end <= end)
            if inside
            else (gap.end > start and gap.start < end)
        )
    ]
    return {
        "gaps": len(found),
        "over_0.5s": sum(1 for gap in found if gap.seconds > 0.5),
        "over_1s": sum(1 for gap in found if gap.seconds > 1.0),
    }


def gap_report(gap: Gap | None, since: float) -> dict[str, Any] | None:
    if gap is None:
        return None
    return {
        "seconds": round(gap.seconds, 3),
        "partition": gap.partition,
        "from_t": round(gap.start - since, 3),
        "to_t": round(gap.end - since, 3),
    }


def consumer_lag(times: list[float], depths: list[tuple[float, int]]) -> float:
    """A bound on how late the consumer noted arrivals: the most messages it ever had to get
    through first (the deepest the queue was, plus PREFETCH delivered but perhaps not yet
    read) at the fastest rate it showed (arrivals in a quarter second). Arrival gaps are
    publish gaps give or take this."""
    ordered = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(ordered):
        while ordered[first] < at - 0.25:
            first += 1
        most = max(most, last - first + 1)
    if not most:
        return 0.0
    deepest = max((depth for _, depth in depths), default=0)
    return round((deepest + PREFETCH) / (most / 0.25), 3)


# -- the measurements ------------------------------------------------------------------------


class ScaleBench:
    def __init__(
        self,
        env: BenchEnv,
        sizes: Sizes,
        log_dir: Path,
        *,
        metrics: bool,
        batch_size: int | None,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.env = env
        self.sizes = sizes
        self.extra = extra or {}
        self.log_dir = log_dir
        self.metrics = metrics
        self.batch_size = batch_size
        # relay_bench's phase runner (re-runs a phase a service restart interrupted) and raw
        # publisher.
        self.runner = Bench(env, QUICK, batch_size or 0, None)

    def fleet(self) -> Fleet:
        return Fleet(
            self.env,
            self.log_dir,
            metrics=self.metrics,
            batch_size=self.batch_size,
            extra=self.extra,
        )

    def phase(self, name: str, measure: Any, *args: Any) -> Any:
        return self.runner.phase(name, measure, *args)

    @contextmanager
    def started(self, fleet: Fleet, names: list[str]) -> Iterator[None]:
        """Start ``names`` on an empty outbox and wait until they share it fairly."""
        quiet_database(self.env)
        fleet.start(*names)
        fleet.wait_balanced(names)
        yield

    # -- 1. drain rate with 1, 2, 3 relays -------------------------------------------------

    def raw(self, events: int) -> dict[str, Any]:
        result: dict[str, Any] = self.runner.raw(RAW_WINDOW, events)
        return result

    def drain(self, relays: int, aggregates: int) -> dict[str, Any]:
        events = self.sizes.events
        names = [f"scale-{n}" for n in range(1, relays + 1)]
        with self.fleet() as fleet, self.started(fleet, names):
            counter = PublishedCounter(self.env.database_url)
            try:
                base = counter.published()
                inserted_in = insert_backlog_at_once(self.env.database_url, events, aggregates)
                started = time.perf_counter()
                meter = CpuMeter(fleet.pids(), self.env.database).start()
                try:
                    finished = counter.wait_for(base + events, timeout=events / 100 + 120)
                finally:
                    cpu = meter.stop()
            finally:
                counter.close()
            if finished is None:
                raise RuntimeError(
                    f"backlog of {events} not drained: {pending(self.env.database_url)} pending"
                )
            published = fleet.published(events)
            fleet.check_running()
            fleet.stop()
            fleet.check_logs()
        seconds = finished - started
        depth = self.env.queue_depth()
        self.env.purge_queue()
        rate = events / seconds
        per_relay: dict[str, dict[str, Any]] = {
            name: {
                "cpu_percent": round(100 * meter.pid_seconds.get(relay.pid, 0.0) / meter.wall, 1),
                "published": None if published[name] is None else int(published[name] or 0),
            }
            for name, relay in fleet.relays.items()
        }
        relay_seconds = sum(meter.pid_seconds.values())
        result: dict[str, Any] = {
            "relays": relays,
            "events": events,
            "aggregates": aggregates,
            "insert_seconds": round(inserted_in, 3),
            "seconds": round(seconds, 3),
            "events_per_s": round(rate, 1),
            "queued": depth,
            "relay_cpu_percent": round(100 * relay_seconds / meter.wall, 1),
            "relay_cpu_us_per_event": round(relay_seconds * 1e6 / events, 2),
            "relay_cpu_percent_max": max(r["cpu_percent"] for r in per_relay.values()),
            "broker_cpu_percent": cpu["rabbitmq"],
            "per_relay": per_relay,
            "cpu_percent": cpu,
        }
        log(
            f"{relays} relay(s), backlog {events} over {aggregates} aggregates: "
            f"{rate:.0f} events/s, relays {result['relay_cpu_percent']} % CPU, "
            f"broker {cpu['rabbitmq']} %"
        )
        return result

    def drain_matrix(self, profiles: dict[str, int]) -> dict[str, Any]:
        events = self.sizes.events
        out: dict[str, Any] = {}
        for key, aggregates in profiles.items():
            out[key] = {
                "aggregates": aggregates or events,
                "raw": {"runs": []},
                "relays": {str(n): {"runs": []} for n in RELAY_COUNTS},
            }
        for round_ in range(1, self.sizes.rounds + 1):
            for key, entry in out.items():
                raw = self.phase(f"scale {key} round {round_} raw", self.raw, events)
                raw["round"] = round_
                entry["raw"]["runs"].append(raw)
                # The order of 1, 2 and 3 relays turns each round, so that none always runs
                # first after the raw publisher.
                shift = (round_ - 1) % len(RELAY_COUNTS)
                for count in RELAY_COUNTS[shift:] + RELAY_COUNTS[:shift]:
                    run = self.phase(
                        f"scale {key} round {round_} {count} relay(s)",
                        self.drain,
                        count,
                        entry["aggregates"],
                    )
                    run["round"] = round_
                    run["raw_just_before"] = raw["msg_per_s"]
                    entry["relays"][str(count)]["runs"].append(run)
        for entry in out.values():
            summarise(entry)
        return {
            "events": events,
            "rounds": self.sizes.rounds,
            "raw_window": RAW_WINDOW,
            "relay_batch_size": self.batch_size,
            "profiles": out,
        }

    # -- 2. take-over after a SIGKILL ------------------------------------------------------

    def takeover(self) -> dict[str, Any]:
        events = self.sizes.takeover_events
        names = ["scale-1", "scale-2", "scale-3"]
        victim = "scale-2"
        with self.fleet() as fleet, self.started(fleet, names):
            partitions = fleet.partitions()
            consumer = GapConsumer(self.env)
            try:
                with (
                    LeaseWatcher(self.env.database_url) as watcher,
                    DepthSampler(self.env) as depth,
                ):
                    victim_partitions = set(fleet.leases_of()[victim])
                    counter = PublishedCounter(self.env.database_url)
                    try:
                        base = counter.published()
                        insert_backlog_at_once(self.env.database_url, events, AGGREGATES)
                        t0 = time.time()
                        kill_after = int(events * self.sizes.kill_at)
                        if counter.wait_for(base + kill_after, timeout=events / 100 + 60) is None:
                            raise RuntimeError(f"{kill_after} events not published in time")
                        fleet.relays[victim].kill()
                        killed_at = time.time()
                        # Counted at the kill: the survivors go on publishing meanwhile.
                        published_at_kill = counter.published() - base
                        fleet.relays[victim].wait(10)
                        finished = counter.wait_for(base + events, timeout=events / 100 + 120)
                    finally:
                        counter.close()
                    if finished is None:
                        raise RuntimeError(
                            f"backlog of {events} not drained after the kill: "
                            f"{pending(self.env.database_url)} pending"
                        )
                    drained_at = time.time()
                    times, aggregates, ids = consumer.finish(events, timeout=120)
            finally:
                consumer.kill()
            fleet.check_running()
            survivors = [name for name in names if name != victim]
            held_after = fleet.holders()
            fleet.stop()
            fleet.check_logs()
            timeline = fleet.timeline(t0)
        self.env.purge_queue()
        if len(set(ids)) < events:
            raise RuntimeError(f"only {len(set(ids))} of {events} events arrived")
        partition = partition_of(self.env.database_url, set(aggregates), partitions)
        gaps = gaps_by_partition(times, aggregates, partition)
        end = max(times)
        others = set(range(partitions)) - victim_partitions
        moved = watcher.first(
            killed_at, lambda held: victim not in held and sum(held.values()) == partitions
        )
        result: dict[str, Any] = {
            "relays": 3,
            "events": events,
            "aggregates": AGGREGATES,
            "partitions": partitions,
            "victim": victim,
            "victim_partitions": sorted(victim_partitions),
            "killed_at_t": round(killed_at - t0, 3),
            "published_at_kill": published_at_kill,
            "drained_at_t": round(drained_at - t0, 3),
            "first_arrival_t": round(min(times) - t0, 3),
            "last_arrival_t": round(end - t0, 3),
            # The longest time any partition published nothing, from the kill to the end.
            "longest_gap_after_kill": gap_report(longest(gaps, killed_at, end), t0),
            "longest_gap_victim_partitions": gap_report(
                longest(gaps, killed_at, end, victim_partitions), t0
            ),
            "longest_gap_other_partitions": gap_report(longest(gaps, killed_at, end, others), t0),
            # For scale: the longest gap before the kill, with all three relays at work.
            "longest_gap_before_kill": gap_report(longest(gaps, t0, killed_at, inside=True), t0),
            "leases_moved_after_s": None if moved is None else round(moved - killed_at, 3),
            "holders_after": held_after,
            "survivors": survivors,
            "deliveries": len(ids),
            "duplicates": len(ids) - len(set(ids)),
            "consumer_lag_bound_s": consumer_lag(times, depth.samples),
            "queue_depth_max": max((d for _, d in depth.samples), default=0),
            "lease_timeline": watcher.changes(t0),
            "relay_log": timeline,
        }
        gap = result["longest_gap_after_kill"]
        log(
            f"take-over: killed {victim} at {result['killed_at_t']} s; longest partition gap "
            f"{gap['seconds'] if gap else '-'} s; leases moved in {result['leases_moved_after_s']} s"
        )
        return result

    # -- 3. rebalance pauses ---------------------------------------------------------------

    def rebalance(self) -> dict[str, Any]:
        rate, seconds = self.sizes.rebalance_rate, self.sizes.rebalance_seconds
        names = ["scale-1", "scale-2"]
        joiner, leaver = "scale-3", "scale-1"
        with self.fleet() as fleet, self.started(fleet, names):
            partitions = fleet.partitions()
            consumer = GapConsumer(self.env)
            try:
                with (
                    LeaseWatcher(self.env.database_url) as watcher,
                    DepthSampler(self.env) as depth,
                ):
                    counter = PublishedCounter(self.env.database_url)
                    try:
                        base = counter.published()
                        producers = PacedProducers(
                            self.env.database_url,
                            rate=rate,
                            seconds=seconds,
                            connections=4,
                            aggregates=AGGREGATES,
                        )
                        try:
                            # The schedule starts with the first event published.
                            if counter.wait_for(base + 1, timeout=60) is None:
                                raise RuntimeError("the producers did not start")
                            first = time.time()
                            _sleep_until(first + seconds * 0.3)
                            fleet.start(joiner)
                            spawned_at = time.time()
                            joined_at = fleet.wait_member(joiner)
                            balanced_at = fleet.wait_balanced([*names, joiner])
                            # Settled for a while, then one of three leaves.
                            _sleep_until(max(first + seconds * 0.6, balanced_at + 2.0))
                            fleet.relays[leaver].terminate()
                            terminated_at = time.time()
                            code = fleet.relays[leaver].wait(30)
                            exited_at = time.time()
                            rebalanced_at = fleet.wait_balanced(
                                [n for n in [*names, joiner] if n != leaver]
                            )
                            committed, achieved = producers.result()
                        finally:
                            producers.kill()
                        finished = counter.wait_for(base + len(committed), timeout=120)
                    finally:
                        counter.close()
                    if finished is None:
                        raise RuntimeError(
                            f"{len(committed)} events not all published: "
                            f"{pending(self.env.database_url)} pending"
                        )
                    times, aggregates, ids = consumer.finish(len(committed), timeout=120)
            finally:
                consumer.kill()
            if code != 0:
                raise RuntimeError(f"relay {leaver} exited with {code} after SIGTERM")
            fleet.check_running()
            fleet.stop()
            fleet.check_logs()
        self.env.purge_queue()
        if len(set(ids)) < len(committed):
            raise RuntimeError(f"only {len(set(ids))} of {len(committed)} events arrived")
        # The producers' child process starts its clock on its own: the first commit is t = 0.
        t0 = min(committed.values())
        produced_until = max(committed.values())
        partition = partition_of(self.env.database_url, set(aggregates), partitions)
        gaps = gaps_by_partition(times, aggregates, partition)
        # A window per event: from the joining to a second after the shares were even again;
        # from the SIGTERM to the end of production; and, for scale, two relays at work.
        windows = {
            "steady": (first + 0.5, spawned_at),
            "join": (joined_at, min(balanced_at + 1.0, terminated_at)),
            "leave": (terminated_at, produced_until),
        }
        join_gap = longest(gaps, *windows["join"])
        leave_gap = longest(gaps, *windows["leave"])
        result: dict[str, Any] = {
            "rate": rate,
            "achieved_rate": round(achieved, 1),
            "seconds": seconds,
            "events": len(committed),
            "aggregates": AGGREGATES,
            "partitions": partitions,
            "joiner": joiner,
            "leaver": leaver,
            "spawned_at_t": round(spawned_at - t0, 3),
            "joined_at_t": round(joined_at - t0, 3),
            "balanced_3_at_t": round(balanced_at - t0, 3),
            "terminated_at_t": round(terminated_at - t0, 3),
            "leaver_exited_after_s": round(exited_at - terminated_at, 3),
            "balanced_2_at_t": round(rebalanced_at - t0, 3),
            "produced_until_t": round(produced_until - t0, 3),
            # Production after the SIGTERM: the leave pause is only seen if this is long enough.
            "leave_observed_seconds": round(produced_until - terminated_at, 3),
            # The longest time a partition published nothing while the relay joined (from its
            # joining until the SIGTERM) and from the SIGTERM to the end of production.
            "longest_gap_join": gap_report(join_gap, t0),
            "longest_gap_leave": gap_report(leave_gap, t0),
            # For scale: the longest gap with two relays at work and nothing changing.
            "longest_gap_steady": gap_report(longest(gaps, *windows["steady"], inside=True), t0),
            # How many gaps each window saw, and how many were long (pauses, not chance).
            "gap_counts": {
                name: gap_counts(gaps, *window, inside=name == "steady")
                for name, window in windows.items()
            },
            "deliveries": len(ids),
            "duplicates": len(ids) - len(set(ids)),
            "consumer_lag_bound_s": consumer_lag(times, depth.samples),
            "queue_depth_max": max((d for _, d in depth.samples), default=0),
            "lease_timeline": watcher.changes(t0),
            "relay_log": fleet.timeline(t0),
        }
        log(
            f"rebalance: longest partition gap {join_gap.seconds if join_gap else '-'} s on "
            f"join, {leave_gap.seconds if leave_gap else '-'} s on SIGTERM"
        )
        return result


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


# -- summary and report ----------------------------------------------------------------------


def limits(run: dict[str, Any], raw_broker: float) -> list[str]:
    """What held a drain back (README: how to read it)."""
    found = []
    if run["broker_cpu_percent"] >= BROKER_BOUND_SHARE * raw_broker:
        found.append("broker")
    if run["relay_cpu_percent_max"] >= RELAY_BOUND_PERCENT:
        found.append("relay_cpu")
    if run["cpu_percent"]["machine_busy"] >= MACHINE_BOUND_PERCENT:
        found.append("machine")
    return found or ["waits"]


def summarise(entry: dict[str, Any]) -> None:
    raw_runs = entry["raw"]["runs"]
    raw_rate = median([r["msg_per_s"] for r in raw_runs])
    raw_broker = median([r["cpu_percent"]["rabbitmq"] for r in raw_runs])
    entry["raw"]["median"] = {
        "msg_per_s": round(raw_rate, 1),
        "publisher_cpu_us_per_msg": round(median([r["cpu_us_per_msg"] for r in raw_runs]), 2),
        "broker_cpu_percent": round(raw_broker, 1),
    }
    one = median([r["events_per_s"] for r in entry["relays"]["1"]["runs"]])
    for relays in entry["relays"].values():
        runs = relays["runs"]
        for run in runs:
            run["ratio_vs_raw_median"] = round(run["events_per_s"] / raw_rate, 3)
            run["ratio_vs_one_relay_median"] = round(run["events_per_s"] / one, 3)
            run["limited_by"] = limits(run, raw_broker)
        rate = median([r["events_per_s"] for r in runs])
        relays["median"] = {
            "events_per_s": round(rate, 1),
            "ratio_vs_one_relay": round(rate / one, 3),
            "ratio_vs_raw": round(rate / raw_rate, 3),
            "relay_cpu_percent": round(median([r["relay_cpu_percent"] for r in runs]), 1),
            "relay_cpu_percent_max": round(median([r["relay_cpu_percent_max"] for r in runs]), 1),
            "relay_cpu_us_per_event": round(median([r["relay_cpu_us_per_event"] for r in runs]), 2),
            "broker_cpu_percent": round(median([r["broker_cpu_percent"] for r in runs]), 1),
            "machine_busy_percent": round(
                median([r["cpu_percent"]["machine_busy"] for r in runs]), 1
            ),
        }
        # What limited most of the runs.
        votes: dict[str, int] = {}
        for run in runs:
            for reason in run["limited_by"]:
                votes[reason] = votes.get(reason, 0) + 1
        relays["limited_by"] = sorted(r for r, n in votes.items() if 2 * n > len(runs)) or sorted(
            votes
        )


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    for key, entry in results.get("drain", {}).get("profiles", {}).items():
        for count in ("2", "3"):
            ratio = entry["relays"][count]["median"]["ratio_vs_one_relay"]
            checks[f"drain_{key}_{count}_relays_vs_1"] = {
                "value": ratio,
                "target": f">= {TARGET_SCALE_RATIO}",
                "met": ratio >= TARGET_SCALE_RATIO,
            }
    if "takeover" in results:
        gap = results["takeover"]["longest_gap_after_kill"]
        value = gap["seconds"] if gap else None
        checks["takeover_longest_gap_s"] = {
            "value": value,
            "target": f"<= {TARGET_TAKEOVER_S:.0f}",
            "met": value is not None and value <= TARGET_TAKEOVER_S,
        }
    if "rebalance" in results:
        for what in ("join", "leave"):
            gap = results["rebalance"][f"longest_gap_{what}"]
            value = gap["seconds"] if gap else None
            checks[f"rebalance_{what}_longest_gap_s"] = {
                "value": value,
                "target": f"<= {TARGET_REBALANCE_S:.0f}",
                "met": value is not None and value <= TARGET_REBALANCE_S,
            }
    return checks


def _columns(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    checks = results["targets"]

    def mark(name: str) -> str:
        return "MET" if checks[name]["met"] else "MISSED"

    def runs(values: list[float], fmt: str) -> str:
        return " / ".join(format(v, fmt) for v in values)

    out: list[str] = []
    drain = results.get("drain")
    if drain:
        rows: list[tuple[str, ...]] = []
        for key, entry in drain["profiles"].items():
            raw = entry["raw"]
            label = f"{entry['aggregates']:,} aggregates" if key != "distinct" else "distinct"
            rows.append(
                (
                    label,
                    f"raw w{drain['raw_window']}",
                    f"{raw['median']['msg_per_s']:,.0f} "
                    f"({runs([r['msg_per_s'] for r in raw['runs']], ',.0f')})",
                    "-",
                    f"pub {raw['median']['publisher_cpu_us_per_msg']:.0f} us/msg",
                    f"{raw['median']['broker_cpu_percent']:.0f}",
                    "",
                    "ceiling",
                )
            )
            for count, relays in entry["relays"].items():
                middle = relays["median"]
                target = ""
                if count != "1":
                    target = f">= {TARGET_SCALE_RATIO:.0%} of 1: " + mark(
                        f"drain_{key}_{count}_relays_vs_1"
                    )
                rows.append(
                    (
                        "",
                        f"{count} relay{'s' if count != '1' else ''}",
                        f"{middle['events_per_s']:,.0f} "
                        f"({runs([r['events_per_s'] for r in relays['runs']], ',.0f')})",
                        f"{middle['ratio_vs_one_relay']:.2f} / {middle['ratio_vs_raw']:.2f}",
                        f"{middle['relay_cpu_percent']:.0f} % (max {middle['relay_cpu_percent_max']:.0f})"
                        f", {middle['relay_cpu_us_per_event']:.0f} us/ev",
                        f"{middle['broker_cpu_percent']:.0f}",
                        ",".join(relays["limited_by"]),
                        target,
                    )
                )
        out.append(
            f"1. Drain rate: {drain['events']:,}-event backlogs, {drain['rounds']} round(s); "
            "medians (every run)"
        )
        out.append(
            _columns(
                (
                    "backlog",
                    "run",
                    "events/s",
                    "vs 1 / vs raw",
                    "relay CPU (% of a core)",
                    "broker %",
                    "limited by",
                    "target",
                ),
                rows,
            )
        )
    rows = []
    takeover = results.get("takeover")
    if takeover:
        gap = takeover["longest_gap_after_kill"]
        before = takeover["longest_gap_before_kill"]
        rows.append(
            (
                f"2. take-over: SIGKILL 1 of 3 relays at {takeover['killed_at_t']} s of a "
                f"{takeover['events']:,}-event drain",
                f"longest partition gap {gap['seconds'] if gap else '-'} s "
                f"(before the kill {before['seconds'] if before else '-'} s); leases moved "
                f"{takeover['leases_moved_after_s']} s after; {takeover['duplicates']} dup.; "
                f"consumer lag <= {takeover['consumer_lag_bound_s']} s",
                f"<= {TARGET_TAKEOVER_S:.0f} s: {mark('takeover_longest_gap_s')}",
            )
        )
    rebalance = results.get("rebalance")
    if rebalance:
        steady = rebalance["longest_gap_steady"]
        for what, label in (("join", "a 3rd relay joins"), ("leave", "SIGTERM to 1 of 3")):
            gap = rebalance[f"longest_gap_{what}"]
            rows.append(
                (
                    f"3. rebalance: {label} ({rebalance['achieved_rate']:,.0f} events/s produced)",
                    f"longest partition gap {gap['seconds'] if gap else '-'} s (steady "
                    f"{steady['seconds'] if steady else '-'} s); consumer lag <= "
                    f"{rebalance['consumer_lag_bound_s']} s",
                    f"<= {TARGET_REBALANCE_S:.0f} s: {mark(f'rebalance_{what}_longest_gap_s')}",
                )
            )
    if rows:
        out.append(_columns(("measurement", "result", "target"), rows))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, about 2 minutes")
    parser.add_argument("--events", type=int, help="each drain backlog and raw run (100,000)")
    parser.add_argument("--rounds", type=int, help="drain rounds (3)")
    parser.add_argument(
        "--profiles",
        default=",".join(PROFILES),
        help=f"drain backlogs: {', '.join(PROFILES)} (aggregates; default both)",
    )
    parser.add_argument("--takeover-events", type=int, help="backlog of the SIGKILL phase")
    parser.add_argument(
        "--kill-at", type=float, help="share of it published when a relay is killed (0.3)"
    )
    parser.add_argument("--rebalance-rate", type=int, help="events/s during the rebalances")
    parser.add_argument("--rebalance-seconds", type=float, help="production time (20)")
    parser.add_argument("--batch-size", type=int, help="each relay's --batch-size (its default)")
    parser.add_argument(
        "--relay-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another OUTBOX_RELAY_<NAME> for every relay (e.g. poll_interval=0.2), repeatable",
    )
    parser.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="run the relays without --metrics-port (no per-relay published counts)",
    )
    parser.add_argument(
        "--only",
        default="drain,takeover,rebalance",
        help="comma-separated parts: drain, takeover, rebalance (default all)",
    )
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("OUTBOX_RELAY_TEST_DATABASE_URL", DEFAULT_ADMIN_URL),
    )
    parser.add_argument(
        "--broker-url", default=os.environ.get("OUTBOX_RELAY_TEST_BROKER_URL", DEFAULT_BROKER_URL)
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "scale-latest.json")
    parser.add_argument("--log-dir", type=Path, help="relay logs (default: a temporary directory)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if not parts or set(parts) - {"drain", "takeover", "rebalance"}:
        parser.error("--only: choose among drain, takeover, rebalance")
    keys = [k.strip() for k in args.profiles.split(",") if k.strip()]
    if not keys or set(keys) - set(PROFILES):
        parser.error(f"--profiles: choose among {', '.join(PROFILES)}")
    base = QUICK_SIZES if args.quick else FULL
    overrides = {
        "events": args.events,
        "rounds": args.rounds,
        "takeover_events": args.takeover_events,
        "kill_at": args.kill_at,
        "rebalance_rate": args.rebalance_rate,
        "rebalance_seconds": args.rebalance_seconds,
    }
    sizes = Sizes(**{**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    if min(sizes.events, sizes.rounds, sizes.takeover_events, sizes.rebalance_rate) < 1:
        parser.error("sizes must be at least 1")
    if not 0 < sizes.kill_at < 1:
        parser.error("--kill-at: between 0 and 1")
    if sizes.rebalance_seconds < 4:
        parser.error("--rebalance-seconds: at least 4")
    extra: dict[str, str] = {}
    for setting in args.relay_setting:
        name, equals, value = setting.partition("=")
        if not equals or not name.strip():
            parser.error(f"--relay-setting: {setting!r} is not NAME=VALUE")
        extra[name.strip().upper().removeprefix("OUTBOX_RELAY_")] = value
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="scale-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    started = time.time()
    load_before = uptime()
    log(f"scale bench starting ({'quick' if args.quick else 'full'}): {load_before}")
    results: dict[str, Any] = {
        "meta": {
            "started_at": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
            "quick": args.quick,
            "parts": parts,
            "sizes": sizes.__dict__,
            "relay_batch_size": args.batch_size,
            "metrics": args.metrics,
            "relay_settings": extra,
            "relay_command": relay_command(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "relay_version": code_version(),
            "uptime_before": load_before,
            "log_dir": str(log_dir),
        }
    }
    with bench_env(args.admin_url, args.broker_url) as env:
        bench = ScaleBench(
            env, sizes, log_dir, metrics=args.metrics, batch_size=args.batch_size, extra=extra
        )
        if "drain" in parts:
            results["drain"] = bench.drain_matrix({k: PROFILES[k] for k in keys})
        if "takeover" in parts:
            results["takeover"] = bench.phase("take-over", bench.takeover)
        if "rebalance" in parts:
            results["rebalance"] = bench.phase("rebalance", bench.rebalance)
        results["meta"]["phases_run_again"] = bench.runner.interrupted
    results["targets"] = verdicts(results)
    results["meta"]["seconds"] = round(time.time() - started, 1)
    results["meta"]["uptime_after"] = uptime()

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    print(f"\nload before: {load_before}\nload after:  {results['meta']['uptime_after']}")
    print(f"took {results['meta']['seconds']} s; results in {args.output}; relay logs in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
