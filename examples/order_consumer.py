"""An order service's consumers: confirmation emails and stock reservations, each applied once.

Create the example's tables, then run a worker (from the repository root)::

    python examples/order_consumer.py --database-url postgresql://localhost/shop
    outbox-relay consume --handler examples.order_consumer:consumer \\
        --queue order.events --database-url postgresql://localhost/shop

The handlers write to the service's own tables with the connection they are given: that work and
the inbox row commit together, so a redelivered event never sends a second email or reserves the
stock twice. Emails are queued in a table (the outbox pattern again) rather than sent from the
handler, because an SMTP call cannot be rolled back with the transaction.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import psycopg

from outbox_relay.consumer import Consumer, Event, PermanentError

TABLES = """
CREATE TABLE IF NOT EXISTS email_queue (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id   text   NOT NULL,
    recipient  text   NOT NULL,
    subject    text   NOT NULL,
    queued_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS stock (
    sku        text    PRIMARY KEY,
    available  integer NOT NULL CHECK (available >= 0),
    reserved   integer NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS stock_reservations (
    order_id   text    NOT NULL,
    sku        text    NOT NULL,
    quantity   integer NOT NULL,
    PRIMARY KEY (order_id, sku)
);
"""

consumer = Consumer("order-service")


def _order_lines(payload: Any) -> list[tuple[str, int]]:
    """Schema check for order events: dead-letters malformed payloads instead of retrying them."""
    if not isinstance(payload, dict) or not isinstance(payload.get("lines", []), list):
        raise ValueError("payload must be an object with a 'lines' list")
    lines = []
    for line in payload.get("lines", []):
        if not isinstance(line, dict) or not isinstance(line.get("quantity"), int):
            raise ValueError(f"bad order line: {line!r}")
        lines.append((str(line["sku"]), int(line["quantity"])))
    return lines


@consumer.handler("order.created", validate=_order_lines)
def order_created(event: Event, db: psycopg.Connection[Any]) -> None:
    """Queue the confirmation email and reserve the stock, in the inbox's transaction."""
    email = event.payload.get("customer_email")
    if email:
        db.execute(
            "INSERT INTO email_queue (event_id, recipient, subject) VALUES (%s, %s, %s)",
            (event.event_id, email, f"Your order {event.aggregate_id} is confirmed"),
        )
    for sku, quantity in _order_lines(event.payload):
        row = db.execute(
            "UPDATE stock SET available = available - %s, reserved = reserved + %s"
            " WHERE sku = %s AND available >= %s RETURNING sku",
            (quantity, quantity, sku, quantity),
        ).fetchone()
        if row is None:
            # Retrying will not create stock: let an operator look at it in the DLQ.
            raise PermanentError(f"not enough stock of {sku!r} for order {event.aggregate_id}")
        db.execute(
            "INSERT INTO stock_reservations (order_id, sku, quantity) VALUES (%s, %s, %s)",
            (event.aggregate_id, sku, quantity),
        )


@consumer.handler("order.cancelled")
def order_cancelled(event: Event, db: psycopg.Connection[Any]) -> None:
    """Release the order's reservations."""
    released = db.execute(
        "DELETE FROM stock_reservations WHERE order_id = %s RETURNING sku, quantity",
        (event.aggregate_id,),
    ).fetchall()
    for sku, quantity in released:
        db.execute(
            "UPDATE stock SET available = available + %s, reserved = reserved - %s WHERE sku = %s",
            (quantity, quantity, sku),
        )


@consumer.handler("order.*")
def other_order_events(event: Event) -> None:
    """Everything else bound to the queue (order.shipped, ...) is acknowledged and ignored."""


def main() -> None:
    parser = argparse.ArgumentParser(description="Create the example's tables and some stock.")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("OUTBOX_RELAY_DATABASE_URL", "postgresql://localhost/postgres"),
    )
    args = parser.parse_args()
    with psycopg.connect(args.database_url) as conn:
        conn.execute(TABLES)
        conn.execute(
            "INSERT INTO stock (sku, available) VALUES ('book', 100), ('pen', 1000)"
            " ON CONFLICT DO NOTHING"
        )
    print("tables ready: email_queue, stock, stock_reservations")


if __name__ == "__main__":
    main()
