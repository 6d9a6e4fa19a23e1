"""The consumer reads what the relay's RabbitMQ publisher sends in every --message-format: the
same handler call from native, CloudEvents binary and structured; dedupe on the CloudEvents id;
ordered mode keeps each aggregate on one partition in every format."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from outbox_relay.consumer import Consumer, Event, NoHooks
from outbox_relay.envelopes import MessageFormat
from outbox_relay.messages import OutboxMessage
from outbox_relay.publishers import PublisherSettings, create_publisher
from tests.conftest import wait_until
from tests.integration.consumer_harness import (
    ConsumerEnv,
    WorkerThread,
    consumer_env,
    record_effect,
    require_consistent_hash,
)

pytestmark = pytest.mark.integration

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
FORMATS = list(MessageFormat)


@pytest.fixture
def env(broker_url: str, database_url: str, exchange: str) -> Iterator[ConsumerEnv]:
    yield from consumer_env(broker_url, database_url, exchange)


def row(event_id: str, *, aggregate: str = "o-1", seq: int = 0) -> OutboxMessage:
    return OutboxMessage(
        id=seq + 1,
        event_id=event_id,
        event_type="order.created",
        aggregate_type="order",
        aggregate_id=aggregate,
        payload=f'{{"total":12.5,"seq":{seq},"note":"grüße"}}'.encode(),
        headers={"traceparent": TRACEPARENT, "tenant": "acme", "priority": 2},
        created_at=datetime(2026, 3, 1, 12, 30, 45, 123456, tzinfo=UTC),
    )


def publish(env: ConsumerEnv, fmt: MessageFormat, messages: Sequence[OutboxMessage]) -> None:
    """Through the relay's own RabbitMQ publisher, confirmed."""
    values: dict[str, Any] = {
        "broker_url": env.broker_url,
        "exchange": env.exchange,
        "message_format": fmt,
    }
    if fmt is not MessageFormat.NATIVE:
        values["ce_source"] = "postgresql://db.example/shop/public"

    async def run() -> None:
        publisher = create_publisher(PublisherSettings.from_mapping(values))
        await publisher.connect()
        try:
            results = await publisher.publish_batch(messages)
        finally:
            await publisher.close()
        assert all(r.confirmed for r in results), results

    asyncio.run(run())


class Deduped(NoHooks):
    def __init__(self) -> None:
        self.deduped: list[str] = []

    def on_deduped(self, event: Event) -> None:
        self.deduped.append(event.event_id)


def test_every_format_reaches_the_handler_as_the_same_event(env: ConsumerEnv) -> None:
    # Given one row published in each format (each its own event id, so none is deduped)
    consumer = Consumer()
    seen: dict[str, Event] = {}

    @consumer.handler("order.*")
    def handle(event: Event, db: psycopg.Connection[Any]) -> None:
        seen[event.event_id] = event
        record_effect(event, db)

    settings = env.settings()
    env.declare(settings)
    ids = {fmt: str(uuid.uuid4()) for fmt in FORMATS}
    for fmt, event_id in ids.items():
        publish(env, fmt, [row(event_id)])

    # When the consumer runs
    with WorkerThread(consumer, settings):
        wait_until(lambda: len(seen) == len(FORMATS), timeout=30)

    # Then each handler call got the same Event but for its id, and the time's precision (an
    # AMQP timestamp has whole seconds; CloudEvents time keeps the microseconds)
    native = seen[ids[MessageFormat.NATIVE]]
    assert native.headers == {
        "traceparent": TRACEPARENT,
        "tenant": "acme",
        "priority": 2,
        "aggregate_type": "order",
        "aggregate_id": "o-1",
    }
    assert native.payload == {"total": 12.5, "seq": 0, "note": "grüße"}
    for fmt in (MessageFormat.BINARY, MessageFormat.STRUCTURED):
        event = seen[ids[fmt]]
        assert event.created_at == row(ids[fmt]).created_at
        assert native.created_at == event.created_at.replace(microsecond=0)
        expected = {**_fields(native), "event_id": ids[fmt], "created_at": event.created_at}
        assert _fields(event) == expected, fmt


def _fields(event: Event) -> dict[str, Any]:
    return {name: getattr(event, name) for name in Event.__dataclass_fields__}


def test_one_event_in_three_formats_is_applied_once(env: ConsumerEnv) -> None:
    # Given the same event (one CloudEvents id) published in all three formats
    consumer = Consumer()
    hooks = Deduped()

    @consumer.handler("order.*")
    def handle(event: Event, db: psycopg.Connection[Any]) -> None:
        record_effect(event, db)

    settings = env.settings()
    env.declare(settings)
    event_id = str(uuid.uuid4())
    for fmt in FORMATS:
        publish(env, fmt, [row(event_id)])

    # When the consumer runs, then it applies it once and dedupes the other two copies
    with WorkerThread(consumer, settings, hooks=hooks):
        wait_until(lambda: len(hooks.deduped) == 2, timeout=30)
        wait_until(lambda: env.queue_count(settings.queue) == 0)
    assert env.effect_counts() == {event_id: 1}


@pytest.mark.parametrize("fmt", [MessageFormat.BINARY, MessageFormat.STRUCTURED])
def test_ordered_mode_applies_each_aggregate_in_order_in_cloudevents_formats(
    env: ConsumerEnv, fmt: MessageFormat
) -> None:
    # Given an ordered consumer (partition queues hashed on the aggregate_id header)
    require_consistent_hash(env.broker_url)
    consumer = Consumer()
    applied: dict[str | None, list[int]] = defaultdict(list)

    @consumer.handler("order.*")
    def handle(event: Event, db: psycopg.Connection[Any]) -> None:
        applied[event.aggregate_id].append(event.payload["seq"])
        record_effect(event, db)

    settings = env.settings(ordered=True, partition_queues=4)
    env.declare(settings)
    aggregates = [f"agg-{n}" for n in range(12)]
    messages = [
        row(str(uuid.uuid4()), aggregate=aggregate, seq=seq)
        for seq in range(5)
        for aggregate in aggregates
    ]
    publish(env, fmt, messages)

    # When it runs, then every aggregate's events were applied in publication order
    with WorkerThread(consumer, settings):
        wait_until(lambda: sum(map(len, applied.values())) == len(messages), timeout=60)
    assert set(applied) == set(aggregates)
    for aggregate in aggregates:
        assert applied[aggregate] == list(range(5)), aggregate
