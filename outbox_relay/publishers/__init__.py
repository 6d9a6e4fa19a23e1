"""Publishers: one module per broker, chosen by the broker URL's scheme and imported lazily so
``pip install outbox-relay`` pulls only the clients a deployment uses."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from outbox_relay.errors import ConfigError, MissingExtraError
from outbox_relay.publishers.base import Publisher, PublisherSettings

# scheme -> (module, class, install extra or None when the client is a core dependency)
_REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "amqp": ("outbox_relay.publishers.rabbitmq", "RabbitMQPublisher", None),
    "amqps": ("outbox_relay.publishers.rabbitmq", "RabbitMQPublisher", None),
    "nats": ("outbox_relay.publishers.nats", "NatsPublisher", "nats"),
    "tls": ("outbox_relay.publishers.nats", "NatsPublisher", "nats"),
    "redis": ("outbox_relay.publishers.redis_streams", "RedisStreamsPublisher", "redis"),
    "rediss": ("outbox_relay.publishers.redis_streams", "RedisStreamsPublisher", "redis"),
    "mqtt": ("outbox_relay.publishers.mqtt", "MqttPublisher", "mqtt"),
    "mqtts": ("outbox_relay.publishers.mqtt", "MqttPublisher", "mqtt"),
    "http": ("outbox_relay.publishers.webhook", "WebhookPublisher", "webhook"),
    "https": ("outbox_relay.publishers.webhook", "WebhookPublisher", "webhook"),
}

__all__ = ["Publisher", "PublisherSettings", "create_publisher", "supported_schemes"]


def supported_schemes() -> list[str]:
    return sorted(_REGISTRY)


def create_publisher(settings: PublisherSettings) -> Publisher:
    try:
        scheme = urlsplit(settings.url).scheme.lower()
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise ConfigError(f"--broker-url: not a URL ({exc})") from None
    try:
        module_name, class_name, extra = _REGISTRY[scheme]
    except KeyError:
        raise ConfigError(
            f"--broker-url: unsupported scheme {scheme!r}; use one of "
            + ", ".join(f"{s}://" for s in supported_schemes())
        ) from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if extra is None:
            raise
        raise MissingExtraError(
            f"--broker-url {scheme}:// needs the {exc.name!r} client: "
            f"pip install 'outbox-relay[{extra}]'"
        ) from exc
    publisher: Publisher = getattr(module, class_name)(settings)
    return publisher
