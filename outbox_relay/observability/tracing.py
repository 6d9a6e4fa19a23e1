"""OpenTelemetry tracing: one trace from the producer's transaction to the consumer's handler.

* Producer: :func:`emit_context` stores the W3C context (``traceparent``, ``tracestate``,
  ``baggage``) in the outbox row's ``headers`` and records an ``outbox emit <type>`` span.
* Relay: :class:`RelayTracing` (a :class:`~outbox_relay.relay.hooks.RelayHooks`) records one PRODUCER
  span per message, child of the producer's context read from the row, and writes its own context
  into the outgoing message's headers; claim and settle get one span per batch.
* Consumer: :class:`ConsumerTracing` (a consumer hook) runs the handler in a CONSUMER span, child
  of the relay's publish span.

Configured the standard way from ``OTEL_*`` variables by :func:`configure_tracing`. With nothing
configured no exporter runs, the relay gets no tracing hooks at all and ``emit()`` does two
context look-ups.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import baggage, propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    ProxyTracerProvider,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from outbox_relay.errors import ConfigError, MissingExtraError
from outbox_relay.messages import OutboxMessage, PublishResult

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from pika.spec import Basic, BasicProperties

    from outbox_relay.consumer.events import Event
    from outbox_relay.messages import Failure

log = logging.getLogger(__name__)

#: Header names carrying the trace context, in the outbox row and in the broker message (W3C).
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
BAGGAGE = "baggage"

INSTRUMENTATION = "outbox_relay"

_NOOP_PROVIDERS = (ProxyTracerProvider, trace.NoOpTracerProvider)


# -- configuration -------------------------------------------------------------------------------


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def traces_exporter_names() -> list[str]:
    """OTEL_TRACES_EXPORTER as a list. Unlike the SDK's default (otlp), nothing configured means
    no exporter, unless an OTLP endpoint is given: a relay must not try to reach a collector
    nobody runs."""
    value = _env("OTEL_TRACES_EXPORTER").lower()
    if not value:
        endpoint = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    names = [n.strip() for n in value.split(",") if n.strip()]
    return [] if "none" in names else names


def otlp_protocol(signal: str) -> str:
    protocol = (
        _env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or _env("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).lower()
    if protocol not in {"grpc", "http/protobuf"}:
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not one of grpc, http/protobuf"
        )
    return protocol


def configure_tracing(
    default_service_name: str, *, set_global: bool = True
) -> TracerProvider | None:
    """Build the tracer provider the ``OTEL_*`` variables ask for, or None when they ask for none.

    Honours OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES (resource), OTEL_TRACES_SAMPLER[_ARG]
    (sampler), OTEL_TRACES_EXPORTER (otlp, console, none; comma-separated), and for OTLP the
    exporters' own OTEL_EXPORTER_OTLP_* variables with the protocol grpc or http/protobuf.
    Console spans go to stderr so a command's stdout stays machine-readable.
    """
    names = traces_exporter_names()
    if not names:
        return None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ModuleNotFoundError as exc:
        raise MissingExtraError(
            f"OTEL_TRACES_EXPORTER={','.join(names)} needs the OpenTelemetry SDK: "
            "pip install 'outbox-relay[otel]'"
        ) from exc
    attributes = {} if _env("OTEL_SERVICE_NAME") else {SERVICE_NAME: default_service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        elif name == "otlp":
            provider.add_span_processor(BatchSpanProcessor(_otlp_span_exporter()))
        else:
            raise ConfigError(f"OTEL_TRACES_EXPORTER: {name!r} is not one of otlp, console, none")
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def _otlp_span_exporter() -> Any:
    try:
        if otlp_protocol("traces") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            # The gRPC and HTTP exporters are distinct classes with one interface; either is the exporter.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
    except ModuleNotFoundError as exc:
        raise MissingExtraError(
            "OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter: pip install 'outbox-relay[otel]'"
        ) from exc
    return OTLPSpanExporter()


# -- W3C trace context, fast path ------------------------------------------------------------------


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):  # AMQP long strings may arrive undecoded
        return value.decode("ascii", "replace")
    return None


def parse_traceparent(headers: Mapping[str, Any]) -> SpanContext | None:
    """The remote span context in ``headers``, or None when absent or malformed.

    A hand-written parser: the relay reads one per message and the generic propagator's regular
    expressions cost more than the rest of the span."""
    value = _text(headers.get(TRACEPARENT))
    if value is None:
        return None
    # version "-" trace-id (32 hex) "-" parent-id (16 hex) "-" flags (2 hex) ["-" future fields]
    if len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    version = value[:2]
    if (
        version == "ff"
        or (version == "00" and len(value) != 55)
        or (len(value) > 55 and value[55] != "-")
    ):
        return None
    try:
        int(version, 16)
        trace_id, span_id, flags = (
            int(value[3:35], 16),
            int(value[36:52], 16),
            int(value[53:55], 16),
        )
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    state = _text(headers.get(TRACESTATE))
    return SpanContext(
        trace_id,
        span_id,
        is_remote=True,
        trace_flags=_SAMPLED if flags & TraceFlags.SAMPLED else _NOT_SAMPLED,
        trace_state=TraceState.from_header([state]) if state else None,
    )


def _unsampled(traceparent: Any) -> bool:
    """A version-00 traceparent whose sampled flag is clear, judged without parsing it."""
    return (
        isinstance(traceparent, str)
        and len(traceparent) == 55
        and traceparent.startswith("00-")
        and traceparent[54] in "02468ace"
    )


def format_traceparent(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


# -- producer ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _tracer_of(provider: trace.TracerProvider) -> trace.Tracer:
    # Keyed on the provider, not fetched once at import: the application may set (or, in tests,
    # replace) its provider after importing this module.
    return provider.get_tracer(INSTRUMENTATION)


@contextmanager
def emit_context(
    event_type: str, event_id: str, headers: Mapping[str, Any] | None
) -> Iterator[Mapping[str, Any] | None]:
    """Around one outbox INSERT: yields the headers to store, with the current trace context.

    Headers the caller passed win over the injected ones. Without a tracer provider and without
    an active span or baggage this yields ``headers`` untouched.
    """
    provider = trace.get_tracer_provider()
    if isinstance(provider, _NOOP_PROVIDERS):
        if not trace.get_current_span().get_span_context().is_valid and not baggage.get_all():
            yield headers
            return
        # No SDK here, but the caller's context (e.g. from another library) still travels.
        yield _with_context(headers)
        return
    with _tracer_of(provider).start_as_current_span(
        f"outbox emit {event_type}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.operation.type": "create",
            "messaging.operation.name": "emit",
            "messaging.message.id": event_id,
            "messaging.destination.name": event_type,
        },
    ):
        yield _with_context(headers)


def _with_context(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    carrier: dict[str, Any] = {}
    propagate.inject(carrier)
    carrier.update(headers or {})
    return carrier


# -- relay ---------------------------------------------------------------------------------------


class _Publish:
    """One message's publish span between before_publish and after_publish."""

    __slots__ = ("context", "event_id", "event_type", "parent", "sampler_attributes", "span")

    def __init__(
        self,
        context: SpanContext,
        parent: SpanContext | None,
        event_id: str,
        event_type: str,
        span: trace.Span | None = None,
        sampler_attributes: Mapping[str, Any] | None = None,
    ) -> None:
        self.context = context
        self.parent = parent
        self.event_id = event_id
        self.event_type = event_type
        self.span = span  # the generic path's live span; None on the SDK fast path
        self.sampler_attributes = sampler_attributes


