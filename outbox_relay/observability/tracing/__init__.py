"""OpenTelemetry tracing: one trace from the producer's transaction to the consumer's handler.

* :mod:`.setup`: the tracer provider from ``OTEL_*`` variables (:func:`configure_tracing`);
  nothing configured means no exporter, no relay hooks, and two context look-ups per ``emit()``.
* :mod:`.context`: W3C ``traceparent``/``tracestate``/``baggage`` headers; :func:`emit_context`
  stores them in the outbox row and records an ``outbox emit <type>`` span.
* :mod:`.relay`: :class:`RelayTracing`, a PRODUCER span per message, child of the row's context.
* :mod:`.consumer`: :class:`ConsumerTracing`, a CONSUMER span around each handler.

Only ``context`` is imported up front: ``emit()`` needs it and nothing else, so the producer
loads neither the span code of the relay and the consumer nor the SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from outbox_relay.observability.tracing.context import (
    INSTRUMENTATION,
    emit_context,
    format_traceparent,
    parse_traceparent,
)

if TYPE_CHECKING:
    from outbox_relay.observability.tracing.consumer import ConsumerTracing
    from outbox_relay.observability.tracing.relay import RelayTracing
    from outbox_relay.observability.tracing.setup import (
        configure_tracing,
        otlp_protocol,
        traces_exporter_names,
    )

__all__ = [
    "INSTRUMENTATION",
    "ConsumerTracing",
    "RelayTracing",
    "configure_tracing",
    "emit_context",
    "format_traceparent",
    "otlp_protocol",
    "parse_traceparent",
    "traces_exporter_names",
]


def __getattr__(name: str) -> object:
    """The names of the other modules, imported on first use (PEP 562)."""
    value: object
    if name in {"configure_tracing", "otlp_protocol", "traces_exporter_names"}:
        from outbox_relay.observability.tracing import setup

        value = getattr(setup, name)
    elif name == "RelayTracing":
        from outbox_relay.observability.tracing import relay

        value = relay.RelayTracing
    elif name == "ConsumerTracing":
        from outbox_relay.observability.tracing import consumer

        value = consumer.ConsumerTracing
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # found directly from now on
    return value
