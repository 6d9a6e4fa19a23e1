"""Relay throughput per broker, side by side in one run.

    .venv/bin/python bench/brokers_bench.py [--events 20000] [--brokers rabbitmq,nats,...]
        [--message-formats native,cloudevents-binary] [--rounds 5]

For each broker: a fresh migrated database holding a backlog of N events (200 aggregates, about
300-byte payloads), a fresh destination (exchange + queue bound '#', JetStream stream, Redis
stream, MQTT topic with a subscriber, a local HTTP endpoint), then ``outbox-relay serve`` as a
subprocess. The clock runs from the first settled batch (so interpreter start-up and connecting are
left out; the rate counts the events pending then) to the moment the relay has settled every
event (confirmed by the broker and marked sent; read from its ``outbox_relay_stats`` every
10 ms). Prints a table and writes
bench/results/brokers-latest.json. Everything it creates is removed afterwards.

With several ``--message-formats`` (``serve --message-format``), each round runs every format
for a broker back to back, the order turning each round, so a pair of runs shares the machine's
load; the summary gives each format's median rate and, per CloudEvents format, the median of the
per-round ratios to native (the issue's target: cloudevents-binary within 5% on RabbitMQ).

``--raw-ceiling`` (RabbitMQ; native and cloudevents-binary) adds, in every round and next to each
relay run, a raw pipelined publisher (bench/raw_publisher.py, no database) sending the very
messages the relay would send for the same rows in that format, properties encoded by the
relay's own publisher, with a window of 200 (the backlog's aggregates: what per-aggregate order
allows). Its rate is the broker's ceiling for the format; the summary gives each format's ratio
to its own ceiling, and the ceiling's own cloudevents-binary/native ratio: what the format costs
the broker, whatever publishes it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import statistics
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
import raw_publisher
from psycopg import sql
from raw_publisher import Row

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
# The raw ceiling's CloudEvents source: as long as the relay's default for a bench database.
RAW_SOURCE = "postgresql://127.0.0.1:5432/bench_brokers_0123456789/public"
RAW_FORMATS = ("native", "cloudevents-binary")

AGGREGATES = 200
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
BACKLOG_SQL = f"""
INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload, headers)
SELECT 'order.created', 'order', 'order-' || (i %% {AGGREGATES}),
       jsonb_build_object('order_id', i, 'customer', 'customer-' || (i %% 997),
                          'note', repeat('x', 220)),
       '{{"traceparent": "{TRACEPARENT}"}}'
FROM generate_series(1, %(events)s) AS i
"""


def backlog_rows(events: int) -> list[Row]:
    """BACKLOG_SQL's rows as the relay reads them (the payload as jsonb renders it: shorter
    keys first)."""
    note = "x" * 220
    return [
        Row(
            "order.created",
            "order",
            f"order-{i % AGGREGATES}",
            f'{{"note": "{note}", "customer": "customer-{i % 997}", "order_id": {i}}}'.encode(),
            {"traceparent": TRACEPARENT},
        )
        for i in range(1, events + 1)
    ]


FORMATS = ("native", "cloudevents-binary", "cloudevents-structured")


@dataclass
class Result:
    broker: str
    events: int
    seconds: float
    message_format: str = "native"
    round: int = 1

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


def pending(conn: psycopg.Connection[Any], events: int) -> int:
    """Events of the backlog not yet settled, from the relay's own per-minute counts (written in
    each settle's transaction): a count over the outbox every 10 ms would scan rows the relay is
    deleting, on the machine's two cores, and slow down what it measures."""
    row = conn.execute(
        "SELECT coalesce(sum(published + dead), 0) FROM outbox_relay_stats"
    ).fetchone()
    return events - int(row[0]) if row else -1


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


def measure(broker: str, events: int, batch_size: int, message_format: str = "native") -> Result:
    with backlog_database(events) as database_url, DESTINATIONS[broker]() as options:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_")}
        env.update({f"OUTBOX_RELAY_{k.upper()}": v for k, v in options.items()})
        env["OUTBOX_RELAY_MESSAGE_FORMAT"] = message_format
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
                while (remaining := pending(poll, events)) == events:
                    if process.poll() is not None or time.perf_counter() > deadline:
                        raise RuntimeError(
                            f"{broker}: relay did not start:\n{Path(log.name).read_text()}"
                        )
                    time.sleep(0.005)
                started = time.perf_counter()
                while pending(poll, events) > 0:
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
    return Result(broker, remaining, elapsed, message_format)


def measure_raw(events: int, message_format: str) -> Result:
    """The broker's ceiling for the format: raw_publisher sending the relay's messages for the
    backlog's rows (see the module docstring)."""
    with rabbitmq() as options:
        shaped = (backlog_rows(events), message_format, RAW_SOURCE)
        value = raw_publisher.run(
            options["broker_url"], options["exchange"], events, AGGREGATES, shaped
        )
    return Result("rabbitmq raw", value["messages"], value["seconds"], message_format)


