"""The publisher contract: every broker, the same guarantees, against the real local servers.

``PublisherContract`` holds the cases; each ``Test<Broker>`` subclass only says how to reach its
broker (an adapter from ``adapters.py``). Cases: a batch is confirmed and arrives with the message
contract; per-aggregate order within a batch; broker down (clean BrokerUnavailableError) and back;
an event the broker refuses fails alone (permanently where it can never succeed) and the relay
dead-letters it while other aggregates flow; a republished batch is dropped by brokers that
deduplicate, and carries the same event id everywhere else; trace context passes unchanged.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import pytest
from cloudevents.core.base import BaseCloudEvent

from outbox_relay.envelopes import default_source
from outbox_relay.errors import BrokerUnavailableError
from outbox_relay.messages import OutboxMessage, PublishResult
from outbox_relay.publishers import create_publisher
from tests.brokers import Received
from tests.conftest import RabbitQueue, wait_until
from tests.contract.adapters import (
    ROUTED,
    UNROUTED,
    BrokerUnderTest,
    MqttUnderTest,
    NatsUnderTest,
    RabbitMQUnderTest,
    RedisUnderTest,
    WebhookUnderTest,
)
from tests.contract.messages import TRACEPARENT, make_messages, publish
from tests.integration.relay_harness import RelayThread, relay_settings

pytestmark = pytest.mark.integration

CE_SOURCE = "postgresql://db.example/shop/public"
# Row headers of the CloudEvents cases: the trace context, a plain one, one whose key is no
# extension name (sanitised to ``tenantid``) and whose value needs percent-encoding in HTTP and
# NATS headers, and an integer (a CloudEvents Integer where the transport has types).
CE_HEADERS: dict[str, Any] = {
    "traceparent": TRACEPARENT,
    "tracestate": "vendor=abc",
    "producer": "contract",
    "Tenant-ID": 'acmé "north" 100%',
    "n": 3,
}
CE_FORMATS = ["cloudevents-binary", "cloudevents-structured"]


def arrived(broker: BrokerUnderTest, messages: Sequence[OutboxMessage]) -> list[Received]:
    """Wait until every one of ``messages`` has arrived; return everything that did."""
    wanted = {m.event_id for m in messages}
    return list(
        wait_until(
            lambda: (got := broker.received()) and wanted <= {r.event_id for r in got} and got,
            timeout=30,
        )
    )


def arrived_cloudevents(
    broker: BrokerUnderTest, messages: Sequence[OutboxMessage]
) -> dict[str, BaseCloudEvent]:
    """Wait until every one of ``messages`` arrived; each decoded by the SDK, by its id."""
    wanted = {m.event_id for m in messages}
    got: dict[str, BaseCloudEvent] = {}

    def more() -> bool:
        got.update((e.get_id(), e) for e in broker.cloudevents())
        return wanted <= set(got)

    wait_until(more, timeout=30)
    return got


def assert_cloudevent(event: BaseCloudEvent, message: OutboxMessage, *, typed: bool) -> None:
    """Every attribute of ``event`` is the row's (``typed``: the transport keeps an Integer)."""
    assert event.get_attributes() == {
        "specversion": "1.0",
        "id": message.event_id,
        "source": CE_SOURCE,
        "type": message.event_type,
        "datacontenttype": "application/json",
        "time": message.created_at,
        "subject": message.aggregate_id,
        "aggregatetype": message.aggregate_type,
        "traceparent": TRACEPARENT,
        "tracestate": "vendor=abc",
        "producer": "contract",
        "tenantid": 'acmé "north" 100%',
        "n": 3 if typed else "3",
    }
    assert event.get_data() == json.loads(message.payload)


