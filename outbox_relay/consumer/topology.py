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

Ordered (``Topology(ordered=True)``, ``--ordered``): events of one aggregate must be handled one
at a time, in publish order, while other aggregates go on in parallel. The queue is split into
``partitions`` classic queues fed by a consistent-hash exchange (RabbitMQ's
``rabbitmq_consistent_hash_exchange`` plugin) that hashes the ``aggregate_id`` header::

    events (topic) --order.*--> order.events.hash (x-consistent-hash on aggregate_id)
                                  |--> order.events.p00  (one worker at a time: exclusive consumer)
                                  |--> order.events.p01
                                  ...
                                  '--> order.events.p15  --(dead letters)--> order.events.dlx

There are no retry queues in ordered mode (a retry would rejoin the partition behind later events):
the worker retries in place. ``order.events.workers`` and ``order.events.workers.hungry`` never hold
a message; their consumer counts tell the workers how many of them there are and whether one holds
less than its share of partitions (``outbox_relay.consumer.partitions``).
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
from outbox_relay.tls import TlsFiles

log = logging.getLogger(__name__)


class QueueType(enum.StrEnum):
    CLASSIC = "classic"
    QUORUM = "quorum"


#: The exchange type of the rabbitmq_consistent_hash_exchange plugin.
HASH_EXCHANGE_TYPE = "x-consistent-hash"
#: The message header the partitions are keyed by (the relay sets it on every event).
PARTITION_HEADER = "aggregate_id"
# Partition queues are named <queue>.p00 ... <queue>.p99: zero-padded, because after a restart
# RabbitMQ rebuilds the hash ring from the bindings sorted by queue name, and only then is that
# the order they were first bound in (p00, p01, ..., p10, not p0, p1, p10, ..., p2): the ring, and
# so each aggregate's partition, stays the same across broker restarts.
MAX_PARTITIONS = 100


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
    # Per-aggregate order: partition queues behind a consistent-hash exchange (see the module doc).
    ordered: bool = False
    partitions: int = 16

    def __post_init__(self) -> None:
        if not self.queue or self.queue.startswith("amq."):
            raise ConfigError(f"--queue: {self.queue!r} is not a usable queue name")
        if not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ConfigError(
                f"--partition-queues: must be between 1 and {MAX_PARTITIONS}, got {self.partitions}"
            )
        if self.ordered and self.queue_type is QueueType.QUORUM:
            # Measured on RabbitMQ 3.10: quorum queues accept a second "exclusive" consumer, and
            # return a dead consumer's unacked messages after newer ones. Either breaks the order.
            raise ConfigError(
                "--ordered needs classic partition queues (--queue-type classic): quorum queues "
                "neither enforce exclusive consumers nor give a dead consumer's messages back in "
                "order, so a worker's crash could reorder an aggregate's events"
            )

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
        """The TTL retry queues; none when ordered (retries happen in place)."""
        if self.ordered:
            return []
        return list(dict.fromkeys(self.retry_queue(d) for d in self.delays))

    @property
    def hash_exchange(self) -> str:
        """Ordered: the consistent-hash exchange between ``exchange`` and the partitions."""
        return f"{self.queue}.hash"

    def partition_queue(self, index: int) -> str:
        return f"{self.queue}.p{index:02d}"

    @property
    def partition_queues(self) -> list[str]:
        return [self.partition_queue(n) for n in range(self.partitions)] if self.ordered else []

    @property
    def workers_queue(self) -> str:
        """Ordered: every worker consumes it, so its consumer count is the number of workers."""
        return f"{self.queue}.workers"

    @property
    def hungry_queue(self) -> str:
        """Ordered: consumed by the workers holding fewer partitions than their share."""
        return f"{self.queue}.workers.hungry"

    @property
    def consumed_queues(self) -> list[str]:
        """The queues workers take events from: the partitions, or the queue itself."""
        return self.partition_queues if self.ordered else [self.queue]

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
        if self.ordered:
            self._declare_ordered(channel)
            return
        if exists(channel.connection, "exchange", self.hash_exchange):
            raise ConfigError(
                f"queue {self.queue!r} was declared --ordered ({self.hash_exchange!r} exists): "
                "consume it with --ordered, or delete its ordered topology once drained"
            )
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

    def _declare_ordered(self, channel: BlockingChannel) -> None:
        connection = channel.connection
        if exists(connection, "queue", self.queue):
            raise ConfigError(
                f"queue {self.queue!r} exists, so {self.queue!r} was declared without --ordered: "
                "events bound to it would keep piling up there. Delete it once drained (or "
                "choose another --queue) before declaring the ordered topology"
            )
        found = existing_partitions(connection, self.queue, limit=self.partitions + 1)
        if found and found != self.partitions:
            raise ConfigError(
                f"the ordered topology of {self.queue!r} has {found} partition(s), not "
                f"--partition-queues {self.partitions}: changing the count moves aggregates to other "
                "partitions and would reorder their events in flight. Keep the count, or drain "
                "and delete the ordered topology first"
            )
        _declare_exchange(channel, self.exchange, "topic")
        _declare_exchange(
            channel,
            self.hash_exchange,
            HASH_EXCHANGE_TYPE,
            arguments={"hash-header": PARTITION_HEADER},
        )
        for key in self.bindings:
            channel.exchange_bind(self.hash_exchange, self.exchange, key)
        for name in self.partition_queues:
            _declare_queue(channel, name, self.main_queue_arguments())
            # The binding key is the partition's weight on the hash ring: all equal.
            channel.queue_bind(name, self.hash_exchange, "1")
        _declare_exchange(channel, self.dead_letter_exchange, "fanout")
        _declare_queue(channel, self.dead_letter_queue, self._type_arguments())
        channel.queue_bind(self.dead_letter_queue, self.dead_letter_exchange)
        for name in (self.workers_queue, self.hungry_queue):
            _declare_queue(channel, name, {})
        log.info(
            "declared ordered topology",
            extra={
                "queue": self.queue,
                "bindings": list(self.bindings),
                "partitions": self.partitions,
                "hash_exchange": self.hash_exchange,
            },
        )