def summarise(results: list[Result], formats: list[str]) -> list[dict[str, Any]]:
    """Per broker and format: the median rate; per CloudEvents format, the per-round ratios to
    the native run of the same round and their median."""
    summary = []
    for broker in dict.fromkeys(r.broker for r in results):
        rates = {
            fmt: {
                r.round: r.rate for r in results if r.broker == broker and r.message_format == fmt
            }
            for fmt in formats
        }
        for fmt in formats:
            if not rates[fmt]:
                continue
            entry: dict[str, Any] = {
                "broker": broker,
                "message_format": fmt,
                "runs": len(rates[fmt]),
                "median_events_per_s": round(statistics.median(rates[fmt].values())),
            }
            if fmt != "native" and rates.get("native"):
                # A run that drained everything in its first batch measured nothing (rate 0).
                pairs = [
                    rate / rates["native"][n]
                    for n, rate in rates[fmt].items()
                    if rates["native"].get(n)
                ]
                if pairs:
                    entry["ratios_to_native"] = [round(p, 3) for p in pairs]
                    entry["median_ratio_to_native"] = round(statistics.median(pairs), 3)
            ceiling = {
                r.round: r.rate
                for r in results
                if r.broker == f"{broker} raw" and r.message_format == fmt
            }
            to_ceiling = [rate / ceiling[n] for n, rate in rates[fmt].items() if ceiling.get(n)]
            if to_ceiling:
                entry["median_ratio_to_raw_ceiling"] = round(statistics.median(to_ceiling), 3)
            summary.append(entry)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--brokers", default=",".join(DESTINATIONS))
    parser.add_argument(
        "--message-formats",
        default="native",
        help=f"comma-separated serve --message-format values to compare: {', '.join(FORMATS)}",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="paired rounds (each runs every format once)"
    )
    parser.add_argument(
        "--raw-ceiling",
        action="store_true",
        help="RabbitMQ: also a raw publisher sending the relay's messages per format, each round",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = set(brokers) - set(DESTINATIONS)
    if unknown:
        parser.error(f"unknown broker(s) {sorted(unknown)}; choose from {sorted(DESTINATIONS)}")
    formats = list(dict.fromkeys(f.strip() for f in args.message_formats.split(",") if f.strip()))
    if not formats or set(formats) - set(FORMATS):
        parser.error(f"--message-formats: choose among {', '.join(FORMATS)}")
    if args.rounds < 1:
        parser.error("--rounds: must be at least 1")
    if args.raw_ceiling and ("rabbitmq" not in brokers or set(formats) - set(RAW_FORMATS)):
        parser.error(f"--raw-ceiling: RabbitMQ only, with formats among {', '.join(RAW_FORMATS)}")

    results: list[Result] = []
    failures: dict[str, str] = {}
    for round_ in range(1, args.rounds + 1):
        shift = (round_ - 1) % len(formats)  # no format always runs first
        for broker in brokers:
            for fmt in formats[shift:] + formats[:shift]:
                label = broker if fmt == "native" else f"{broker} {fmt}"
                try:
                    result = measure(broker, args.events, args.batch_size, fmt)
                except Exception as exc:  # e.g. a shared broker restarted by someone's test
                    failures[f"{label} round {round_}"] = (
                        f"{type(exc).__name__}: {exc}".splitlines()[0]
                    )
                    print(f"{label:<14} failed: {exc!r}"[:200], flush=True)
                    continue
                runs = [result]
                if args.raw_ceiling and broker == "rabbitmq":
                    try:
                        runs.append(measure_raw(args.events, fmt))
                    except Exception as exc:
                        failures[f"{label} raw round {round_}"] = (
                            f"{type(exc).__name__}: {exc}".splitlines()[0]
                        )
                        print(f"{label} raw failed: {exc!r}"[:200], flush=True)
                for run in runs:
                    run.round = round_
                    name = label if run is result else f"{label} (raw)"
                    print(
                        f"{name:<14} {run.events:>7} events {run.seconds:>7.2f} s "
                        f"{run.rate:>9.0f} events/s",
                        flush=True,
                    )
                    results.append(run)

    summary = summarise(results, formats)
    print("\nrelay throughput, backlog to all confirmed (median of rounds)")
    print(
        f"{'broker':<14} {'format':<24} {'runs':>4} {'events/s':>9} {'vs native':>9} {'vs raw':>7}"
    )
    for entry in summary:
        ratio = entry.get("median_ratio_to_native")
        to_raw = entry.get("median_ratio_to_raw_ceiling")
        print(
            f"{entry['broker']:<14} {entry['message_format']:<24} {entry['runs']:>4} "
            f"{entry['median_events_per_s']:>9} {'' if ratio is None else f'{ratio:.3f}':>9} "
            f"{'' if to_raw is None else f'{to_raw:.3f}':>7}"
        )
    for label, reason in failures.items():
        print(f"{label} failed: {reason}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "events": args.events,
                "batch_size": args.batch_size,
                "cpus": os.cpu_count(),
                "rounds": args.rounds,
                "message_formats": formats,
                "raw_ceiling": args.raw_ceiling,
                "results": [
                    {
                        "broker": r.broker,
                        "message_format": r.message_format,
                        "round": r.round,
                        "seconds": round(r.seconds, 3),
                        "events_per_s": round(r.rate),
                    }
                    for r in results
                ],
                "summary": summary,
                "failed": failures,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwritten to {args.output}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
