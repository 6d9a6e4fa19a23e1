"""Handlers by routing pattern: :class:`Consumer` registers them and routes each event type to
the first one whose pattern matches (AMQP topic rules)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from outbox_relay.consumer.events import Event, PermanentError
from outbox_relay.consumer.hooks import ConsumerHooks
from outbox_relay.consumer.inbox import Inbox
from outbox_relay.consumer.settings import ConsumerSettings
from outbox_relay.consumer.worker import Worker
from outbox_relay.errors import ConfigError
from outbox_relay.messages import topic_matches

HandlerFn = Callable[..., None]
F = TypeVar("F", bound=HandlerFn)


@dataclass(frozen=True, slots=True)
class Route:
    pattern: str
    fn: HandlerFn
    takes_transaction: bool
    validate: Callable[[Any], object] | None

    def call(self, event: Event, transaction: Any) -> None:
        if self.takes_transaction:
            self.fn(event, transaction)
        else:
            self.fn(event)


def takes_transaction(fn: HandlerFn) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


class Consumer:
    """A set of handlers, each for a routing pattern, run by ``run()`` or ``outbox-relay consume``.

    ``transient``: exception types retried with backoff (default: any exception). Others, and any
    ``PermanentError``, are dead-lettered at once.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        transient: tuple[type[BaseException], ...] = (Exception,),
    ) -> None:
        self.name = name
        self.transient = transient
        self._routes: list[Route] = []
        self._by_type: dict[str, Route | None] = {}

    def handler(
        self, pattern: str, *, validate: Callable[[Any], object] | None = None
    ) -> Callable[[F], F]:
        """Register ``fn(event)`` or ``fn(event, tx)`` for event types matching ``pattern``.

        ``tx`` is the psycopg connection (or SQLAlchemy session) in the transaction that also
        records the event in the inbox. ``validate(payload)`` raising any exception dead-letters
        the event without calling the handler (a schema check, a pydantic model, ...).
        """

        def register(fn: F) -> F:
            self.add_handler(pattern, fn, validate=validate)
            return fn

        return register

    def add_handler(
        self, pattern: str, fn: HandlerFn, *, validate: Callable[[Any], object] | None = None
    ) -> None:
        if not pattern or any(w == "" for w in pattern.split(".")):
            raise ConfigError(f"handler pattern {pattern!r} must be dot-separated words")
        self._routes.append(Route(pattern, fn, takes_transaction(fn), validate))
        self._by_type.clear()

    @property
    def patterns(self) -> list[str]:
        """The handlers' patterns: the queue's default bindings."""
        return list(dict.fromkeys(r.pattern for r in self._routes))

    def route(self, event_type: str) -> Route | None:
        """The first handler registered for a pattern matching ``event_type``."""
        if event_type not in self._by_type:
            self._by_type[event_type] = next(
                (r for r in self._routes if topic_matches(r.pattern, event_type)), None
            )
        return self._by_type[event_type]

    def is_transient(self, exc: BaseException) -> bool:
        return not isinstance(exc, PermanentError) and isinstance(exc, self.transient)

    def worker(
        self,
        settings: ConsumerSettings,
        *,
        hooks: ConsumerHooks | None = None,
        inbox: Inbox | None = None,
    ) -> Worker:
        """A worker for these handlers; call ``run()`` on it (blocks) and ``stop()`` from anywhere."""
        return Worker(self, settings, hooks=hooks, inbox=inbox)

    def run(
        self,
        settings: ConsumerSettings,
        *,
        hooks: ConsumerHooks | None = None,
        inbox: Inbox | None = None,
    ) -> None:
        """Consume until SIGTERM or SIGINT (finishing the message in flight). Main thread only."""
        worker = self.worker(settings, hooks=hooks, inbox=inbox)
        with worker.stop_on_signals():
            worker.run()
