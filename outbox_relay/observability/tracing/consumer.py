"""Consumer spans: each delivery is handled in a CONSUMER span, child of the relay's publish."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from outbox_relay.observability.tracing.context import header_text

if TYPE_CHECKING:
    from pika.spec import Basic, BasicProperties

    from outbox_relay.consumer.events import Event


class _HeaderGetter:
    """Reads AMQP headers for the propagator; values may be bytes. A CloudEvent in binary mode
    carries the trace context as the Distributed Tracing extension's attributes
    (``cloudEvents:traceparent``)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        found = carrier.get(key)
        if found is None:
            found = carrier.get("cloudEvents:" + key)
        value = header_text(found)
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
