"""Tracing pieces that need no services: W3C parsing, producer headers, relay span contexts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from opentelemetry import baggage, context, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Tracer, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_ON,
    ParentBased,
    SamplingResult,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util.types import Attributes

from outbox_relay.messages import CONFIRMED, OutboxMessage, failed
from outbox_relay.observability.tracing import (
    INSTRUMENTATION,
    RelayTracing,
    emit_context,
    format_traceparent,
    parse_traceparent,
    traces_exporter_names,
)
from tests.otel_helpers import global_memory_tracing

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = TRACEPARENT[:-2] + "00"


def message(n: int = 1, headers: dict[str, Any] | None = None) -> OutboxMessage:
    return OutboxMessage(
        id=n,
        event_id=f"e-{n}",
        event_type="order.created",
        aggregate_type="order",
        aggregate_id="o-1",
        payload=b"{}",
        headers=dict(headers or {}),
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        attempts=2,
    )


# -- W3C traceparent ------------------------------------------------------------------------------


def test_parses_a_w3c_traceparent_and_tracestate() -> None:
    parsed = parse_traceparent({"traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE"})
    assert parsed is not None
    assert (parsed.trace_id, parsed.span_id) == (TRACE_ID, SPAN_ID)
    assert parsed.is_remote
    assert parsed.trace_flags.sampled
    assert parsed.trace_state.to_header() == "congo=t61rcWkgMzE"
    assert format_traceparent(parsed) == TRACEPARENT


def test_accepts_amqp_bytes_and_future_versions() -> None:
    assert parse_traceparent({"traceparent": TRACEPARENT.encode()}) is not None
    future = "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-the-future-holds"
    assert parse_traceparent({"traceparent": future}) is not None


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        "",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
        "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
    ],
)
def test_rejects_malformed_traceparents(value: Any) -> None:
    assert parse_traceparent({"traceparent": value}) is None


# -- producer -------------------------------------------------------------------------------------


def test_emit_without_tracing_leaves_the_headers_alone() -> None:
    headers = {"producer": "billing"}
    with emit_context("order.created", "e-1", headers) as stored:
        assert stored is headers  # not even copied


def test_emit_carries_the_callers_context_even_without_an_sdk() -> None:
    caller = SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1))
    token = context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        with (
            trace.use_span(NonRecordingSpan(caller)),
            emit_context("order.created", "e-1", {"x": 1}) as stored,
        ):
            assert stored == {"traceparent": TRACEPARENT, "baggage": "tenant=acme", "x": 1}
    finally:
        context.detach(token)


@pytest.fixture
def memory_spans() -> Iterator[InMemorySpanExporter]:
    with global_memory_tracing() as exporter:
        yield exporter


def test_emit_records_a_span_and_stores_its_context(memory_spans: InMemorySpanExporter) -> None:
    with emit_context("order.created", "e-1", {"producer": "billing"}) as stored:
        pass
    (span,) = memory_spans.get_finished_spans()
    assert span.name == "outbox emit order.created"
    assert span.kind is SpanKind.PRODUCER
    assert span.attributes is not None
    assert span.attributes["messaging.message.id"] == "e-1"
    assert stored is not None
    assert stored["traceparent"] == format_traceparent(span.context)
    assert stored["producer"] == "billing"


def test_headers_the_caller_passed_win(memory_spans: InMemorySpanExporter) -> None:
    with emit_context("order.created", "e-1", {"traceparent": TRACEPARENT}) as stored:
        pass
    assert stored == {"traceparent": TRACEPARENT}


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ["otlp", "console"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ["otlp"]),
    ],
)
def test_nothing_configured_means_no_exporter(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], expected: list[str]
) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert traces_exporter_names() == expected


# -- relay ----------------------------------------------------------------------------------------


def test_copying_a_message_keeps_every_field() -> None:
    original = message(7, {"a": 1})
    copy = original.with_headers({"b": 2})
    assert copy == dataclasses.replace(original, headers={"b": 2})
    # A new OutboxMessage field must be added to with_headers too.
    assert len(dataclasses.fields(OutboxMessage)) == 11


def sdk_tracing(**provider_args: Any) -> tuple[RelayTracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(**provider_args)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return RelayTracing(provider.get_tracer("t"), system="rabbitmq", destination="events"), exporter


def test_publish_spans_continue_the_producer_trace_and_report_failures() -> None:
    tracing, exporter = sdk_tracing()
    sent = tracing.before_publish([message(1, {"traceparent": TRACEPARENT}), message(2)])
    tracing.after_publish(sent, [CONFIRMED, failed("unroutable: 312 NO_ROUTE")], 0.01)

    first, second = exporter.get_finished_spans()
    assert first.parent is not None
    assert (first.context.trace_id, first.parent.span_id) == (TRACE_ID, SPAN_ID)
    assert first.status.status_code is StatusCode.UNSET
    assert sent[0].headers["traceparent"] == format_traceparent(first.context)
    assert second.parent is None  # no producer context: the publish starts the trace
    assert second.status.status_code is StatusCode.ERROR
    assert second.status.description == "unroutable: 312 NO_ROUTE"
    assert second.attributes is not None
    assert second.attributes["messaging.batch.message_count"] == 2
    assert sent[1].headers["traceparent"] == format_traceparent(second.context)
    assert sent[1].attempts == 2  # the rest of the message is untouched


def test_a_sampled_out_publish_forwards_the_producers_context_unchanged() -> None:
    tracing, exporter = sdk_tracing(sampler=ALWAYS_OFF)
    with_parent = message(1, {"traceparent": TRACEPARENT})
    sent = tracing.before_publish([with_parent, message(2)])
    tracing.after_publish(sent, [CONFIRMED, CONFIRMED], 0.01)
    assert exporter.get_finished_spans() == ()
    assert sent[0] is with_parent
    # Without a producer context the relay starts one, not sampled, so the consumer agrees.
    root = parse_traceparent(sent[1].headers)
    assert root is not None
    assert not root.trace_flags.sampled


def test_an_unsampled_producer_trace_costs_the_default_sampler_nothing() -> None:
    tracing, exporter = sdk_tracing()  # parentbased_always_on
    unsampled = message(1, {"traceparent": UNSAMPLED})
    sent = tracing.before_publish([unsampled, message(2, {"traceparent": TRACEPARENT})])
    tracing.after_publish(sent, [CONFIRMED, CONFIRMED], 0.01)
    assert sent[0] is unsampled
    (span,) = exporter.get_finished_spans()
    assert span.parent is not None
    assert span.parent.span_id == SPAN_ID


def test_a_publish_error_ends_the_spans_with_error_status() -> None:
    tracing, exporter = sdk_tracing()
    sent = tracing.before_publish([message(1), message(2)])
    tracing.on_publish_error(sent, ConnectionError("gone"))
    assert [s.status.status_code for s in exporter.get_finished_spans()] == [StatusCode.ERROR] * 2


def test_a_no_op_tracer_leaves_the_producers_context_in_place() -> None:
    tracing = RelayTracing(trace.NoOpTracer(), system="rabbitmq", destination="events")
    original = message(1, {"traceparent": TRACEPARENT})
    sent = tracing.before_publish([original])
    tracing.after_publish(sent, [CONFIRMED], 0.01)
    assert sent == [original]


def test_a_sampler_that_records_unsampled_producer_traces_is_obeyed() -> None:
    tracing, exporter = sdk_tracing(
        sampler=ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON)
    )
    sent = tracing.before_publish([message(1, {"traceparent": UNSAMPLED})])
    tracing.after_publish(sent, [CONFIRMED], 0.01)
    (span,) = exporter.get_finished_spans()
    assert span.parent is not None
    assert span.parent.span_id == SPAN_ID


def test_a_nested_default_root_does_not_pass_for_default_remote_delegates() -> None:
    # The root's description holds "remoteParentSampled:AlwaysOnSampler" too; the outer
    # sampler's own delegate says drop, and wins.
    tracing, exporter = sdk_tracing(
        sampler=ParentBased(DEFAULT_ON, remote_parent_sampled=ALWAYS_OFF)
    )
    original = message(1, {"traceparent": TRACEPARENT})
    sent = tracing.before_publish([original])
    tracing.after_publish(sent, [CONFIRMED], 0.01)
    assert exporter.get_finished_spans() == ()
    assert sent == [original]


@pytest.mark.parametrize(("name", "version"), [(INSTRUMENTATION, None), ("billing", "2.1")])
def test_publish_spans_carry_the_tracers_instrumentation_scope(
    name: str, version: str | None
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = RelayTracing(
        provider.get_tracer(name, version),
        system="rabbitmq",
        destination="events",
        tracer_name=name,
        tracer_version=version,
    )
    tracing.after_claim([message(1)], 0.001)  # a span of the tracer's own making
    sent = tracing.before_publish([message(1)])
    tracing.after_publish(sent, [CONFIRMED], 0.01)
    claim, publish = exporter.get_finished_spans()
    assert publish.name == "publish order.created"
    assert publish.instrumentation_scope == claim.instrumentation_scope
    assert publish.instrumentation_scope is not None
    assert publish.instrumentation_scope.name == name


# -- no private SDK attributes --------------------------------------------------------------------


class _PrivateAttributesAbsent:
    """Reading any private attribute fails, as it would after the SDK renamed them."""

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") and not name.startswith("__"):
            raise AttributeError(f"{type(self).__name__} has no (private) attribute {name!r}")
        return super().__getattribute__(name)


class PublicParentBased(_PrivateAttributesAbsent, ParentBased):
    """The default parent-based sampler seen through its public face only; counts decisions."""

    def __init__(self) -> None:  # no super().__init__(): no private delegates exist
        self.decisions = 0

    def get_description(self) -> str:
        return str(DEFAULT_ON.get_description())

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        self.decisions += 1
        return DEFAULT_ON.should_sample(parent_context, trace_id, name, kind, attributes, links)


class PublicTracer(_PrivateAttributesAbsent, Tracer):
    """An SDK tracer with its public attributes only (no instrumentation scope to borrow)."""

    def __init__(self, provider: TracerProvider, sampler: ParentBased) -> None:
        real = provider.get_tracer(INSTRUMENTATION)
        assert isinstance(real, Tracer)
        self.sampler = sampler
        self.resource = real.resource
        self.span_processor = real.span_processor
        self.id_generator = real.id_generator


def test_the_fast_path_needs_no_private_sdk_attribute() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sampler = PublicParentBased()
    tracing = RelayTracing(PublicTracer(provider, sampler), system="rabbitmq", destination="events")
    unsampled = message(2, {"traceparent": UNSAMPLED})
    sent = tracing.before_publish([message(1, {"traceparent": TRACEPARENT}), unsampled])
    tracing.after_publish(sent, [CONFIRMED, CONFIRMED], 0.01)

    # Recognised as the default sampler: remote parents decided by their flag, no sampler call.
    assert sampler.decisions == 0
    assert sent[1] is unsampled
    (span,) = exporter.get_finished_spans()
    assert span.parent is not None
    assert span.parent.span_id == SPAN_ID
    # The scope the tracer was obtained with, built rather than read from the tracer.
    assert span.instrumentation_scope == InstrumentationScope(INSTRUMENTATION, "")
    assert sent[0].headers["traceparent"] == format_traceparent(span.context)


# -- the producer's imports -----------------------------------------------------------------------


def test_the_producer_loads_no_span_code_no_sdk_and_no_broker_client() -> None:
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, outbox_relay.producer; print(*sorted(sys.modules), sep=chr(10))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert "outbox_relay.observability.tracing.context" in loaded
    heavy = (
        "outbox_relay.observability.tracing.relay",
        "outbox_relay.observability.tracing.consumer",
        "opentelemetry.sdk",
        "pika",
    )
    assert [m for m in loaded if m.startswith(heavy)] == []
