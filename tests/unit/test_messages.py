"""The message contract: which event types are routing keys, and what headers a broker carries."""

from __future__ import annotations

import pytest

from outbox_relay.messages import (
    CONFIRMED,
    MAX_EVENT_TYPE_BYTES,
    event_type_problem,
    failed,
)
from tests.unit.outbox_messages import outbox_message


@pytest.mark.parametrize(
    "event_type",
    ["order.created", "order", "Order.Line-Item_added:v2", "a.b.c.d.e", "x" * MAX_EVENT_TYPE_BYTES],
)
def test_routing_key_event_types_are_accepted(event_type: str) -> None:
    assert event_type_problem(event_type) is None


@pytest.mark.parametrize(
    "event_type",
    [
        "",
        "order.",
        ".order",
        "order..created",
        "order.*",
        "order.#",
        "order created",
        "order/created",
        "ordér.created",
        "order.created\n",
    ],
)
def test_event_types_that_are_not_routing_keys_are_refused(event_type: str) -> None:
    problem = event_type_problem(event_type)
    assert problem is not None
    assert "dot-separated words" in problem


def test_event_type_longer_than_a_short_string_is_refused() -> None:
    problem = event_type_problem("a" * (MAX_EVENT_TYPE_BYTES + 1))
    assert problem is not None
    assert str(MAX_EVENT_TYPE_BYTES) in problem


message = outbox_message


def test_broker_headers_carry_row_headers_and_the_aggregate() -> None:
    row = message(headers={"traceparent": "00-abc-def-01"})
    assert row.broker_headers() == {
        "traceparent": "00-abc-def-01",
        "aggregate_type": "order",
        "aggregate_id": "o-42",
    }


def test_broker_headers_leave_out_a_missing_aggregate() -> None:
    row = message(aggregate_type=None, aggregate_id=None, headers={"traceparent": "t"})
    assert row.broker_headers() == {"traceparent": "t"}


def test_broker_headers_do_not_mutate_the_row_headers() -> None:
    row_headers = {"traceparent": "t"}
    msg = message(headers=row_headers)
    msg.broker_headers()["extra"] = 1
    assert row_headers == {"traceparent": "t"}
    assert "aggregate_id" not in msg.headers


def test_the_row_aggregate_wins_over_a_header_of_the_same_name() -> None:
    # Consumers route and deduplicate on aggregate_id: a producer's header must not spoof it.
    headers = message(headers={"aggregate_id": "spoofed"}).broker_headers()
    assert headers["aggregate_id"] == "o-42"


def test_publish_results() -> None:
    assert CONFIRMED.confirmed
    assert CONFIRMED.reason is None
    retryable = failed("unroutable")
    assert (retryable.confirmed, retryable.reason, retryable.permanent) == (
        False,
        "unroutable",
        False,
    )
    assert failed("too big", permanent=True).permanent
