"""RabbitMQ topology for one consumer queue, declared idempotently.

For a queue ``order.events`` bound to the ``events`` exchange with ``order.*``::

    events (topic) --order.*--> order.events --(nack, requeue=False)--> order.events.dlx (fanout)
                                     ^                                         |
                                     |  TTL expires, dead-lettered back        v
    order.events.retry.1000ms  ------+                                 order.events.dlq
    order.events.retry.2000ms  ------+
    ...

The worker publishes a failed message to the retry queue of its delay (through the default
exchange) and acks the original; when its TTL expires the broker dead-letters it back into the main
queue, straight to that queue rather than through ``events``, so no other consumer sees it twice.
Every retry queue holds messages of one delay only, so the oldest always expires first.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from outbox_relay import amqp
from outbox_relay.errors import BrokerUnavailableError, ConfigError

log = logging.getLogger(__name__)


class QueueType(enum.StrEnum):
    CLASSIC = "classic"
    QUORUM = "quorum"


def retry_delays(
    max_attempts: int, first_delay: float, max_delay: float = 300.0
) -> tuple[float, ...]:
    """Delay before attempt 2, 3, ... max_attempts: ``first_delay`` doubling, capped at ``max_delay``."""
    if max_attempts < 1:
        raise ConfigError(f"--max-attempts: must be at least 1, got {max_attempts}")
    if first_delay <= 0:
        raise ConfigError(f"--retry-delay: must be greater than 0, got {first_delay}")
    return tuple(min(first_delay * 2**n, max_delay) for n in range(max_attempts - 1))


@dataclass(frozen=True, slots=True)
class Topology:
    """Everything one consumer queue needs: bindings, retry queues, dead-letter exchange and queue."""

    queue: str
    bindings: tuple[str, ...] = ()
    exchange: str = "events"
    queue_type: QueueType = QueueType.CLASSIC
    delays: tuple[float, ...] = field(default_factory=lambda: retry_delays(5, 1.0))

    def __post_init__(self) -> None:
        if not self.queue or self.queue.startswith("amq."):
            raise ConfigError(f"--queue: {self.queue!r} is not a usable queue name")

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.queue}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.queue}.dlq"

    def retry_queue(self, delay: float) -> str:
        return f"{self.queue}.retry.{round(delay * 1000)}ms"

    @property
    def retry_queues(self) -> list[str]:
        return list(dict.fromkeys(self.retry_queue(d) for d in self.delays))

    def _type_arguments(self) -> dict[str, Any]:
        # Classic is the default: leaving the argument out keeps queues declared by older tools
        # (without x-queue-type) equivalent.
        if self.queue_type is QueueType.CLASSIC:
            return {}
        return {"x-queue-type": str(self.queue_type)}

    def main_queue_arguments(self) -> dict[str, Any]:
        return {**self._type_arguments(), "x-dead-letter-exchange": self.dead_letter_exchange}

    def retry_queue_arguments(self, delay: float) -> dict[str, Any]:
        return {
            **self._type_arguments(),
            "x-message-ttl": round(delay * 1000),
            # The default exchange routes by queue name: straight back to the main queue.
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.queue,
        }

    def declare(self, channel: BlockingChannel) -> None:
        """Declare the whole topology on ``channel``; safe to repeat.

        A queue or exchange that already exists with other arguments raises ConfigError naming it
        and the differing argument (RabbitMQ closes the channel; the caller opens a new one).
        """
        _declare_exchange(channel, self.exchange, "topic")
        # The main queue first: a conflict there is the one an operator most needs to see.
        _declare_queue(channel, self.queue, self.main_queue_arguments())
        for key in self.bindings:
            channel.queue_bind(self.queue, self.exchange, key)
        _declare_exchange(channel, self.dead_letter_exchange, "fanout")
        _declare_queue(channel, self.dead_letter_queue, self._type_arguments())
        channel.queue_bind(self.dead_letter_queue, self.dead_letter_exchange)
        for delay in dict.fromkeys(self.delays):
            _declare_queue(channel, self.retry_queue(delay), self.retry_queue_arguments(delay))
        log.info(
            "declared topology",
            extra={
                "queue": self.queue,
                "bindings": list(self.bindings),
                "queue_type": str(self.queue_type),
                "retry_queues": self.retry_queues,
            },
        )


def _refused(kind: str, name: str, exc: pika.exceptions.ChannelClosedByBroker) -> ConfigError:
    # RabbitMQ's reply text names the argument: "inequivalent arg 'x-queue-type' for queue ...:
    # received the value 'quorum' ... but current value is 'classic' ...".
    return ConfigError(
        f"RabbitMQ refused to declare {kind} {name!r}: {exc.reply_text}. It already exists "
        "with other arguments; delete it (after draining it) or declare it with the same "
        "options (e.g. --queue-type)"
    )


def _declare_exchange(channel: BlockingChannel, name: str, kind: str) -> None:
    try:
        channel.exchange_declare(name, kind, durable=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            raise _refused("exchange", name, exc) from exc
        raise BrokerUnavailableError(f"declaring exchange {name!r} failed: {exc}") from exc


def _declare_queue(channel: BlockingChannel, name: str, arguments: dict[str, Any]) -> None:
    try:
        channel.queue_declare(name, durable=True, arguments=arguments)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            raise _refused("queue", name, exc) from exc
        raise BrokerUnavailableError(f"declaring queue {name!r} failed: {exc}") from exc


def connect(broker_url: str, *, heartbeat: int | None = None) -> BlockingConnection:
    """A blocking connection to RabbitMQ, with driver errors translated."""
    parameters = amqp.parameters(broker_url)
    if heartbeat is not None:
        parameters.heartbeat = heartbeat
    try:
        return BlockingConnection(parameters)
    except pika.exceptions.AMQPError as exc:
        raise amqp.translate(exc, broker_url) from exc


def apply(broker_url: str, topology: Topology) -> None:
    """Connect, declare ``topology``, disconnect (``outbox-relay topology apply``)."""
    connection = connect(broker_url)
    try:
        topology.declare(connection.channel())
    except pika.exceptions.AMQPError as exc:
        raise BrokerUnavailableError(f"declaring the topology failed: {exc!r}") from exc
    finally:
        if connection.is_open:
            connection.close()


@dataclass(frozen=True, slots=True)
class QueueDepth:
    name: str
    messages: int | None  # None: the queue does not exist
    consumers: int | None


def queue_depths(broker_url: str, names: Sequence[str]) -> list[QueueDepth]:
    """Ready messages and consumers per queue, by passive declare (no management plugin needed)."""
    connection = connect(broker_url)
    found = []
    try:
        channel = connection.channel()
        for name in names:
            try:
                ok = channel.queue_declare(name, passive=True).method
                found.append(QueueDepth(name, int(ok.message_count), int(ok.consumer_count)))
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise BrokerUnavailableError(f"inspecting queue {name!r}: {exc}") from exc
                found.append(QueueDepth(name, None, None))
                channel = connection.channel()
    finally:
        if connection.is_open:
            connection.close()
    return found
