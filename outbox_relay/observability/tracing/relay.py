"""Relay spans: a PRODUCER span per published message, a span per claim and per settle."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from outbox_relay.messages import OutboxMessage, PublishResult
from outbox_relay.observability.tracing.context import (
    INSTRUMENTATION,
    TRACEPARENT,
    TRACESTATE,
    format_traceparent,
    parse_traceparent,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from outbox_relay.messages import Failure

_OK = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_NO_ATTRIBUTES: Mapping[str, Any] = {}
_ROOT = Context()


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

    ``tracer_name`` and ``tracer_version`` are what ``tracer`` was obtained with (the arguments of
    ``get_tracer``): the fast path's spans carry them as their instrumentation scope, which the
    SDK's tracer does not expose.
    """

    def __init__(
        self,
        tracer: trace.Tracer,
        *,
        system: str,
        destination: str,
        tracer_name: str = INSTRUMENTATION,
        tracer_version: str | None = None,
    ) -> None:
        self._tracer = tracer
        self._system = system
        self._destination = destination
        self._sdk = _is_sdk_tracer(tracer)
        self._follows_remote_parent = self._sdk and _follows_remote_parent(
            getattr(tracer, "sampler", None)
        )
        self._scope: InstrumentationScope | None = None
        if self._sdk:
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope

            # get_tracer records a missing version as "": the same scope as the tracer's own
            # spans (claim, settle), so exporters group them together.
            self._scope = InstrumentationScope(tracer_name, tracer_version or "")
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
        scope = self._scope
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


def _unsampled(traceparent: Any) -> bool:
    """A version-00 traceparent whose sampled flag is clear, judged without parsing it."""
    return (
        isinstance(traceparent, str)
        and len(traceparent) == 55
        and traceparent.startswith("00-")
        and traceparent[54] in "02468ace"
    )


def _is_sdk_tracer(tracer: trace.Tracer) -> bool:
    try:
        from opentelemetry.sdk.trace import Tracer as SdkTracer
    except ModuleNotFoundError:
        return False
    return isinstance(tracer, SdkTracer) and all(
        hasattr(tracer, name) for name in ("sampler", "id_generator", "span_processor", "resource")
    )


def _follows_remote_parent(sampler: object) -> bool:
    """True for the SDK's ParentBased sampler with its default remote-parent delegates (the
    sampler of every ``parentbased_*`` OTEL_TRACES_SAMPLER and of an unconfigured SDK).

    The delegates are private to the sampler; its public description names them:
    ``ParentBased{root:…,remoteParentSampled:AlwaysOnSampler,remoteParentNotSampled:…,…}``.
    """
    try:
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler
    except ModuleNotFoundError:
        return False
    if not isinstance(sampler, ParentBased):
        return False
    described: Sampler = sampler  # ParentBased's own override carries no annotations
    delegates = _described_fields(described.get_description(), "ParentBased")
    return (
        delegates.get("remoteParentSampled") == ALWAYS_ON.get_description()
        and delegates.get("remoteParentNotSampled") == ALWAYS_OFF.get_description()
    )


def _described_fields(description: str, kind: str) -> dict[str, str]:
    """The top-level ``key:value`` fields of a ``Kind{key:value,...}`` sampler description, or
    none when it has another shape. Values may nest braces and commas (a ParentBased root is
    itself described), so the split counts braces rather than trusting a substring."""
    if not (description.startswith(kind + "{") and description.endswith("}")):
        return {}
    body = description[len(kind) + 1 : -1]
    fields: dict[str, str] = {}
    depth = start = 0
    for index, char in enumerate(body + ","):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0:
            key, separator, value = body[start:index].partition(":")
            if separator:
                fields[key] = value
            start = index + 1
    return fields
