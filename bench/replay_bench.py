"""Replay bench (issue 17): kept events replayed to a second exchange, complete and in order.

    .venv/bin/python bench/replay_bench.py                          # 100,000 events, 1,000 aggregates
    .venv/bin/python bench/replay_bench.py --events 5000 --aggregates 100

1. Fill: a backlog inserted with SQL (event g: aggregate g mod A, sequence g div A in its payload,
   created at base + g ms) is sent by a real relay (bench/relay_process.py, ``--on-sent keep``)
   until the outbox is empty and outbox_sent holds every event.
2. ``outbox-relay replay`` (the console script, a subprocess) by time window and by aggregate to
   a second exchange with its own queue; each run right after a raw pipelined-confirm publisher
   (bench/raw_publisher.py) sent as many messages with the window strict per-aggregate order
   allows. The received set must be the expected set exactly, each aggregate's sequence numbers
   increasing, every message marked ``outbox-replay: true``.
3. A full replay interrupted (SIGINT, then SIGKILL) after about a third arrived, then
   ``replay --resume --name``: complete, in order across both parts, duplicates within the
   in-flight bound.

Creates its own database, exchanges and queues and removes them; prints a table and writes
bench/results/replay-latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import raw_publisher
from bench_setup import AGGREGATE_TYPE, EVENT_TYPE, PAD, BenchEnv, amqp_channel, bench_env
from relay_bench import DEFAULT_ADMIN_URL, DEFAULT_BROKER_URL, RESULTS, code_version, log, uptime
from relay_process import RelayProcess
from scale_bench import relay_command

from outbox_relay.relay.replay import REPLAY_HEADER, REPLAY_HEADER_VALUE, ReplaySettings

# The replay's own default: at most this many events read and not yet confirmed.
DEFAULT_REPLAY_BATCH = int(ReplaySettings.model_fields["batch_size"].default)

# Event g (from 0): aggregate g mod A, its sequence number within the aggregate g div A, created
# at base + g ms. Inserted in g order, so ids (and per-aggregate commit order) follow g.
FILL_SQL = (
    "INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload, created_at)"
    " SELECT %(type)s, %(aggregate_type)s, mod(g, %(aggregates)s)::text,"
    "        jsonb_build_object('n', g, 'seq', g / %(aggregates)s, 'pad', %(pad)s::text),"
    "        %(base)s::timestamptz + g * interval '1 millisecond'"
    " FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g ORDER BY g"
)
FILL_CHUNK = 10_000

SUMMARY = re.compile(r"replayed (\d+) events .* in ([0-9.]+) s")


@dataclass(frozen=True)
class Received:
    event_id: str
    aggregate_id: str
    n: int
    seq: int
    replay_header: Any


@dataclass(frozen=True)
class Destination:
    """The second exchange and its queue (bound with '#'): where replays go."""

    broker_url: str
    exchange: str
    queue: str

    def depth(self, channel: Any = None) -> int:
        if channel is None:
            with amqp_channel(self.broker_url) as channel:
                return self.depth(channel)
        frame = channel.queue_declare(self.queue, passive=True)
        return int(frame.method.message_count)

    def purge(self) -> None:
        with amqp_channel(self.broker_url) as channel:
            channel.queue_purge(self.queue)

    def receive_all(self, idle: float = 5.0) -> list[Received]:
        """Everything in the queue, in queue order: as many messages as it holds now (what a
        replay that exited left there), or fewer if none comes for ``idle`` seconds."""
        got: list[Received] = []
        with amqp_channel(self.broker_url) as channel:
            holds = self.depth(channel)
            channel.basic_qos(prefetch_count=2000)
            for method, properties, body in channel.consume(
                self.queue, auto_ack=True, inactivity_timeout=idle
            ):
                if method is None:
                    break
                headers = dict(properties.headers or {})
                payload = json.loads(body)
                got.append(
                    Received(
                        str(properties.message_id),
                        str(headers.get("aggregate_id")),
                        int(payload["n"]),
                        int(payload["seq"]),
                        headers.get(REPLAY_HEADER),
                    )
                )
                if len(got) >= holds:
                    break
            channel.cancel()
        return got


@contextmanager
def destination(env: BenchEnv) -> Iterator[Destination]:
    name = f"{env.exchange}.replay"
    target = Destination(env.broker_url, name, name)
    with amqp_channel(env.broker_url) as channel:
        channel.exchange_declare(name, "topic", durable=True)
        channel.queue_declare(name, durable=True)
        channel.queue_bind(name, name, "#")
    try:
        yield target
    finally:
        with amqp_channel(env.broker_url) as channel:
            channel.queue_delete(name)
            channel.exchange_delete(name)


# -- 1. fill ----------------------------------------------------------------------------------


def fill(env: BenchEnv, events: int, aggregates: int, base: dt.datetime) -> dict[str, Any]:
    """The backlog, inserted with the relay stopped, then sent and kept by a real relay."""
    started = time.perf_counter()
    with psycopg.connect(env.database_url) as conn:
        for first in range(0, events, FILL_CHUNK):
            conn.execute(
                FILL_SQL,
                {
                    "type": EVENT_TYPE,
                    "aggregate_type": AGGREGATE_TYPE,
                    "aggregates": aggregates,
                    "pad": PAD,
                    "base": base,
                    "first": first,
                    "last": min(events, first + FILL_CHUNK) - 1,
                },
            )
            conn.commit()
        conn.execute("ANALYZE outbox")
        conn.commit()
    inserted = time.perf_counter() - started
    log(f"fill: {events:,} events inserted in {inserted:.1f} s; relay sending them (keep)")
    settings = {
        "database_url": env.database_url,
        "broker_url": env.broker_url,
        "exchange": env.exchange,
        "on_sent": "keep",
    }
    with RelayProcess(settings) as relay:
        relay_started = time.perf_counter()
        relay.go()
        relay.wait_leading()
        deadline = time.monotonic() + events / 500 + 120
        with psycopg.connect(env.database_url, autocommit=True) as conn:
            while True:
                left = _value(conn, "SELECT count(*) FROM outbox")
                if left == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fill: the relay left {left} events unsent")
                time.sleep(0.25)
            sent_seconds = time.perf_counter() - relay_started
            kept = _value(conn, "SELECT count(*) FROM outbox_sent")
            partitions = _value(
                conn, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'outbox_sent'::regclass"
            )
        relay.stop()
    queued = env.queue_depth()
    env.purge_queue()
    log(f"fill: sent and kept in {sent_seconds:.1f} s ({events / sent_seconds:,.0f} events/s)")
    return {
        "method": "relay (bench/relay_process.py, on_sent keep) over an SQL backlog",
        "events": events,
        "aggregates": aggregates,
        "base": base.isoformat(),
        "insert_seconds": round(inserted, 2),
        "relay_seconds": round(sent_seconds, 2),
        "relay_events_per_s": round(events / sent_seconds, 1),
        "kept": kept,
        "kept_partitions": partitions,
        "queued_on_relay_exchange": queued,
        "ok": kept == events and queued == events,
    }


def _value(conn: psycopg.Connection[Any], query: str) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def expected(env: BenchEnv, where: str, params: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """event_id -> (aggregate_id, sequence) of the kept events matching ``where`` (over the
    payload's n and the aggregate id, independently of the replay's own query)."""
    with psycopg.connect(env.database_url) as conn:
        rows = conn.execute(
            "SELECT event_id::text, aggregate_id, (payload->>'seq')::int FROM outbox_sent"
            f" WHERE {where}",
            params,
        ).fetchall()
    return {event_id: (aggregate, seq) for event_id, aggregate, seq in rows}


# -- the replay, as a user runs it ------------------------------------------------------------


class Replay:
    """``outbox-relay replay`` subprocesses to one destination, configured by environment."""

    def __init__(self, env: BenchEnv, target: Destination, batch_size: int) -> None:
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_")},
            "OUTBOX_RELAY_DATABASE_URL": env.database_url,
            "OUTBOX_RELAY_BROKER_URL": target.broker_url,
            "OUTBOX_RELAY_EXCHANGE": target.exchange,
        }
        self.database_url = env.database_url
        self.batch_size = batch_size

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*relay_command(), "replay", *args, "--batch-size", str(self.batch_size)],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, *args: str, timeout: float = 600) -> dict[str, Any]:
        """Run to the end; the CLI's own figures (its summary line) and the wall time."""
        started = time.perf_counter()
        process = self.start(*args)
        out, err = process.communicate(timeout=timeout)
        wall = time.perf_counter() - started
        return self.outcome(process, out, err, wall)

    @staticmethod
    def outcome(process: subprocess.Popen[str], out: str, err: str, wall: float) -> dict[str, Any]:
        match = SUMMARY.search(out)
        result: dict[str, Any] = {
            "exit_code": process.returncode,
            "wall_seconds": round(wall, 2),
            "summary": match.group(0) if match else None,
        }
        if match:
            replayed, seconds = int(match.group(1)), float(match.group(2))
            result.update(
                replayed=replayed,
                seconds=seconds,
                # The summary gives tenths of a second: a replay shorter than that has no rate.
                events_per_s=round(replayed / seconds, 1) if seconds else None,
                under_resolution=not seconds,
            )
        if process.returncode not in (0, 130) or "Traceback" in err:
            result["stderr"] = err[-2000:]
        return result

    def saved(self, name: str) -> dict[str, Any]:
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute(
                "SELECT position, upper_id, replayed, state FROM outbox_replays WHERE name = %s",
                (name,),
            ).fetchone()
        if row is None:
            return {}
        return dict(zip(("position", "upper_id", "replayed", "state"), row, strict=True))


