"""The consumer library: idempotent handlers for the events the relay publishes.

::

    consumer = Consumer("order-service")

    @consumer.handler("order.created")
    def send_confirmation(event: Event, db: psycopg.Connection) -> None:
        db.execute("INSERT INTO emails (order_id) VALUES (%s)", (event.aggregate_id,))

    consumer.run(ConsumerSettings(broker_url=..., database_url=..., queue="order.events",
                                  bindings=("order.*",)))

Delivery is at least once; the inbox (``outbox_relay.consumer.inbox``) makes the effect exactly once: the
handler's database work and the inbox row commit in one transaction, and the message is acked
only after that commit. A handler error is retried through per-delay TTL queues (``topology``)
with exponential backoff up to ``max_attempts``; a ``PermanentError``, an undecodable body or a
failed validation goes straight to the dead-letter queue ``<queue>.dlq``.
"""

from __future__ import annotations

import inspect
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any, Protocol, TypeVar

import pika
import pika.exceptions
import tenacity
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from outbox_relay.consumer import topology as topo
from outbox_relay.consumer.inbox import Delivery, Inbox, PsycopgInbox
from outbox_relay.errors import BrokerUnavailableError, ConfigError, DatabaseUnavailableError
from outbox_relay.redact import redact_url

log = logging.getLogger(__name__)

#: Delivery attempt of this copy of the message (absent on the first delivery: attempt 1).
ATTEMPT_HEADER = "x-outbox-attempt"
#: Set on dead-lettered messages.
FAILURE_REASON_HEADER = "x-outbox-failure-reason"
ATTEMPTS_HEADER = "x-outbox-attempts"
FAILED_AT_HEADER = "x-outbox-failed-at"
LAST_ERROR_HEADER = "x-outbox-last-error"

_MAX_REASON = 1000


class PermanentError(Exception):
    """Raise from a handler when the event can never succeed: it is dead-lettered at once."""


class Reject(PermanentError):
    """Same as PermanentError (the name the AMQP world uses for 'do not requeue')."""