class PublisherContract:
    """The cases; subclasses provide the ``broker`` fixture."""

    # Whether the broker's binary mode keeps an Integer typed (AMQP does; headers are text).
    binary_typed = False

    @pytest.mark.parametrize("message_format", CE_FORMATS)
    def test_cloudevents_arrive_per_the_binding_with_every_attribute(
        self, broker: BrokerUnderTest, message_format: str
    ) -> None:
        sent = make_messages(6, aggregates=["agg-1", "agg-2"], headers=CE_HEADERS)

        [results] = publish(broker, sent, message_format=message_format, ce_source=CE_SOURCE)

        assert all(r.confirmed for r in results), results
        got = arrived_cloudevents(broker, sent)
        typed = message_format == "cloudevents-structured" or self.binary_typed
        for message in sent:
            assert_cloudevent(got[message.event_id], message, typed=typed)

    def test_the_relay_sends_cloudevents_with_the_outbox_as_their_source(
        self, broker: BrokerUnderTest, database_url: str
    ) -> None:
        # Given rows written by SQL, as producers do
        with psycopg.connect(database_url, autocommit=True) as conn:
            rows = [
                conn.execute(
                    "SELECT outbox_emit(%s, %s, %s, 'order', %s)",
                    (ROUTED, f"agg-{n}", json.dumps({"n": n}), json.dumps({"tenant": "acme"})),
                ).fetchone()
                for n in range(3)
            ]
        ids = {str(r[0]) for r in rows if r is not None}
        settings = relay_settings(
            database_url, message_format="cloudevents-binary", **broker.relay_options()
        )

        # When the relay runs in binary mode without --ce-source
        with RelayThread(settings):
            got: dict[str, BaseCloudEvent] = {}

            def all_arrived() -> bool:
                got.update((e.get_id(), e) for e in broker.cloudevents())
                return ids <= set(got)

            wait_until(all_arrived, timeout=30)

        # Then each is a CloudEvent whose source names the outbox (no credentials)
        source = default_source(database_url, "public")
        assert "@" not in source
        for event_id in ids:
            event = got[event_id]
            assert event.get_source() == source
            assert event.get_type() == ROUTED
            assert (event.get_subject() or "").startswith("agg-")
            assert event.get_extension("aggregatetype") == "order"
            assert event.get_extension("tenant") == "acme"
            assert event.get_data() == {"n": int((event.get_subject() or "-0").split("-")[1])}

    def test_a_confirmed_batch_arrives_with_the_message_contract(
        self, broker: BrokerUnderTest
    ) -> None:
        sent = make_messages(60, aggregates=[f"agg-{i}" for i in range(6)])

        [results] = publish(broker, sent)

        assert [r.confirmed for r in results] == [True] * len(sent), results[:3]
        got = {r.event_id: r for r in arrived(broker, sent)}
        for message in sent:
            record = got[message.event_id]
            assert record.event_type == message.event_type
            assert record.aggregate_type == "order"
            assert record.aggregate_id == message.aggregate_id
            assert record.headers["producer"] == "contract"
            assert json.loads(record.payload) == json.loads(message.payload)
            assert message.event_type.split(".")[-1] in record.where

    def test_per_aggregate_order_is_kept_within_a_batch(self, broker: BrokerUnderTest) -> None:
        sent = make_messages(400, aggregates=["agg-a", "agg-b", "agg-c", "agg-d"])

        [results] = publish(broker, sent)

        assert all(r.confirmed for r in results)
        order: dict[str | None, list[str]] = defaultdict(list)
        for record in arrived(broker, sent):
            order[record.aggregate_id].append(record.event_id)
        for aggregate in ("agg-a", "agg-b", "agg-c", "agg-d"):
            expected = [m.event_id for m in sent if m.aggregate_id == aggregate]
            assert order[aggregate] == expected, f"{aggregate} arrived out of order"

    def test_an_event_the_broker_refuses_fails_alone(self, broker: BrokerUnderTest) -> None:
        good_before = make_messages(1, aggregates=["agg-1"])
        refused = make_messages(1, event_type=UNROUTED, aggregates=["agg-2"], first_id=2)
        good_after = make_messages(1, aggregates=["agg-3"], first_id=3)

        [results] = publish(broker, [*good_before, *refused, *good_after])

        assert results[0].confirmed, results
        assert results[2].confirmed, results
        assert not results[1].confirmed
        assert broker.unroutable_reason in (results[1].reason or ""), results[1]
        assert results[1].permanent is broker.unroutable_permanent
        got = {r.event_id for r in arrived(broker, [*good_before, *good_after])}
        assert refused[0].event_id not in got

    def test_batches_published_concurrently_each_get_their_own_results(
        self, broker: BrokerUnderTest
    ) -> None:
        # The relay sends the next batch before the previous one is confirmed.
        first = make_messages(150, aggregates=["agg-1", "agg-2"])
        refused = make_messages(1, event_type=UNROUTED, aggregates=["agg-3"], first_id=200)
        second = make_messages(150, aggregates=["agg-4"], first_id=300)
        third = make_messages(3, aggregates=["agg-5"], first_id=500)

        async def run() -> list[list[PublishResult]]:
            publisher = create_publisher(broker.settings())
            await publisher.connect()
            try:
                calls = [
                    publisher.publish_batch(first),
                    publisher.publish_batch([*second[:75], *refused, *second[75:]]),
                    publisher.publish_batch(third),
                ]
                return list(await asyncio.gather(*calls))
            finally:
                await publisher.close()

        one, two, three = asyncio.run(run())

        assert [r.confirmed for r in one] == [True] * 150
        assert [r.confirmed for r in two] == [True] * 75 + [False] + [True] * 75
        assert broker.unroutable_reason in (two[75].reason or ""), two[75]
        assert [r.confirmed for r in three] == [True] * 3
        got = {r.event_id for r in arrived(broker, [*first, *second, *third])}
        assert refused[0].event_id not in got

    def test_a_republished_batch_is_dropped_or_carries_the_same_event_ids(
        self, broker: BrokerUnderTest
    ) -> None:
        sent = make_messages(10, aggregates=["agg-1", "agg-2"])

        # As after a relay crash: the same rows again, from a new connection.
        [first] = publish(broker, sent)
        [again] = publish(broker, sent)

        assert all(r.confirmed for r in first + again)
        copies: dict[str, list[Received]] = defaultdict(list)
        if broker.dedupes:
            got = arrived(broker, sent)
            for record in got:
                copies[record.event_id].append(record)
            assert len(got) == len(sent), "the broker stored a republished event twice"
        else:
            got = wait_until(lambda: len(r := broker.received()) >= 2 * len(sent) and r, 30)
            for record in got:
                copies[record.event_id].append(record)
            assert all(len(c) == 2 for c in copies.values())
        assert set(copies) == {m.event_id for m in sent}
        for event_copies in copies.values():  # consumers can dedupe on the event id
            assert len({c.payload for c in event_copies}) == 1

    def test_trace_context_passes_unchanged(self, broker: BrokerUnderTest) -> None:
        headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=abc", "producer": "contract"}
        sent = make_messages(3, headers=headers)

        [results] = publish(broker, sent)

        assert all(r.confirmed for r in results)
        for record in arrived(broker, sent):
            assert record.headers["traceparent"] == TRACEPARENT
            assert record.headers["tracestate"] == "vendor=abc"

    @pytest.mark.disruptive
    def test_broker_down_fails_cleanly_and_publishing_resumes_when_it_is_back(
        self, broker: BrokerUnderTest
    ) -> None:
        before = make_messages(5)
        after = make_messages(5, first_id=6)

        async def run() -> None:
            publisher = create_publisher(broker.settings(confirm_timeout=5.0))
            await publisher.connect()
            assert all(r.confirmed for r in await publisher.publish_batch(before))
            try:
                await asyncio.to_thread(broker.stop)
                # The connection is gone: publishing says so instead of hanging or confirming.
                with pytest.raises(BrokerUnavailableError):
                    await publisher.publish_batch(after)
                await publisher.close()
                # And a new connection fails cleanly while the broker is down.
                with pytest.raises(BrokerUnavailableError):
                    await create_publisher(broker.settings(confirm_timeout=5.0)).connect()
            finally:
                await asyncio.to_thread(broker.start)
            await publisher.connect()
            try:
                assert all(r.confirmed for r in await publisher.publish_batch(after))
            finally:
                await publisher.close()

        asyncio.run(run())

        arrived(broker, after)

    def test_the_relay_dead_letters_a_refused_event_while_other_aggregates_flow(
        self, broker: BrokerUnderTest, database_url: str
    ) -> None:
        # Given one event the broker refuses and, behind it, events of other aggregates
        with psycopg.connect(database_url, autocommit=True) as conn:
            bad = conn.execute(
                "SELECT outbox_emit(%s, 'poison', '{\"n\": 0}', 'order')", (UNROUTED,)
            ).fetchone()
            good = [
                conn.execute(
                    "SELECT outbox_emit(%s, %s, %s, 'order', %s)",
                    (ROUTED, f"agg-{n}", json.dumps({"n": n}), json.dumps({"producer": "sql"})),
                ).fetchone()
                for n in range(1, 4)
            ]
        assert bad is not None
        assert all(g is not None for g in good)
        good_ids = {str(g[0]) for g in good if g is not None}
        settings = relay_settings(
            database_url,
            max_attempts=2,
            retry_backoff=0.05,
            retry_backoff_max=0.1,
            **broker.relay_options(),
        )

        # When the relay runs
        with RelayThread(settings):
            wait_until(lambda: good_ids <= {r.event_id for r in broker.received()}, timeout=30)
            dead = wait_until(lambda: _dead(database_url), timeout=30)

        # Then the refused event is dead with the broker's reason; the others were published
        assert [d[0] for d in dead] == [str(bad[0])]
        assert broker.unroutable_reason in dead[0][1]