def inversions(messages: Sequence[Received]) -> int:
    """Messages whose sequence number is not above the one before of their aggregate."""
    last: dict[str, int] = {}
    count = 0
    for message in messages:
        if message.seq <= last.get(message.aggregate_id, -1):
            count += 1
        last[message.aggregate_id] = message.seq
    return count


def check(
    received: Sequence[Received], wanted: dict[str, tuple[str, int]], duplicates_allowed: int = 0
) -> dict[str, Any]:
    """The received messages against the expected events: complete, nothing else, duplicates
    within ``duplicates_allowed``, each aggregate's sequence numbers increasing (by each event's
    first arrival: a duplicate repeats what came before it), every message marked."""
    counts = Counter(message.event_id for message in received)
    got = set(counts)
    firsts: list[Received] = []
    seen: set[str] = set()
    for message in received:
        if message.event_id not in seen:
            seen.add(message.event_id)
            firsts.append(message)
    wrong_aggregate = sum(
        1
        for message in firsts
        if message.event_id in wanted
        and wanted[message.event_id] != (message.aggregate_id, message.seq)
    )
    out_of_order = inversions(firsts)
    duplicates = len(received) - len(got)
    result = {
        "expected": len(wanted),
        "received": len(received),
        "distinct": len(got),
        "missing": len(wanted.keys() - got),
        "unexpected": len(got - wanted.keys()),
        "duplicates": duplicates,
        "duplicates_allowed": duplicates_allowed,
        "out_of_order": out_of_order,
        "wrong_aggregate_or_sequence": wrong_aggregate,
        "without_replay_header": sum(
            1 for message in received if message.replay_header != REPLAY_HEADER_VALUE
        ),
        "aggregates": len({message.aggregate_id for message in firsts}),
    }
    result["complete"] = result["missing"] == 0 and result["unexpected"] == 0
    result["in_order"] = out_of_order == 0 and wrong_aggregate == 0
    result["ok"] = (
        result["complete"]
        and result["in_order"]
        and duplicates <= duplicates_allowed
        and result["without_replay_header"] == 0
    )
    return result