@dataclass(frozen=True, slots=True)
class Event:
    """One event as a handler sees it."""

    event_id: str
    event_type: str
    aggregate_type: str | None
    aggregate_id: str | None
    payload: Any
    headers: dict[str, Any]
    attempt: int = 1
    redelivered: bool = False
    created_at: datetime | None = None


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


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    """How a worker connects and behaves; built by ``outbox-relay consume`` or by hand."""

    broker_url: str = field(repr=False)
    database_url: str = field(repr=False)
    queue: str
    bindings: tuple[str, ...] = ()
    exchange: str = "events"
    queue_type: topo.QueueType = topo.QueueType.CLASSIC
    prefetch: int = 100
    max_attempts: int = 5
    retry_delay: float = 1.0
    retry_delay_max: float = 300.0
    schema: str = "public"
    consumer_name: str | None = None  # the inbox key; defaults to the queue name
    inbox_retention: float = 7 * 24 * 3600.0
    cleanup_interval: float = 3600.0
    declare_topology: bool = True
    migrate_inbox: bool = True
    reconnect_max_delay: float = 30.0

    def __post_init__(self) -> None:
        positive = {
            "--prefetch": self.prefetch,
            "--max-attempts": self.max_attempts,
            "--retry-delay": self.retry_delay,
            "--retry-delay-max": self.retry_delay_max,
            "--inbox-retention": self.inbox_retention,
            "--cleanup-interval": self.cleanup_interval,
        }
        for option, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{option}: must be greater than 0, got {value}")
        if self.prefetch > 65535:
            raise ConfigError(f"--prefetch: at most 65535, got {self.prefetch}")

    @property
    def inbox_consumer(self) -> str:
        return self.consumer_name or self.queue

    def topology(self) -> topo.Topology:
        return topo.Topology(
            queue=self.queue,
            bindings=self.bindings,
            exchange=self.exchange,
            queue_type=self.queue_type,
            delays=topo.retry_delays(self.max_attempts, self.retry_delay, self.retry_delay_max),
        )

    def describe(self) -> dict[str, object]:
        return {
            "broker_url": redact_url(self.broker_url),
            "database_url": redact_url(self.database_url),
            "queue": self.queue,
            "bindings": list(self.bindings),
            "prefetch": self.prefetch,
            "max_attempts": self.max_attempts,
            "queue_type": str(self.queue_type),
        }


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more words."""
    return _match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _match(rest, words[1:])


HandlerFn = Callable[..., None]
F = TypeVar("F", bound=HandlerFn)


@dataclass(frozen=True, slots=True)
class _Route:
    pattern: str
    fn: HandlerFn
    takes_transaction: bool
    validate: Callable[[Any], object] | None

    def call(self, event: Event, transaction: Any) -> None:
        if self.takes_transaction:
            self.fn(event, transaction)
        else:
            self.fn(event)


def _takes_transaction(fn: HandlerFn) -> bool:
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
        self._routes: list[_Route] = []
        self._by_type: dict[str, _Route | None] = {}

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
        self._routes.append(_Route(pattern, fn, _takes_transaction(fn), validate))
        self._by_type.clear()

    @property
    def patterns(self) -> list[str]:
        """The handlers' patterns: the queue's default bindings."""
        return list(dict.fromkeys(r.pattern for r in self._routes))

    def route(self, event_type: str) -> _Route | None:
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


class _Permanent(Exception):
    """Internal: a message that cannot be decoded or has no handler."""


class Worker:
    """One consuming connection: a message at a time, ``prefetch`` of them buffered."""

    def __init__(
        self,
        consumer: Consumer,
        settings: ConsumerSettings,
        *,
        hooks: ConsumerHooks | None = None,
        inbox: Inbox | None = None,
    ) -> None:
        self.consumer = consumer
        self.settings = settings
        self.topology = settings.topology()
        self.hooks: ConsumerHooks = hooks or NoHooks()
        self.inbox: Inbox = inbox or PsycopgInbox(
            settings.database_url,
            settings.inbox_consumer,
            settings.schema,
            migrate=settings.migrate_inbox,
        )
        self.ready = threading.Event()  # set while consuming
        # time.monotonic() of the consume loop's last turn (at least every 0.5 s unless a
        # handler runs): the health endpoint's /livez.
        self.heartbeat = time.monotonic()
        # The live broker connection, for handlers and tests running on the worker's thread.
        self.connection: BlockingConnection | None = None
        self._stopping = threading.Event()
        self._next_cleanup = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the message in flight, ack it, then return from ``run()``. Thread-safe."""
        self._stopping.set()

    @contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s: finishing the message in flight", signal.Signals(signum).name)
            self.stop()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def run(self) -> None:
        """Consume until ``stop()``; reconnect with backoff when the broker or database drops."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(
                (BrokerUnavailableError, DatabaseUnavailableError)
            ),
            # Exponential from 0.2 s, plus jitter so a fleet of workers does not reconnect in step.
            wait=tenacity.wait_exponential(multiplier=0.2, max=self.settings.reconnect_max_delay)
            + tenacity.wait_random(0, 0.2),
            stop=lambda _state: self._stopping.is_set(),
            sleep=self._sleep,
            before_sleep=self._log_reconnect,
            reraise=True,
        )
        log.info("starting consumer", extra=self.settings.describe())
        try:
            for attempt in retrying:
                with attempt:
                    self._session()
        except (BrokerUnavailableError, DatabaseUnavailableError):
            if not self._stopping.is_set():
                raise
        log.info("consumer stopped", extra={"queue": self.settings.queue})

    def _sleep(self, seconds: float) -> None:
        # Backoff that a stop() cuts short.
        self._stopping.wait(seconds)

    @staticmethod
    def _log_reconnect(state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "consumer connection failed, reconnecting in %.1fs: %s",
            delay,
            error,
            extra={"attempt": state.attempt_number},
        )

    def _session(self) -> None:
        self.inbox.open()
        connection = None
        try:
            connection = self.connection = topo.connect(self.settings.broker_url)
            channel = connection.channel()
            if self.settings.declare_topology:
                self.topology.declare(channel)
            channel.confirm_delivery()
            channel.basic_qos(prefetch_count=self.settings.prefetch)
            self.ready.set()
            log.info(
                "consuming",
                extra={"queue": self.settings.queue, "prefetch": self.settings.prefetch},
            )
            for method, properties, body in channel.consume(
                self.settings.queue, inactivity_timeout=0.5
            ):
                if method is not None:
                    with self._handling(method, properties):
                        self._handle(channel, method, properties, body)
                self.heartbeat = time.monotonic()
                self._maybe_cleanup()
                if self._stopping.is_set():
                    break
            # Unacked prefetched messages go back to the queue for the other workers.
            channel.cancel()
        except pika.exceptions.AMQPError as exc:
            raise BrokerUnavailableError(f"lost the RabbitMQ connection: {exc!r}") from exc
        finally:
            self.ready.clear()
            self.connection = None
            self.inbox.close()
            if connection is not None and connection.is_open:
                with suppress(pika.exceptions.AMQPError):
                    connection.close()

    def _maybe_cleanup(self) -> None:
        now = time.monotonic()
        if now < self._next_cleanup:
            return
        self._next_cleanup = now + self.settings.cleanup_interval
        deleted = self.inbox.cleanup(self.settings.inbox_retention)
        if deleted:
            log.info("removed old inbox rows", extra={"deleted": deleted})

    # -- one message -----------------------------------------------------------------------

    def _handle(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        headers: dict[str, Any] = dict(properties.headers or {})
        attempt = _attempt(headers)
        event_id = properties.message_id or _str_or_none(headers.get("event_id"))
        event_type = properties.type or method.routing_key
        if method.redelivered:
            self._hook("on_redelivered", event_id, event_type)
        try:
            event = _decode(event_id, event_type, properties, headers, body, attempt, method)
            route = self.consumer.route(event.event_type)
            if route is None:
                raise _Permanent(f"no handler for event type {event.event_type!r}")
            if route.validate is not None:
                try:
                    route.validate(event.payload)
                except Exception as exc:
                    raise _Permanent(f"validation failed: {exc!r}") from exc
        except _Permanent as exc:
            log.warning(
                "dead-lettering undeliverable message: %s",
                exc,
                extra={"event_id": event_id, "event_type": event_type},
            )
            self._dead_letter(channel, method, properties, body, headers, attempt, str(exc))
            self._hook("on_dead_lettered", event_id, event_type, str(exc))
            return

        started = time.perf_counter()
        try:
            applied = self.inbox.apply(
                Delivery(event.event_id, event.event_type, attempt, bool(method.redelivered)),
                lambda tx: route.call(event, tx),
            )
        except DatabaseUnavailableError:
            raise  # not the handler's fault: reconnect; the unacked message is redelivered
        except Exception as exc:
            elapsed = time.perf_counter() - started
            self._hook("on_handler_latency", event.event_type, elapsed)
            self._failed(channel, method, properties, body, headers, event, exc)
            return
        elapsed = time.perf_counter() - started
        channel.basic_ack(method.delivery_tag)
        if applied:
            self._hook("on_handler_latency", event.event_type, elapsed)
            self._hook("on_handled", event, elapsed)
        else:
            log.debug("duplicate event skipped", extra={"event_id": event.event_id})
            self._hook("on_deduped", event)

    def _failed(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
        headers: dict[str, Any],
        event: Event,
        exc: Exception,
    ) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:_MAX_REASON]
        context = {
            "event_id": event.event_id,
            "event_type": event.event_type,
            "attempt": event.attempt,
        }
        if not self.consumer.is_transient(exc):
            log.warning("handler rejected the event: %s", reason, extra=context)
            self._dead_letter(channel, method, properties, body, headers, event.attempt, reason)
            self._hook("on_dead_lettered", event.event_id, event.event_type, reason)
            return
        if event.attempt >= self.settings.max_attempts:
            reason = f"gave up after {event.attempt} attempt(s): {reason}"[:_MAX_REASON]
            log.error("handler failed, dead-lettering: %s", reason, extra=context)
            self._dead_letter(channel, method, properties, body, headers, event.attempt, reason)
            self._hook("on_dead_lettered", event.event_id, event.event_type, reason)
            return
        delay = self.topology.delays[event.attempt - 1]
        log.warning("handler failed, retrying in %ss: %s", delay, reason, extra=context)
        retry_headers = {**headers, ATTEMPT_HEADER: event.attempt + 1, LAST_ERROR_HEADER: reason}
        self._publish(
            channel,
            "",
            self.topology.retry_queue(delay),
            body,
            properties,
            retry_headers,
            event.event_type,
        )
        channel.basic_ack(method.delivery_tag)
        self._hook("on_retried", event, delay, reason)

    def _dead_letter(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
        headers: dict[str, Any],
        attempt: int,
        reason: str,
    ) -> None:
        dead_headers = {
            **headers,
            FAILURE_REASON_HEADER: reason[:_MAX_REASON],
            ATTEMPTS_HEADER: attempt,
            FAILED_AT_HEADER: datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        self._publish(
            channel,
            self.topology.dead_letter_exchange,
            self.settings.queue,
            body,
            properties,
            dead_headers,
            properties.type or method.routing_key,
        )
        # Acked only once the broker confirmed the dead-lettered copy: nothing is lost.
        channel.basic_ack(method.delivery_tag)

    def _publish(
        self,
        channel: BlockingChannel,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: BasicProperties,
        headers: dict[str, Any],
        event_type: str,
    ) -> None:
        # The event type travels in ``type``: the retry path and replays change the routing key.
        copy = copy_properties(properties, headers, event_type=event_type)
        try:
            channel.basic_publish(exchange, routing_key, body, copy, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            # The retry or dead-letter queue is gone or the broker refused: reconnect, which
            # declares the topology again; the unacked original is redelivered meanwhile.
            raise BrokerUnavailableError(
                f"RabbitMQ did not accept the message for {exchange or routing_key!r}: {exc!r}"
            ) from exc

    def _handling(
        self, method: Basic.Deliver, properties: BasicProperties
    ) -> AbstractContextManager[object]:
        """The hooks' optional context around one message (tracing: the consumer span, so the
        other hooks' calls and the handler run inside it)."""
        handling = getattr(self.hooks, "handling", None)
        if handling is None:
            return nullcontext()
        try:
            context: AbstractContextManager[object] = handling(method, properties)
        except Exception:
            log.exception("consumer hook handling failed (ignored)")
            return nullcontext()
        return context

    def _hook(self, name: str, *args: Any) -> None:
        try:
            getattr(self.hooks, name)(*args)
        except Exception:
            log.exception("consumer hook %s failed (ignored)", name)


