"""build_row: what the producer API refuses before anything reaches the database."""

from __future__ import annotations

import json
import math
import uuid
from decimal import Decimal
from typing import Any

import pytest

from outbox_relay.errors import InvalidEventError
from outbox_relay.producer import build_row


def row(event_type: str = "order.created", **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "payload": {"id": 1},
        "aggregate_id": "1",
        "aggregate_type": "order",
        "headers": None,
        "event_id": None,
    }
    fields.update(changes)
    return build_row(event_type, **fields)


def test_a_valid_event_becomes_insert_parameters() -> None:
    event_id = uuid.uuid4()
    params = row(
        payload={"id": 1, "lines": [1, 2], "note": "naïve"},
        headers={"traceparent": "00-1-2-01"},
        event_id=event_id,
    )
    assert params["event_id"] == event_id
    assert params["event_type"] == "order.created"
    assert params["aggregate_type"] == "order"
    assert params["aggregate_id"] == "1"
    assert json.loads(params["payload"]) == {"id": 1, "lines": [1, 2], "note": "naïve"}
    assert json.loads(params["headers"]) == {"traceparent": "00-1-2-01"}


def test_defaults_fresh_event_id_and_empty_headers() -> None:
    first, second = row(), row()
    assert isinstance(first["event_id"], uuid.UUID)
    assert first["event_id"] != second["event_id"]
    assert first["headers"] == "{}"


def test_integer_aggregate_id_is_stored_as_text() -> None:
    assert row(aggregate_id=123)["aggregate_id"] == "123"
    assert row(aggregate_id=None)["aggregate_id"] is None


@pytest.mark.parametrize("payload", [None, 0, "text", [1, "two"], {"nested": {"a": [None]}}])
def test_any_json_value_is_a_payload(payload: Any) -> None:
    assert json.loads(row(payload=payload)["payload"]) == payload


@pytest.mark.parametrize(
    "event_type", ["", "order.*", "order..created", "order created", "x" * 256]
)
def test_bad_event_type_is_refused(event_type: str) -> None:
    with pytest.raises(InvalidEventError, match="event type"):
        row(event_type)


@pytest.mark.parametrize(
    "payload", [object(), {1, 2}, {"when": b"bytes"}, math.nan, {"x": math.inf}, Decimal("1.5")]
)
def test_payload_that_is_not_json_is_refused(payload: Any) -> None:
    with pytest.raises(InvalidEventError, match=r"'order\.created' is not JSON-serializable"):
        row(payload=payload)


@pytest.mark.parametrize("headers", [{"trace": object()}, {"score": math.nan}, ["not", "a-map"]])
def test_headers_that_are_not_a_json_object_are_refused(headers: Any) -> None:
    with pytest.raises(InvalidEventError):
        row(headers=headers)


def test_invalid_event_error_is_a_value_error_for_callers_that_catch_those() -> None:
    with pytest.raises(ValueError, match="event type"):
        row("bad type")
