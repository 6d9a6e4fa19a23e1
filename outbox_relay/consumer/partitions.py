"""Ordered consumption: each partition queue is handled by one worker at a time, in queue order.

The relay publishes an aggregate's events in commit order; the consistent-hash exchange
(``topology``) sends every event of one aggregate to the same partition queue, in that order.
What keeps the order from there on:

1. **One holder per partition.** A worker takes a partition with an *exclusive* consumer, which
   RabbitMQ refuses (403) while another consumer holds it. Classic queues only: RabbitMQ 3.10's
   quorum queues accept a second exclusive consumer.
2. **One event at a time.** The holder handles a partition's deliveries in the order they arrive
   and acks each only after its inbox transaction committed. A failing event is retried in place
   (the message stays unacked, the partition waits out the backoff while the worker's other
   partitions go on) and dead-lettered after ``max_attempts``; then the next event goes on.
3. **Hand-over at the head.** A worker gives a partition up only between events, by closing the
   partition's channel; a dead worker's connection closes by itself. Either way RabbitMQ puts the
   unacked messages back at the head of the queue, in order, before it removes the consumer, so
   whoever claims the partition next (only once the queue shows no consumer) starts with them.
   Single-active-consumer does not: measured on 3.10, when the active consumer goes away the
   waiting one receives newer messages before the returned ones.
4. **The inbox covers the overlap.** A worker cut off from the broker may still be committing the
   event in flight when another has claimed its partition. The claimant's first event is that
   same event (redelivered at the head), and its inbox insert waits on the uncommitted key until the
   first transaction ends: it then skips it (committed) or applies it (rolled back), and only after
   that goes on to the next event.

How partitions are spread: every worker consumes ``<queue>.workers`` (a queue that never holds a
message), so its consumer count is the number of workers W. Every ``rebalance_interval`` a worker
counts them and aims for its share of the P partitions: at most ceil(P/W), at least floor(P/W).
A worker below floor(P/W) consumes ``<queue>.workers.hungry`` too; while that queue has a consumer,
the others hand over partitions down to floor(P/W) and claim none beyond it. Unclaimed partitions
(no consumer) are claimed in random order. A new worker thus gets its share within a few intervals
and a dead worker's partitions are taken over within one or two.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from outbox_relay.errors import BrokerUnavailableError, ConfigError

if TYPE_CHECKING:
    from outbox_relay.consumer.worker import Worker

log = logging.getLogger(__name__)

Message = tuple[Basic.Deliver, BasicProperties, bytes]

# Longest wait for the broker between two looks at the partitions' buffers and the clock.
IDLE_WAIT = 0.5
# Events handled from the buffers before taking in new deliveries (acks are sent at once).
PUMP_EVERY = 32


@dataclass
class Partition:
    """A partition this worker holds: its channel and the deliveries not yet handled."""

    index: int
    queue: str
    channel: BlockingChannel
    buffer: deque[Message] = field(default_factory=deque)
    # Failed attempts of the message at the head, and when (monotonic) it may be tried again.
    retries: int = 0
    retry_at: float = 0.0

    def ready(self, now: float) -> bool:
        return bool(self.buffer) and self.retry_at <= now

    @property
    def retrying(self) -> bool:
        return self.retries > 0


def shares(partitions: int, workers: int) -> tuple[int, int]:
    """(floor, ceil) of one worker's share of ``partitions`` among ``workers``."""
    workers = max(1, workers)
    return partitions // workers, math.ceil(partitions / workers)


def share(partitions: int, workers: int, others_hungry: bool) -> int:
    """How many partitions one worker should hold: ceil(P/W), or floor(P/W) while another worker
    holds fewer than floor(P/W) (what the others hand over then goes to it)."""
    low, high = shares(partitions, workers)
    return low if others_hungry else high


