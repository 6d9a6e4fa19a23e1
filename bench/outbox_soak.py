"""Outbox soak: producers at a steady rate the relay keeps up with, for a long time, sampled.

    .venv/bin/python bench/outbox_soak.py                       # 3,000 events/s, 30 min per mode
    .venv/bin/python bench/outbox_soak.py --minutes 2 --rate 500 --modes keep

For each --on-sent mode (delete, keep) in a fresh database of its own: a real relay (a child
process, bench/relay_process.py) and paced single-row producer transactions (a child process,
bench/producers.py). Every --sample-seconds (30): commit-to-confirm p50/p99 of the events
confirmed in the interval, the relay's claim and settle time per call, the outbox's table and
index sizes, its dead tuples and autovacuum runs, the producers' transaction rate and the
pending backlog. Writes bench/results/soak-latest.json, prints a table per mode, and records
where it degrades: the last sample against the first, and the first sample past each limit.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from bench_setup import BenchEnv, bench_env
from producers import StreamingProducers, pending
from relay_bench import (
    DEFAULT_ADMIN_URL,
    DEFAULT_BROKER_URL,
    RESULTS,
    code_version,
    log,
    percentile,
    uptime,
)
from relay_process import RelayProcess

from outbox_relay.relay.settings import DEFAULT_BATCH_SIZE

MODES = ("delete", "keep")
# Where the issue draws the line: p99 at the end within 1.5x of the start, producers within 5%.
P99_LIMIT = 1.5
PRODUCER_LIMIT = 0.95

TABLE_STATS = """
SELECT pg_total_relation_size('outbox'), pg_relation_size('outbox'), pg_indexes_size('outbox'),
       s.n_live_tup, s.n_dead_tup, s.autovacuum_count, s.autoanalyze_count, s.vacuum_count
FROM pg_stat_user_tables AS s
WHERE s.relid = 'outbox'::regclass
"""


# Sent events kept in partitions of outbox_sent (migration 0006; 0 before it).
KEPT_BYTES = """
SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0)::bigint, count(i.inhrelid)
FROM pg_inherits AS i WHERE i.inhparent = to_regclass('outbox_sent')
"""

# Producers waiting on a lock now, and for how long their statement has run: the soak's lock
# waits (retention must never make a producer wait). The relay's sessions name themselves.
# Waits for the ordering lock (advisory: two producers writing the same bucket of aggregates at
# once, by design) are counted apart from every other lock (relations, rows, transactions).
PRODUCER_LOCK_WAITS = """
SELECT coalesce(max(extract(epoch FROM clock_timestamp() - a.query_start) * 1000)
                FILTER (WHERE a.wait_event <> 'advisory'), 0)::float8,
       count(*) FILTER (WHERE a.wait_event <> 'advisory'),
       coalesce(max(extract(epoch FROM clock_timestamp() - a.query_start) * 1000)
                FILTER (WHERE a.wait_event = 'advisory'), 0)::float8
FROM pg_stat_activity AS a
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
  AND a.backend_type = 'client backend' AND a.wait_event_type = 'Lock'
  AND a.application_name NOT LIKE 'outbox-relay%%'
