"""An outbox row as the relay reads it, for unit tests: one realistic row (a trace context, a
non-ASCII payload), changed field by field; and the AMQP properties pika encodes for a row."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pika.spec import BasicProperties

from outbox_relay.messages import OutboxMessage

CREATED = datetime(2026, 3, 1, 12, 30, 45, 123456, tzinfo=UTC)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
# Headers of every JSON type AMQP tables take differently (floats go as their JSON text).
TYPED_HEADERS: dict[str, Any] = {
    "Tenant-ID": 'acmé "north" 100%',
    "flag": True,
    "n": -7,
    "big": 2**40,
    "ratio": 0.5,
    "nested": {"a": [1, "ü", 2.5]},
    "emoji": "😀",
}


def outbox_message(**changes: Any) -> OutboxMessage:
    values: dict[str, Any] = {
        "id": 1,
        "event_id": "8d4f6a53-1c1e-4a0e-9a55-1f0a3f2b8c11",
        "event_type": "order.created",
        "aggregate_type": "order",
        "aggregate_id": "o-42",
        "payload": b'{"total":12.5,"note":"gr\xc3\xbc\xc3\x9fe"}',
        "headers": {"tenant": "acme", "traceparent": TRACEPARENT, "tracestate": "k=v"},
        "created_at": CREATED,
    }
    values.update(changes)
    return OutboxMessage(**values)


def pika_properties(row: OutboxMessage, content_type: str, headers: Any) -> bytes:
    """The properties every format sets, as pika itself encodes them."""
    properties = BasicProperties(
        content_type=content_type,
        delivery_mode=2,
        message_id=row.event_id,
        type=row.event_type,
        timestamp=int(row.created_at.timestamp()),
        headers=headers,
    )
    return b"".join(properties.encode())