class PartitionedSession:
    """One broker connection of an ordered worker: claims, hands over and drains partitions."""

    def __init__(self, worker: Worker, connection: BlockingConnection, channel: BlockingChannel):
        self.worker = worker
        self.settings = worker.settings
        self.topology = worker.topology
        self.connection = connection
        # Membership (the workers and hungry queues) lives on the session's first channel.
        self.control = channel
        self.partitions: dict[int, Partition] = {}
        # Sorted indexes of ``partitions``, replaced (never mutated) on every change: the turn
        # order, and a snapshot other threads may read (Worker.partitions).
        self._held: tuple[int, ...] = ()
        self._probe: BlockingChannel | None = None
        self._hungry_tag: str | None = None
        self._next_rebalance = 0.0
        self._turn = 0

    def held(self) -> list[int]:
        return list(self._held)

    def _changed(self) -> None:
        self._held = tuple(sorted(self.partitions))

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """Handle events until the worker stops; the connection's close hands everything back."""
        self.control.basic_consume(self.topology.workers_queue, _ignore, auto_ack=True)
        self._rebalance()
        self.worker.ready.set()
        log.info(
            "consuming partitions",
            extra={
                "queue": self.settings.queue,
                "partitions": self.held(),
                "prefetch": self.settings.prefetch,
            },
        )
        handled = 0
        while not self.worker.stopping:
            now = time.monotonic()
            if now >= self._next_rebalance:
                self._rebalance()
            partition = self._next_ready(now)
            if partition is None:
                self.connection.process_data_events(time_limit=self._idle_time(now))
                handled = 0
            else:
                self._handle_head(partition)
                handled += 1
                if handled >= PUMP_EVERY:
                    # Take in what arrived meanwhile (deliveries, heartbeats); never blocks.
                    self.connection.process_data_events(time_limit=0)
                    handled = 0
            self.worker.tick()

    def _next_ready(self, now: float) -> Partition | None:
        """Round robin over the held partitions with an event ready to handle."""
        held = self._held
        for offset in range(len(held)):
            index = held[(self._turn + offset) % len(held)]
            partition = self.partitions[index]
            if partition.ready(now):
                self._turn = (self._turn + offset + 1) % len(held)
                return partition
        return None

    def _idle_time(self, now: float) -> float:
        wake = [self._next_rebalance]
        wake += [p.retry_at for p in self.partitions.values() if p.buffer and p.retrying]
        return max(0.0, min(IDLE_WAIT, min(wake) - now))

    def _handle_head(self, partition: Partition) -> None:
        method, properties, body = partition.buffer[0]
        delay = self.worker.handle(partition.channel, method, properties, body, partition.retries)
        if delay is None:
            partition.buffer.popleft()
            partition.retries, partition.retry_at = 0, 0.0
        else:
            # Unacked, at the head: nothing behind it in this partition runs before it.
            partition.retries += 1
            partition.retry_at = time.monotonic() + delay

    # -- spreading partitions over the workers -----------------------------------------------

    def _rebalance(self) -> None:
        self._next_rebalance = time.monotonic() + self.settings.rebalance_interval
        total = self.topology.partitions
        workers = self._consumers(self.topology.workers_queue)
        hungry = self._consumers(self.topology.hungry_queue) - (1 if self._hungry_tag else 0)
        want = share(total, workers, hungry > 0)
        released = self._release(len(self.partitions) - want)
        claimed: list[int] = []
        if len(self.partitions) < want:
            free = [
                n
                for n in range(total)
                if n not in self.partitions
                and self._consumers(self.topology.partition_queue(n)) == 0
            ]
            random.shuffle(free)
            for n in free:
                if len(self.partitions) >= want:
                    break
                if self._claim(n):
                    claimed.append(n)
        self._set_hungry(len(self.partitions) < shares(total, workers)[0])
        if released or claimed:
            log.info(
                "partitions changed",
                extra={
                    "queue": self.settings.queue,
                    "claimed": sorted(claimed),
                    "released": sorted(released),
                    "partitions": self.held(),
                    "workers": workers,
                },
            )

    def _release(self, count: int) -> list[int]:
        """Hand over ``count`` partitions, never one whose head event waits for a retry (the
        next holder would try it again at once, attempt count reset); the least buffered first."""
        candidates = sorted(
            (p for p in self.partitions.values() if not p.retrying),
            key=lambda p: (len(p.buffer), -p.index),
        )
        released = []
        for partition in candidates[: max(0, count)]:
            # Closing the channel returns its unacked messages to the head of the queue, in
            # order, and only then frees the queue for another consumer.
            del self.partitions[partition.index]
            self._changed()
            if partition.channel.is_open:
                partition.channel.close()
            released.append(partition.index)
        return released

    def _claim(self, index: int) -> bool:
        queue = self.topology.partition_queue(index)
        channel = self.connection.channel()
        partition = Partition(index, queue, channel)
        # Dead letters are published on the partition's channel, confirmed before the ack.
        channel.confirm_delivery()
        channel.basic_qos(prefetch_count=self.settings.prefetch)

        def on_message(
            _channel: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
        ) -> None:
            partition.buffer.append((method, props, body))

        def on_cancel(_frame: Any) -> None:
            # The broker ended the consumer (the queue was deleted): the partition is not ours.
            if self.partitions.get(index) is partition:
                del self.partitions[index]
                self._changed()
                log.warning("partition consumer cancelled by RabbitMQ", extra={"queue": queue})

        channel.add_on_cancel_callback(on_cancel)
        try:
            channel.basic_consume(queue, on_message, exclusive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 403:  # another worker claimed it first
                return False
            if exc.reply_code == 404:
                raise ConfigError(
                    f"partition queue {queue!r} does not exist: run `outbox-relay topology apply "
                    f"--ordered --partition-queues {self.topology.partitions}` (or consume with --declare)"
                ) from exc
            raise BrokerUnavailableError(f"claiming {queue!r} failed: {exc}") from exc
        self.partitions[index] = partition
        self._changed()
        return True

    def _set_hungry(self, hungry: bool) -> None:
        if hungry and self._hungry_tag is None:
            self._hungry_tag = self.control.basic_consume(
                self.topology.hungry_queue, _ignore, auto_ack=True
            )
        elif not hungry and self._hungry_tag is not None:
            self.control.basic_cancel(self._hungry_tag)
            self._hungry_tag = None

    def _consumers(self, queue: str) -> int:
        """The queue's consumer count (a passive declare on a channel of its own)."""
        if self._probe is None or not self._probe.is_open:
            self._probe = self.connection.channel()
        try:
            ok = self._probe.queue_declare(queue, passive=True).method
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._probe = None
            if exc.reply_code == 404:
                raise ConfigError(
                    f"queue {queue!r} does not exist: run `outbox-relay topology apply --ordered` "
                    "(or consume with --declare)"
                ) from exc
            raise BrokerUnavailableError(f"inspecting {queue!r} failed: {exc}") from exc
        return int(ok.consumer_count)


def _ignore(*_args: Any) -> None:
    """The membership queues carry no messages; anything published there is dropped."""
