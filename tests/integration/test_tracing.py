"""One trace end to end: the producer's ``outbox emit`` span, the relay's publish span and the
consumer's span, linked parent to child, with the real relay, RabbitMQ and consumer library.

Spans go to an in-memory exporter; the SDK provider is installed globally for ``emit()`` (as an
application would) and removed again after each test. The relay's publish spans take the SDK fast
path (``ReadableSpan`` handed to the processors), the consumer's the ordinary one.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from outbox_relay.consumer import Consumer, Event
from outbox_relay.messages import OutboxMessage
from outbox_relay.observability.tracing import INSTRUMENTATION, ConsumerTracing, RelayTracing
from outbox_relay.producer import emit
from outbox_relay.relay.hooks import NoRelayHooks
from outbox_relay.relay.settings import Mode
from tests.conftest import RabbitQueue, wait_until
from tests.integration.consumer_harness import ConsumerEnv, WorkerThread, consumer_env
from tests.integration.relay_harness import RelayThread, collect, relay_settings
from tests.otel_helpers import global_memory_tracing

pytestmark = pytest.mark.integration


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """A global SDK tracer provider exporting to memory, for this test only."""
    with global_memory_tracing() as exporter:
        yield exporter


@pytest.fixture
def env(broker_url: str, database_url: str, exchange: str) -> Iterator[ConsumerEnv]:
    yield from consumer_env(broker_url, database_url, exchange)


def relay_tracing(exchange: str) -> RelayTracing:
    tracer = trace.get_tracer_provider().get_tracer(INSTRUMENTATION)
    return RelayTracing(tracer, system="rabbitmq", destination=exchange)


def consumer_tracing() -> ConsumerTracing:
    return ConsumerTracing(trace.get_tracer_provider().get_tracer(INSTRUMENTATION))


def emit_one(database_url: str, event_type: str, payload: Any, aggregate_id: str) -> str:
    with psycopg.connect(database_url) as conn:
        event_id = emit(conn, event_type, payload=payload, aggregate_id=aggregate_id)
        conn.commit()
    return str(event_id)


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def drop_slot_when_idle(database_url: str, slot: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
            " WHERE slot_name = %s AND active_pid IS NOT NULL",
            [slot],
        )

        def dropped() -> bool:
            try:
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE slot_name = %s",
                    [slot],
                )
            except psycopg.errors.ObjectInUse:
                return False
            return True

        wait_until(dropped, timeout=30)


@pytest.mark.parametrize("mode", [Mode.NOTIFY, Mode.CDC])
def test_producer_relay_and_consumer_spans_form_one_trace(
    spans: InMemorySpanExporter,
    env: ConsumerEnv,
    database_url: str,
    broker_url: str,
    exchange: str,
    mode: Mode,
) -> None:
    # Given a consumer whose handler runs inside the consumer span
    seen_in_handler: list[trace.SpanContext] = []
    consumer = Consumer("tracing")

    @consumer.handler("order.*")
    def handle(event: Event) -> None:
        seen_in_handler.append(trace.get_current_span().get_span_context())

    slot = f"t_{uuid.uuid4().hex[:12]}"
    overrides: dict[str, Any] = {"mode": mode}
    if mode is Mode.CDC:
        overrides.update(slot_name=slot, publication=slot)
    settings = relay_settings(database_url, broker_url, exchange, **overrides)
    try:
        with (
            WorkerThread(consumer, env.settings(), hooks=consumer_tracing()),
            RelayThread(settings, hooks=relay_tracing(exchange)) as relay,
        ):
            wait_until(lambda: relay.leading, timeout=30)
            # When the application emits an event in its transaction
            event_id = emit_one(database_url, "order.created", {"n": 1}, "o-1")
            wait_until(lambda: named(spans, "process order.created"), timeout=30)
    finally:
        if mode is Mode.CDC:
            drop_slot_when_idle(database_url, slot)

    # Then the three spans are one trace: emit -> publish -> process
    (emitted,) = named(spans, "outbox emit order.created")
    (published,) = named(spans, "publish order.created")
    (processed,) = named(spans, "process order.created")
    trace_id = emitted.context.trace_id
    assert emitted.parent is None
    assert emitted.kind is SpanKind.PRODUCER
    assert emitted.attributes is not None
    assert emitted.attributes["messaging.message.id"] == event_id

    assert published.context.trace_id == trace_id
    assert published.parent is not None
    assert published.parent.span_id == emitted.context.span_id
    assert published.kind is SpanKind.PRODUCER
    assert published.status.status_code is StatusCode.UNSET
    assert dict(published.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": exchange,
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.batch.message_count": 1,
        "messaging.message.id": event_id,
        "messaging.rabbitmq.destination.routing_key": "order.created",
    }

    assert processed.context.trace_id == trace_id
    assert processed.parent is not None
    assert processed.parent.span_id == published.context.span_id
    assert processed.kind is SpanKind.CONSUMER
    assert seen_in_handler == [processed.context]

    # And the batch work is traced once per batch, outside the event's trace
    claims = named(spans, "outbox claim")
    settles = named(spans, "outbox settle")
    assert settles, "no settle span"
    assert all(s.context.trace_id != trace_id for s in claims + settles)
    assert any((s.attributes or {}).get("outbox.sent") == 1 for s in settles)
    if mode is Mode.NOTIFY:
        assert any((s.attributes or {}).get("messaging.batch.message_count") == 1 for s in claims)


def test_with_tracing_off_the_producers_traceparent_reaches_the_broker_unchanged(
    database_url: str, broker_url: str, exchange: str, bind_queue: Any
) -> None:
    queue: RabbitQueue = bind_queue("order.*")
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with psycopg.connect(database_url) as conn:
        emit(
            conn,
            "order.created",
            payload={},
            headers={"traceparent": traceparent, "tracestate": "vendor=1", "baggage": "k=v"},
        )
        conn.commit()
    with RelayThread(relay_settings(database_url, broker_url, exchange)):
        (delivery,) = collect(queue, 1)
    assert delivery.headers["traceparent"] == traceparent
    assert delivery.headers["tracestate"] == "vendor=1"
    assert delivery.headers["baggage"] == "k=v"


def test_with_tracing_on_the_message_carries_the_publish_span_in_the_producers_trace(
    spans: InMemorySpanExporter,
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Any,
) -> None:
    # A producer in another language wrote the row with plain SQL and its own trace context
    queue: RabbitQueue = bind_queue("order.*")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox (event_id, event_type, aggregate_id, payload, headers)"
            " VALUES (gen_random_uuid(), 'order.paid', 'o-9', '{}',"
            " jsonb_build_object('traceparent', %s::text, 'baggage', 'tenant=acme'))",
            ["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"],
        )
    with RelayThread(
        relay_settings(database_url, broker_url, exchange), hooks=relay_tracing(exchange)
    ):
        (delivery,) = collect(queue, 1)
    (published,) = named(spans, "publish order.paid")
    assert published.parent is not None
    assert published.parent.is_remote
    assert published.parent.span_id == 0xB7AD6B7169203331
    assert published.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert delivery.headers["traceparent"] == (
        f"00-{published.context.trace_id:032x}-{published.context.span_id:016x}-01"
    )
    assert delivery.headers["baggage"] == "tenant=acme"


class ExplodingHooks(NoRelayHooks):
    def before_publish(self, messages: Any) -> list[OutboxMessage]:
        raise RuntimeError("hook bug")

    def after_publish(self, messages: Any, results: Any, seconds: float) -> None:
        raise RuntimeError("hook bug")


def test_a_failing_hook_never_stops_delivery(
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue: RabbitQueue = bind_queue("order.*")
    event_id = emit_one(database_url, "order.created", {}, "o-1")
    with RelayThread(relay_settings(database_url, broker_url, exchange), hooks=ExplodingHooks()):
        (delivery,) = collect(queue, 1)
    assert delivery.event_id == event_id
    assert "relay hook before_publish failed" in caplog.text


def test_consumer_span_records_retry_and_dedupe_as_events(
    spans: InMemorySpanExporter, env: ConsumerEnv
) -> None:
    calls: list[str] = []
    consumer = Consumer("tracing-retry")

    @consumer.handler("order.*")
    def flaky(event: Event) -> None:
        calls.append(event.event_id)
        if len(calls) == 1:
            raise RuntimeError("database hiccup")

    traceparent = "00-11111111111111111111111111111111-2222222222222222-01"
    with WorkerThread(consumer, env.settings(), hooks=consumer_tracing()):
        event_id = env.publish("order.created", {}, headers={"traceparent": traceparent})
        wait_until(lambda: len(named(spans, "process order.created")) >= 2, timeout=30)
        env.publish("order.created", {}, event_id=event_id, headers={"traceparent": traceparent})
        wait_until(lambda: len(named(spans, "process order.created")) >= 3, timeout=30)

    first, retried, duplicate = named(spans, "process order.created")
    for span in (first, retried, duplicate):
        assert span.context.trace_id == 0x11111111111111111111111111111111
        assert span.parent is not None
        assert span.parent.span_id == 0x2222222222222222
    assert first.status.status_code is StatusCode.ERROR
    assert [e.name for e in first.events] == ["outbox.retry_scheduled"]
    assert retried.status.status_code is StatusCode.UNSET
    assert [e.name for e in duplicate.events] == ["outbox.deduplicated"]
    assert calls == [event_id, event_id]
