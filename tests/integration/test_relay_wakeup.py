"""Wake-ups: NOTIFY brings an idle relay in at once; producers ring only while a relay listens."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

import outbox_relay
from outbox_relay.relay.settings import Mode
from tests.conftest import RabbitQueue, wait_until
from tests.integration.relay_harness import (
    RelayThread,
    collect,
    kill,
    relay_settings,
    scalar,
    start_cli_relay,
)

pytestmark = pytest.mark.integration

CHANNEL = "outbox_relay_v1.public"


def listening(database_url: str) -> bool:
    return bool(
        scalar(
            database_url,
            "SELECT coalesce(bool_or(listening_until > now()), false) FROM outbox_relay_listeners",
        )
    )


def emit_one(database_url: str, n: int) -> None:
    with psycopg.connect(database_url) as conn:
        outbox_relay.emit(conn, "order.created", payload={"n": n}, aggregate_id=str(n))


def seconds_to_arrive(database_url: str, queue: RabbitQueue, n: int) -> float:
    started = time.monotonic()
    emit_one(database_url, n)
    [delivery] = collect(queue, 1, timeout=10)
    assert delivery.json() == {"n": n}
    return time.monotonic() - started


def test_notify_wakes_an_idle_relay_long_before_its_poll_interval(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    settings = relay_settings(
        database_url, broker_url, exchange, mode=Mode.NOTIFY, poll_interval=30
    )
    with RelayThread(settings):
        wait_until(lambda: listening(database_url))
        assert seconds_to_arrive(database_url, queue, 1) < 2
        # And again once it has gone idle after that batch.
        wait_until(lambda: listening(database_url))
        assert seconds_to_arrive(database_url, queue, 2) < 2


def test_poll_mode_finds_events_without_notify(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    settings = relay_settings(database_url, broker_url, exchange, mode=Mode.POLL, poll_interval=0.2)
    with RelayThread(settings) as relay:
        wait_until(lambda: relay.leading)
        assert seconds_to_arrive(database_url, queue, 1) < 5
        # A polling relay never asks producers to ring.
        assert not listening(database_url)


def notified(listener: psycopg.Connection[object], seconds: float) -> bool:
    return any(True for _ in listener.notifies(timeout=seconds, stop_after=1))


def test_producers_ring_only_while_a_relay_is_listening(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    settings = relay_settings(
        database_url, broker_url, exchange, mode=Mode.NOTIFY, poll_interval=30
    )
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f'LISTEN "{CHANNEL}"')

        # No relay has ever run: nobody asked producers to ring.
        assert not listening(database_url)
        emit_one(database_url, 1)
        assert not notified(listener, 0.5)

        with RelayThread(settings):
            collect(queue, 1)
            wait_until(lambda: listening(database_url))
            until = scalar(
                database_url, "SELECT max(listening_until) - now() FROM outbox_relay_listeners"
            )
            assert until.total_seconds() > 0
            emit_one(database_url, 2)
            assert notified(listener, 5)
            collect(queue, 1)

        # A relay that stopped withdraws the request at once, so commits stay NOTIFY-free.
        assert not listening(database_url)
        emit_one(database_url, 3)
        assert not notified(listener, 0.5)


def test_a_killed_relays_request_to_ring_lapses_by_itself(
    database_url: str, broker_url: str, exchange: str, tmp_path: Path
) -> None:
    relay = start_cli_relay(
        database_url, broker_url, exchange, tmp_path / "relay.log", poll_interval="0.2"
    )
    try:
        wait_until(lambda: listening(database_url))
    finally:
        kill(relay)
    # Nothing withdrew the request: it is still there right after the crash...
    ttl = scalar(
        database_url,
        "SELECT extract(epoch FROM max(listening_until) - now()) FROM outbox_relay_listeners",
    )
    assert ttl is not None
    assert 0 < float(ttl) <= 0.2 * 3 + 5
    # ...and lapses within a few poll intervals, after which producers no longer ring.
    wait_until(lambda: not listening(database_url), timeout=float(ttl) + 5)
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f'LISTEN "{CHANNEL}"')
        emit_one(database_url, 1)
        assert not notified(listener, 0.5)


def test_a_relay_turning_busy_leaves_the_other_relays_wake_up_requests_in_place(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    # Given two idle relays on one outbox, each having asked producers to ring
    queue = bind_queue("order.*")
    first = relay_settings(
        database_url, broker_url, exchange, mode=Mode.NOTIFY, poll_interval=30, relay_name="a"
    )
    second = first.model_copy(update={"relay_name": "b"})
    with RelayThread(first), RelayThread(second):
        requests = "SELECT count(*) FROM outbox_relay_listeners WHERE listening_until > now()"
        wait_until(lambda: scalar(database_url, requests) == 2)
        # When events keep one of them busy for a moment, then both idle again, every event
        # still comes at once: no relay's turn to busy withdrew the other's request
        for n in range(20):
            assert seconds_to_arrive(database_url, queue, n) < 2
