"""Happy path: events written every supported way reach RabbitMQ with the full message contract."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy
from sqlalchemy.orm import Session

import outbox_relay
from outbox_relay.relay.settings import OnSent
from tests.conftest import RabbitQueue, wait_until
from tests.integration.relay_harness import RelayThread, collect, relay_settings, scalar

pytestmark = pytest.mark.integration

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
# Properties the contract leaves unset; pinned so a change to the contract is deliberate.
UNSET_PROPERTIES = (
    "content_encoding",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "user_id",
    "app_id",
    "cluster_id",
)


def sqlalchemy_url(database_url: str) -> str:
    return database_url.replace("postgresql://", "postgresql+psycopg://", 1)


def emit_every_way(database_url: str) -> list[str]:
    """One event per producer path, all of aggregate type 'order'; returns their event ids."""
    ids: list[str] = []
    headers = {"traceparent": TRACEPARENT}

    with psycopg.connect(database_url) as conn:
        ids.append(
            str(
                outbox_relay.emit(
                    conn,
                    "order.created",
                    payload={"id": 1, "total": 9.5, "note": "naïve café", "lines": [1, 2]},
                    aggregate_id=1,
                    aggregate_type="order",
                    headers=headers,
                )
            )
        )

    async def emit_async() -> str:
        async with await psycopg.AsyncConnection.connect(database_url) as aconn:
            event_id = await outbox_relay.emit_async(
                aconn,
                "order.confirmed",
                payload={"id": 2},
                aggregate_id="2",
                aggregate_type="order",
                headers=headers,
            )
        return str(event_id)

    ids.append(asyncio.run(emit_async()))

    engine = sqlalchemy.create_engine(sqlalchemy_url(database_url))
    try:
        with Session(engine) as session, session.begin():
            ids.append(
                str(
                    outbox_relay.emit(
                        session,
                        "order.paid",
                        payload={"id": 3, "amount": "12.00"},
                        aggregate_id=3,
                        aggregate_type="order",
                        headers=headers,
                    )
                )
            )
        with engine.begin() as sa_conn:
            ids.append(
                str(
                    outbox_relay.emit(
                        sa_conn,
                        "order.shipped",
                        payload={"id": 4, "carrier": None},
                        aggregate_id="4",
                        aggregate_type="order",
                        headers=headers,
                    )
                )
            )
    finally:
        engine.dispose()

    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload, headers)"
            " VALUES ('order.noted', 'order', '5', %s::jsonb, %s::jsonb) RETURNING event_id::text",
            (json.dumps({"id": 5, "b": 1, "a": 2}), json.dumps(headers)),
        ).fetchone()
        assert row is not None
        ids.append(row[0])
        row = conn.execute(
            "SELECT outbox_emit('order.cancelled', '6', %s::jsonb, 'order', %s::jsonb)::text",
            (json.dumps({"id": 6, "reason": "customer"}), json.dumps(headers)),
        ).fetchone()
        assert row is not None
        ids.append(row[0])
    return ids


def stored_rows(database_url: str) -> dict[str, tuple[str, str, str, datetime]]:
    """event_id -> (event_type, aggregate_id, payload as PostgreSQL renders it, created_at)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT event_id::text, event_type, aggregate_id, payload::text, created_at FROM outbox"
        ).fetchall()
    return {row[0]: (row[1], row[2], row[3], row[4]) for row in rows}


def relay_once(
    database_url: str,
    broker_url: str,
    exchange: str,
    queue: RabbitQueue,
    count: int,
    **settings: Any,
) -> list[Any]:
    with RelayThread(relay_settings(database_url, broker_url, exchange, **settings)):
        return collect(queue, count)