def copy_properties(
    properties: BasicProperties, headers: dict[str, Any], *, event_type: str | None = None
) -> BasicProperties:
    """The message's own properties (id, type, timestamp, ...) with ``headers``, persistent."""
    return BasicProperties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        delivery_mode=2,
        correlation_id=properties.correlation_id,
        message_id=properties.message_id,
        timestamp=properties.timestamp,
        type=properties.type or event_type,
        app_id=properties.app_id,
        headers=headers,
    )


def _str_or_none(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


def _attempt(headers: dict[str, Any]) -> int:
    try:
        return max(1, int(headers.get(ATTEMPT_HEADER, 1)))
    except (TypeError, ValueError):
        return 1


def _decode(
    event_id: str | None,
    event_type: str,
    properties: BasicProperties,
    headers: dict[str, Any],
    body: bytes,
    attempt: int,
    method: Basic.Deliver,
) -> Event:
    if not event_id:
        raise _Permanent("message has no message_id and no event_id header")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Permanent(f"invalid JSON body: {exc}") from exc
    created_at = (
        datetime.fromtimestamp(properties.timestamp, UTC)
        if isinstance(properties.timestamp, int)
        else None
    )
    return Event(
        event_id=event_id,
        event_type=event_type,
        aggregate_type=_str_or_none(headers.get("aggregate_type")),
        aggregate_id=_str_or_none(headers.get("aggregate_id")),
        payload=payload,
        headers=headers,
        attempt=attempt,
        redelivered=bool(method.redelivered),
        created_at=created_at,
    )
