"""Per-aggregate commit order on the queue, with concurrent producers and late commits."""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

import outbox_relay
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


def bucket(database_url: str, aggregate_id: str) -> int:
    """The ordering-lock bucket of an aggregate (see outbox_before_insert_v2 in the migrations)."""
    value: int = scalar(database_url, "SELECT hashtext(%s) & 1023", (aggregate_id,))
    return value


def aggregates_in_distinct_buckets(database_url: str, count: int, prefix: str) -> list[str]:
    chosen: dict[int, str] = {}
    n = 0
    while len(chosen) < count:
        candidate = f"{prefix}-{n}"
        chosen.setdefault(bucket(database_url, candidate), candidate)
        n += 1
    return list(chosen.values())


def backend_waits_on_advisory_lock(database_url: str, pid: int) -> bool:
    return bool(
        scalar(
            database_url,
            "SELECT wait_event_type = 'Lock' AND wait_event = 'advisory'"
            " FROM pg_stat_activity WHERE pid = %s",
            (pid,),
        )
    )


def test_a_second_writer_of_an_aggregate_waits_for_the_first_to_commit(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    first = psycopg.connect(database_url)
    second = psycopg.connect(database_url)
    other = psycopg.connect(database_url)
    try:
        # Given T1 wrote an event of A and has not committed
        first_id = outbox_relay.emit(first, "order.created", payload={"by": "T1"}, aggregate_id="A")

        # When T2 writes an event of A and tries to commit
        def write_second() -> uuid.UUID:
            event_id = outbox_relay.emit(
                second, "order.updated", payload={"by": "T2"}, aggregate_id="A"
            )
            second.commit()
            return event_id

        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(write_second)
            # Then T2 blocks inside its INSERT, before drawing an id...
            wait_until(
                lambda: backend_waits_on_advisory_lock(database_url, second.info.backend_pid)
            )
            assert not pending.done()
            # ...while a writer of an aggregate in another bucket is not held up at all.
            b = next(
                f"B-{n}"
                for n in range(100)
                if bucket(database_url, f"B-{n}") != bucket(database_url, "A")
            )
            outbox_relay.emit(other, "order.created", payload={"by": "T3"}, aggregate_id=b)
            other.commit()
            assert not pending.done()

            first.commit()
            second_id = pending.result(timeout=10)
    finally:
        for conn in (first, second, other):
            conn.close()

    ids = dict(rows(database_url, "SELECT event_id, id FROM outbox"))
    assert ids[first_id] < ids[second_id], "id order equals commit order for one aggregate"

    with RelayThread(relay_settings(database_url, broker_url, exchange)):
        deliveries = collect(queue, 3)
    on_a = [d.json()["by"] for d in deliveries if d.aggregate_id == "A"]
    assert on_a == ["T1", "T2"]


def lock_first(conn: psycopg.Connection[Any], aggregate: str, events: int) -> None:
    """Lock the aggregate row, bump its version, then write events carrying the new versions."""
    row = conn.execute(
        "UPDATE aggregates SET version = version + %s WHERE id = %s RETURNING version",
        (events, aggregate),
    ).fetchone()
    assert row is not None
    for seq in range(row[0] - events + 1, row[0] + 1):
        outbox_relay.emit(
            conn,
            "order.updated",
            payload={"seq": seq},
            aggregate_id=aggregate,
            aggregate_type="order",
        )


def event_first(conn: psycopg.Connection[Any], aggregate: str, events: int) -> None:
    """Write events first, then update the aggregate row under its lock; the version the row
    lock hands out is stamped into the still-uncommitted events."""
    event_ids = [
        outbox_relay.emit(
            conn, "order.updated", payload={}, aggregate_id=aggregate, aggregate_type="order"
        )
        for _ in range(events)
    ]
    row = conn.execute(
        "UPDATE aggregates SET version = version + %s WHERE id = %s RETURNING version",
        (events, aggregate),
    ).fetchone()
    assert row is not None
    for offset, event_id in enumerate(event_ids):
        conn.execute(
            "UPDATE outbox SET payload = jsonb_build_object('seq', %s::int) WHERE event_id = %s",
            (row[0] - events + 1 + offset, event_id),
        )


def test_concurrent_producers_keep_per_aggregate_commit_order(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    # Two patterns, each on its own aggregates: mixing them on ONE aggregate deadlocks (row lock
    # then ordering lock vs. ordering lock then row lock), which PostgreSQL would resolve by abort.
    locked = [f"L{n}" for n in range(12)]
    evented = [f"E{n}" for n in range(12)]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE aggregates (id text PRIMARY KEY, version int NOT NULL DEFAULT 0)"
        )
        conn.execute("INSERT INTO aggregates (id) SELECT unnest(%s::text[])", (locked + evented,))

    threads, transactions = 6, 40
    unordered = 0
    unordered_lock = threading.Lock()

    def producer(worker: int) -> None:
        nonlocal unordered
        rng = random.Random(worker)
        with psycopg.connect(database_url) as conn:
            for _ in range(transactions):
                events = rng.choice((1, 1, 1, 2, 3))
                if rng.random() < 0.5:
                    lock_first(conn, rng.choice(locked), events)
                else:
                    event_first(conn, rng.choice(evented), events)
                if rng.random() < 0.2:
                    outbox_relay.emit(conn, "order.audited", payload={"seq": 0, "worker": worker})
                    with unordered_lock:
                        unordered += 1
                conn.commit()

    with RelayThread(relay_settings(database_url, broker_url, exchange, batch_size=25)):
        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(producer, w) for w in range(threads)]:
                future.result()
        versions = dict(rows(database_url, "SELECT id, version FROM aggregates"))
        total = sum(versions.values()) + unordered
        deliveries = collect(queue, total, timeout=60)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0)

    assert len(deliveries) == total
    assert len({d.event_id for d in deliveries}) == total, "each event exactly once"
    order = per_aggregate(deliveries)
    assert len(order.pop("None", [])) == unordered
    # Every aggregate's events arrive as versions 1..n: commit order, no gap, no duplicate.
    assert order == {agg: list(range(1, v + 1)) for agg, v in versions.items() if v}
    assert len(order) > 12


def test_an_event_committed_late_with_a_low_id_is_still_published(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    late, *others = aggregates_in_distinct_buckets(database_url, 4, "late")
    slow = psycopg.connect(database_url)
    try:
        with RelayThread(relay_settings(database_url, broker_url, exchange, batch_size=10)):
            # Given a transaction holding the lowest id stays open...
            late_id = outbox_relay.emit(
                slow, "order.created", payload={"seq": 1}, aggregate_id=late
            )
            # ...while other aggregates commit many events after it and the relay publishes them
            with psycopg.connect(database_url) as conn:
                for seq in range(1, 31):
                    for aggregate in others:
                        outbox_relay.emit(
                            conn, "order.created", payload={"seq": seq}, aggregate_id=aggregate
                        )
                    conn.commit()
            early = collect(queue, 90)
            assert late not in {d.aggregate_id for d in early}
            assert per_aggregate(early) == {agg: list(range(1, 31)) for agg in others}

            # When it finally commits
            slow.commit()

            # Then the relay still publishes it: nothing behind a published id is ever skipped.
            arrived = collect(queue, 1)
            wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0)
    finally:
        slow.close()
    assert [d.event_id for d in arrived] == [str(late_id)]
    assert drain(queue) == []
