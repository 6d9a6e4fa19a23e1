"""Consumer throughput: events/s applied exactly once (inbox dedupe) by 1 and 4 worker processes.

    python bench/consumer_bench.py [--events 20000] [--duplicates 0.1] [--prefetch 200]

Needs the local PostgreSQL and RabbitMQ (override with OUTBOX_RELAY_BENCH_DATABASE_URL, an admin
URL, and OUTBOX_RELAY_BENCH_BROKER_URL). Each run gets a fresh database and queue, pre-filled with
the events (a share of them published twice, back to back, so copies race between workers); the
rate is measured between the first and the last handler commit.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from outbox_relay.consumer import Consumer, ConsumerSettings, Event
from outbox_relay.consumer import topology as topo

ADMIN_URL = os.environ.get(
    "OUTBOX_RELAY_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BROKER_URL = os.environ.get(
    "OUTBOX_RELAY_BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"
)
EXCHANGE = "events.bench"

consumer = Consumer("bench")


@consumer.handler("order.*")
def apply(event: Event, db: psycopg.Connection[Any]) -> None:
    db.execute("INSERT INTO effects (event_id) VALUES (%s)", (event.event_id,))


def _worker(settings: ConsumerSettings) -> None:
    # SIGTERM from the parent: finish the message in flight, then exit.
    worker = consumer.worker(settings)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    worker.run()


def _database(name: str) -> str:
    return urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))


def _publish(queue: str, events: int, duplicates: float) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    sent = 0
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        every = round(1 / duplicates) if duplicates > 0 else 0
        for n in range(events):
            event_id = str(uuid.uuid4())
            properties = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=event_id,
                type="order.created",
                headers={"aggregate_type": "order", "aggregate_id": f"o-{n % 500}"},
            )
            body = json.dumps({"n": n}).encode()
            for _ in range(2 if every and n % every == 0 else 1):
                channel.basic_publish(EXCHANGE, "order.created", body, properties)
                sent += 1
    finally:
        connection.close()
    return sent


def run(workers: int, events: int, duplicates: float, prefetch: int) -> dict[str, Any]:
    name = f"consumer_bench_{uuid.uuid4().hex[:8]}"
    queue = f"bench.consumer.{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _database(name)
    settings = ConsumerSettings(
        broker_url=BROKER_URL,
        database_url=url,
        queue=queue,
        bindings=("order.*",),
        exchange=EXCHANGE,
        prefetch=prefetch,
    )
    processes: list[multiprocessing.process.BaseProcess] = []
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE effects (event_id text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )
        topo.apply(BROKER_URL, settings.topology())
        published = _publish(queue, events, duplicates)
        context = multiprocessing.get_context("spawn")
        processes = [context.Process(target=_worker, args=(settings,)) for _ in range(workers)]
        for process in processes:
            process.start()
        deadline = time.monotonic() + 600
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                row = conn.execute("SELECT count(*) FROM effects").fetchone()
                if row and row[0] >= events:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {row[0] if row else 0} of {events} applied in 600s")
                time.sleep(0.1)
            stats = conn.execute(
                "SELECT count(*), count(DISTINCT event_id),"
                " extract(epoch FROM max(applied_at) - min(applied_at)) FROM effects"
            ).fetchone()
        assert stats is not None
        applied, distinct, seconds = int(stats[0]), int(stats[1]), float(stats[2])
        if applied != distinct:
            raise SystemExit(f"{applied - distinct} event(s) applied twice")
        return {
            "workers": workers,
            "published": published,
            "applied": applied,
            "skipped": published - applied,
            "seconds": seconds,
            "rate": (applied - 1) / seconds if seconds > 0 else float("inf"),
        }
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(30)
        connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        channel = connection.channel()
        topology = settings.topology()
        for queue_name in (topology.queue, topology.dead_letter_queue, *topology.retry_queues):
            channel.queue_delete(queue_name)
        channel.exchange_delete(topology.dead_letter_exchange)
        connection.close()
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--duplicates", type=float, default=0.1, help="share published twice")
    parser.add_argument("--prefetch", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    results = [run(w, args.events, args.duplicates, args.prefetch) for w in args.workers]
    table = Table(
        title=f"consumer throughput, applied once with inbox dedupe ({os.cpu_count()} CPUs)"
    )
    for column in ("workers", "published", "applied", "duplicates skipped", "seconds", "events/s"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r["workers"]),
            str(r["published"]),
            str(r["applied"]),
            str(r["skipped"]),
            f"{r['seconds']:.2f}",
            f"{r['rate']:,.0f}",
        )
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
