"""Reading dead-lettered messages: the consumer's own headers, or the broker's x-death."""

from __future__ import annotations

import datetime

import pika

from outbox_relay.consumer import (
    ATTEMPTS_HEADER,
    FAILED_AT_HEADER,
    FAILURE_REASON_HEADER,
)
from outbox_relay.consumer.dlq import dead_message
from outbox_relay.consumer.worker import copy_properties


def test_dead_message_reads_the_consumers_failure_headers() -> None:
    properties = pika.BasicProperties(
        message_id="e-1",
        type="order.created",
        headers={
            FAILURE_REASON_HEADER: "gave up after 3 attempt(s): boom",
            ATTEMPTS_HEADER: 3,
            FAILED_AT_HEADER: "2026-01-01T00:00:00.000+00:00",
            "aggregate_id": "o-1",
        },
    )
    dead = dead_message(properties, b"{}")
    assert (dead.event_id, dead.event_type, dead.attempts) == ("e-1", "order.created", 3)
    assert dead.reason == "gave up after 3 attempt(s): boom"
    assert dead.failed_at == "2026-01-01T00:00:00.000+00:00"
    assert dead.headers["aggregate_id"] == "o-1"


def test_dead_message_explains_broker_dead_lettering() -> None:
    properties = pika.BasicProperties(
        headers={
            "event_id": b"e-2",
            "x-death": [
                {
                    "reason": "rejected",
                    "queue": "order.events",
                    "count": 1,
                    "time": datetime.datetime(2026, 1, 1),
                }
            ],
        }
    )
    dead = dead_message(properties, b"{}")
    assert dead.event_id == "e-2"
    assert dead.reason == "dead-lettered by RabbitMQ: rejected"
    assert dead.attempts is None


def test_copied_properties_are_persistent_and_keep_identity() -> None:
    original = pika.BasicProperties(
        message_id="e-3", content_type="application/json", timestamp=1_700_000_000, delivery_mode=1
    )
    copy = copy_properties(original, {"a": 1}, event_type="order.paid")
    assert copy.delivery_mode == 2
    assert (copy.message_id, copy.content_type, copy.timestamp) == (
        "e-3",
        "application/json",
        1_700_000_000,
    )
    assert copy.type == "order.paid"
    assert copy.headers == {"a": 1}