class RelayTracing:
    """RelayHooks recording a PRODUCER span per message and a span per claim and per settle.

    With the OpenTelemetry SDK's tracer (the usual case) the publish spans take a fast path: the
    tracer's own sampler and id generator decide each span's context before the publish, and the
    finished span (a ``ReadableSpan`` with its final status and both timestamps) goes straight to
    the tracer's span processors after the confirm. That skips the live-span machinery (locks,
    per-attribute validation of constant values), which would cost more than the publish itself.
    Processors get ``on_end`` only, not ``on_start``. Any other tracer takes the generic path.
    """

    def __init__(self, tracer: trace.Tracer, *, system: str, destination: str) -> None:
        self._tracer = tracer
        self._system = system
        self._destination = destination
        self._sdk = _is_sdk_tracer(tracer)
        self._follows_remote_parent = self._sdk and _follows_remote_parent(
            getattr(tracer, "sampler", None)
        )
        # The publishes of each wave in flight, in message order, by the id of its first message.
        self._in_flight: dict[int, tuple[int, int, list[_Publish | None]]] = {}

    def after_claim(self, messages: Sequence[OutboxMessage], seconds: float) -> None:
        self._batch_span("outbox claim", seconds, {"messaging.batch.message_count": len(messages)})

    def after_rebalance(self, owned: int, gained: int, lost: int) -> None:
        pass  # a change of share is a metric, not part of any event's trace

    def after_settle(
        self, sent: Sequence[int], failures: Sequence[Failure], dead: int, seconds: float
    ) -> None:
        self._batch_span(
            "outbox settle",
            seconds,
            {
                "messaging.batch.message_count": len(sent) + len(failures),
                "outbox.sent": len(sent),
                "outbox.failed": len(failures),
                "outbox.dead": dead,
            },
        )

    def _batch_span(self, name: str, seconds: float, attributes: dict[str, Any]) -> None:
        end = time.time_ns()
        attributes["db.system.name"] = "postgresql"
        span = self._tracer.start_span(
            name,
            context=Context(),  # a root: batch work belongs to no single event's trace
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=end - int(seconds * 1e9),
        )
        span.end(end_time=end)

    def _common(self, count: int) -> dict[str, Any]:
        return {
            "messaging.system": self._system,
            "messaging.destination.name": self._destination,
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.batch.message_count": count,
        }

    def before_publish(self, messages: Sequence[OutboxMessage]) -> Sequence[OutboxMessage]:
        start = time.time_ns()
        publishes: list[_Publish | None] = []
        sent: list[OutboxMessage] = []
        skip_unsampled = self._follows_remote_parent
        for message in messages:
            if skip_unsampled and _unsampled(message.headers.get(TRACEPARENT)):
                # The producer's trace is not sampled, and so not recorded here either: forward
                # its context as it is. Costs next to nothing, which makes producer-side
                # sampling the cheap way to trace a busy outbox.
                publishes.append(None)
                sent.append(message)
                continue
            parent = parse_traceparent(message.headers)
            publish = (
                self._sdk_context(parent, message)
                if self._sdk
                else self._generic_span(parent, message, len(messages), start)
            )
            publishes.append(publish)
            if not publish.context.is_valid or (
                parent is not None and publish.sampler_attributes is None and self._sdk
            ):
                # A no-op tracer, or a producer's trace sampled out: forward its context as is.
                sent.append(message)
                continue
            headers = dict(message.headers)
            headers[TRACEPARENT] = format_traceparent(publish.context)
            if publish.context.trace_state:
                headers[TRACESTATE] = publish.context.trace_state.to_header()
            else:
                headers.pop(TRACESTATE, None)
            sent.append(message.with_headers(headers))
        if sent:
            self._in_flight[id(sent[0])] = (start, len(messages), publishes)
        return sent

    def _sdk_context(self, parent: SpanContext | None, message: OutboxMessage) -> _Publish:
        tracer: Any = self._tracer
        if parent is not None and self._follows_remote_parent:
            # The default parentbased_* samplers decide a remote parent's child by its flag alone.
            sampled = parent.trace_flags.sampled
            return _Publish(
                SpanContext(
                    parent.trace_id,
                    tracer.id_generator.generate_span_id(),
                    is_remote=False,
                    trace_flags=_SAMPLED if sampled else _NOT_SAMPLED,
                    trace_state=parent.trace_state,
                ),
                parent,
                message.event_id,
                message.event_type,
                sampler_attributes=_NO_ATTRIBUTES if sampled else None,
            )
        if parent is None:
            trace_id = tracer.id_generator.generate_trace_id()
            context = _ROOT
        else:
            trace_id = parent.trace_id
            context = trace.set_span_in_context(NonRecordingSpan(parent))
        result = tracer.sampler.should_sample(
            context, trace_id, f"publish {message.event_type}", SpanKind.PRODUCER
        )
        return _Publish(
            SpanContext(
                trace_id,
                tracer.id_generator.generate_span_id(),
                is_remote=False,
                trace_flags=_SAMPLED if result.decision.is_sampled() else _NOT_SAMPLED,
                trace_state=result.trace_state,
            ),
            parent,
            message.event_id,
            message.event_type,
            # A sampled-out span is not recorded: None marks it.
            sampler_attributes=result.attributes or {} if result.decision.is_recording() else None,
        )

    def _generic_span(
        self, parent: SpanContext | None, message: OutboxMessage, count: int, start: int
    ) -> _Publish:
        attributes = self._common(count)
        attributes["messaging.message.id"] = message.event_id
        attributes["messaging.rabbitmq.destination.routing_key"] = message.event_type
        span = self._tracer.start_span(
            f"publish {message.event_type}",
            context=trace.set_span_in_context(NonRecordingSpan(parent))
            if parent is not None
            else Context(),
            kind=SpanKind.PRODUCER,
            attributes=attributes,
            start_time=start,
        )
        return _Publish(span.get_span_context(), parent, message.event_id, message.event_type, span)

    def after_publish(
        self,
        messages: Sequence[OutboxMessage],
        results: Sequence[PublishResult],
        seconds: float,
    ) -> None:
        statuses = [
            _OK if result.confirmed else Status(StatusCode.ERROR, result.reason or "not confirmed")
            for result in results
        ]
        self._finish(messages, statuses)

    def on_publish_error(self, messages: Sequence[OutboxMessage], error: BaseException) -> None:
        status = Status(StatusCode.ERROR, f"{type(error).__name__}: {error}")
        self._finish(messages, [status] * len(messages))

    def _finish(self, messages: Sequence[OutboxMessage], statuses: Sequence[Status]) -> None:
        wave = self._in_flight.pop(id(messages[0]), None) if messages else None
        if wave is None:
            return
        start, count, publishes = wave
        end = time.time_ns()
        if not self._sdk:
            for publish, status in zip(publishes, statuses, strict=False):
                if publish is None or publish.span is None:
                    continue
                if status is not _OK:
                    publish.span.set_status(status)
                publish.span.end(end_time=end)
            return
        from opentelemetry.sdk.trace import ReadableSpan

        tracer: Any = self._tracer
        processor = tracer.span_processor
        scope = getattr(tracer, "_instrumentation_scope", None)
        common = self._common(count)
        for publish, status in zip(publishes, statuses, strict=False):
            if publish is None or publish.sampler_attributes is None:
                continue
            attributes = dict(common)
            attributes["messaging.message.id"] = publish.event_id
            attributes["messaging.rabbitmq.destination.routing_key"] = publish.event_type
            attributes.update(publish.sampler_attributes)
            processor.on_end(
                ReadableSpan(
                    name=f"publish {publish.event_type}",
                    context=publish.context,
                    parent=publish.parent,
                    resource=tracer.resource,
                    attributes=attributes,
                    kind=SpanKind.PRODUCER,
                    status=status,
                    start_time=start,
                    end_time=end,
                    instrumentation_scope=scope,
                )
            )