def test_every_producer_path_is_delivered_with_the_full_contract_and_the_rows_are_deleted(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    ids = emit_every_way(database_url)
    stored = stored_rows(database_url)
    assert set(stored) == set(ids)

    with RelayThread(relay_settings(database_url, broker_url, exchange)):
        deliveries = collect(queue, len(ids))
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0)

    assert [d.event_id for d in deliveries] == ids  # no aggregate shared, but one relay: id order
    for delivery in deliveries:
        event_type, aggregate_id, payload, created_at = stored[delivery.event_id]
        props = delivery.properties
        assert delivery.exchange == exchange
        assert delivery.routing_key == event_type
        assert delivery.body == payload.encode()
        assert props.message_id == delivery.event_id
        assert props.type == event_type
        assert props.content_type == "application/json"
        assert props.delivery_mode == 2
        assert props.timestamp == int(created_at.timestamp())
        assert props.headers == {
            "traceparent": TRACEPARENT,
            "aggregate_type": "order",
            "aggregate_id": aggregate_id,
        }
        for name in UNSET_PROPERTIES:
            assert getattr(props, name) is None, name
    first = deliveries[0].json()
    assert first == {"id": 1, "total": 9.5, "note": "naïve café", "lines": [1, 2]}
    # jsonb's own rendering (keys sorted by length, then bytes), not the producer's text.
    assert deliveries[4].body == b'{"a": 2, "b": 1, "id": 5}'
    assert len(queue.drain()) == 0, "each event exactly once"


def test_on_sent_keep_moves_sent_rows_to_the_archive_with_their_sending_time(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    with psycopg.connect(database_url) as conn:
        ids = [
            str(outbox_relay.emit(conn, "order.created", payload={"n": n}, aggregate_id="k"))
            for n in range(3)
        ]

    with RelayThread(relay_settings(database_url, broker_url, exchange, on_sent=OnSent.KEEP)):
        deliveries = collect(queue, 3)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0)

    assert [d.event_id for d in deliveries] == ids
    with psycopg.connect(database_url, autocommit=True) as conn:
        kept = conn.execute(
            "SELECT event_id::text, published_at >= created_at, attempts, payload"
            " FROM outbox_sent ORDER BY id"
        ).fetchall()
        # The partition of the sending time holds them, and partitions exist ahead of it.
        ahead = conn.execute("SELECT max(to_time) - now() FROM outbox_sent_partitions").fetchone()
    assert kept == [(event_id, True, 0, {"n": n}) for n, event_id in enumerate(ids)]
    assert ahead is not None
    assert ahead[0] >= timedelta(minutes=14)


def test_a_rolled_back_event_is_never_published(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    with psycopg.connect(database_url) as conn:
        outbox_relay.emit(conn, "order.created", payload={"n": "rolled back"}, aggregate_id="r")
        conn.rollback()
        kept = outbox_relay.emit(conn, "order.created", payload={"n": "kept"}, aggregate_id="r")
        conn.commit()

    with RelayThread(relay_settings(database_url, broker_url, exchange)):
        deliveries = collect(queue, 1)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0)

    assert [d.event_id for d in deliveries] == [str(kept)]
    assert deliveries[0].json() == {"n": "kept"}


def test_emit_with_a_bad_schema_name_fails_before_writing(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        with pytest.raises(outbox_relay.ConfigError, match="--schema"):
            outbox_relay.emit(conn, "order.created", payload={}, schema="public; DROP TABLE outbox")
        # The caller's transaction is untouched and still usable.
        outbox_relay.emit(conn, "order.created", payload={})
    assert scalar(database_url, "SELECT count(*) FROM outbox") == 1


def test_the_database_refuses_rows_that_would_poison_the_relay(database_url: str) -> None:
    # Plain SQL bypasses the producer's checks; the table's constraints catch the same mistakes.
    with psycopg.connect(database_url) as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match="routing_key"):
            conn.execute("SELECT outbox_emit('order.*', '1', '{}')")
        conn.rollback()
        with pytest.raises(psycopg.errors.CheckViolation, match="headers_is_object"):
            conn.execute("SELECT outbox_emit('order.created', '1', '{}', NULL, '[1]')")
