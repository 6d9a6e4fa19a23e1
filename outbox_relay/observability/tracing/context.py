"""W3C trace context in outbox and broker headers, and the producer's side of a trace.

The producer imports this module (and only this one), so it needs the OpenTelemetry API only.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import baggage, propagate, trace
from opentelemetry.trace import ProxyTracerProvider, SpanContext, SpanKind, TraceFlags, TraceState

#: Header names carrying the trace context, in the outbox row and in the broker message (W3C).
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
BAGGAGE = "baggage"

#: The instrumentation scope name of every tracer (and meter) the project obtains.
INSTRUMENTATION = "outbox_relay"

_NOOP_PROVIDERS = (ProxyTracerProvider, trace.NoOpTracerProvider)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)


def header_text(value: Any) -> str | None:
    """A header value as text: AMQP long strings may arrive undecoded, as bytes."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return None


def parse_traceparent(headers: Mapping[str, Any]) -> SpanContext | None:
    """The remote span context in ``headers``, or None when absent or malformed.

    A hand-written parser: the relay reads one per message and the generic propagator's regular
    expressions cost more than the rest of the span."""
    value = header_text(headers.get(TRACEPARENT))
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
    state = header_text(headers.get(TRACESTATE))
    return SpanContext(
        trace_id,
        span_id,
        is_remote=True,
        trace_flags=_SAMPLED if flags & TraceFlags.SAMPLED else _NOT_SAMPLED,
        trace_state=TraceState.from_header([state]) if state else None,
    )


def format_traceparent(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


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
