"""Two relays on one outbox: one leads, the other stands by and takes over when it goes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

import outbox_relay
from outbox_relay.db.status import OutboxStatus, read_status
from outbox_relay.db.store import OutboxStore
from tests.conftest import RabbitQueue, wait_until
from tests.integration.relay_harness import (
    Delivery,
    RelayThread,
    collect,
    drain,
    kill,
    per_aggregate,
    relay_settings,
    rows,
    scalar,
    start_cli_relay,
)

pytestmark = pytest.mark.integration

AGGREGATES = [f"agg-{n}" for n in range(10)]


def status_of(database_url: str) -> OutboxStatus:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return read_status(conn, "public")


def relay_backends(database_url: str) -> set[int]:
    return {
        pid
        for (pid,) in rows(
            database_url,
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'outbox-relay:public'",
        )
    }


def produce(database_url: str, events: int, already: int = 0) -> None:
    """Emit ``events`` events round-robin over AGGREGATES, five per transaction, continuing after
    ``already`` earlier ones; payload seq is the event's place in its aggregate's commit order."""
    with psycopg.connect(database_url) as conn:
        for n in range(already, already + events):
            aggregate = AGGREGATES[n % len(AGGREGATES)]
            seq = n // len(AGGREGATES) + 1
            outbox_relay.emit(conn, "order.updated", payload={"seq": seq}, aggregate_id=aggregate)
            if n % 5 == 4:
                conn.commit()


@contextmanager
def producing(database_url: str, events: int) -> Iterator[threading.Event]:
    """produce() on a background thread; the yielded event is set when it is done."""
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            produce(database_url, events)
        except BaseException as exc:
            failure.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run, name="producer", daemon=True)
    thread.start()
    try:
        yield done
    finally:
        thread.join(60)
    if failure:
        raise failure[0]


def expected_order(events: int) -> dict[str, list[int]]:
    per = events // len(AGGREGATES)
    return {aggregate: list(range(1, per + 1)) for aggregate in AGGREGATES}


def first_deliveries(deliveries: list[Delivery]) -> list[Delivery]:
    seen: set[str] = set()
    first = []
    for delivery in deliveries:
        if delivery.event_id not in seen:
            seen.add(delivery.event_id)
            first.append(delivery)
    return first


def test_one_relay_leads_and_the_standby_takes_over_when_it_stops(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    settings = relay_settings(database_url, broker_url, exchange, batch_size=50)
    events = 2000
    first = RelayThread(settings, "relay-1").start()
    second = RelayThread(settings, "relay-2")
    try:
        wait_until(lambda: first.leading)
        second.start()
        wait_until(lambda: status_of(database_url).relays_connected == 2)
        status = status_of(database_url)
        assert status.leader_pid in relay_backends(database_url)
        assert (first.leading, second.leading) == (True, False)

        with producing(database_url, events // 2) as produced:
            arrived = collect(queue, 200)
            # When the leader stops mid-stream (finishing its batch)
            first.stop()
            # Then the standby takes over and drains everything, old and new
            wait_until(lambda: second.leading)
            produced.wait(60)
        # Produced after the hand-over: only the new leader can publish these.
        produce(database_url, events // 2, already=events // 2)
        arrived += collect(queue, events - len(arrived), timeout=60)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0)
        new_status = status_of(database_url)
        assert new_status.leader_pid in relay_backends(database_url)
        assert new_status.leader_pid != status.leader_pid
        assert new_status.relays_connected == 1
    finally:
        first.stop()
        second.stop()

    assert len(arrived) == events
    assert drain(queue) == []
    assert len({d.event_id for d in arrived}) == events, "exactly once across the hand-over"
    assert per_aggregate(arrived) == expected_order(events)


def test_a_killed_leader_is_replaced_and_nothing_is_lost(
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    tmp_path: Path,
) -> None:
    queue = bind_queue("order.*")
    events = 2000
    leader = start_cli_relay(
        database_url,
        broker_url,
        exchange,
        tmp_path / "leader.log",
        poll_interval="0.2",
        batch_size="50",
    )
    standby = RelayThread(relay_settings(database_url, broker_url, exchange, batch_size=50))
    try:
        wait_until(lambda: status_of(database_url).leader_pid is not None)
        standby.start()
        wait_until(lambda: status_of(database_url).relays_connected == 2)
        assert not standby.leading

        with producing(database_url, events // 2) as produced:
            arrived = collect(queue, 200)
            # When the leader dies without a chance to clean up
            kill(leader)
            # Then PostgreSQL frees its lock with its connection and the standby leads
            wait_until(lambda: standby.leading, timeout=15)
            produced.wait(60)
        # Produced after the take-over: only the new leader can publish these.
        produce(database_url, events // 2, already=events // 2)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0, timeout=60)
        arrived += drain(queue)
    finally:
        kill(leader)
        standby.stop()

    # At least once: only the killed leader's batches in flight (two lanes) may come twice.
    first = first_deliveries(arrived)
    assert len(first) == events
    assert len(arrived) - events <= 2 * 50
    assert per_aggregate(first) == expected_order(events)


def test_relay_sessions_probe_their_tcp_connection_so_a_vanished_leader_is_noticed(
    database_url: str, broker_url: str, exchange: str
) -> None:
    """After a node failure nothing closes the leader's socket: the server must find out by
    itself (TCP keepalives) to free the leadership lock for a standby within about a minute."""

    async def settings_seen_by_the_server() -> list[str]:
        store = OutboxStore(relay_settings(database_url, broker_url, exchange))
        await store.connect()
        try:
            conn = store._connection()
            names = ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")
            return [
                str((await (await conn.execute(f"SHOW {name}")).fetchone() or [None])[0])
                for name in names
            ]
        finally:
            await store.close()

    # Over TCP (on a Unix socket the server reports 0 for all three).
    assert asyncio.run(settings_seen_by_the_server()) == ["30", "10", "3"]
