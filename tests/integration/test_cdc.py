"""``--mode cdc`` against the real PostgreSQL (wal_level=logical) and RabbitMQ.

Most tests use a long poll interval, so the table path (which also runs in CDC mode, for retries
and rows committed while no slot existed) only runs at start: what arrives afterwards came from
the WAL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import psycopg
import pytest

from outbox_relay.cdc.stream import ReplicationStream
from outbox_relay.db.dead_events import retry_dead
from outbox_relay.db.pool import ConnectionPool
from outbox_relay.db.store import OutboxStore
from outbox_relay.relay.settings import Mode, OnSent
from tests.cdc_support import current_wal_lsn, drop_slot_eventually, slot_row, unique_slot_name
from tests.conftest import RabbitQueue, wait_until
from tests.integration.relay_harness import (
    RelayThread,
    collect,
    drain,
    relay_settings,
    rows,
    scalar,
)

pytestmark = pytest.mark.integration

NO_SWEEP = 30.0  # poll interval long enough that the table path never runs mid-test


@pytest.fixture
def slot(database_url: str) -> Iterator[str]:
    name = unique_slot_name()
    yield name
    drop_slot_eventually(database_url, name)


@pytest.fixture
def cdc_relay(
    database_url: str, broker_url: str, exchange: str, slot: str
) -> Iterator[Callable[..., RelayThread]]:
    """cdc_relay(**overrides) -> a started RelayThread in CDC mode, streaming once returned."""
    started: list[RelayThread] = []

    def start(*, wait_streaming: bool = True, **overrides: object) -> RelayThread:
        values: dict[str, object] = {
            "mode": Mode.CDC,
            "slot_name": slot,
            "publication": slot,
            "poll_interval": NO_SWEEP,
            "heartbeat_interval": 0.5,
        }
        values.update(overrides)
        relay = RelayThread(relay_settings(database_url, broker_url, exchange, **values)).start()
        started.append(relay)
        if wait_streaming:
            # confirmed_flush_lsn is NULL while the slot is still being created (it waits for the
            # cluster's running transactions): only then is everything committed later streamed.
            wait_until(
                lambda: (
                    (s := slot_row(database_url, slot))
                    and s["active"]
                    and s["confirmed"] is not None
                ),
                timeout=60,
            )
        return relay

    yield start
    for relay in started:
        relay.stop()  # re-raises whatever the relay thread died of


def emit(database_url: str, *events: tuple[str, str | None, dict[str, object]]) -> list[str]:
    """Commit (event_type, aggregate_id, payload) events in one transaction; their event ids."""
    with psycopg.connect(database_url) as conn:
        ids = [
            str(
                conn.execute(
                    "SELECT outbox_emit(%s, %s, %s::jsonb, 'order', %s::jsonb)",
                    (kind, aggregate, json.dumps(payload), json.dumps({"trace": "t-1"})),
                ).fetchone()[0]  # type: ignore[index]  # one row, always
            )
            for kind, aggregate, payload in events
        ]
        conn.commit()
    return ids


def test_cdc_publishes_committed_events_with_the_message_contract_and_deletes_them(
    database_url: str,
    slot: str,
    bind_queue: Callable[..., RabbitQueue],
    cdc_relay: Callable[..., RelayThread],
) -> None:
    queue = bind_queue("order.*")
    cdc_relay()

    ids = emit(
        database_url,
        ("order.created", "A-1", {"id": 1, "note": "naïve café", "lines": [1, 2]}),
        ("order.paid", "A-1", {"id": 1, "total": 9.5}),
    )
    got = collect(queue, 2, timeout=30)

    assert [d.event_id for d in got] == ids
    created = got[0]
    assert created.routing_key == "order.created"
    assert created.json() == {"id": 1, "note": "naïve café", "lines": [1, 2]}
    props = created.properties
    assert props.type == "order.created"
    assert props.content_type == "application/json"
    assert props.delivery_mode == 2
    assert props.headers == {"trace": "t-1", "aggregate_type": "order", "aggregate_id": "A-1"}
    assert abs(props.timestamp - datetime.now().timestamp()) < 60
    wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0, timeout=10)
    # The slot confirmed the transaction: its position moved past the commit.
    end = current_wal_lsn(database_url)
    wait_until(lambda: slot_row(database_url, slot)["confirmed"] >= end - 1024 * 1024, timeout=10)  # type: ignore[index]  # the slot exists


def test_restart_resumes_from_the_slot_without_republishing_confirmed_events(
    database_url: str, bind_queue: Callable[..., RabbitQueue], cdc_relay: Callable[..., RelayThread]
) -> None:
    queue = bind_queue("#")
    relay = cdc_relay(on_sent=OnSent.KEEP)
    first = emit(database_url, ("order.created", "R-1", {"n": 1}))
    collect(queue, 1, timeout=30)
    relay.stop()

    second = emit(database_url, ("order.paid", "R-1", {"n": 2}))
    cdc_relay(on_sent=OnSent.KEEP)
    got = collect(queue, 1, timeout=30)

    assert [d.event_id for d in got] == second
    # Kept rows are moved to the archive, and the first event was not streamed again.
    wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox_history") == 2, timeout=10)
    assert drain(queue) == []
    assert first != second


def test_transactions_arrive_in_commit_order_even_when_ids_say_otherwise(
    database_url: str, bind_queue: Callable[..., RabbitQueue], cdc_relay: Callable[..., RelayThread]
) -> None:
    queue = bind_queue("#")
    cdc_relay()

    # X and Y hash to different ordering-lock buckets, so `late` does not wait for `early`.
    with psycopg.connect(database_url) as early, psycopg.connect(database_url) as late:
        # `early` draws the smaller id but commits last.
        early.execute("SELECT outbox_emit('order.created', 'X', '{\"n\": 1}')")
        late.execute("SELECT outbox_emit('order.created', 'Y', '{\"n\": 1}')")
        late.execute("SELECT outbox_emit('order.paid', 'Y', '{\"n\": 2}')")
        late.commit()
        wait_until(lambda: queue.count() == 2, timeout=30)
        early.commit()
    with psycopg.connect(database_url) as conn:  # and the same aggregate across transactions
        for n in (2, 3):
            conn.execute(
                "SELECT outbox_emit('order.paid', 'X', %s::jsonb)", (json.dumps({"n": n}),)
            )
            conn.commit()
    got = collect(queue, 5, timeout=30)

    assert [(d.aggregate_id, d.json()["n"]) for d in got] == [
        ("Y", 1),
        ("Y", 2),
        ("X", 1),
        ("X", 2),
        ("X", 3),
    ]


def test_a_failed_event_is_recorded_and_holds_back_later_events_of_its_aggregate(
    database_url: str, bind_queue: Callable[..., RabbitQueue], cdc_relay: Callable[..., RelayThread]
) -> None:
    queue = bind_queue("order.*")  # "audit.logged" is unroutable: refused by the broker
    cdc_relay(poll_interval=0.2, max_attempts=3, retry_backoff=0.2, retry_backoff_max=0.5)

    emit(database_url, ("audit.logged", "H-1", {"n": 1}), ("order.paid", "H-1", {"n": 2}))
    emit(database_url, ("order.created", "OK", {"n": 1}))

    wait_until(
        lambda: scalar(database_url, "SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL") == 1,
        timeout=30,
    )
    got = collect(queue, 2, timeout=30)

    # The unroutable event was tried max_attempts times (recorded in the table like the core),
    # and H-1's next event went out only once it was dead: never before it.
    assert rows(
        database_url, "SELECT event_type, attempts, last_error IS NOT NULL FROM outbox"
    ) == [("audit.logged", 3, True)]
    assert sorted((d.aggregate_id, d.json()["n"]) for d in got) == [("H-1", 2), ("OK", 1)]


def test_an_event_held_back_behind_one_dead_at_once_goes_without_waiting_for_a_sweep(
    database_url: str, bind_queue: Callable[..., RabbitQueue], cdc_relay: Callable[..., RelayThread]
) -> None:
    queue = bind_queue("order.*")
    # No sweep during the test (NO_SWEEP): only the CDC path's own hand-off can publish P-1's
    # second event, which the first one, too large and dead at once, held back.
    cdc_relay(max_message_bytes=1000)

    emit(
        database_url,
        ("order.created", "P-1", {"n": 1, "pad": "x" * 2000}),
        ("order.paid", "P-1", {"n": 2}),
    )
    got = collect(queue, 1, timeout=10)

    assert [(d.aggregate_id, d.json()["n"]) for d in got] == [("P-1", 2)]
    assert rows(database_url, "SELECT event_type, dead_at IS NOT NULL FROM outbox") == [
        ("order.created", True)
    ]


def test_a_relay_waits_as_standby_while_another_process_holds_the_slot(
    database_url: str,
    slot: str,
    bind_queue: Callable[..., RabbitQueue],
    cdc_relay: Callable[..., RelayThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="outbox_relay")
    queue = bind_queue("#")
    relay = cdc_relay()  # creates slot and publication
    relay.stop()
    holder = ReplicationStream(
        psycopg.conninfo.make_conninfo(database_url, options="-c TimeZone=UTC")
    )
    holder.open()
    holder.start(slot, slot, 0)
    try:
        cdc_relay(wait_streaming=False, poll_interval=0.2)
        wait_until(lambda: "is in use by another process" in caplog.text, timeout=30)
        emit(database_url, ("order.created", "S-1", {"n": 1}))
        assert queue.count() == 0  # the other consumer has the slot: nothing published
    finally:
        holder.close()
    got = collect(queue, 1, timeout=20)  # took over once the slot freed

    assert got[0].aggregate_id == "S-1"
    assert caplog.text.count("is in use by another process") == 1  # said once, not per retry


def test_a_dropped_slot_is_recreated_and_events_committed_meanwhile_are_published(
    database_url: str,
    slot: str,
    bind_queue: Callable[..., RabbitQueue],
    cdc_relay: Callable[..., RelayThread],
) -> None:
    queue = bind_queue("#")
    relay = cdc_relay()
    emit(database_url, ("order.created", "D-1", {"n": 1}))
    collect(queue, 1, timeout=30)
    relay.stop()

    before_drop = emit(database_url, ("order.paid", "D-1", {"n": 2}))
    drop_slot_eventually(database_url, slot)
    after_drop = emit(database_url, ("order.shipped", "D-1", {"n": 3}))
    cdc_relay()
    later = emit(database_url, ("order.closed", "D-1", {"n": 4}))
    got = collect(queue, 3, timeout=20)

    assert [d.event_id for d in got] == before_drop + after_drop + later
    assert slot_row(database_url, slot) is not None


def test_an_idle_outbox_does_not_make_the_slot_retain_wal(
    database_url: str, slot: str, cdc_relay: Callable[..., RelayThread]
) -> None:
    cdc_relay()
    start = current_wal_lsn(database_url)
    # Another table takes ~20,000 writes (about 20 MB of WAL) while the outbox stays idle.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE busy (id int, filler text)")
        for _ in range(20):
            conn.execute(
                "INSERT INTO busy SELECT g, repeat('x', 900) FROM generate_series(1, 1000) g"
            )
    end = current_wal_lsn(database_url)
    assert end - start > 16 * 1024 * 1024

    def state() -> dict[str, Any]:
        row = slot_row(database_url, slot)
        assert row is not None
        return row

    # The relay confirms keepalive/heartbeat positions past the other table's writes (without
    # them it would stay before them: nothing came for the outbox), and the server then lets
    # that WAL go. Retained WAL is cluster-wide, so tests writing elsewhere meanwhile count too:
    # hence the generous 64 MB bound.
    wait_until(lambda: state()["confirmed"] >= end, timeout=30, interval=0.2)
    wait_until(lambda: state()["retained"] < 64 * 1024 * 1024, timeout=30, interval=0.5)


def test_shutdown_is_prompt_while_streaming(
    database_url: str, cdc_relay: Callable[..., RelayThread]
) -> None:
    relay = cdc_relay()
    stopped = threading.Event()

    def stop() -> None:
        relay.stop()
        stopped.set()

    threading.Thread(target=stop, daemon=True).start()
    wait_until(stopped.is_set, timeout=5)
    assert not relay.running


def emit_to_wal(database_url: str, *documents: object, prefix: str = "outbox_relay.public") -> None:
    """Write events straight to the WAL in one transaction: no table is touched."""
    with psycopg.connect(database_url) as conn:
        for document in documents:
            text = document if isinstance(document, str) else json.dumps(document)
            conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", (prefix, text))
        conn.commit()


def test_events_written_straight_to_the_wal_are_published_with_the_same_contract(
    database_url: str,
    bind_queue: Callable[..., RabbitQueue],
    cdc_relay: Callable[..., RelayThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="outbox_relay")
    queue = bind_queue("order.*")
    cdc_relay(poll_interval=0.2, max_attempts=2, retry_backoff=0.1, retry_backoff_max=0.2)
    given_id = "0b6c3f4e-2f59-4a8e-9a57-1d3f0c6e5a01"

    emit_to_wal(
        database_url,
        {
            "event_type": "order.created",
            "aggregate_type": "order",
            "aggregate_id": "W-1",
            "payload": {"id": 1, "note": "café"},
            "headers": {"trace": "t-9"},
            "event_id": given_id,
        },
        {"event_type": "order.paid", "aggregate_id": "W-1", "payload": {"id": 1, "paid": True}},
        "not json",  # skipped with an error, the others still go
        {"event_type": "audit.logged", "payload": {}},  # unroutable: stored, retried, dead
    )
    emit_to_wal(database_url, {"event_type": "order.other", "payload": {}}, prefix="someone.else")
    got = collect(queue, 2, timeout=30)

    first, second = got
    assert first.event_id == given_id
    assert first.routing_key == "order.created"
    assert first.json() == {"id": 1, "note": "café"}
    assert first.properties.type == "order.created"
    assert first.properties.content_type == "application/json"
    assert first.properties.delivery_mode == 2
    assert first.headers == {"trace": "t-9", "aggregate_type": "order", "aggregate_id": "W-1"}
    assert (second.routing_key, second.aggregate_id) == ("order.paid", "W-1")
    wait_until(
        lambda: (
            rows(database_url, "SELECT event_type, attempts, dead_at IS NOT NULL FROM outbox")
            == [("audit.logged", 2, True)]
        ),
        timeout=20,
    )
    assert "skipped an invalid event written to the WAL: not JSON" in caplog.text
    assert drain(queue) == []  # other prefixes are not ours


def test_cdc_mode_streams_many_events_of_few_aggregates_in_commit_order(
    database_url: str, bind_queue: Callable[..., RabbitQueue], cdc_relay: Callable[..., RelayThread]
) -> None:
    # Each aggregate's events go confirm by confirm on the shared window, across batches and
    # lanes (CDC mode uses the same pipeline as the table modes).
    queue = bind_queue("order.*")
    cdc_relay(batch_size=30)
    for seq in range(1, 41):
        emit(database_url, *[("order.updated", f"A-{k}", {"seq": seq}) for k in range(3)])

    got = collect(queue, 120, timeout=30)

    order: dict[str, list[int]] = {}
    for delivery in got:
        order.setdefault(str(delivery.aggregate_id), []).append(delivery.json()["seq"])
    assert order == {f"A-{k}": list(range(1, 41)) for k in range(3)}


def test_rows_of_a_transaction_are_read_only_once_it_shows_as_committed(
    database_url: str, broker_url: str, exchange: str
) -> None:
    # The walsender may send a commit a moment before the committing session makes it visible;
    # the relay waits on the WAL's (32-bit) xid until snapshots show the transaction.
    async def scenario() -> None:
        pool = ConnectionPool(database_url, 1, "visibility-test")
        store = OutboxStore(relay_settings(database_url, broker_url, exchange, mode=Mode.CDC), pool)
        try:
            with psycopg.connect(database_url) as writer:
                xid = int(scalar_of(writer, "SELECT pg_current_xact_id()::text"))
                wal_xid = xid & 0xFFFFFFFF
                waiting = asyncio.ensure_future(store.wait_visible([wal_xid]))
                await asyncio.sleep(0.3)
                assert not waiting.done(), "an open transaction counted as visible"
                writer.commit()
            await asyncio.wait_for(waiting, timeout=5)
            # Long committed and unknown-but-old transactions are visible at once.
            await asyncio.wait_for(store.wait_visible([wal_xid, 3]), timeout=1)
        finally:
            await store.rollback()
            await pool.close()

    asyncio.run(scenario())


def scalar_of(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_dead_events_retried_are_published_at_once_not_at_the_next_sweep(
    database_url: str, bind_queue: Callable[..., RabbitQueue], cdc_relay: Callable[..., RelayThread]
) -> None:
    # Given an event that died (unroutable, one attempt allowed), and no sweep during the test
    orders = bind_queue("order.*")
    cdc_relay(max_attempts=1)
    (event_id,) = emit(database_url, ("audit.logged", "A-1", {"n": 1}))
    wait_until(
        lambda: scalar(database_url, "SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL") == 1,
        timeout=30,
    )
    audits = bind_queue("audit.*")

    # When an operator retries it (the row becomes pending without an insert)
    with psycopg.connect(database_url) as conn:
        assert retry_dead(conn, "public", [event_id]) == [event_id]

    # Then the WAL message committed with it brings the relay to the table within seconds
    (got,) = collect(audits, 1, timeout=10)
    assert got.event_id == event_id
    assert orders.count() == 0
