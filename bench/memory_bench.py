"""Memory of ``outbox-relay serve`` (the installed CLI, as a container runs it): resident set
size idle and its peak while draining a backlog, per ``--batch-size`` and payload size. The
figures behind the sizing advice in docs/deploy.md (memory requests and limits).

    .venv/bin/python bench/memory_bench.py            # 4 runs, about a minute
    .venv/bin/python bench/memory_bench.py --events 20000 --batch-sizes 1000 4000 --payloads 300 4096

RSS is read from /proc/<pid>/status every 50 ms (VmRSS) plus the kernel's own peak (VmHWM), so
no short spike is missed. Each run uses a fresh database, exchange and queue (bench_setup).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg
from bench_setup import AGGREGATE_TYPE, EVENT_TYPE, BenchEnv, bench_env

RESULTS = Path(__file__).parent / "results" / "memory-latest.json"
CLI = Path(sys.executable).with_name("outbox-relay")


@dataclass
class MemoryRun:
    batch_size: int
    payload_bytes: int
    events: int
    idle_rss_mib: float
    peak_rss_mib: float
    seconds: float  # from the first insert to an empty outbox


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def _insert(env: BenchEnv, events: int, payload_bytes: int) -> None:
    pad = "x" * max(0, payload_bytes - len('{"n": 0, "pad": ""}'))
    with psycopg.connect(env.database_url) as conn:
        for first in range(0, events, 10_000):
            last = min(events, first + 10_000) - 1
            conn.execute(
                "INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload)"
                " SELECT %s, %s, g::text, jsonb_build_object('n', g, 'pad', %s::text)"
                " FROM generate_series(%s::bigint, %s::bigint) AS g",
                (EVENT_TYPE, AGGREGATE_TYPE, pad, first, last),
            )
            conn.commit()


def _pending(env: BenchEnv) -> int:
    with psycopg.connect(env.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox").fetchone()
        return int(row[0]) if row else 0


def measure(
    admin_url: str, broker_url: str, batch_size: int, payload: int, events: int
) -> MemoryRun:
    with bench_env(admin_url, broker_url) as env:
        variables = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_")}
        variables |= {
            "OUTBOX_RELAY_DATABASE_URL": env.database_url,
            "OUTBOX_RELAY_BROKER_URL": broker_url,
            "OUTBOX_RELAY_EXCHANGE": env.exchange,
            "OUTBOX_RELAY_BATCH_SIZE": str(batch_size),
            "OUTBOX_RELAY_LOG_LEVEL": "warning",
        }
        relay = subprocess.Popen([str(CLI), "serve"], env=variables)
        try:
            time.sleep(3)  # connected, leading, idle
            idle = _status_kib(relay.pid, "VmRSS")
            started = time.perf_counter()
            _insert(env, events, payload)  # the relay starts draining during the inserts
            peak = idle
            while _pending(env) > 0:
                for _ in range(10):
                    peak = max(peak, _status_kib(relay.pid, "VmRSS"))
                    time.sleep(0.05)
            drained = time.perf_counter() - started
            peak = max(peak, _status_kib(relay.pid, "VmHWM"))
        finally:
            relay.terminate()
            relay.wait(timeout=30)
        env.purge_queue()
    return MemoryRun(batch_size, payload, events, idle / 1024, peak / 1024, drained)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--broker-url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--payloads", type=int, nargs="+", default=[300, 4096])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = []
    for payload in args.payloads:
        for batch_size in args.batch_sizes:
            run = measure(args.admin_url, args.broker_url, batch_size, payload, args.events)
            runs.append(run)
            print(
                f"batch {batch_size:>5}, payload {payload:>5} B: idle {run.idle_rss_mib:6.1f} MiB,"
                f" peak {run.peak_rss_mib:6.1f} MiB while draining {run.events} events"
                f" ({run.seconds:.1f} s from the first insert)",
                flush=True,
            )
    args.output.write_text(json.dumps([asdict(run) for run in runs], indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