def exists(connection: BlockingConnection, kind: str, name: str) -> bool:
    """Whether the queue or exchange ``name`` exists (a passive declare on a channel of its own,
    since RabbitMQ closes the channel that asked about a missing one)."""
    channel = connection.channel()
    try:
        if kind == "queue":
            channel.queue_declare(name, passive=True)
        else:
            channel.exchange_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return False
        raise BrokerUnavailableError(f"inspecting {kind} {name!r} failed: {exc}") from exc
    channel.close()
    return True


def existing_partitions(connection: BlockingConnection, queue: str, limit: int) -> int:
    """How many partition queues ``queue`` has (``<queue>.p00`` ... in a row), at most ``limit``."""
    topology = Topology(queue)
    count = 0
    while count < limit and exists(connection, "queue", topology.partition_queue(count)):
        count += 1
    return count


def is_ordered(connection: BlockingConnection, queue: str) -> bool:
    """Whether ``queue`` was declared ``--ordered`` (its consistent-hash exchange exists)."""
    return exists(connection, "exchange", Topology(queue).hash_exchange)


def _refused(kind: str, name: str, exc: pika.exceptions.ChannelClosedByBroker) -> ConfigError:
    # RabbitMQ's reply text names the argument: "inequivalent arg 'x-queue-type' for queue ...:
    # received the value 'quorum' ... but current value is 'classic' ...".
    return ConfigError(
        f"RabbitMQ refused to declare {kind} {name!r}: {exc.reply_text}. It already exists "
        "with other arguments; delete it (after draining it) or declare it with the same "
        "options (e.g. --queue-type)"
    )


def _declare_exchange(
    channel: BlockingChannel, name: str, kind: str, arguments: dict[str, Any] | None = None
) -> None:
    try:
        channel.exchange_declare(name, kind, durable=True, arguments=arguments)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            raise _refused("exchange", name, exc) from exc
        if exc.reply_code == 503 and kind == HASH_EXCHANGE_TYPE:
            raise ConfigError(
                f"RabbitMQ has no {HASH_EXCHANGE_TYPE!r} exchange type, which --ordered needs: "
                "enable the plugin with `rabbitmq-plugins enable "
                "rabbitmq_consistent_hash_exchange` (no restart needed)"
            ) from exc
        raise BrokerUnavailableError(f"declaring exchange {name!r} failed: {exc}") from exc


def _declare_queue(channel: BlockingChannel, name: str, arguments: dict[str, Any]) -> None:
    try:
        channel.queue_declare(name, durable=True, arguments=arguments)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            raise _refused("queue", name, exc) from exc
        raise BrokerUnavailableError(f"declaring queue {name!r} failed: {exc}") from exc


def connect(
    broker_url: str,
    *,
    heartbeat: int | None = None,
    tls_files: TlsFiles | None = None,
    answered: bool = False,
) -> BlockingConnection:
    """A blocking connection to RabbitMQ, with driver errors translated; ``tls_files`` for an
    ``amqps://`` URL (``--broker-ca-file``, ...); ``answered``: the URL has answered like
    RabbitMQ before (a hang-up is then retried, see amqp.translate)."""
    parameters = amqp.parameters(broker_url, tls_files=tls_files)
    if heartbeat is not None:
        parameters.heartbeat = heartbeat
    try:
        return BlockingConnection(parameters)
    except amqp.CONNECT_ERRORS as exc:
        raise amqp.translate(exc, broker_url, answered=answered) from exc


def apply(broker_url: str, topology: Topology, *, tls_files: TlsFiles | None = None) -> None:
    """Connect, declare ``topology``, disconnect (``outbox-relay topology apply``)."""
    connection = connect(broker_url, tls_files=tls_files)
    try:
        topology.declare(connection.channel())
    except pika.exceptions.AMQPError as exc:
        raise BrokerUnavailableError(f"declaring the topology failed: {exc!r}") from exc
    finally:
        if connection.is_open:
            connection.close()


def ordered_partitions(
    broker_url: str, queue: str, *, tls_files: TlsFiles | None = None
) -> int | None:
    """The partition count of an ordered ``queue``, or None when it is not ordered."""
    connection = connect(broker_url, tls_files=tls_files)
    try:
        if not is_ordered(connection, queue):
            return None
        return existing_partitions(connection, queue, limit=MAX_PARTITIONS)
    except pika.exceptions.AMQPError as exc:
        raise BrokerUnavailableError(f"inspecting {queue!r} failed: {exc!r}") from exc
    finally:
        if connection.is_open:
            connection.close()


@dataclass(frozen=True, slots=True)
class QueueDepth:
    name: str
    messages: int | None  # None: the queue does not exist
    consumers: int | None


def queue_depths(
    broker_url: str, names: Sequence[str], *, tls_files: TlsFiles | None = None
) -> list[QueueDepth]:
    """Ready messages and consumers per queue, by passive declare (no management plugin needed)."""
    connection = connect(broker_url, tls_files=tls_files)
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
