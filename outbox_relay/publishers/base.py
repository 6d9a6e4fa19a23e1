"""The one interface between the relay core and a message broker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


@runtime_checkable
class Publisher(Protocol):
    """Publishes batches and reports, per message, whether the broker confirmed it.

    A publisher pipelines: it sends the whole batch without waiting for each confirm, then waits
    for all of them. Results are returned in the order of ``messages``. Messages in one batch are
    sent in that order. When the connection is lost mid-batch it raises
    :class:`~outbox_relay.errors.BrokerUnavailableError`; the relay then republishes the batch.
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
