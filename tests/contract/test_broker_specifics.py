"""What only one broker does, beyond the shared contract: the webhook's signature, headers,
retryable statuses, timeouts and batch mode; JetStream's stream set-up at start-up; Redis's
MAXLEN trimming."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import logging
import time
from collections.abc import Iterator

import nats
import pika.exceptions
import pytest

from outbox_relay.errors import BrokerUnavailableError
from outbox_relay.publishers import PublisherSettings, create_publisher
from outbox_relay.publishers.rabbitmq import RabbitMQPublisher
from tests.brokers import NATS_URL, REDIS_URL, redis_cleanup, redis_client, unique
from tests.contract.adapters import NatsUnderTest, WebhookUnderTest
from tests.contract.http_sink import HttpSink, Request
from tests.contract.messages import TRACEPARENT, make_messages, publish
from tests.faults import HangingProxy, via

pytestmark = pytest.mark.integration


@pytest.fixture
def webhook() -> Iterator[WebhookUnderTest]:
    adapter = WebhookUnderTest()
    try:
        yield adapter
    finally:
        adapter.cleanup()


def test_webhook_requests_are_signed_and_carry_the_event_id_and_trace_context(
    webhook: WebhookUnderTest,
) -> None:
    sent = make_messages(3, headers={"traceparent": TRACEPARENT})

    [results] = publish(webhook, sent)

    assert all(r.confirmed for r in results)
    requests = {r.headers["idempotency-key"]: r for r in webhook.sink.requests}
    assert set(requests) == {m.event_id for m in sent}
    for message in sent:
        request = requests[message.event_id]
        expected = hmac.new(webhook.secret.encode(), request.body, hashlib.sha256).hexdigest()
        assert request.headers["x-outbox-signature"] == f"sha256={expected}"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["traceparent"] == TRACEPARENT
        assert request.headers["x-outbox-event-type"] == message.event_type
        assert request.json()["event_id"] == message.event_id


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_webhook_retryable_statuses_fail_without_being_permanent(
    webhook: WebhookUnderTest, status: int
) -> None:
    webhook.respond_override = lambda _request: status

    [results] = publish(webhook, make_messages(2, aggregates=["a", "b"]))

    assert [(r.confirmed, r.permanent) for r in results] == [(False, False)] * 2
    assert str(status) in (results[0].reason or "")


def test_webhook_a_later_event_of_a_failed_aggregate_is_not_sent(
    webhook: WebhookUnderTest,
) -> None:
    webhook.respond_override = lambda request: 503 if request.json()["payload"]["n"] == 0 else 200
    sent = make_messages(4, aggregates=["a", "b"])  # a: n=0, n=2; b: n=1, n=3

    [results] = publish(webhook, sent)

    assert [r.confirmed for r in results] == [False, True, False, True]
    assert "earlier event" in (results[2].reason or "")
    posted = {r.json()["event_id"] for r in webhook.sink.requests}
    assert sent[2].event_id not in posted


def test_webhook_timeout_fails_the_event_for_a_retry(webhook: WebhookUnderTest) -> None:
    webhook.sink.delay = 1.0

    [results] = publish(webhook, make_messages(1), webhook_timeout=0.2)

    assert not results[0].confirmed
    assert not results[0].permanent
    assert "did not answer within 0.2s" in (results[0].reason or "")


def test_webhook_that_answers_nothing_is_a_dead_link_within_twice_the_timeout(
    webhook: WebhookUnderTest,
) -> None:
    """Behind a link that hangs, the requests time out and so does the probe: the publisher
    raises BrokerUnavailableError (the relay goes unready and reconnects) within twice
    --webhook-timeout, instead of failing each event as a slow answer."""
    timeout = 0.5
    with HangingProxy(webhook.sink.port) as proxy:

        async def run() -> float:
            publisher = create_publisher(
                webhook.settings(
                    broker_url=via(webhook.sink.url, proxy.port), webhook_timeout=timeout
                )
            )
            await publisher.connect()
            try:
                proxy.freeze()
                started = time.monotonic()
                with pytest.raises(BrokerUnavailableError, match="cannot reach the webhook"):
                    await publisher.publish_batch(make_messages(40, aggregates=list("abcdefgh")))
                return time.monotonic() - started
            finally:
                await publisher.close()

        waited = asyncio.run(run())
    assert waited <= 2 * timeout + 1.0, waited


def test_webhook_batch_mode_posts_one_request_for_the_wave(webhook: WebhookUnderTest) -> None:
    sent = make_messages(5, aggregates=["a", "b", "c", "d", "e"])

    [results] = publish(webhook, sent, webhook_batch=True)

    assert all(r.confirmed for r in results)
    [request] = webhook.sink.requests
    events = request.json()["events"]
    assert isinstance(events, list)
    assert [e["event_id"] for e in events] == [m.event_id for m in sent]
    assert request.headers["idempotency-key"].startswith("batch-")


def test_webhook_batch_mode_one_answer_settles_the_whole_batch(
    webhook: WebhookUnderTest,
) -> None:
    webhook.respond_override = lambda _request: 400

    [results] = publish(webhook, make_messages(3, aggregates=["a", "b", "c"]), webhook_batch=True)

    assert [(r.confirmed, r.permanent) for r in results] == [(False, True)] * 3


def test_webhook_without_a_secret_sends_no_signature() -> None:
    sink = HttpSink().start()
    try:
        adapter = WebhookUnderTest.__new__(WebhookUnderTest)
        adapter.url, adapter.options = sink.url, {}
        [results] = publish(adapter, make_messages(1))
        assert results[0].confirmed
        [request] = sink.requests
        assert isinstance(request, Request)
        assert "x-outbox-signature" not in request.headers
    finally:
        sink.stop()


def test_rabbitmq_connection_lost_mid_batch_fails_the_call_and_leaves_nothing_behind(
    broker_url: str, exchange: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> RabbitMQPublisher:
        publisher = RabbitMQPublisher(PublisherSettings(broker_url=broker_url, exchange=exchange))
        await publisher.connect()
        connection = publisher._connection
        # What pika calls when the socket dies, here between two chunks of the batch.
        asyncio.get_running_loop().call_soon(
            publisher._on_connection_closed,
            connection,
            pika.exceptions.StreamLostError("simulated"),
        )
        try:
            with pytest.raises(BrokerUnavailableError, match="lost the RabbitMQ connection"):
                await publisher.publish_batch(make_messages(1000))
        finally:
            assert connection is not None
            connection.close()
            await asyncio.sleep(0.2)
        return publisher

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        publisher = asyncio.run(run())
        gc.collect()

    assert not publisher._unconfirmed  # no delivery tag left to confuse the next connection
    assert not publisher._waves  # nor a wave a late basic.return could be matched to
    assert "never retrieved" not in caplog.text


def test_nats_creates_the_stream_at_start_up_for_the_prefix() -> None:
    # An adapter without the pre-made stream NatsUnderTest sets up: the publisher must make it.
    stream, prefix = unique("CS").upper(), unique("cs")
    adapter = NatsUnderTest.__new__(NatsUnderTest)
    adapter.url, adapter.stream = NATS_URL, stream
    adapter.options = {"nats_stream": stream, "topic_prefix": prefix}

    async def stream_subjects() -> list[str]:
        nc = await nats.connect(NATS_URL)
        try:
            info = await nc.jetstream().stream_info(stream)
            return list(info.config.subjects or [])
        finally:
            await nc.close()

    try:
        [results] = publish(adapter, make_messages(2))
        assert all(r.confirmed for r in results)
        assert asyncio.run(stream_subjects()) == [f"{prefix}.>"]
        assert {r.where for r in adapter.received()} == {f"{prefix}.order.created"}
    finally:
        adapter.cleanup()


def test_redis_maxlen_trims_the_stream_approximately() -> None:
    prefix = unique("cs")

    class Adapter:
        def settings(self, **overrides: object) -> PublisherSettings:
            return PublisherSettings(
                broker_url=REDIS_URL,
                topic_prefix=prefix,
                redis_stream_mode="single",
                redis_maxlen=100,
                **overrides,  # type: ignore[arg-type]  # the contract's adapters pass typed fields
            )

    try:
        [results] = publish(Adapter(), make_messages(1000))  # type: ignore[arg-type]  # a duck-typed adapter
        assert all(r.confirmed for r in results)
        client = redis_client()
        length = client.xlen(prefix)
        client.close()
        assert 100 <= length < 1000  # "~": trimmed in whole macro nodes, never below MAXLEN
    finally:
        redis_cleanup(prefix)
