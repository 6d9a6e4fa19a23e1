"""Callbacks around each delivery (metrics and tracing implement them); a failing hook is
logged, never fatal to delivery."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, ExitStack
from typing import TYPE_CHECKING, Protocol

from outbox_relay.consumer.events import Event
from outbox_relay.hooks import HookDispatcher

if TYPE_CHECKING:
    from pika.spec import Basic, BasicProperties


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


class CompositeConsumerHooks(HookDispatcher[ConsumerHooks]):
    """Several consumer hooks as one, each callback's failure contained: what the worker calls."""

    kind = "consumer hook"

    def __init__(self, hooks: Iterable[ConsumerHooks]) -> None:
        super().__init__(hooks)

    def handling(
        self, method: Basic.Deliver, properties: BasicProperties
    ) -> AbstractContextManager[object]:
        """The hooks' optional context around one message (tracing: the consumer span, so the
        other hooks' calls and the handler run inside it)."""
        stack = ExitStack()
        for hook in self.hooks:
            handling = getattr(hook, "handling", None)
            if handling is not None:
                with self.contained("handling"):
                    stack.enter_context(handling(method, properties))
        return stack

    def on_handled(self, event: Event, seconds: float) -> None:
        self.call("on_handled", event, seconds)

    def on_deduped(self, event: Event) -> None:
        self.call("on_deduped", event)

    def on_retried(self, event: Event, delay: float, reason: str) -> None:
        self.call("on_retried", event, delay, reason)

    def on_dead_lettered(self, event_id: str | None, event_type: str | None, reason: str) -> None:
        self.call("on_dead_lettered", event_id, event_type, reason)

    def on_redelivered(self, event_id: str | None, event_type: str | None) -> None:
        self.call("on_redelivered", event_id, event_type)

    def on_handler_latency(self, event_type: str, seconds: float) -> None:
        self.call("on_handler_latency", event_type, seconds)


def dispatcher(hooks: ConsumerHooks | None) -> CompositeConsumerHooks:
    """``hooks`` as a dispatcher (unchanged when it already is one)."""
    if isinstance(hooks, CompositeConsumerHooks):
        return hooks
    return CompositeConsumerHooks(() if hooks is None else (hooks,))
