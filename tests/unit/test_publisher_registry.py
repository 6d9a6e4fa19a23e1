"""create_publisher: the broker URL's scheme picks the publisher."""

from __future__ import annotations

import pytest

from outbox_relay.errors import ConfigError
from outbox_relay.publishers import (
    Publisher,
    PublisherSettings,
    create_publisher,
    supported_schemes,
)
from outbox_relay.publishers.rabbitmq import RabbitMQPublisher


@pytest.mark.parametrize("url", ["amqp://guest:guest@localhost:5672/%2F", "AMQPS://broker/vhost"])
def test_amqp_urls_make_a_rabbitmq_publisher_without_connecting(url: str) -> None:
    publisher = create_publisher(PublisherSettings(broker_url=url))
    assert isinstance(publisher, RabbitMQPublisher)
    assert isinstance(publisher, Publisher)
    assert publisher.name == "rabbitmq"
    assert not publisher.is_healthy()


@pytest.mark.parametrize("url", ["ftp://broker/", "kafka://broker:9092"])
def test_unknown_scheme_names_the_option_and_the_choices(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^--broker-url: unsupported scheme") as caught:
        create_publisher(PublisherSettings(broker_url=url))
    assert "amqp://" in str(caught.value)


@pytest.mark.parametrize("url", ["localhost:5672", "", "amqp://"])
def test_a_broker_url_without_a_scheme_and_host_names_the_option(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^--broker-url \(OUTBOX_RELAY_BROKER_URL\): "):
        PublisherSettings(broker_url=url)


def test_an_unknown_scheme_error_does_not_echo_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        create_publisher(PublisherSettings(broker_url="kafka://user:hunter2@broker:9092"))
    assert "hunter2" not in str(caught.value)


def test_supported_schemes_include_amqp() -> None:
    assert {"amqp", "amqps"} <= set(supported_schemes())
    assert supported_schemes() == sorted(supported_schemes())
