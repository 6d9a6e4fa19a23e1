"""CDC mode next to notify mode, in the same run: throughput on a backlog and latency at a rate.

    .venv/bin/python bench/cdc_bench.py               # 20,000 events, 1,000/s for 10 s
    .venv/bin/python bench/cdc_bench.py --events 5000 --seconds 5 --rate 500

For each mode, on a fresh database, exchange and queue (bench/bench_setup.py), with
``outbox-relay serve`` running as a child process (its own GIL, exactly what users run):

* throughput: ``--events`` rows are inserted (transactions of 100 rows) while the relay runs;
  events/s from the first insert until the queue holds them all;
* latency: events are committed at ``--rate`` per second (transactions of 10 every 10 ms) for
  ``--seconds``; commit-to-delivery latency is measured by a consumer in this process
  (p50/p95/p99, milliseconds).

Prints a table and one JSON line. Needs a superuser PostgreSQL with wal_level=logical and RabbitMQ
(URLs as in bench/relay_bench.py: --admin-url / --broker-url).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_setup import PAYLOAD_SQL, BenchEnv, bench_env

ADMIN_URL = os.environ.get(
    "OUTBOX_RELAY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1/postgres"
)
BROKER_URL = os.environ.get("OUTBOX_RELAY_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def relay_command() -> list[str]:
    beside = Path(sys.executable).with_name("outbox-relay")
    if beside.exists():
        return [str(beside)]
    return [shutil.which("outbox-relay") or "outbox-relay"]


class Consumer:
    """Counts deliveries and notes each one's arrival time (message_id -> time.time())."""

    def __init__(self, env: BenchEnv) -> None:
        self._env = env
        self.arrived: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Consumer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        def on_message(ch: Any, method: Any, props: Any, _body: bytes) -> None:
            self.arrived.setdefault(str(props.message_id), time.time())
            ch.basic_ack(method.delivery_tag)

        while not self._stop.is_set():
            try:  # survives a broker restarted by someone else's test meanwhile
                connection = pika.BlockingConnection(pika.URLParameters(self._env.broker_url))
                channel = connection.channel()
                channel.basic_qos(prefetch_count=2000)
                channel.basic_consume(self._env.queue, on_message)
                while not self._stop.is_set():
                    connection.process_data_events(time_limit=0.05)
                connection.close()
            except pika.exceptions.AMQPError:
                self._stop.wait(0.5)


def start_relay(env: BenchEnv, mode: str, log: Path) -> subprocess.Popen[bytes]:
    settings = {
        "DATABASE_URL": env.database_url,
        "BROKER_URL": env.broker_url,
        "EXCHANGE": env.exchange,
        "MODE": mode,
        "SLOT_NAME": env.database,
        "PUBLICATION": env.database,
    }
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_")}
    child_env.update({f"OUTBOX_RELAY_{k}": v for k, v in settings.items()})
    with log.open("wb") as out:
        relay = subprocess.Popen(
            [*relay_command(), "serve"], env=child_env, stdout=out, stderr=subprocess.STDOUT
        )
    ready = "streaming replication slot" if mode == "cdc" else "leading"
    deadline = time.monotonic() + 30
    while ready not in log.read_text(errors="replace"):
        if time.monotonic() > deadline or relay.poll() is not None:
            raise RuntimeError(f"relay did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    return relay


def wait_for(consumer: Consumer, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(consumer.arrived) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(consumer.arrived)} of {count} events arrived")
        time.sleep(0.005)


def throughput(env: BenchEnv, consumer: Consumer, events: int) -> float:
    started = time.time()
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        for first in range(0, events, 100):
            conn.execute(
                "INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload)"
                f" SELECT 'bench.created', 'bench', 'agg-' || (g %% 200), {PAYLOAD_SQL}"
                " FROM generate_series(%s::int, %s::int) AS g",
                (first, min(first + 100, events) - 1),
            )
    wait_for(consumer, events, timeout=300)
    return events / (max(consumer.arrived.values()) - started)


def latency(env: BenchEnv, consumer: Consumer, rate: int, seconds: float) -> dict[str, float]:
    committed: dict[str, float] = {}
    before = len(consumer.arrived)
    per_tick = max(1, rate // 100)
    with psycopg.connect(env.database_url) as conn:
        tick = time.monotonic()
        end = tick + seconds
        n = 0
        while tick < end:
            ids = [
                str(
                    conn.execute(
                        "SELECT outbox_emit('bench.latency', %s, jsonb_build_object('n', %s))",
                        (f"agg-{(n + i) % 200}", n + i),
                    ).fetchone()[0]  # type: ignore[index]  # one row, always
                )
                for i in range(per_tick)
            ]
            conn.commit()
            now = time.time()
            committed.update((event_id, now) for event_id in ids)
            n += per_tick
            tick += 0.01
            time.sleep(max(0.0, tick - time.monotonic()))
    wait_for(consumer, before + len(committed), timeout=60)
    samples = sorted((consumer.arrived[i] - t) * 1000 for i, t in committed.items())

    def pct(q: float) -> float:
        return round(samples[min(len(samples) - 1, int(q * len(samples)))], 1)

    return {"events": len(samples), "p50_ms": pct(0.5), "p95_ms": pct(0.95), "p99_ms": pct(0.99)}


def run_mode(mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with bench_env(args.admin_url, args.broker_url) as env:
        consumer = Consumer(env).start()
        relay = start_relay(env, mode, workdir / f"relay-{mode}.log")
        try:
            rate = throughput(env, consumer, args.events)
            lat = latency(env, consumer, args.rate, args.seconds)
        finally:
            relay.send_signal(signal.SIGTERM)
            relay.wait(30)
            consumer.stop()
            if mode == "cdc":
                with psycopg.connect(env.database_url, autocommit=True) as conn:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (env.database,))
    return {"mode": mode, "throughput_events_per_s": round(rate), **lat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default=ADMIN_URL)
    parser.add_argument("--broker-url", default=BROKER_URL)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=1_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    results = [run_mode(mode, args, args.workdir) for mode in ("notify", "cdc")]
    print(f"{'mode':8} {'events/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for r in results:
        print(
            f"{r['mode']:8} {r['throughput_events_per_s']:>10} {r['p50_ms']:>8} "
            f"{r['p95_ms']:>8} {r['p99_ms']:>8}"
        )
    print(json.dumps({"events": args.events, "rate": args.rate, "results": results}))


if __name__ == "__main__":
    main()
