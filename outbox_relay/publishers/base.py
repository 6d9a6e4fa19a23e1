"""The one interface between the relay core and a message broker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from outbox_relay.messages import OutboxMessage, PublishResult


@dataclass(frozen=True, slots=True)
class PublisherSettings:
    """Broker-independent publishing settings; each publisher reads the ones it understands."""

    url: str
    exchange: str = "events"
    confirm_timeout: float = 30.0
    max_message_bytes: int = 128 * 1024 * 1024
    max_in_flight: int = 5000
    # Prefix of the NATS subject (events.order.created), the Redis stream (events:order.created)
    # and the MQTT topic (events/order/created).
    topic_prefix: str = "events"
    nats_stream: str = "EVENTS"
    redis_stream_mode: str = "per-type"  # per-type: one stream per event type; single: one stream
    redis_maxlen: int | None = None  # XADD MAXLEN ~ n when set
    mqtt_qos: int = 1
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_timeout: float = 10.0
    webhook_batch: bool = False


@runtime_checkable
class Publisher(Protocol):
    """Publishes batches and reports, per message, whether the broker confirmed it.

    A publisher pipelines: it sends the whole batch without waiting for each confirm, then waits
    for all of them. Results are returned in the order of ``messages``. Messages in one batch are
    sent in that order. The relay calls ``publish_batch`` again before earlier calls have
    returned (it keeps several waves on the wire; events of separate calls need no order between
    them), so each call must track its own confirms. When the connection is lost mid-batch it
    raises :class:`~outbox_relay.errors.BrokerUnavailableError`; the relay then republishes.
    """

    @property
    def name(self) -> str:
        """Short broker name for logs and metrics, e.g. ``rabbitmq``."""
        ...

    async def connect(self) -> None:
        """Connect and declare/check the destination (exchange, stream, ...)."""
        ...

    async def publish_batch(self, messages: Sequence[OutboxMessage]) -> list[PublishResult]: ...

    async def close(self) -> None: ...

    def is_healthy(self) -> bool:
        """True while connected and able to publish."""
        ...
