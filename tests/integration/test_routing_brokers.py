"""Routing rules (``--route``) on NATS, Redis, MQTT and the webhook: routed events arrive under
the rule's destination, the rest under the default one, each aggregate's in order."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from outbox_relay.messages import OutboxMessage
from outbox_relay.publishers import create_publisher
from outbox_relay.publishers.base import PublisherSettings
from tests.brokers import (
    MQTT_URL,
    NATS_URL,
    REDIS_URL,
    MqttSubscriber,
    Received,
    nats_cleanup,
    nats_make_stream,
    nats_stream_messages,
    redis_cleanup,
    redis_entries,
    unique,
    wait_for_jetstream,
)
from tests.conftest import wait_until
from tests.contract.http_sink import HttpSink
from tests.contract.messages import make_messages

pytestmark = pytest.mark.integration

# Orders of two aggregates (routed), interleaved with customer events (not routed).
ORDERS = 6
CUSTOMERS = 4


def events() -> list[OutboxMessage]:
    orders = make_messages(ORDERS, event_type="order.created", aggregates=("o-1", "o-2"))
    customers = make_messages(
        CUSTOMERS, event_type="customer.created", aggregates=("c-1",), first_id=100
    )
    mixed: list[OutboxMessage] = []
    for n in range(max(ORDERS, CUSTOMERS)):
        mixed += orders[n : n + 1] + customers[n : n + 1]
    return mixed


def publish(settings: PublisherSettings, messages: list[OutboxMessage]) -> None:
    async def run() -> None:
        publisher = create_publisher(settings)
        await publisher.connect()
        try:
            results = await publisher.publish_batch(messages)
        finally:
            await publisher.close()
        assert all(result.confirmed for result in results), results

    asyncio.run(run())


def ids(received: list[Received]) -> list[str]:
    return [r.event_id for r in received]


def expected(messages: list[OutboxMessage], event_type: str) -> list[str]:
    return [m.event_id for m in messages if m.event_type == event_type]


@pytest.fixture
def prefixes() -> Iterator[tuple[str, str]]:
    default, routed = unique("rt"), unique("rt")
    yield default, routed
    redis_cleanup(f"{default}*")
    redis_cleanup(f"{routed}*")


def test_nats_routes_by_subject_prefix(prefixes: tuple[str, str]) -> None:
    # Given a stream of its own for the routed prefix (the relay's stream must leave it alone)
    default, routed = prefixes
    stream, routed_stream = unique("RT").upper(), unique("RT").upper()
    wait_for_jetstream()
    asyncio.run(nats_make_stream(routed_stream, [f"{routed}.>"]))
    try:
        settings = PublisherSettings.from_mapping(
            {
                "broker_url": NATS_URL,
                "topic_prefix": default,
                "nats_stream": stream,
                "route": [f"order.*={routed}"],
            }
        )
        messages = events()
        publish(settings, messages)

        assert ids(asyncio.run(nats_stream_messages(routed_stream))) == expected(
            messages, "order.created"
        )
        assert ids(asyncio.run(nats_stream_messages(stream))) == expected(
            messages, "customer.created"
        )
    finally:
        nats_cleanup(stream)
        nats_cleanup(routed_stream)


def test_redis_routes_by_stream_prefix(prefixes: tuple[str, str]) -> None:
    default, routed = prefixes
    settings = PublisherSettings.from_mapping(
        {"broker_url": REDIS_URL, "topic_prefix": default, "route": [f"aggregate:order={routed}"]}
    )
    messages = events()
    # make_messages gives every event the aggregate type "order": customers are made otherwise
    messages = [
        m
        if m.event_type == "order.created"
        else OutboxMessage(**{**_fields(m), "aggregate_type": "customer"})
        for m in messages
    ]
    publish(settings, messages)

    assert ids(redis_entries([f"{routed}:order.created"])) == expected(messages, "order.created")
    assert ids(redis_entries([f"{default}:customer.created"])) == expected(
        messages, "customer.created"
    )
    assert redis_entries([f"{default}:order.created", f"{routed}:customer.created"]) == []


def test_mqtt_routes_by_topic_prefix(prefixes: tuple[str, str]) -> None:
    default, routed = prefixes
    subscriber = MqttSubscriber("#").start()
    try:
        settings = PublisherSettings.from_mapping(
            {"broker_url": MQTT_URL, "topic_prefix": default, "route": [f"order.#={routed}"]}
        )
        messages = events()
        publish(settings, messages)
        wait_until(lambda: subscriber.has_all({m.event_id for m in messages}), timeout=30)
        mine = [r for r in subscriber.messages if r.where.split("/")[0] in (default, routed)]
    finally:
        subscriber.stop()

    routed_topic = [r for r in mine if r.where == f"{routed}/order/created"]
    default_topic = [r for r in mine if r.where == f"{default}/customer/created"]
    assert ids(routed_topic) == expected(messages, "order.created")
    assert ids(default_topic) == expected(messages, "customer.created")
    assert len(mine) == len(messages)


@pytest.mark.parametrize("batch", [False, True], ids=["per-event", "batch"])
def test_webhook_routes_by_url(batch: bool) -> None:
    sink = HttpSink().start()
    try:
        settings = PublisherSettings.from_mapping(
            {
                "broker_url": f"{sink.url}/default",
                "route": [f"order.*={sink.url}/orders"],
                "webhook_batch": batch,
            }
        )
        messages = events()
        publish(settings, messages)
        by_path: dict[str, list[str]] = {}
        for request in sink.requests:
            body: dict[str, Any] = request.json()
            for event in body.get("events", [body]):
                by_path.setdefault(request.path.rsplit("/", 1)[-1], []).append(event["event_id"])
    finally:
        sink.stop()

    # Per aggregate, in order (several requests may run side by side per event)
    order_ids, customer_ids = (
        expected(messages, "order.created"),
        expected(messages, "customer.created"),
    )
    assert sorted(by_path) == ["default", "orders"]
    assert sorted(by_path["orders"]) == sorted(order_ids)
    assert sorted(by_path["default"]) == sorted(customer_ids)
    for aggregate in ("o-1", "o-2"):
        sent = [m.event_id for m in messages if m.aggregate_id == aggregate]
        assert [i for i in by_path["orders"] if i in sent] == sent


def _fields(message: OutboxMessage) -> dict[str, Any]:
    return {name: getattr(message, name) for name in OutboxMessage.__slots__}
