"""Broker selection by URL scheme, and the one-line hint when a broker's extra is missing."""

from __future__ import annotations

import sys

import pytest

from outbox_relay.errors import ConfigError, MissingExtraError
from outbox_relay.publishers import PublisherSettings, create_publisher, supported_schemes
from outbox_relay.publishers.mqtt import MqttPublisher, mqtt_topic
from outbox_relay.publishers.nats import NatsPublisher
from outbox_relay.publishers.redis_streams import RedisStreamsPublisher
from outbox_relay.publishers.webhook import WebhookPublisher, sign, verdict
from outbox_relay.relay.settings import RelaySettings

SCHEMES = {
    "nats://127.0.0.1:4222": NatsPublisher,
    "tls://nats.example:4222": NatsPublisher,
    "redis://127.0.0.1:6379/0": RedisStreamsPublisher,
    "rediss://user:pw@redis.example:6380/1": RedisStreamsPublisher,
    "mqtt://127.0.0.1:1883": MqttPublisher,
    "mqtts://broker.example?version=3.1.1": MqttPublisher,
    "http://127.0.0.1:8080/hook": WebhookPublisher,
    "https://hooks.example/outbox": WebhookPublisher,
}

# (scheme, the module the publisher lives in, the client library it imports, the extra)
EXTRAS = [
    ("nats", "outbox_relay.publishers.nats", "nats", "nats"),
    ("redis", "outbox_relay.publishers.redis_streams", "redis", "redis"),
    ("mqtt", "outbox_relay.publishers.mqtt", "paho", "mqtt"),
    ("http", "outbox_relay.publishers.webhook", "httpx", "webhook"),
]


@pytest.mark.parametrize(("url", "cls"), SCHEMES.items())
def test_the_url_scheme_picks_the_publisher_without_connecting(url: str, cls: type) -> None:
    publisher = create_publisher(PublisherSettings(broker_url=url))

    assert isinstance(publisher, cls)
    assert not publisher.is_healthy()


def test_every_broker_scheme_is_listed() -> None:
    assert {"nats", "redis", "rediss", "mqtt", "mqtts", "http", "https"} <= set(supported_schemes())


@pytest.mark.parametrize(("scheme", "module", "library", "extra"), EXTRAS)
def test_a_missing_client_library_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, scheme: str, module: str, library: str, extra: str
) -> None:
    # Given the client library cannot be imported (None in sys.modules makes import fail)
    monkeypatch.setitem(sys.modules, library, None)
    monkeypatch.delitem(sys.modules, module, raising=False)

    with pytest.raises(MissingExtraError) as caught:
        create_publisher(PublisherSettings(broker_url=f"{scheme}://127.0.0.1:1"))

    message = str(caught.value)
    assert f"pip install 'outbox-relay[{extra}]'" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("values", "option"),
    [
        (
            {"broker_url": "redis://localhost", "redis_stream_mode": "sharded"},
            "--redis-stream-mode",
        ),
        ({"broker_url": "redis://localhost", "redis_maxlen": 0}, "--redis-maxlen"),
        ({"broker_url": "mqtt://localhost", "mqtt_qos": 0}, "--mqtt-qos"),
        ({"broker_url": "mqtt://localhost?version=4"}, "--broker-url"),
        ({"broker_url": "mqtt://localhost", "topic_prefix": "a/#"}, "--topic-prefix"),
        ({"broker_url": "nats://localhost", "topic_prefix": "a.*"}, "--topic-prefix"),
        ({"broker_url": "nats://localhost", "nats_stream": "a.b"}, "--nats-stream"),
        ({"broker_url": "http://localhost/h", "webhook_timeout": 0}, "--webhook-timeout"),
        ({"broker_url": "amqp://localhost", "redis_maxlen": 5}, "--redis-maxlen: applies to"),
    ],
)
def test_bad_broker_options_name_the_option(values: dict[str, object], option: str) -> None:
    with pytest.raises(ConfigError, match=f"^{option}"):
        create_publisher(PublisherSettings.from_mapping(values))


def test_mqtt_topics_turn_the_event_type_dots_into_levels() -> None:
    assert mqtt_topic("events", "order.created") == "events/order/created"
    assert mqtt_topic("", "order.created") == "order/created"


@pytest.mark.parametrize(
    ("status", "confirmed", "permanent"),
    [(200, True, False), (204, True, False), (400, False, True), (404, False, True),
     (408, False, False), (422, False, True), (429, False, False), (500, False, False),
     (503, False, False), (302, False, False)],
)  # fmt: skip
def test_webhook_status_codes_map_to_confirmed_retried_or_dead(
    status: int, confirmed: bool, permanent: bool
) -> None:
    result = verdict(status, "Reason")

    assert result.confirmed is confirmed
    assert result.permanent is permanent


def test_webhook_signature_is_hmac_sha256_of_the_body() -> None:
    # Reference value: printf '{"a":1}' | openssl dgst -sha256 -hmac secret
    assert sign("secret", b'{"a":1}') == (
        "sha256=aa9e2e3575f5d7098b6caccd790888c36d5fdb63342a73bada2d6a51747a8494"
    )


def test_relay_settings_pass_the_broker_options_to_the_publisher() -> None:
    options = {"topic_prefix": "shop", "nats_stream": "SHOP"}
    settings = RelaySettings(
        database_url="postgresql://localhost/app", broker_url="nats://localhost", **options
    )

    publisher_settings = settings.publisher
    given = {**publisher_settings.model_dump(), **publisher_settings.options}

    assert {name: given[name] for name in options} == options
    assert "s3cret-value" not in repr(settings)
    assert "s3cret-value" not in repr(publisher_settings)