def _dead(database_url: str) -> list[tuple[str, str]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT event_id::text, last_error FROM outbox WHERE dead_at IS NOT NULL"
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def _adapter(make: Callable[[], BrokerUnderTest]) -> Iterator[BrokerUnderTest]:
    adapter = make()
    try:
        yield adapter
    finally:
        adapter.cleanup()


class TestRabbitMQ(PublisherContract):
    binary_typed = True

    @pytest.fixture
    def broker(
        self, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
    ) -> Iterator[BrokerUnderTest]:
        queue = bind_queue("order.#")
        yield from _adapter(lambda: RabbitMQUnderTest(broker_url, exchange, queue))


class TestNatsJetStream(PublisherContract):
    @pytest.fixture
    def broker(self) -> Iterator[BrokerUnderTest]:
        yield from _adapter(NatsUnderTest)


class TestRedisStreams(PublisherContract):
    @pytest.fixture
    def broker(self) -> Iterator[BrokerUnderTest]:
        yield from _adapter(RedisUnderTest)


class TestMqtt(PublisherContract):
    @pytest.fixture
    def broker(self) -> Iterator[BrokerUnderTest]:
        yield from _adapter(MqttUnderTest)

    def test_mqtt_3_1_1_sends_structured_cloudevents_without_a_content_type(
        self, broker: BrokerUnderTest
    ) -> None:
        sent = make_messages(3, headers=CE_HEADERS)
        url = f"{broker.url}?version=3.1.1"

        [results] = publish(
            broker,
            sent,
            broker_url=url,
            message_format="cloudevents-structured",
            ce_source=CE_SOURCE,
        )

        assert all(r.confirmed for r in results), results
        got = arrived_cloudevents(broker, sent)
        for message in sent:
            assert_cloudevent(got[message.event_id], message, typed=True)


class TestWebhook(PublisherContract):
    @pytest.fixture
    def broker(self) -> Iterator[BrokerUnderTest]:
        yield from _adapter(WebhookUnderTest)

    def test_batches_of_cloudevents_are_sent_in_the_batched_content_mode(
        self, broker: BrokerUnderTest
    ) -> None:
        assert isinstance(broker, WebhookUnderTest)
        sent = make_messages(5, aggregates=["agg-1", "agg-2"], headers=CE_HEADERS)

        [results] = publish(
            broker,
            sent,
            message_format="cloudevents-structured",
            ce_source=CE_SOURCE,
            webhook_batch=True,
        )

        assert all(r.confirmed for r in results), results
        [request] = broker.sink.requests
        assert request.headers["content-type"] == "application/cloudevents-batch+json"
        got = arrived_cloudevents(broker, sent)
        for message in sent:
            assert_cloudevent(got[message.event_id], message, typed=True)