"""
LOCK_SAMPLE_EVERY = 0.05


class LockWaits:
    """Samples producers' lock waits every LOCK_SAMPLE_EVERY seconds in a thread; take() gives,
    since the last take, the longest wait for a lock other than the ordering lock, how many
    samples saw one, and the longest wait for the ordering lock."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._longest = 0.0
        self._seen = 0
        self._ordering = 0.0
        self._thread = threading.Thread(target=self._run, name="lock-waits", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with psycopg.connect(self._url, autocommit=True) as conn:
            while not self._stop.wait(LOCK_SAMPLE_EVERY):
                row = conn.execute(PRODUCER_LOCK_WAITS).fetchone()
                if row is None:
                    continue
                with self._lock:
                    self._longest = max(self._longest, float(row[0]))
                    self._seen += int(row[1])
                    self._ordering = max(self._ordering, float(row[2]))

    def take(self) -> tuple[float, int, float]:
        with self._lock:
            taken = (round(self._longest, 1), self._seen, round(self._ordering, 1))
            self._longest, self._seen, self._ordering = 0.0, 0, 0.0
        return taken

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


WINDOW_MINUTES = 5.0


def _median(values: list[Any]) -> float | None:
    present = sorted(value for value in values if value is not None)
    return float(statistics.median(present)) if present else None


def _ms(values: list[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if math.isnan(value) else round(value, 2)


class Step:
    """A relay step's cumulative calls and seconds, to tell its cost per call per interval."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.seconds = 0.0

    def per_call_ms(self, steps: dict[str, Any]) -> float | None:
        now = steps.get(self.name, {"calls": 0, "seconds": 0.0})
        calls, seconds = now["calls"] - self.calls, now["seconds"] - self.seconds
        self.calls, self.seconds = now["calls"], now["seconds"]
        return round(seconds / calls * 1000, 3) if calls else None


def table_stats(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(TABLE_STATS).fetchone()
        kept = conn.execute(KEPT_BYTES).fetchone()
    assert row is not None
    assert kept is not None
    keys = (
        "total_bytes",
        "table_bytes",
        "index_bytes",
        "live_tuples",
        "dead_tuples",
        "autovacuum_count",
        "autoanalyze_count",
        "vacuum_count",
        "kept_bytes",
        "kept_partitions",
    )
    return dict(zip(keys, (int(value) for value in (*row, *kept)), strict=True))


def soak(env: BenchEnv, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One mode's run: the samples and the verdicts."""
    settings: dict[str, Any] = {
        "database_url": env.database_url,
        "broker_url": env.broker_url,
        "exchange": env.exchange,
        "on_sent": mode,
        "batch_size": args.batch_size,
    }
    if mode == "keep" and args.retention:
        settings["retention"] = args.retention
    seconds = args.minutes * 60
    samples: list[dict[str, Any]] = []
    # Either end of an event seen and not yet matched with the other (a confirm can come before
    # the producer's take that carries its commit): event_id -> time.
    committed_at: dict[str, float] = {}
    confirmed_at: dict[str, float] = {}
    claim, settle = Step("claim"), Step("settle")
    with RelayProcess(settings, clock=True) as relay:
        relay.go()
        relay.wait_leading()
        # Producers run past the last sample, so every sample covers a whole interval at the rate.
        intervals = max(1, round(seconds / args.sample_seconds))
        producers = StreamingProducers(
            env.database_url,
            args.rate,
            intervals * args.sample_seconds + 10,
            args.connections,
            args.aggregates,
        )
        waits = LockWaits(env.database_url)
        try:
            # The first second (connections, the first ticks) is not measured; its events
            # still count for latency matching.
            time.sleep(1.0)
            committed, started, _producing = producers.take()
            committed_at.update(committed)
            confirmed, steps = relay.sample()
            confirmed_at.update(confirmed)
            claim.per_call_ms(steps)  # the baselines
            settle.per_call_ms(steps)
            last = started
            for number in range(1, intervals + 1):
                time.sleep(max(0.0, started + number * args.sample_seconds - time.time()))
                committed, now, _producing = producers.take()
                confirmed, steps = relay.sample()
                committed_at.update(committed)
                confirmed_at.update(confirmed)
                both = [event_id for event_id in confirmed_at if event_id in committed_at]
                latencies = sorted(
                    (confirmed_at.pop(event_id) - committed_at.pop(event_id)) * 1000
                    for event_id in both
                )
                stats = table_stats(env.database_url)
                longest_wait, waits_seen, ordering_wait = waits.take()
                sample = {
                    "minute": round((now - started) / 60, 2),
                    "producer_tx_per_s": round(len(committed) / max(now - last, 1e-9), 1),
                    "confirmed": len(latencies),
                    "commit_to_confirm_p50_ms": _ms(latencies, 50),
                    "commit_to_confirm_p99_ms": _ms(latencies, 99),
                    "claim_ms_per_call": claim.per_call_ms(steps),
                    "settle_ms_per_call": settle.per_call_ms(steps),
                    "pending": pending(env.database_url),
                    "producer_lock_wait_max_ms": longest_wait,
                    "producer_lock_wait_samples": waits_seen,
                    "producer_ordering_lock_wait_max_ms": ordering_wait,
                    "load1": round(os.getloadavg()[0], 2),
                    **stats,
                }
                samples.append(sample)
                log(
                    f"{mode} {sample['minute']:6.2f} min: {sample['producer_tx_per_s']:.0f} tx/s, "
                    f"p99 {sample['commit_to_confirm_p99_ms']} ms, outbox "
                    f"{stats['total_bytes'] / 2**20:.1f} MiB, {stats['dead_tuples']} dead tuples, "
                    f"kept {stats['kept_bytes'] / 2**20:.1f} MiB, longest producer lock wait (not ordering) "
                    f"{longest_wait} ms"
                )
                # The bench queue would hold every event: emptied at each sample.
                env.purge_queue()
                last = now
        finally:
            waits.close()
            producers.close()
        relay.stop()
    return {"mode": mode, "samples": samples, "degradation": degradation(samples)}


def degradation(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The last sample against the first, per figure, and where each limit was first passed."""
    if not samples:
        return {}
    first, last = samples[0], samples[-1]
    ratios: dict[str, float | None] = {}
    for key in (
        "commit_to_confirm_p50_ms",
        "commit_to_confirm_p99_ms",
        "claim_ms_per_call",
        "settle_ms_per_call",
        "producer_tx_per_s",
        "total_bytes",
        "index_bytes",
        "kept_bytes",
    ):
        a, b = first.get(key), last.get(key)
        ratios[key] = round(b / a, 3) if a and b is not None else None
    p99_first = first.get("commit_to_confirm_p99_ms")
    rate_first = first.get("producer_tx_per_s")

    def first_minute(passed: Any) -> float | None:
        return next((s["minute"] for s in samples[1:] if passed(s)), None)

    # One 30-second sample's p99 swings by 2x on a busy 2-core machine; the medians of the
    # first and last WINDOW_MINUTES of samples say the same without the swing.
    windowed: dict[str, float | None] = {}
    for key in ("commit_to_confirm_p99_ms", "producer_tx_per_s", "total_bytes"):
        early = _median([s[key] for s in samples if s["minute"] <= WINDOW_MINUTES])
        late = _median(
            [s[key] for s in samples if s["minute"] >= last["minute"] - WINDOW_MINUTES + 0.01]
        )
        windowed[key] = round(late / early, 3) if early and late is not None else None
    return {
        "last_vs_first": ratios,
        "last_vs_first_5min_medians": windowed,
        # The verdicts: the end against the start, each a WINDOW_MINUTES median.
        "p99_within_1_5x": windowed["commit_to_confirm_p99_ms"] is not None
        and windowed["commit_to_confirm_p99_ms"] <= P99_LIMIT,
        "producer_within_5pct": windowed["producer_tx_per_s"] is not None
        and windowed["producer_tx_per_s"] >= PRODUCER_LIMIT,
        "p99_past_1_5x_at_minute": first_minute(
            lambda s: (
                p99_first
                and s["commit_to_confirm_p99_ms"] is not None
                and s["commit_to_confirm_p99_ms"] > P99_LIMIT * p99_first
            )
        ),
        "producer_below_95pct_at_minute": first_minute(
            lambda s: rate_first and s["producer_tx_per_s"] < PRODUCER_LIMIT * rate_first
        ),
        "largest_total_bytes": max(s["total_bytes"] for s in samples),
        "largest_dead_tuples": max(s["dead_tuples"] for s in samples),
        "largest_kept_bytes": max(s.get("kept_bytes", 0) for s in samples),
        "longest_producer_lock_wait_ms": max(
            s.get("producer_lock_wait_max_ms", 0.0) for s in samples
        ),
        "vacuums": last["vacuum_count"] - first["vacuum_count"],
        "autovacuum_runs": last["autovacuum_count"] - first["autovacuum_count"],
    }


def render(results: dict[str, Any]) -> str:
    header = (
        "minute",
        "tx/s",
        "p50 ms",
        "p99 ms",
        "claim ms",
        "settle ms",
        "table MiB",
        "index MiB",
        "dead tup",
        "vacuums",
        "kept MiB",
        "lock wait ms",
        "pending",
    )
    out: list[str] = []
    for run in results["runs"]:
        rows = [
            (
                f"{s['minute']:.2f}",
                f"{s['producer_tx_per_s']:.0f}",
                str(s["commit_to_confirm_p50_ms"]),
                str(s["commit_to_confirm_p99_ms"]),
                str(s["claim_ms_per_call"]),
                str(s["settle_ms_per_call"]),
                f"{s['table_bytes'] / 2**20:.1f}",
                f"{s['index_bytes'] / 2**20:.1f}",
                str(s["dead_tuples"]),
                str(s["autovacuum_count"] + s["vacuum_count"]),
                f"{s.get('kept_bytes', 0) / 2**20:.1f}",
                str(s.get("producer_lock_wait_max_ms")),
                str(s["pending"]),
            )
            for s in run["samples"]
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        out.append(f"--on-sent {run['mode']}")
        out.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
        out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        verdict = run["degradation"]
        if verdict:
            ratios = verdict["last_vs_first"]
            windowed = verdict["last_vs_first_5min_medians"]
            out.append(
                f"last vs first 5 minutes (medians): p99 x{windowed['commit_to_confirm_p99_ms']}, "
                f"producers x{windowed['producer_tx_per_s']}, outbox size "
                f"x{windowed['total_bytes']}"
            )
            out.append(
                f"last vs first: p99 x{ratios['commit_to_confirm_p99_ms']}, producers "
                f"x{ratios['producer_tx_per_s']}, outbox size x{ratios['total_bytes']}, claim "
                f"x{ratios['claim_ms_per_call']}, settle x{ratios['settle_ms_per_call']}; "
                f"p99 past 1.5x at minute {verdict['p99_past_1_5x_at_minute']}, producers "
                f"below 95% at minute {verdict['producer_below_95pct_at_minute']}, "
                f"{verdict['autovacuum_runs']} autovacuum runs, {verdict['vacuums']} vacuums by "
                f"the relay, longest producer lock wait (not ordering) {verdict['longest_producer_lock_wait_ms']} ms"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=3000, help="producer events/s (3000)")
    parser.add_argument("--minutes", type=float, default=30, help="per mode (30)")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="--on-sent modes, in order (delete,keep)"
    )
    parser.add_argument("--sample-seconds", type=float, default=30, help="between samples (30)")
    parser.add_argument(
        "--connections", type=int, default=6, help="producer connections, one thread each (6)"
    )
    parser.add_argument("--aggregates", type=int, default=10_000, help="aggregate ids (10,000)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="relay's")
    parser.add_argument("--retention", help="relay --retention in keep mode (default: its own)")
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("OUTBOX_RELAY_TEST_DATABASE_URL", DEFAULT_ADMIN_URL),
        help="PostgreSQL maintenance database (the bench creates its own next to it)",
    )
    parser.add_argument(
        "--broker-url", default=os.environ.get("OUTBOX_RELAY_TEST_BROKER_URL", DEFAULT_BROKER_URL)
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "soak-latest.json")
    args = parser.parse_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes: choose among {', '.join(MODES)}")
    if args.rate <= 0 or args.minutes <= 0 or args.sample_seconds <= 0 or args.connections < 1:
        parser.error("--rate, --minutes, --sample-seconds and --connections must be positive")

    started = time.time()
    results: dict[str, Any] = {
        "meta": {
            "started_at": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
            "rate": args.rate,
            "minutes": args.minutes,
            "sample_seconds": args.sample_seconds,
            "connections": args.connections,
            "aggregates": args.aggregates,
            "batch_size": args.batch_size,
            "retention": args.retention,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "relay_version": code_version(),
            "uptime_before": uptime(),
        },
        "runs": [],
    }
    for mode in modes:
        log(f"soak --on-sent {mode}: {args.rate:g} events/s for {args.minutes:g} min")
        with bench_env(args.admin_url, args.broker_url) as env:
            results["runs"].append(soak(env, mode, args))
    results["meta"]["uptime_after"] = uptime()
    results["meta"]["seconds"] = round(time.time() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