_OK = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_NO_ATTRIBUTES: Mapping[str, Any] = {}


def _follows_remote_parent(sampler: Any) -> bool:
    """True for the SDK's ParentBased sampler with its default remote-parent delegates (the
    sampler of every ``parentbased_*`` OTEL_TRACES_SAMPLER and of an unconfigured SDK)."""
    try:
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
    except ModuleNotFoundError:
        return False
    return (
        isinstance(sampler, ParentBased)
        and getattr(sampler, "_remote_parent_sampled", None) is ALWAYS_ON
        and getattr(sampler, "_remote_parent_not_sampled", None) is ALWAYS_OFF
    )


_ROOT = Context()


def _is_sdk_tracer(tracer: trace.Tracer) -> bool:
    try:
        from opentelemetry.sdk.trace import Tracer as SdkTracer
    except ModuleNotFoundError:
        return False
    return isinstance(tracer, SdkTracer) and all(
        hasattr(tracer, name) for name in ("sampler", "id_generator", "span_processor", "resource")
    )


# -- consumer ------------------------------------------------------------------------------------


class _HeaderGetter:
    """Reads AMQP headers for the propagator; values may be bytes."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = _text(carrier.get(key))
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


_GETTER = _HeaderGetter()


class ConsumerTracing:
    """Consumer hooks: the handler runs in a CONSUMER span whose parent is the publish span;
    dedupe hits and retries are span events, failures set the error status."""

    def __init__(self, tracer: trace.Tracer, *, system: str = "rabbitmq") -> None:
        self._tracer = tracer
        self._system = system

    def handling(
        self, method: Basic.Deliver, properties: BasicProperties
    ) -> AbstractContextManager[object]:
        """The span one delivery is handled in (called by the worker around each message)."""
        headers = properties.headers or {}
        # AMQP headers are a dict of AMQP values, not the str carrier the stubs declare.
        parent = propagate.extract(headers, getter=_GETTER)  # type: ignore[arg-type]
        event_type = properties.type or method.routing_key
        attributes: dict[str, Any] = {
            "messaging.system": self._system,
            "messaging.operation.type": "process",
            "messaging.operation.name": "consume",
            "messaging.destination.name": method.exchange,
            "messaging.rabbitmq.destination.routing_key": method.routing_key,
        }
        if properties.message_id:
            attributes["messaging.message.id"] = properties.message_id
        if method.redelivered:
            attributes["outbox.redelivered"] = True
        return self._tracer.start_as_current_span(
            f"process {event_type}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )

    def on_handled(self, event: Event, seconds: float) -> None:
        span = trace.get_current_span()
        if event.attempt > 1:
            span.set_attribute("outbox.attempt", event.attempt)

    def on_deduped(self, event: Event) -> None:
        trace.get_current_span().add_event(
            "outbox.deduplicated", {"messaging.message.id": event.event_id}
        )

    def on_retried(self, event: Event, delay: float, reason: str) -> None:
        span = trace.get_current_span()
        span.add_event(
            "outbox.retry_scheduled",
            {"outbox.attempt": event.attempt, "outbox.retry_in_seconds": delay, "reason": reason},
        )
        span.set_status(Status(StatusCode.ERROR, reason))

    def on_dead_lettered(self, event_id: str | None, event_type: str | None, reason: str) -> None:
        span = trace.get_current_span()
        span.add_event("outbox.dead_lettered", {"reason": reason})
        span.set_status(Status(StatusCode.ERROR, reason))

    def on_redelivered(self, event_id: str | None, event_type: str | None) -> None:
        pass

    def on_handler_latency(self, event_type: str, seconds: float) -> None:
        pass
