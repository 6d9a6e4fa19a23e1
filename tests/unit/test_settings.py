"""Settings declared once: every field is validated the same way from code, the CLI, the
environment or a mapping, and a bad value is one line naming the option and its variable."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic.fields import FieldInfo

from outbox_relay.cli.app import app
from outbox_relay.cli.options import cli_fields
from outbox_relay.consumer.settings import ConsumerSettings
from outbox_relay.errors import ConfigError
from outbox_relay.observability.settings import ObservabilitySettings
from outbox_relay.publishers import broker_options
from outbox_relay.publishers.base import PublisherSettings
from outbox_relay.relay.settings import Mode, OnSent, RelaySettings
from outbox_relay.settings import Settings, env_name, flag_of, key_of, option_name

DATABASE = "postgresql://app:db-secret@db/orders"
BROKER = "amqp://relay:broker-secret@rabbit:5672/%2F"


def settings(**changes: Any) -> RelaySettings:
    return RelaySettings.from_mapping({"database_url": DATABASE, "broker_url": BROKER, **changes})


def serve_models() -> list[type[Settings]]:
    return [
        RelaySettings,
        PublisherSettings,
        *(options for _schemes, options in broker_options()),
        ObservabilitySettings,
    ]


def test_defaults() -> None:
    s = settings()
    assert (s.schema_name, s.mode, s.publisher.exchange, s.on_sent) == (
        "public",
        Mode.NOTIFY,
        "events",
        OnSent.DELETE,
    )
    assert s.batch_size == 4000
    assert s.retention == 7 * 86400


def numeric_fields() -> list[tuple[type[Settings], str, FieldInfo]]:
    found = []
    for model in [*serve_models(), ConsumerSettings]:
        for key, info in cli_fields(model):
            bounds = [m for m in info.metadata if hasattr(m, "gt") or hasattr(m, "ge")]
            if bounds:
                found.append((model, key, info))
    return found


@pytest.mark.parametrize(
    ("model", "key", "info"), numeric_fields(), ids=lambda v: v if isinstance(v, str) else ""
)
@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "-inf", "1e400", "twelve", "9" * 40])
def test_every_bounded_number_refuses_bad_values_naming_its_option(
    model: type[Settings], key: str, info: FieldInfo, bad: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        model.from_mapping({"queue": "q", key: bad} if model is ConsumerSettings else {key: bad})
    message = str(caught.value)
    assert message.startswith(f"{option_name(key, info)} ({env_name(key)}): "), message
    assert "\n" not in message


@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf])
@pytest.mark.parametrize(
    "key", ["batch_size", "poll_interval", "max_attempts", "retry_backoff", "confirm_timeout"]
)
def test_numbers_must_be_finite_and_positive(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"^--{key.replace('_', '-')} "):
        settings(**{key: value})


@pytest.mark.parametrize(
    "url", ["mysql://app:db-secret@db/orders", "db.internal", "amqp://app:db-secret@db/"]
)
def test_a_database_url_that_is_not_postgresql_names_the_option_without_its_password(
    url: str,
) -> None:
    with pytest.raises(ConfigError, match=r"^--database-url ") as caught:
        settings(database_url=url)
    assert "db-secret" not in str(caught.value)


@pytest.mark.parametrize(
    "url", ["postgresql://db/orders", "postgres://u@db:5433/orders", "host=db dbname=orders"]
)
def test_postgresql_urls_and_conninfo_strings_are_accepted(url: str) -> None:
    assert settings(database_url=url).database_url == url


@pytest.mark.parametrize(
    "schema", ["Orders-Outbox", "pg_temp", "pg_catalog", "information_schema", "a" * 41, ""]
)
def test_a_schema_postgresql_would_refuse_or_misread_names_the_option(schema: str) -> None:
    with pytest.raises(ConfigError, match=r"^--schema \(OUTBOX_RELAY_SCHEMA\): "):
        settings(schema=schema)


def test_secrets_stay_out_of_repr_and_describe() -> None:
    s = settings(broker_url="https://u:broker-secret@hooks/x", webhook_secret="hook-secret")
    text = repr(s) + repr(s.describe()) + str(s)
    for secret in ("db-secret", "broker-secret", "hook-secret"):
        assert secret not in text
    assert s.describe()["database_url"] == "postgresql://app:***@db/orders"
    assert s.describe()["broker_url"] == "https://u:***@hooks/x"
    # What the log scrubber is given: both URLs whole and the webhook's shared secret.
    assert {DATABASE, "https://u:broker-secret@hooks/x", "hook-secret"} <= set(s.secrets())


def test_broker_settings_given_flat_go_to_the_publisher_and_its_options() -> None:
    s = RelaySettings.from_mapping(
        {"broker_url": "nats://n:4222", "confirm_timeout": "5", "nats_stream": "SHOP"}
    )
    assert s.publisher.broker_url == "nats://n:4222"
    assert s.publisher.confirm_timeout == 5.0
    assert s.publisher.options == {"nats_stream": "SHOP"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"slot_name": "s"}, r"^--slot-name: applies to --mode cdc only"),
        ({"heartbeat_interval": "5"}, r"^--heartbeat-interval: applies to --mode cdc only"),
        ({"retention": "1d"}, r"^--retention: applies to --on-sent keep only"),
        ({"retry_backoff": "10", "retry_backoff_max": "5"}, r"^--retry-backoff \(10s\) is longer"),
        ({"topic_prefix": "shop"}, r"^--topic-prefix: applies to NATS, Redis and MQTT"),
        ({"broker_url": "nats://n", "exchange": "x"}, r"^--exchange: applies to RabbitMQ"),
    ],
)
def test_options_that_cannot_take_effect_are_named(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings(**changes)


def test_options_in_their_mode_are_accepted() -> None:
    s = settings(mode="cdc", slot_name="s1", on_sent="keep", retention="1d")
    assert (s.slot_name_or_default, s.retention) == ("s1", 86400.0)


def test_every_serve_setting_has_one_key_one_flag_and_one_variable() -> None:
    keys: dict[str, str] = {}
    for model in serve_models():
        for key, info in cli_fields(model):
            owner = keys.setdefault(key, model.__name__)
            assert owner == model.__name__, f"{key} is declared by {owner} and {model.__name__}"
            assert info.description, f"{model.__name__}.{key} has no help"
            assert option_name(key, info).startswith("--")
            assert key_of(key, info) == key
    assert {"database_url", "broker_url", "batch_size", "nats_stream", "health_host"} <= set(keys)


def test_the_serve_command_offers_every_declared_setting() -> None:
    import typer.main

    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]  # a group
    offered = {opt for param in command.params for opt in param.opts}
    envs = {param.envvar for param in command.params}
    for model in serve_models():
        for key, info in cli_fields(model):
            assert option_name(key, info) in offered, key
            if flag_of(info).env:
                assert env_name(key) in envs, key
