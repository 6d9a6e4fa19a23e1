"""Relay throughput per broker, side by side in one run.

    .venv/bin/python bench/brokers_bench.py [--events 20000] [--brokers rabbitmq,nats,...]

For each broker: a fresh migrated database holding a backlog of N events (200 aggregates, about
300-byte payloads), a fresh destination (exchange + queue bound '#', JetStream stream, Redis
stream, MQTT topic with a subscriber, a local HTTP endpoint), then ``outbox-relay serve`` as a
subprocess. The clock runs from the first settled batch (so interpreter start-up and connecting are
left out; the rate counts the events pending then) to the moment the outbox holds no pending row
(every event confirmed by the broker and marked sent). Prints a table and writes
bench/results/brokers-latest.json. Everything it creates is removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from outbox_relay.db.migrations import migrate
from outbox_relay.relay.settings import DEFAULT_BATCH_SIZE

ADMIN_URL = os.environ.get(
    "OUTBOX_RELAY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
RABBITMQ_URL = os.environ.get(
    "OUTBOX_RELAY_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"
)
NATS_URL = os.environ.get("OUTBOX_RELAY_TEST_NATS_URL", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("OUTBOX_RELAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MQTT_URL = os.environ.get("OUTBOX_RELAY_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
RESULTS = Path(__file__).resolve().parent / "results" / "brokers-latest.json"

BACKLOG_SQL = """
INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload, headers)
SELECT 'order.created', 'order', 'order-' || (i %% 200),
       jsonb_build_object('order_id', i, 'customer', 'customer-' || (i %% 997),
                          'note', repeat('x', 220)),
       '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}'
FROM generate_series(1, %(events)s) AS i
"""


@dataclass
class Result:
    broker: str
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


# -- a fresh database with a backlog -----------------------------------------------------------


@contextmanager
def backlog_database(events: int) -> Iterator[str]:
    name = f"bench_brokers_{uuid.uuid4().hex[:10]}"
    url = urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            migrate(conn, "public")
            conn.execute(BACKLOG_SQL, {"events": events})
        yield url
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def pending(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM outbox WHERE published_at IS NULL AND dead_at IS NULL"
    ).fetchone()
    return int(row[0]) if row else -1


# -- a fresh destination per broker: yields the relay's extra settings --------------------------

Destination = Callable[[], contextlib.AbstractContextManager[dict[str, str]]]


@contextmanager
def rabbitmq() -> Iterator[dict[str, str]]:
    import pika

    exchange, queue = f"bench.{uuid.uuid4().hex[:8]}", f"bench.q.{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = conn.channel()
    channel.exchange_declare(exchange, "topic", durable=True)
    channel.queue_declare(queue, durable=True)
    channel.queue_bind(queue, exchange, "#")
    conn.close()
    try:
        yield {"broker_url": RABBITMQ_URL, "exchange": exchange}
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        channel = conn.channel()
        channel.queue_delete(queue)
        channel.exchange_delete(exchange)
        conn.close()


@contextmanager
def nats_jetstream() -> Iterator[dict[str, str]]:
    import nats

    stream, prefix = f"BENCH{uuid.uuid4().hex[:8].upper()}", f"bench{uuid.uuid4().hex[:8]}"
    try:
        yield {"broker_url": NATS_URL, "nats_stream": stream, "topic_prefix": prefix}
    finally:

        async def delete() -> None:
            nc = await nats.connect(NATS_URL)
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(stream)
            await nc.close()

        asyncio.run(delete())


@contextmanager
def redis_streams() -> Iterator[dict[str, str]]:
    import redis

    prefix = f"bench{uuid.uuid4().hex[:8]}"
    try:
        yield {"broker_url": REDIS_URL, "topic_prefix": prefix}
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


@contextmanager
def mqtt() -> Iterator[dict[str, str]]:
    """A QoS 1 subscriber on the prefix: with none, MQTT 5 answers "no matching subscribers"."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    prefix = f"bench{uuid.uuid4().hex[:8]}"
    subscribed = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.on_subscribe = lambda *_args: subscribed.set()
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
    props.ReceiveMaximum = 65535
    parts = urlsplit(MQTT_URL)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, properties=props)
    client.subscribe(f"{prefix}/#", qos=1)
    client.loop_start()
    if not subscribed.wait(10):
        raise RuntimeError("MQTT subscription not acknowledged within 10 s")
    try:
        yield {"broker_url": MQTT_URL, "topic_prefix": prefix}
    finally:
        client.disconnect()
        client.loop_stop()