# -- the ceiling ------------------------------------------------------------------------------


def raw(env: BenchEnv, count: int, window: int) -> dict[str, Any]:
    """bench/raw_publisher.py in a child process: ``count`` messages to the bench exchange with
    ``window`` unconfirmed; the bench queue is emptied afterwards."""
    value = raw_publisher.run(env.broker_url, env.exchange, count, window)
    queued = env.queue_depth()
    env.purge_queue()
    return {
        "messages": count,
        "window": window,
        "msg_per_s": value["msg_per_s"],
        "seconds": value["seconds"],
        "queued": queued,
    }


# -- 2. by time window and by aggregate -------------------------------------------------------


def selective(
    env: BenchEnv,
    target: Destination,
    replay: Replay,
    kind: str,
    args: Sequence[str],
    wanted: dict[str, tuple[str, int]],
    window: int,
) -> dict[str, Any]:
    """The raw ceiling for as many messages, then the replay; what arrived, checked."""
    ceiling = raw(env, len(wanted), window)
    target.purge()
    log(f"{kind}: raw publisher {ceiling['msg_per_s']:,.0f} msg/s (window {window})")
    run = replay.run(*args)
    received = target.receive_all()
    verdict = check(received, wanted)
    rate = run.get("events_per_s")
    log(
        f"{kind}: replayed {run.get('replayed')} at {rate} events/s; received "
        f"{len(received):,}, ok={verdict['ok']}"
    )
    return {
        "selection": list(args),
        "replay": run,
        "raw": ceiling,
        "ratio_vs_raw": round(rate / ceiling["msg_per_s"], 3) if rate else None,
        "check": verdict,
        "ok": verdict["ok"] and run["exit_code"] == 0,
    }


# -- 3. interrupted and resumed ---------------------------------------------------------------


