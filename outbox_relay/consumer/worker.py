"""A worker: one consuming connection that applies each delivery exactly once.

Delivery is at least once; the inbox (``outbox_relay.consumer.inbox``) makes the effect exactly
once: the handler's database work and the inbox row commit in one transaction, and the message is acked
only after that commit. A handler error is retried through per-delay TTL queues (``topology``)
with exponential backoff up to ``max_attempts``; a ``PermanentError``, an undecodable body or a
failed validation goes straight to the dead-letter queue ``<queue>.dlq``.

With ``ordered`` settings the worker consumes partition queues instead
(``outbox_relay.consumer.partitions``) and retries a failing event in place, holding its partition,
so no later event of its aggregate overtakes it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from types import FrameType
from typing import Any, Protocol

import pika.exceptions
import tenacity
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from outbox_relay import amqp
from outbox_relay.consumer import topology as topo
from outbox_relay.consumer.events import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    FAILED_AT_HEADER,
    FAILURE_REASON_HEADER,
    LAST_ERROR_HEADER,
    MAX_REASON,
    Event,
    Undeliverable,
    attempt_of,
    copy_properties,
    decode,
    str_or_none,
)
from outbox_relay.consumer.hooks import ConsumerHooks, dispatcher
from outbox_relay.consumer.inbox import Delivery, Inbox, PsycopgInbox
from outbox_relay.consumer.partitions import PartitionedSession
from outbox_relay.consumer.settings import ConsumerSettings
from outbox_relay.errors import BrokerUnavailableError, DatabaseUnavailableError

log = logging.getLogger(__name__)


class Handler(Protocol):
    """A routed handler (routing.Route): whether it takes the transaction, its validation."""

    @property
    def validate(self) -> Callable[[Any], object] | None: ...

    def call(self, event: Event, transaction: Any) -> None: ...


class Handlers(Protocol):
    """What the worker asks of a :class:`~outbox_relay.consumer.routing.Consumer`."""

    def route(self, event_type: str) -> Handler | None: ...

    def is_transient(self, exc: BaseException) -> bool: ...


class Worker:
    """One consuming connection: a message at a time, ``prefetch`` of them buffered."""

    def __init__(
        self,
        consumer: Handlers,
        settings: ConsumerSettings,
        *,
        hooks: ConsumerHooks | None = None,
        inbox: Inbox | None = None,
    ) -> None:
        self.consumer = consumer
        self.settings = settings
        self.topology = settings.topology()
        # Every callback goes through one dispatcher: a failing hook is logged, never fatal.
        self.hooks = dispatcher(hooks)
        self.inbox: Inbox = inbox or PsycopgInbox(
            settings.database_url,
            settings.inbox_consumer,
            settings.schema_name,
            migrate=settings.migrate_inbox,
            statement_timeout=settings.statement_timeout,
        )
        self.ready = threading.Event()  # set while consuming
        # time.monotonic() of the consume loop's last turn (at least every 0.5 s unless a
        # handler runs): the health endpoint's /livez.
        self.heartbeat = time.monotonic()
        # The live broker connection, for handlers and tests running on the worker's thread.
        self.connection: BlockingConnection | None = None
        self._stopping = threading.Event()
        self._next_cleanup = time.monotonic()
        self._partitioned: PartitionedSession | None = None
        # Once the broker URL answered like RabbitMQ, a hang-up before the handshake (a restart,
        # a proxy with no broker behind it) is reconnected to, not called a wrong URL.
        self._answered = False

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
        # Consumer("name") is a label for people: it shows here, in the first line of each run.
        name = getattr(self.consumer, "name", None)
        log.info(
            "starting consumer",
            extra={**self.settings.describe(), **({"consumer": name} if name else {})},
        )
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

    @property
    def partitions(self) -> list[int]:
        """Ordered mode: the partitions this worker holds now (empty otherwise)."""
        session = self._partitioned
        return session.held() if session is not None else []

    def _session(self) -> None:
        self.inbox.open()
        connection = None
        try:
            connection = self.connection = topo.connect(
                self.settings.broker_url,
                # Heartbeats notice a silent broker within --broker-timeout (amqp.heartbeat_for).
                heartbeat=amqp.heartbeat_for(self.settings.broker_timeout),
                tls_files=self.settings.broker_tls,
                answered=self._answered,
            )
            self._answered = True
            channel = connection.channel()
            if self.settings.declare_topology:
                self.topology.declare(channel)
            if self.topology.ordered:
                self._partitioned = PartitionedSession(self, connection, channel)
                self._partitioned.run()
                return
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
                    self.handle(channel, method, properties, body)
                self.tick()
                if self._stopping.is_set():
                    break
            # Unacked prefetched messages go back to the queue for the other workers.
            channel.cancel()
        except pika.exceptions.AMQPError as exc:
            raise BrokerUnavailableError(f"lost the RabbitMQ connection: {exc!r}") from exc
        finally:
            self.ready.clear()
            self.connection = None
            self._partitioned = None
            self.inbox.close()
            if connection is not None and connection.is_open:
                with suppress(pika.exceptions.AMQPError):
                    connection.close()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def tick(self) -> None:
        """Between messages: note that the loop is alive, delete old inbox rows when due."""
        self.heartbeat = time.monotonic()
        self._maybe_cleanup()

    def _maybe_cleanup(self) -> None:
        now = time.monotonic()
        if now < self._next_cleanup:
            return
        self._next_cleanup = now + self.settings.cleanup_interval
        deleted = self.inbox.cleanup(self.settings.inbox_retention)
        if deleted:
            log.info("removed old inbox rows", extra={"deleted": deleted})

    # -- one message -----------------------------------------------------------------------

    def handle(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
        retries: int = 0,
    ) -> float | None:
        """One delivery, inside the hooks' context (the tracing span); see ``_handle``."""
        delay = None
        with self.hooks.handling(method, properties):
            delay = self._handle(channel, method, properties, body, retries)
        return delay

    def _handle(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
        retries: int = 0,
    ) -> float | None:
        """Apply, dead-letter or retry one delivery; None once it is settled (acked).

        Unordered, a transient failure is republished to its retry queue and the original acked.
        Ordered, the message stays unacked and the delay before trying it again (as attempt + 1,
        ``retries`` + 1) is returned: the caller holds the partition meanwhile.
        """
        headers: dict[str, Any] = dict(properties.headers or {})
        attempt = attempt_of(headers) + retries
        event_id = properties.message_id or str_or_none(headers.get("event_id"))
        event_type = properties.type or method.routing_key
        if method.redelivered and not retries:
            self.hooks.on_redelivered(event_id, event_type)
        try:
            event = decode(event_id, event_type, properties, headers, body, attempt, method)
            route = self.consumer.route(event.event_type)
            if route is None:
                raise Undeliverable(f"no handler for event type {event.event_type!r}")
            if route.validate is not None:
                try:
                    route.validate(event.payload)
                except Exception as exc:
                    raise Undeliverable(f"validation failed: {exc!r}") from exc
        except Undeliverable as exc:
            log.warning(
                "dead-lettering undeliverable message: %s",
                exc,
                extra={"event_id": event_id, "event_type": event_type},
            )
            self._dead_letter(channel, method, properties, body, headers, attempt, str(exc))
            self.hooks.on_dead_lettered(event_id, event_type, str(exc))
            return None

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
            self.hooks.on_handler_latency(event.event_type, elapsed)
            return self._failed(channel, method, properties, body, headers, event, exc)
        elapsed = time.perf_counter() - started
        channel.basic_ack(method.delivery_tag)
        if applied:
            self.hooks.on_handler_latency(event.event_type, elapsed)
            self.hooks.on_handled(event, elapsed)
        else:
            log.debug("duplicate event skipped", extra={"event_id": event.event_id})
            self.hooks.on_deduped(event)
        return None

    def _failed(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
        headers: dict[str, Any],
        event: Event,
        exc: Exception,
    ) -> float | None:
        reason = f"{type(exc).__name__}: {exc}"[:MAX_REASON]
        context = {
            "event_id": event.event_id,
            "event_type": event.event_type,
            "attempt": event.attempt,
        }
        if not self.consumer.is_transient(exc):
            log.warning("handler rejected the event: %s", reason, extra=context)
            self._dead_letter(channel, method, properties, body, headers, event.attempt, reason)
            self.hooks.on_dead_lettered(event.event_id, event.event_type, reason)
            return None
        if event.attempt >= self.settings.max_attempts:
            reason = f"gave up after {event.attempt} attempt(s): {reason}"[:MAX_REASON]
            log.error("handler failed, dead-lettering: %s", reason, extra=context)
            self._dead_letter(channel, method, properties, body, headers, event.attempt, reason)
            self.hooks.on_dead_lettered(event.event_id, event.event_type, reason)
            return None
        delay = self.topology.delays[event.attempt - 1]
        log.warning("handler failed, retrying in %ss: %s", delay, reason, extra=context)
        if self.topology.ordered:
            # In place: a retry queue would put it behind later events of its aggregate.
            self.hooks.on_retried(event, delay, reason)
            return delay
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
        self.hooks.on_retried(event, delay, reason)
        return None

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
            FAILURE_REASON_HEADER: reason[:MAX_REASON],
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
