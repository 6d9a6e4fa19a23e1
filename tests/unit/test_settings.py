"""RelaySettings: invalid values fail at once, naming the option the operator has to fix."""

from __future__ import annotations

from typing import Any

import pytest

from outbox_relay.errors import ConfigError
from outbox_relay.relay.settings import Mode, OnSent, RelaySettings


def settings(**changes: Any) -> RelaySettings:
    values: dict[str, Any] = {
        "database_url": "postgresql://app:db-secret@db/orders",
        "broker_url": "amqp://relay:broker-secret@rabbit:5672/%2F",
    }
    values.update(changes)
    return RelaySettings(**values)


def test_defaults() -> None:
    s = settings()
    assert (s.schema, s.mode, s.exchange, s.on_sent) == (
        "public",
        Mode.NOTIFY,
        "events",
        OnSent.DELETE,
    )
    assert s.batch_size > 0
    assert s.max_attempts > 0


@pytest.mark.parametrize(
    ("option", "field"),
    [
        ("--batch-size", "batch_size"),
        ("--poll-interval", "poll_interval"),
        ("--max-attempts", "max_attempts"),
        ("--retry-backoff", "retry_backoff"),
        ("--confirm-timeout", "confirm_timeout"),
        ("--max-message-bytes", "max_message_bytes"),
    ],
)
@pytest.mark.parametrize("value", [0, -1])
def test_values_that_must_be_positive_name_their_option(
    option: str, field: str, value: int
) -> None:
    with pytest.raises(ConfigError, match=rf"^{option}: must be greater than 0, got {value}$"):
        settings(**{field: value})


@pytest.mark.parametrize(
    "url", ["mysql://app:db-secret@db/orders", "db.internal", "amqp://app:db-secret@db/"]
)
def test_a_database_url_that_is_not_postgresql_names_the_option_without_its_password(
    url: str,
) -> None:
    with pytest.raises(ConfigError, match=r"^--database-url: ") as caught:
        settings(database_url=url)
    assert "db-secret" not in str(caught.value)


@pytest.mark.parametrize(
    "url", ["postgresql://db/orders", "postgres://u@db:5433/orders", "host=db dbname=orders"]
)
def test_postgresql_urls_and_conninfo_strings_are_accepted(url: str) -> None:
    assert settings(database_url=url).database_url == url


def test_a_bad_schema_names_the_option() -> None:
    with pytest.raises(ConfigError, match=r"^--schema: "):
        settings(schema="Orders-Outbox")


def test_secrets_stay_out_of_repr_and_describe() -> None:
    s = settings()
    text = repr(s) + repr(s.describe())
    assert "db-secret" not in text
    assert "broker-secret" not in text
    assert s.describe()["database_url"] == "postgresql://app:***@db/orders"
    assert s.describe()["broker_url"] == "amqp://relay:***@rabbit:5672/%2F"


def test_publisher_settings_carry_the_broker_options() -> None:
    s = settings(exchange="domain", confirm_timeout=5.0, max_message_bytes=1024)
    p = s.publisher_settings()
    assert (p.url, p.exchange, p.confirm_timeout, p.max_message_bytes) == (
        s.broker_url,
        "domain",
        5.0,
        1024,
    )