class _HookHandler(BaseHTTPRequestHandler):
    """A minimal endpoint: read the body, answer 204."""

    protocol_version = "HTTP/1.1"
    # One write per response, sent at once: headers and body in separate small
    # writes would meet Nagle + delayed ACK and cost 40 ms a request.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HookServer(ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True


def _serve_hooks(port: Connection) -> None:
    server = _HookServer(("127.0.0.1", 0), _HookHandler)
    port.send(server.server_address[1])
    server.serve_forever()


@contextmanager
def webhook() -> Iterator[dict[str, str]]:
    """The endpoint runs in a process of its own, so it does not share a GIL with the bench."""
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.Process(target=_serve_hooks, args=(child,), daemon=True)
    process.start()
    try:
        if not parent.poll(10):
            raise RuntimeError("the webhook endpoint did not start")
        yield {"broker_url": f"http://127.0.0.1:{parent.recv()}/hook"}
    finally:
        process.terminate()
        process.join(10)


@contextmanager
def webhook_batch() -> Iterator[dict[str, str]]:
    with webhook() as options:
        yield {**options, "webhook_batch": "true"}


DESTINATIONS: dict[str, Destination] = {
    "rabbitmq": rabbitmq,
    "nats": nats_jetstream,
    "redis": redis_streams,
    "mqtt": mqtt,
    "webhook": webhook,
    "webhook-batch": webhook_batch,
}


# -- the measurement ---------------------------------------------------------------------------


def relay_command() -> list[str]:
    beside = Path(sys.executable).with_name("outbox-relay")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("outbox-relay")
    return [found] if found else [sys.executable, "-m", "outbox_relay"]


def measure(broker: str, events: int, batch_size: int) -> Result:
    with backlog_database(events) as database_url, DESTINATIONS[broker]() as options:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_")}
        env.update({f"OUTBOX_RELAY_{k.upper()}": v for k, v in options.items()})
        env["OUTBOX_RELAY_DATABASE_URL"] = database_url
        env["OUTBOX_RELAY_BATCH_SIZE"] = str(batch_size)
        env["OUTBOX_RELAY_LOG_LEVEL"] = "warning"  # keep logging out of the measurement
        with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
            process = subprocess.Popen(
                [*relay_command(), "serve", "--poll-interval", "0.2"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            poll = psycopg.connect(database_url, autocommit=True)
            try:
                started = time.perf_counter()
                deadline = started + 300
                # Clock from the first batch settled: excludes interpreter start-up and
                # connecting; the rate counts only the events left at that moment.
                while (remaining := pending(poll)) == events:
                    if process.poll() is not None or time.perf_counter() > deadline:
                        raise RuntimeError(
                            f"{broker}: relay did not start:\n{Path(log.name).read_text()}"
                        )
                    time.sleep(0.005)
                started = time.perf_counter()
                while pending(poll) > 0:
                    if process.poll() is not None or time.perf_counter() > deadline:
                        raise RuntimeError(
                            f"{broker}: relay stopped:\n{Path(log.name).read_text()}"
                        )
                    time.sleep(0.01)
                elapsed = time.perf_counter() - started
            finally:
                poll.close()
                process.terminate()
                process.wait(timeout=30)
    return Result(broker, remaining, elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--brokers", default=",".join(DESTINATIONS))
    args = parser.parse_args()
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = set(brokers) - set(DESTINATIONS)
    if unknown:
        parser.error(f"unknown broker(s) {sorted(unknown)}; choose from {sorted(DESTINATIONS)}")

    results: list[Result] = []
    failures: dict[str, str] = {}
    for broker in brokers:
        try:
            result = measure(broker, args.events, args.batch_size)
        except Exception as exc:  # e.g. a shared broker restarted by someone's test: go on
            failures[broker] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"{broker:<14} failed: {failures[broker]}", flush=True)
            continue
        print(
            f"{broker:<14} {result.events:>7} events {result.seconds:>7.2f} s "
            f"{result.rate:>9.0f} events/s",
            flush=True,
        )
        results.append(result)

    print("\nrelay throughput, backlog to all confirmed")
    print(f"{'broker':<14} {'events':>7} {'seconds':>8} {'events/s':>9}")
    for result in results:
        print(f"{result.broker:<14} {result.events:>7} {result.seconds:>8.2f} {result.rate:>9.0f}")
    for broker, reason in failures.items():
        print(f"{broker:<14} failed: {reason}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "events": args.events,
                "batch_size": args.batch_size,
                "cpus": os.cpu_count(),
                "results": [
                    {
                        "broker": r.broker,
                        "seconds": round(r.seconds, 3),
                        "events_per_s": round(r.rate),
                    }
                    for r in results
                ],
                "failed": failures,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwritten to {RESULTS}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
