"""The demo: an order service writes orders and their events in one transaction; the relay
publishes them to RabbitMQ; a queue bound with ``order.*`` receives them.

Run it with ``bash scripts/demo.sh`` (which starts the services and installs everything first).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pika
import psycopg
from rich.console import Console

from outbox_relay import emit

DATABASE_URL = os.environ.get("OUTBOX_RELAY_DATABASE_URL", "postgresql://localhost/postgres")
BROKER_URL = os.environ.get("OUTBOX_RELAY_BROKER_URL", "amqp://guest:guest@localhost:5672/%2F")
QUEUE = "order.events"
BIN = Path(sys.executable).parent / "outbox-relay"
console = Console()


def cli(*args: str) -> str:
    env = {
        **os.environ,
        "OUTBOX_RELAY_DATABASE_URL": DATABASE_URL,
        "OUTBOX_RELAY_BROKER_URL": BROKER_URL,
    }
    done = subprocess.run([str(BIN), *args], env=env, check=True, capture_output=True, text=True)
    return done.stdout


def declare_queue() -> None:
    """The consumer side's topology: the durable ``events`` topic exchange and a bound queue."""
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    channel = connection.channel()
    channel.exchange_declare("events", "topic", durable=True)
    channel.queue_declare(QUEUE, durable=True)
    channel.queue_bind(QUEUE, "events", "order.*")
    channel.queue_purge(QUEUE)
    connection.close()


def place_orders() -> None:
    """Business change and event in one transaction, three ways: Python, SQL function, plain SQL."""
    with psycopg.connect(DATABASE_URL) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS demo_orders"
            " (id bigint PRIMARY KEY, status text NOT NULL, total numeric NOT NULL)"
        )
        conn.execute("TRUNCATE demo_orders")
        conn.commit()
        for order_id, total in ((1001, 25.5), (1002, 99.0)):
            with conn.transaction():
                conn.execute(
                    "INSERT INTO demo_orders VALUES (%s, 'created', %s)", (order_id, total)
                )
                emit(
                    conn,
                    "order.created",
                    aggregate_type="order",
                    aggregate_id=order_id,
                    payload={"order_id": order_id, "total": total},
                )
        with conn.transaction():
            conn.execute("UPDATE demo_orders SET status = 'paid' WHERE id = 1001")
            conn.execute(
                "SELECT outbox_emit('order.paid', '1001', '{\"order_id\": 1001}', 'order')"
            )
        with conn.transaction():
            conn.execute("UPDATE demo_orders SET status = 'shipped' WHERE id = 1001")
            conn.execute(
                "INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload)"
                " VALUES ('order.shipped', 'order', '1001', '{\"order_id\": 1001}')"
            )


def show_arrivals(expected: int, timeout: float = 15.0) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    channel = connection.channel()
    seen = 0
    deadline = time.monotonic() + timeout
    while seen < expected and time.monotonic() < deadline:
        method, properties, body = channel.basic_get(QUEUE, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        seen += 1
        console.print(
            f"  [green]received[/] {method.routing_key:<14} id={properties.message_id}"
            f" aggregate={properties.headers.get('aggregate_id')} body={body.decode()}"
        )
    connection.close()
    return seen


def main() -> int:
    console.rule("outbox-relay demo")
    console.print("1. migrate:", cli("migrate").strip())
    declare_queue()
    console.print(f"2. queue {QUEUE!r} bound to exchange 'events' with 'order.*'")
    relay = subprocess.Popen(
        [str(BIN), "serve", "--database-url", DATABASE_URL, "--broker-url", BROKER_URL],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        console.print("3. relay started (outbox-relay serve); placing orders...")
        place_orders()
        event_id = cli(
            "emit", "order.cancelled", "--aggregate-id", "1002", "--payload", '{"order_id": 1002}'
        ).strip()
        console.print(f"   and one from the CLI: outbox-relay emit order.cancelled -> {event_id}")
        console.print("4. arriving on the queue, per order in commit order:")
        got = show_arrivals(expected=5)
        console.print("5. outbox-relay status --json:")
        console.print_json(json.dumps(json.loads(cli("status", "--json"))))
    finally:
        relay.send_signal(signal.SIGTERM)
        _, log = relay.communicate(timeout=15)
    console.print(f"6. relay stopped with exit code {relay.returncode}; its log:")
    console.print(log.rstrip(), markup=False, highlight=False)
    ok = got == 5 and relay.returncode == 0
    console.rule("[green]demo finished" if ok else "[red]demo failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
