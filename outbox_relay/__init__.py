"""outbox-relay: a transactional-outbox relay from PostgreSQL to message brokers.

``from outbox_relay import emit`` is the producer API and imports no broker client; the other
public names are imported on first use (the consumer pulls in pika, the relay its publishers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
from outbox_relay.producer import emit, emit_async

if TYPE_CHECKING:
    from outbox_relay.consumer import Consumer, ConsumerSettings, Event, PermanentError, Reject
    from outbox_relay.db.migrations import migrate
    from outbox_relay.publishers.base import Publisher, PublisherSettings
    from outbox_relay.relay.hooks import NoRelayHooks, RelayHooks

__version__ = "0.1.0"

# Public name -> the module defining it, imported when the name is first used.
_LAZY = {
    "Consumer": "outbox_relay.consumer",
    "ConsumerSettings": "outbox_relay.consumer",
    "Event": "outbox_relay.consumer",
    "PermanentError": "outbox_relay.consumer",
    "Reject": "outbox_relay.consumer",
    "migrate": "outbox_relay.db.migrations",
    "Publisher": "outbox_relay.publishers.base",
    "PublisherSettings": "outbox_relay.publishers.base",
    "NoRelayHooks": "outbox_relay.relay.hooks",
    "RelayHooks": "outbox_relay.relay.hooks",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'outbox_relay' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
