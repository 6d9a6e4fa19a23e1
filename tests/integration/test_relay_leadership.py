"""Several relays on one outbox: each holds its share of the partitions and publishes it; when
one goes, the others take its partitions over, without loss and in per-aggregate order."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

import outbox_relay
from outbox_relay.db.pool import DatabaseHub
from outbox_relay.db.status import OutboxStatus, read_status
from tests.conftest import RabbitQueue, wait_until
from tests.integration.relay_harness import (
    RelayThread,
    collect,
    drain,
    first_deliveries,
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


def owned(database_url: str) -> dict[str, int]:
    """Relay name -> partitions it holds a live lease on."""
    return {
        relay: count
        for relay, count in rows(
            database_url,
            "SELECT relay, count(*) FROM outbox_relay_leases"
            " WHERE relay IS NOT NULL AND expires_at > now() GROUP BY relay",
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


def test_two_relays_share_the_partitions_and_one_takes_all_when_the_other_stops(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    events = 2000
    first = RelayThread(
        relay_settings(database_url, broker_url, exchange, batch_size=50, relay_name="relay-1")
    )
    second = RelayThread(
        relay_settings(database_url, broker_url, exchange, batch_size=50, relay_name="relay-2")
    )
    try:
        first.start()
        wait_until(lambda: owned(database_url) == {"relay-1": 64})
        second.start()
        # Given two relays: each holds half of the 64 partitions
        wait_until(lambda: owned(database_url) == {"relay-1": 32, "relay-2": 32}, timeout=15)
        status = status_of(database_url)
        assert status.relays_connected == 2
        assert [r.relay for r in status.relays] == ["relay-1", "relay-2"]
        assert status.leader_pid == min(r.pid for r in status.relays)

        with producing(database_url, events // 2) as produced:
            arrived = collect(queue, 200)
            # When one stops mid-stream (finishing its batches and handing its partitions over)
            first.stop()
            # Then the other takes them all at once and drains everything, old and new
            wait_until(lambda: owned(database_url) == {"relay-2": 64}, timeout=5)
            produced.wait(60)
        produce(database_url, events // 2, already=events // 2)
        arrived += collect(queue, events - len(arrived), timeout=60)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0)
        assert status_of(database_url).relays_connected == 1
    finally:
        first.stop()
        second.stop()

    assert len(arrived) == events
    assert drain(queue) == []
    assert len({d.event_id for d in arrived}) == events, "exactly once across the hand-over"
    assert per_aggregate(arrived) == expected_order(events)


def test_a_killed_relay_is_replaced_and_nothing_is_lost(
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    tmp_path: Path,
) -> None:
    queue = bind_queue("order.*")
    events = 2000
    killed = start_cli_relay(
        database_url,
        broker_url,
        exchange,
        tmp_path / "killed.log",
        poll_interval="0.2",
        batch_size="50",
        relay_name="doomed",
    )
    survivor = RelayThread(
        relay_settings(database_url, broker_url, exchange, batch_size=50, relay_name="survivor")
    )
    try:
        wait_until(lambda: owned(database_url).get("doomed") == 64, timeout=30)
        survivor.start()
        wait_until(lambda: owned(database_url) == {"doomed": 32, "survivor": 32}, timeout=15)

        with producing(database_url, events // 2) as produced:
            arrived = collect(queue, 200)
            # When one relay dies without a chance to clean up
            kill(killed)
            # Then PostgreSQL ends its session, and the survivor takes its partitions
            wait_until(lambda: owned(database_url) == {"survivor": 64}, timeout=10)
            produced.wait(60)
        produce(database_url, events // 2, already=events // 2)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0, timeout=60)
        arrived += drain(queue)
    finally:
        kill(killed)
        survivor.stop()

    # At least once: only the killed relay's rows in flight (at most --batch-size) come twice.
    first = first_deliveries(arrived)
    assert len(first) == events
    assert len(arrived) - events <= 50
    assert per_aggregate(first) == expected_order(events)


def test_relay_sessions_probe_their_tcp_connection_so_a_vanished_leader_is_noticed(
    database_url: str, broker_url: str, exchange: str
) -> None:
    """After a node failure nothing closes a relay's socket: the server must find out by itself
    (TCP keepalives) to end its session (and so its membership) within about a minute."""

    async def settings_seen_by_the_server() -> list[list[str]]:
        # Every connection of the relay: claiming, leases (its membership) and LISTEN.
        hub = DatabaseHub(database_url, 10, "keepalive-test")
        hub.lanes.reserve(1)
        await hub.open(listen=True)
        try:
            seen = []
            for conn in (await hub.lanes.acquire(), hub.coordinator._conn, hub.listener._conn):
                assert conn is not None
                names = ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")
                seen.append(
                    [
                        str((await (await conn.execute(f"SHOW {name}")).fetchone() or [None])[0])
                        for name in names
                    ]
                )
            return seen
        finally:
            await hub.close()

    # Over TCP (on a Unix socket the server reports 0 for all three).
    assert asyncio.run(settings_seen_by_the_server()) == [["30", "10", "3"]] * 3