def interrupted(
    target: Destination,
    replay: Replay,
    how: signal.Signals,
    wanted: dict[str, tuple[str, int]],
    bound: int,
    at: float,
) -> dict[str, Any]:
    """A full replay stopped by ``how`` once ``at`` of it arrived, then resumed by name."""
    name = f"bench-{how.name.lower()}"
    target.purge()
    threshold = max(1, int(len(wanted) * at))
    started = time.perf_counter()
    process = replay.start("--all", "--name", name)
    depth_at_signal = -1
    try:
        with amqp_channel(target.broker_url) as channel:
            while process.poll() is None:
                depth = target.depth(channel)
                if depth >= threshold:
                    process.send_signal(how)
                    depth_at_signal = depth
                    break
                time.sleep(0.01)
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    first = Replay.outcome(process, out, err, time.perf_counter() - started)
    first["received_at_signal"] = depth_at_signal
    first["received_by_exit"] = target.depth()
    first["saved"] = replay.saved(name)
    signalled = depth_at_signal >= 0
    log(
        f"{how.name}: signalled at {depth_at_signal:,} received, exit {process.returncode}, "
        f"{first['received_by_exit']:,} received by then, saved {first['saved']}"
    )
    # Finished before the signal, or everything was read before it (a selection smaller than
    # --batch-size): done, there is nothing to resume.
    done = first["saved"].get("state") == "done"
    resumed = None if done else replay.run("--resume", "--name", name)
    received = target.receive_all()
    allowed = 0 if how is signal.SIGINT else bound
    verdict = check(received, wanted, allowed)
    # Each part on its own, resent events included, is in order too.
    before = first["received_by_exit"]
    verdict["out_of_order_within_parts"] = [
        inversions(received[:before]),
        inversions(received[before:]),
    ]
    verdict["in_order"] = verdict["in_order"] and not any(verdict["out_of_order_within_parts"])
    verdict["ok"] = verdict["ok"] and verdict["in_order"]
    log(
        f"{how.name}: resumed, exit {resumed and resumed['exit_code']}; "
        f"{verdict['duplicates']} duplicates (allowed {allowed}), ok={verdict['ok']}"
    )
    expected_exit = 128 + int(how) if how is signal.SIGINT else -int(how)
    return {
        "signal": how.name,
        "name": name,
        "interrupted": signalled and process.returncode == expected_exit and not done,
        "first": first,
        "resumed": resumed,
        "check": verdict,
        "ok": verdict["ok"] and (resumed is None or resumed["exit_code"] == 0),
    }


