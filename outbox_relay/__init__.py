"""outbox-relay: a transactional-outbox relay from PostgreSQL to message brokers."""

from __future__ import annotations

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
from outbox_relay.messages import OutboxMessage, PublishResult
from outbox_relay.migrations import migrate
from outbox_relay.producer import emit, emit_async
from outbox_relay.publishers.base import Publisher, PublisherSettings

__version__ = "0.1.0"

__all__ = [
    "BrokerUnavailableError",
    "ConfigError",
    "DatabaseUnavailableError",
    "InvalidEventError",
    "OutboxMessage",
    "OutboxRelayError",
    "PublishError",
    "PublishResult",
    "Publisher",
    "PublisherSettings",
    "SchemaError",
    "StoreError",
    "__version__",
    "emit",
    "emit_async",
    "migrate",
]
