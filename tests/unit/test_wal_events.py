"""Events written straight to the WAL: what a valid message is and how it becomes an event."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from outbox_relay.cdc.wal_events import WalEvent, default_prefix, parse_wal_event
from outbox_relay.errors import InvalidEventError

AT = datetime(2025, 5, 6, 7, 8, 9, tzinfo=UTC)
PREFIX = default_prefix("public")


def parse(document: object, lsn: int = 0x1_0000_00A0) -> WalEvent:
    text = document if isinstance(document, bytes) else json.dumps(document).encode()
    return parse_wal_event(text, PREFIX, lsn, AT)


def test_a_full_message_keeps_every_field() -> None:
    event = parse(
        {
            "event_type": "order.created",
            "aggregate_type": "order",
            "aggregate_id": 42,
            "payload": {"id": 42, "note": "café"},
            "headers": {"traceparent": "00-1-2-01"},
            "event_id": "0B6C3F4E-2F59-4A8E-9A57-1D3F0C6E5A01",
        }
    )
    assert event.event_id == "0b6c3f4e-2f59-4a8e-9a57-1d3f0c6e5a01"
    assert event.aggregate_id == "42"
    assert json.loads(event.payload) == {"id": 42, "note": "café"}
    assert json.loads(event.headers) == {"traceparent": "00-1-2-01"}
    assert event.created_at == AT


def test_without_event_id_the_id_is_derived_from_the_wal_position() -> None:
    first = parse({"event_type": "a.b", "payload": 1})
    again = parse({"event_type": "a.b", "payload": 1})
    elsewhere = parse({"event_type": "a.b", "payload": 1}, lsn=0x2_0000_0000)

    assert first.event_id == again.event_id != elsewhere.event_id
    assert first.aggregate_id is None
    assert first.headers == "{}"


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (b"not json", "not JSON"),
        (b"\xff", "not JSON"),
        ([1, 2], "not a JSON object"),
        ({"payload": {}}, "event_type is missing"),
        ({"event_type": "order created", "payload": {}}, "dot-separated words"),
        ({"event_type": "a.b"}, "payload is missing"),
        ({"event_type": "a.b", "payload": {}, "headers": [1]}, "headers must be a JSON object"),
        ({"event_type": "a.b", "payload": {}, "event_id": "nope"}, "is not a UUID"),
        ({"event_type": "a.b", "payload": {}, "aggregate_id": {"x": 1}}, "must be a string"),
    ],
)
def test_invalid_messages_say_what_is_wrong(document: object, problem: str) -> None:
    with pytest.raises(InvalidEventError, match=problem):
        parse(document)