# -- report -----------------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    header = (
        "phase",
        "expected",
        "received",
        "missing",
        "dupes",
        "allowed",
        "order",
        "header",
        "events/s",
        "raw msg/s",
        "ratio",
        "ok",
    )
    rows: list[tuple[str, ...]] = []

    def row(label: str, entry: dict[str, Any], rate: Any, ceiling: Any, ratio: Any) -> None:
        c = entry["check"]
        rows.append(
            (
                label,
                f"{c['expected']:,}",
                f"{c['received']:,}",
                str(c["missing"] + c["unexpected"]),
                str(c["duplicates"]),
                str(c["duplicates_allowed"]),
                "ok" if c["in_order"] else f"{c['out_of_order']} out",
                "ok" if not c["without_replay_header"] else f"{c['without_replay_header']} no",
                f"{rate:,.0f}" if rate else "-",
                f"{ceiling:,.0f}" if ceiling else "-",
                f"{ratio:.2f}" if ratio else "-",
                "yes" if entry["ok"] else "NO",
            )
        )

    for key, label in (("window", "time window"), ("aggregate", "by aggregate")):
        entry = results[key]
        rate = entry["replay"].get("events_per_s")
        row(label, entry, rate, entry["raw"]["msg_per_s"], entry["ratio_vs_raw"])
    for entry in results["interrupt"]:
        how = entry["signal"] + ("" if entry["interrupted"] else " (not interrupted)")
        rate = entry["resumed"].get("events_per_s") if entry["resumed"] else None
        row(f"{how} + resume", entry, rate, None, None)
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True))
        for r in (header, *rows)
    ]
    fill_ = results["fill"]
    title = (
        f"Replay of {fill_['events']:,} kept events over {fill_['aggregates']:,} aggregates "
        f"(sent by a relay at {fill_['relay_events_per_s']:,.0f} events/s); replay --batch-size "
        f"{results['meta']['replay_batch_size']}, in-flight bound "
        f"{results['meta']['in_flight_bound']}"
    )
    return "\n".join([title, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=100_000, help="kept events (100,000)")
    parser.add_argument("--aggregates", type=int, default=1000, help="over this many (1,000)")
    parser.add_argument(
        "--replay-aggregates",
        type=int,
        default=50,
        help="aggregates replayed by --aggregate-id (50; at most half of --aggregates)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_REPLAY_BATCH,
        help=f"the replay's --batch-size (its default, {DEFAULT_REPLAY_BATCH})",
    )
    parser.add_argument(
        "--interrupt-at",
        type=float,
        default=1 / 3,
        help="share of a full replay received before the signal (1/3)",
    )
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("OUTBOX_RELAY_TEST_DATABASE_URL", DEFAULT_ADMIN_URL),
        help="PostgreSQL maintenance database (the bench creates its own next to it)",
    )
    parser.add_argument(
        "--broker-url", default=os.environ.get("OUTBOX_RELAY_TEST_BROKER_URL", DEFAULT_BROKER_URL)
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "replay-latest.json")
    args = parser.parse_args(argv)
    if args.events < 10 or args.aggregates < 2 or args.aggregates > args.events:
        parser.error("--events at least 10, --aggregates from 2 to --events")
    if not 0 < args.interrupt_at < 1:
        parser.error("--interrupt-at: a share between 0 and 1")
    picked = max(1, min(args.replay_aggregates, args.aggregates // 2))
    # Every kept event is read again: the bound on resent events after a kill is what is in
    # flight (--batch-size) plus one page (half of it) confirmed since the last save.
    bound = args.batch_size + max(1, args.batch_size // 2)

    started = time.time()
    load_before = uptime()
    log(f"replay bench: {args.events:,} events, {args.aggregates:,} aggregates; {load_before}")
    base = dt.datetime.fromtimestamp(started, dt.UTC).replace(
        minute=0, second=0, microsecond=0
    ) - dt.timedelta(days=1)
    results: dict[str, Any] = {
        "meta": {
            "started_at": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
            "events": args.events,
            "aggregates": args.aggregates,
            "replay_aggregates": picked,
            "replay_batch_size": args.batch_size,
            "in_flight_bound": bound,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "relay_version": code_version(),
            "uptime_before": load_before,
        }
    }
    with bench_env(args.admin_url, args.broker_url) as env, destination(env) as target:
        results["meta"].update(database=env.database, destination=target.exchange)
        results["fill"] = fill(env, args.events, args.aggregates, base)
        replay = Replay(env, target, args.batch_size)
        # Strict per-aggregate order allows one unconfirmed event per aggregate: the raw
        # publisher gets as many (at most --batch-size) for a fair ceiling.
        window_of = min(args.aggregates, args.batch_size)

        # The middle 60 % by creation time: g in [lo, hi).
        lo, hi = args.events // 5, args.events * 4 // 5
        since = base + dt.timedelta(milliseconds=lo)
        until = base + dt.timedelta(milliseconds=hi)
        wanted = expected(
            env,
            "(payload->>'n')::bigint >= %(lo)s AND (payload->>'n')::bigint < %(hi)s",
            {"lo": lo, "hi": hi},
        )
        selection = ("--since", since.isoformat(), "--until", until.isoformat())
        results["window"] = selective(
            env,
            target,
            replay,
            "time window",
            (*selection, "--name", "bench-window"),
            wanted,
            window_of,
        )

        ids = [str(i * args.aggregates // picked) for i in range(picked)]
        wanted = expected(env, "aggregate_id = ANY(%(ids)s)", {"ids": ids})
        by_id = [flag for aggregate in ids for flag in ("--aggregate-id", aggregate)]
        results["aggregate"] = selective(
            env,
            target,
            replay,
            "by aggregate",
            (*by_id, "--name", "bench-aggregates"),
            wanted,
            min(picked, args.batch_size),
        )

        everything = expected(env, "true", {})
        results["interrupt"] = [
            interrupted(target, replay, how, everything, bound, args.interrupt_at)
            for how in (signal.SIGINT, signal.SIGKILL)
        ]
    sigint, sigkill = results["interrupt"]
    results["verdicts"] = {
        "fill": results["fill"]["ok"],
        "window_complete_in_order": results["window"]["ok"],
        "aggregate_complete_in_order": results["aggregate"]["ok"],
        "sigint_resume_nothing_twice": sigint["ok"],
        "sigkill_resume_within_in_flight_bound": sigkill["ok"],
        "interrupted_mid_way": sigint["interrupted"] and sigkill["interrupted"],
    }
    results["meta"]["seconds"] = round(time.time() - started, 1)
    results["meta"]["uptime_after"] = uptime()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    print(f"\nverdicts: {json.dumps(results['verdicts'])}")
    print(f"load before: {load_before}\nload after:  {results['meta']['uptime_after']}")
    print(f"took {results['meta']['seconds']} s; results in {args.output}")
    return 0 if all(results["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
