"""Publishers: one module per broker, chosen by the broker URL's scheme.

Each module declares its own options (a ``BrokerOptions`` subclass named ``OPTIONS``) and guards
its client's import, so ``pip install outbox-relay`` pulls only the clients a deployment uses
while ``serve --help`` still lists every broker's options.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from outbox_relay.errors import ConfigError, MissingExtraError
from outbox_relay.publishers.base import BrokerOptions, Publisher, PublisherSettings
from outbox_relay.redact import redact_url


@dataclass(frozen=True, slots=True)
class Broker:
    module: str
    publisher: str  # the class in that module
    extra: str | None  # the install extra with its client; None when it is a core dependency
    # The class in that module sharing one connection among publishers (SharedClients).
    shares: str | None = None


_RABBITMQ = Broker(
    "outbox_relay.publishers.rabbitmq", "RabbitMQPublisher", None, shares="AmqpConnections"
)
_NATS = Broker("outbox_relay.publishers.nats", "NatsPublisher", "nats", shares="NatsConnections")
_REDIS = Broker(
    "outbox_relay.publishers.redis_streams", "RedisStreamsPublisher", "redis", shares="RedisClients"
)
_MQTT = Broker("outbox_relay.publishers.mqtt", "MqttPublisher", "mqtt")
_WEBHOOK = Broker("outbox_relay.publishers.webhook", "WebhookPublisher", "webhook")

BROKERS: dict[str, Broker] = {
    "amqp": _RABBITMQ,
    "amqps": _RABBITMQ,
    "nats": _NATS,
    "tls": _NATS,
    "redis": _REDIS,
    "rediss": _REDIS,
    "mqtt": _MQTT,
    "mqtts": _MQTT,
    "http": _WEBHOOK,
    "https": _WEBHOOK,
}

__all__ = [
    "BROKERS",
    "BrokerOptions",
    "Publisher",
    "PublisherSettings",
    "broker_options",
    "create_publisher",
    "supported_schemes",
]


def supported_schemes() -> list[str]:
    return sorted(BROKERS)


def _module(broker: Broker) -> ModuleType:
    return importlib.import_module(broker.module)


def options_of(broker: Broker) -> type[BrokerOptions]:
    options: type[BrokerOptions] = _module(broker).OPTIONS
    return options


def broker_options() -> list[tuple[list[str], type[BrokerOptions]]]:
    """Every broker's options with the schemes it serves, for the CLI and config files."""
    found: dict[str, tuple[list[str], type[BrokerOptions]]] = {}
    for scheme, broker in BROKERS.items():
        entry = found.setdefault(broker.module, ([], options_of(broker)))
        entry[0].append(scheme)
    return list(found.values())


def broker_for(settings: PublisherSettings) -> Broker:
    scheme = settings.scheme
    try:
        return BROKERS[scheme]
    except KeyError:
        raise ConfigError(
            f"--broker-url: unsupported scheme {scheme!r} in {redact_url(settings.broker_url)!r}; "
            "use one of " + ", ".join(f"{s}://" for s in supported_schemes())
        ) from None


def check_options(settings: PublisherSettings) -> BrokerOptions:
    """Validate the broker's own options; an option of another broker is named as such."""
    broker = broker_for(settings)
    options = options_of(broker)
    for key in settings.options:
        if key in options.model_fields:
            continue
        owners = [schemes for schemes, other in broker_options() if key in other.model_fields]
        flag = "--" + key.replace("_", "-")
        if owners:
            served = ", ".join(f"{s}://" for s in owners[0])
            raise ConfigError(
                f"{flag}: applies to {served} brokers only, not {settings.scheme}:// "
                "(remove it or change --broker-url)"
            )
        raise ConfigError(f"{flag}: is not a setting")
    return options.of(settings)


def create_publisher(
    settings: PublisherSettings, *, shared: SharedClients | None = None
) -> Publisher:
    """The publisher of ``settings``' broker; with ``shared``, publishers of one process that
    use the same broker share its connections where the broker allows (RabbitMQ: one
    connection, a channel each)."""
    broker = broker_for(settings)
    check_options(settings)
    module = _module(broker)
    missing: ModuleNotFoundError | None = getattr(module, "MISSING_CLIENT", None)
    if missing is not None:
        raise MissingExtraError(
            f"--broker-url {settings.scheme}:// needs the {missing.name!r} client: "
            f"pip install 'outbox-relay[{broker.extra}]'"
        ) from missing
    publisher: Publisher
    if shared is not None and broker.shares is not None:
        # Publishers of one process on one server share its connection (SharedClients).
        connections = shared.of(broker)
        publisher = getattr(module, broker.publisher)(settings, connections)
    else:
        publisher = getattr(module, broker.publisher)(settings)
    return publisher


class SharedClients:
    """Broker connections shared by the publishers of one process (serve --config): one
    registry per broker whose protocol multiplexes independent streams on a connection:
    RabbitMQ (a channel per publisher), NATS, Redis. MQTT keeps a session per outbox (a
    session's in-flight window is the broker's: one outbox's backlog would hold the others'
    messages back), and a webhook a connection pool per outbox (a dead endpoint is handled by
    dropping that outbox's pool)."""

    def __init__(self) -> None:
        self._registries: dict[str, Any] = {}

    def of(self, broker: Broker) -> Any:
        assert broker.shares is not None
        registry = self._registries.get(broker.shares)
        if registry is None:
            registry = self._registries[broker.shares] = getattr(_module(broker), broker.shares)()
        return registry
