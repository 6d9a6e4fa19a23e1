"""The demo's order service: every few seconds it places an order, writing the ``demo_orders`` row
and the order's ``order.created`` and ``order.paid`` events in one transaction, until SIGTERM or
SIGINT (it finishes the order in progress and exits 0).

From the repository root, against a migrated database (``outbox-relay migrate``)::

    OUTBOX_RELAY_DATABASE_URL=postgresql://localhost/postgres python -m examples.order_service

``docker compose up`` runs it as the ``orders`` service. It creates ``demo_orders`` (and the
sequence ``demo_order_ids``) if missing. Both events have the order id as aggregate id, so the
relay publishes ``order.created`` before ``order.paid``. ``order.created`` carries the
``customer_email`` and ``lines`` examples/order_consumer.py handles; orders alternate between the
skus ``book`` and ``pen``, which that example stocks 100 and 1,000 of, so after 200 orders its
book orders start landing in the dead-letter queue (``outbox-relay dlq list --queue
order.events``).

Environment (the names are listed in ``ENVIRONMENT``):

``OUTBOX_RELAY_DATABASE_URL``
    the outbox database, default ``postgresql://localhost/postgres``
``OUTBOX_RELAY_SCHEMA``
    schema of the outbox tables, default ``public`` (``demo_orders`` goes to the search path)
``ORDER_SERVICE_INTERVAL``
    seconds between orders, default ``2``
``ORDER_SERVICE_MAX_ORDERS``
    stop after this many orders, default ``0`` (never)

and the standard ``OTEL_*`` variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``,
...): with an exporter configured each order is a ``place order`` span, parent of the events'
``outbox emit`` spans, so one trace runs from here through the relay to the consumer.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from opentelemetry import trace

from outbox_relay import emit
from outbox_relay.observability.tracing import configure_tracing

#: Every variable this script reads besides the standard OTEL_* ones (compose.yaml is checked
#: against it).
ENVIRONMENT = (
    "OUTBOX_RELAY_DATABASE_URL",
    "OUTBOX_RELAY_SCHEMA",
    "ORDER_SERVICE_INTERVAL",
    "ORDER_SERVICE_MAX_ORDERS",
)

TABLES = """
CREATE SEQUENCE IF NOT EXISTS demo_order_ids START WITH 100001;
CREATE TABLE IF NOT EXISTS demo_orders (
    id     bigint  PRIMARY KEY,
    status text    NOT NULL,
    total  numeric NOT NULL
);
"""
SKUS = ("book", "pen")

tracer = trace.get_tracer("examples.order_service")


@dataclass(frozen=True)
class Settings:
    database_url: str
    schema: str
    interval: float
    max_orders: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        interval = environ.get("ORDER_SERVICE_INTERVAL", "2")
        max_orders = environ.get("ORDER_SERVICE_MAX_ORDERS", "0")
        try:
            seconds = float(interval)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise SystemExit(f"ORDER_SERVICE_INTERVAL: {interval!r} is not a number of seconds > 0")
        if not max_orders.isdigit():
            raise SystemExit(f"ORDER_SERVICE_MAX_ORDERS: {max_orders!r} is not a whole number >= 0")
        return cls(
            database_url=environ.get(
                "OUTBOX_RELAY_DATABASE_URL", "postgresql://localhost/postgres"
            ),
            schema=environ.get("OUTBOX_RELAY_SCHEMA", "public"),
            interval=seconds,
            max_orders=int(max_orders),
        )


class StopSignal:
    """Set by SIGTERM/SIGINT. The handler only records the signal, so an order in progress
    completes; ``wait()`` returns early when a signal arrives (the signal module writes to a
    wake-up socket, which a plain sleep would not notice)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._wakeup, self._notify = socket.socketpair()
        for end in (self._wakeup, self._notify):
            end.setblocking(False)
        signal.set_wakeup_fd(self._notify.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def wait(self, seconds: float) -> None:
        if self.received is None:
            select.select([self._wakeup], [], [], seconds)


def create_tables(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute(TABLES)


def place_order(conn: psycopg.Connection[Any], settings: Settings, number: int) -> int:
    """One order: the row and both events commit together, or none of them does."""
    sku = SKUS[number % len(SKUS)]
    total = round(9.5 + 5 * (number % 7), 2)
    with tracer.start_as_current_span("place order") as span, conn.transaction():
        row = conn.execute(
            "INSERT INTO demo_orders (id, status, total)"
            " VALUES (nextval('demo_order_ids'), 'paid', %s) RETURNING id",
            (total,),
        ).fetchone()
        assert row is not None
        order_id: int = row[0]
        span.set_attribute("order.id", order_id)
        emit(
            conn,
            "order.created",
            aggregate_type="order",
            aggregate_id=order_id,
            payload={
                "order_id": order_id,
                "total": total,
                "customer_email": f"customer-{order_id}@example.com",
                "lines": [{"sku": sku, "quantity": 1}],
            },
            schema=settings.schema,
        )
        emit(
            conn,
            "order.paid",
            aggregate_type="order",
            aggregate_id=order_id,
            payload={"order_id": order_id, "total": total},
            schema=settings.schema,
        )
    print(f"order {order_id}: {sku} x1, {total:.2f} -> order.created, order.paid", flush=True)
    return order_id


def run(settings: Settings, stop: StopSignal) -> int:
    """Place orders until stopped; returns how many were placed."""
    placed = 0
    conn: psycopg.Connection[Any] | None = None
    try:
        while stop.received is None:
            try:
                if conn is None:
                    conn = psycopg.connect(
                        settings.database_url, autocommit=True, connect_timeout=5
                    )
                    create_tables(conn)
                place_order(conn, settings, placed)
                placed += 1
            except psycopg.OperationalError as exc:
                # PostgreSQL restarting or unreachable: reconnect on the next round.
                print(f"database unavailable ({exc}); retrying", file=sys.stderr, flush=True)
                if conn is not None:
                    conn.close()
                conn = None
            if settings.max_orders and placed >= settings.max_orders:
                break
            stop.wait(settings.interval)
    finally:
        if conn is not None:
            conn.close()
    return placed


def main() -> int:
    settings = Settings.from_environ(os.environ)
    stop = StopSignal()
    tracer_provider = configure_tracing("order-service")
    print(
        f"order service: one order every {settings.interval:g}s into schema {settings.schema!r}",
        flush=True,
    )
    try:
        placed = run(settings, stop)
    finally:
        if tracer_provider is not None:
            tracer_provider.shutdown()  # flush the last spans
    reason = f"received {stop.received}" if stop.received else "done"
    print(f"order service: {reason}, placed {placed} order(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
