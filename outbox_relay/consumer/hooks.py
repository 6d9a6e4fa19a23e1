"""Callbacks around each delivery (metrics and tracing implement them); a failing hook is
logged, never fatal to delivery."""

from __future__ import annotations

from typing import Protocol

from outbox_relay.consumer.events import Event


class ConsumerHooks(Protocol):
    """Metrics and tracing callbacks (the OpenTelemetry integration implements these).

    A hook that raises is logged and ignored: metrics never stop delivery.
    """

    def on_handled(self, event: Event, seconds: float) -> None: ...

    def on_deduped(self, event: Event) -> None: ...

    def on_retried(self, event: Event, delay: float, reason: str) -> None: ...

    def on_dead_lettered(
        self, event_id: str | None, event_type: str | None, reason: str
    ) -> None: ...

    def on_redelivered(self, event_id: str | None, event_type: str | None) -> None: ...

    def on_handler_latency(self, event_type: str, seconds: float) -> None: ...


class NoHooks:
    """A ConsumerHooks that does nothing; subclass it to implement only some callbacks."""

    def on_handled(self, event: Event, seconds: float) -> None:
        pass

    def on_deduped(self, event: Event) -> None:
        pass

    def on_retried(self, event: Event, delay: float, reason: str) -> None:
        pass

    def on_dead_lettered(self, event_id: str | None, event_type: str | None, reason: str) -> None:
        pass

    def on_redelivered(self, event_id: str | None, event_type: str | None) -> None:
        pass

    def on_handler_latency(self, event_type: str, seconds: float) -> None:
        pass
