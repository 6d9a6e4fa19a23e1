"""Events the broker will not take: retried with backoff, then dead; their aggregate waits."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import outbox_relay
from outbox_relay.db.dead_events import list_dead, retry_dead
from outbox_relay.observability.logs import JsonFormatter
from tests.conftest import RabbitQueue, wait_until
from tests.integration.relay_harness import (
    RelayThread,
    collect,
    drain,
    per_aggregate,
    relay_settings,
    rows,
    scalar,
)

pytestmark = pytest.mark.integration

SECRET = "payload-must-not-be-logged-4f1c"


def row_state(database_url: str, event_id: Any) -> tuple[int, str | None, bool, bool]:
    """(attempts, last_error, retrying, dead) of one outbox row."""
    found = rows(
        database_url,
        "SELECT attempts, last_error, next_attempt_at IS NOT NULL, dead_at IS NOT NULL"
        " FROM outbox WHERE event_id = %s",
        (event_id,),
    )
    assert found, f"row {event_id} is gone"
    attempts, last_error, retrying, dead = found[0]
    return attempts, last_error, retrying, dead


def emit(database_url: str, event_type: str, aggregate_id: str, **payload: Any) -> Any:
    with psycopg.connect(database_url) as conn:
        return outbox_relay.emit(conn, event_type, payload=payload, aggregate_id=aggregate_id)


def dead_events(database_url: str) -> list[Any]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return list_dead(conn, "public")


def test_an_unroutable_event_is_retried_then_dead_and_holds_back_only_its_aggregate(
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue = bind_queue("order.*")
    # Given an event nobody is bound to, followed by routable events of the same aggregate
    poison = emit(database_url, "audit.recorded", "A", secret=SECRET)
    for seq in (1, 2, 3):
        emit(database_url, "order.updated", "A", seq=seq)
    for seq in (1, 2):
        emit(database_url, "order.updated", "B", seq=seq)

    settings = relay_settings(
        database_url, broker_url, exchange, max_attempts=3, retry_backoff=1.0, retry_backoff_max=5.0
    )
    caplog.set_level(logging.DEBUG, logger="outbox_relay")
    with RelayThread(settings):
        # When the relay runs: other aggregates flow while the poison event backs off
        early = collect(queue, 2)
        wait_until(lambda: row_state(database_url, poison)[0] >= 1)
        emit(database_url, "order.updated", "B", seq=3)
        early += collect(queue, 1)
        early += drain(queue)
        # Read after the drain: the poison event was still backing off then, so nothing of A
        # may have reached the queue.
        attempts, last_error, retrying, dead = row_state(database_url, poison)
        assert (retrying, dead) == (True, False)
        assert 1 <= attempts < 3
        assert "unroutable" in (last_error or "")
        assert per_aggregate(early) == {"B": [1, 2, 3]}

        # Then it is dead after max_attempts, and A's later events go, in order
        late = collect(queue, 3, timeout=20)
        attempts, last_error, retrying, dead = row_state(database_url, poison)
    assert (attempts, retrying, dead) == (3, False, True)
    assert per_aggregate(late) == {"A": [1, 2, 3]}

    [dead_event] = dead_events(database_url)
    assert dead_event.event_id == str(poison)
    assert dead_event.event_type == "audit.recorded"
    assert dead_event.aggregate_id == "A"
    assert dead_event.attempts == 3
    assert "unroutable" in (dead_event.last_error or "")
    assert "audit.recorded" in (dead_event.last_error or "")

    # The relay logs the failures with their context, never the payload.
    lines = [JsonFormatter().format(record) for record in caplog.records]
    failures = [json.loads(line) for line in lines if "publish failed" in line]
    assert len(failures) == 3
    assert {f["event_id"] for f in failures} == {str(poison)}
    assert [f["attempt"] for f in failures] == [1, 2, 3]
    assert all(f["aggregate_id"] == "A" and f["event_type"] == "audit.recorded" for f in failures)
    assert not [line for line in lines if SECRET in line]


def test_dead_retry_requeues_and_the_event_is_delivered_once_it_can_be_routed(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    orders = bind_queue("order.*")
    first = emit(database_url, "audit.recorded", "A", n=1)
    second = emit(database_url, "audit.recorded", "B", n=2)
    settings = relay_settings(database_url, broker_url, exchange, max_attempts=1, retry_backoff=0.1)
    with RelayThread(settings):
        wait_until(lambda: len(dead_events(database_url)) == 2)
        assert drain(orders) == []

        # Requeued while still unroutable: attempts start over, and it is dead again.
        assert retry_dead_in(database_url, [str(first)]) == [str(first)]
        wait_until(lambda: row_state(database_url, first)[3])
        assert row_state(database_url, first)[0] == 1

        # ...but once a queue is bound, retrying delivers.
        audit = bind_queue("audit.#")
        assert sorted(retry_dead_in(database_url, [], all_=True)) == sorted(
            [str(first), str(second)]
        )
        delivered = collect(audit, 2)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0)
    assert sorted(d.event_id for d in delivered) == sorted([str(first), str(second)])
    assert dead_events(database_url) == []
    assert drain(audit) == []
    # Retrying an unknown or already delivered event requeues nothing.
    assert retry_dead_in(database_url, [str(first)]) == []


def retry_dead_in(database_url: str, event_ids: list[str], *, all_: bool = False) -> list[str]:
    with psycopg.connect(database_url) as conn:
        return retry_dead(conn, "public", event_ids, all_=all_)


@pytest.mark.parametrize(
    ("case", "headers", "expected_error"),
    [
        ("oversized", {}, "exceeds the 300-byte limit"),
        ("long header key", {"k" * 256: "v"}, "headers cannot be encoded"),
        ("huge header integer", {"count": 2**64}, "headers cannot be encoded"),
    ],
)
def test_events_the_broker_can_never_take_are_dead_at_once(
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    case: str,
    headers: dict[str, Any],
    expected_error: str,
) -> None:
    queue = bind_queue("order.*")
    payload = {"blob": "x" * 300} if case == "oversized" else {"n": 0}
    with psycopg.connect(database_url) as conn:
        bad = outbox_relay.emit(
            conn, "order.created", payload=payload, aggregate_id="A", headers=headers
        )
        for seq in (1, 2):
            outbox_relay.emit(conn, "order.updated", payload={"seq": seq}, aggregate_id="A")
        outbox_relay.emit(conn, "order.updated", payload={"seq": 1}, aggregate_id="B")

    limit = {"max_message_bytes": 300} if case == "oversized" else {}
    settings = relay_settings(database_url, broker_url, exchange, max_attempts=5, **limit)
    with RelayThread(settings):
        delivered = collect(queue, 3)
        wait_until(lambda: row_state(database_url, bad)[3])
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 1)
    # A permanent failure is dead on the first attempt, and its aggregate moves on in order.
    attempts, last_error, retrying, dead = row_state(database_url, bad)
    assert (attempts, retrying, dead) == (1, False, True)
    assert expected_error in (last_error or "")
    assert per_aggregate(delivered) == {"A": [1, 2], "B": [1]}
    assert drain(queue) == []
