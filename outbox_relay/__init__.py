"""outbox-relay: a transactional-outbox relay from PostgreSQL to message brokers."""

from __future__ import annotations

from outbox_relay.consumer import Consumer, ConsumerSettings, Event, PermanentError, Reject
from outbox_relay.errors import (
    BrokerUnavailableError,
    ConfigError,
    DatabaseUnavailableError,
    InvalidEventError,
    OutboxRelayError,
    PublishError,
    SchemaError,
    StoreError,
)
from outbox_relay.hooks import NoRelayHooks, RelayHooks
from outbox_relay.messages import OutboxMessage, PublishResult
from outbox_relay.migrations import migrate
from outbox_relay.producer import emit, emit_async
from outbox_relay.publishers.base import Publisher, PublisherSettings

__version__ = "0.1.0"

__all__ = [
    "BrokerUnavailableError",
    "ConfigError",
    "Consumer",
    "ConsumerSettings",
    "DatabaseUnavailableError",
    "Event",
    "InvalidEventError",
    "NoRelayHooks",
    "OutboxMessage",
    "OutboxRelayError",
    "PermanentError",
    "PublishError",
    "PublishResult",
    "Publisher",
    "PublisherSettings",
    "Reject",
    "RelayHooks",
    "SchemaError",
    "StoreError",
    "__version__",
    "emit",
    "emit_async",
    "migrate",
]
