"""serve --config: a TOML file of outboxes read into the same settings the CLI builds, each
error one line naming the file, the table and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from outbox_relay.cli.config_file import RelayConfig, expand, load
from outbox_relay.errors import ConfigError
from outbox_relay.observability.settings import LogLevel
from outbox_relay.relay.settings import Mode

DB_A = "postgresql://relay@db-a:5432/orders"
DB_B = "postgresql://relay@db-b:5432/billing"

GOOD = f"""
[defaults]
broker_url = "amqp://guest:${{RABBIT_PASSWORD}}@rabbit:5672/%2F"
batch_size = 500
log_level = "debug"

[[outbox]]
name = "orders"
database_url = "{DB_A}"
exchange = "orders-events"

[[outbox]]
name = "billing"
database_url = "${{BILLING_DB}}"
schema = "billing"
mode = "poll"
batch_size = 100
"""

ENV = {"RABBIT_PASSWORD": "s3cret", "BILLING_DB": DB_B}


def read(tmp_path: Path, text: str, given: dict[str, Any] | None = None) -> RelayConfig:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return load(str(path), given or {}, ENV)


def refused(tmp_path: Path, text: str, given: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as raised:
        read(tmp_path, text, given)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_each_outbox_takes_its_table_over_the_defaults(tmp_path: Path) -> None:
    config = read(tmp_path, GOOD)

    orders, billing = config.outboxes
    assert (orders.name, billing.name) == ("orders", "billing")
    assert orders.settings.database_url == DB_A
    assert orders.settings.publisher.exchange == "orders-events"
    assert orders.settings.batch_size == 500
    assert orders.settings.mode is Mode.NOTIFY
    assert billing.settings.database_url == DB_B
    assert billing.settings.schema_name == "billing"
    assert billing.settings.batch_size == 100
    assert billing.settings.mode is Mode.POLL
    assert billing.settings.publisher.exchange == "events"  # the built-in default
    assert billing.settings.publisher.broker_url.endswith("guest:s3cret@rabbit:5672/%2F")
    assert config.observability.log_level is LogLevel.DEBUG
    assert "s3cret" in "".join(config.secrets())


def test_options_given_on_the_command_line_win_over_every_table(tmp_path: Path) -> None:
    config = read(tmp_path, GOOD, {"batch_size": "42", "log_level": "warning"})

    assert [o.settings.batch_size for o in config.outboxes] == [42, 42]
    assert config.observability.log_level is LogLevel.WARNING


def test_broker_options_are_keys_too(tmp_path: Path) -> None:
    config = read(
        tmp_path,
        f"""
        [[outbox]]
        name = "n"
        database_url = "{DB_A}"
        broker_url = "nats://nats:4222"
        nats_stream = "ORDERS"
        topic_prefix = "orders"
        """,
    )
    publisher = config.outboxes[0].settings.publisher
    assert publisher.options == {"nats_stream": "ORDERS"}
    assert publisher.topic_prefix == "orders"


def test_a_database_url_in_the_defaults_serves_outboxes_of_several_schemas(
    tmp_path: Path,
) -> None:
    config = read(
        tmp_path,
        f"""
        [defaults]
        database_url = "{DB_A}"
        [[outbox]]
        name = "a"
        schema = "tenant_a"
        [[outbox]]
        name = "b"
        schema = "tenant_b"
        """,
    )
    assert [o.settings.schema_name for o in config.outboxes] == ["tenant_a", "tenant_b"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{DB_A}'\nbach_size = 5\n",
         'relay.toml: outbox[1] "a": bach_size: is not a setting (did you mean batch_size?)'),
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{DB_A}'\nbatch_size = 'many'\n",
         "relay.toml: outbox[1] \"a\": batch_size: 'many' is not a whole number"),
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{DB_A}'\nbatch_size = 0\n",
         'relay.toml: outbox[1] "a": batch_size: must be greater than 0, got 0'),
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{DB_A}'\nmode = 'push'\n",
         "relay.toml: outbox[1] \"a\": mode: push is not one of notify, poll or cdc"),
        ("[[outbox]]\nname = 'a'\n",
         'relay.toml: outbox[1] "a": database_url: is required'),
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{DB_A}'\n[[outbox]]\nname = 'a'\n"
         f"database_url = '{DB_B}'\n",
         'relay.toml: outbox[2] "a": name: \'a\' is taken by outbox[1] "a"'),
        (f"[[outbox]]\ndatabase_url = '{DB_A}'\n",
         "relay.toml: outbox[1]: name: is required"),
        ("[[outbox]]\nname = 'a'\ndatabase_url = '${NOPE}'\n",
         'relay.toml: outbox[1] "a": database_url: ${NOPE} is not set in the environment'),
        (f"[defaults]\nbatch_size = -1\n[[outbox]]\nname = 'a'\ndatabase_url = '{DB_A}'\n",
         "relay.toml: [defaults]: batch_size: must be greater than 0, got -1"),
        (f"[defaults]\nbatch_sise = 1\n[[outbox]]\nname = 'a'\ndatabase_url = '{DB_A}'\n",
         "relay.toml: [defaults]: batch_sise: is not a setting"),
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{DB_A}'\nmetrics_port = 9000\n",
         'relay.toml: outbox[1] "a": metrics_port: applies to the whole process; set it in '
         "[defaults]"),
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{DB_A}'\nnats_stream = 'X'\n",
         'relay.toml: outbox[1] "a": nats_stream: applies to nats://, tls:// brokers only'),
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{DB_A}'\nschemas = 'tenant_*'\n"
         "schema = 'x'\n",
         'relay.toml: outbox[1] "a": schemas: give schema (one) or schemas (a glob), not both'),
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{DB_A}'\nschemas = ''\n",
         'relay.toml: outbox[1] "a": schemas: must be a glob of schema names'),
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{DB_A}'\nschemas = 't_*'\nmode = 'cdc'\n"
         "slot_name = 's'\n",
         'relay.toml: outbox[1] "a": slot_name: would be shared by every schema'),
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{DB_A}'\n[[outbox]]\nname = 'b'\n"
         f"database_url = '{DB_A}'\n",
         'relay.toml: outbox[2] "b": schema: outbox[1] "a" already relays schema \'public\''),
        (f"[[outbox]]\nname = 'a b'\ndatabase_url = '{DB_A}'\n",
         "relay.toml: outbox[1] \"a b\": name: 'a b' must be 1-48 letters"),
        ("[[outbox]]\nname = 'a'\ndatabase_url = 'postgresql://u:hunter2@db:99999/x'\n",
         'relay.toml: outbox[1] "a": database_url: the port must be a number'),
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{DB_A}'\nexchange = 'x'\n"
         f"broker_url = 'nats://n:4222'\n",
         'relay.toml: outbox[1] "a": --exchange: applies to RabbitMQ (amqp://) only'),
        ("[outbox]\nname = 'a'\n", "relay.toml: outbox: must be [[outbox]] tables"),
        ("[[outboxes]]\nname = 'a'\n", "relay.toml: outboxes: is not a table of a config file"),
        ("[defaults]\nbatch_size = 5\n", "relay.toml: no [[outbox]] table"),
        ("[[outbox]]\nname = 'a'\ndatabase_url = \n",
         "relay.toml: is not valid TOML: Invalid value (at line 3, column 16)"),
    ],
)  # fmt: skip
def test_a_bad_file_is_one_line_naming_the_table_and_the_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    message = refused(tmp_path, text)

    assert message.startswith(str(tmp_path)), message
    assert expected in message, message
    assert "hunter2" not in message


def test_a_missing_file_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--config \(OUTBOX_RELAY_CONFIG\): .*: no such file"):
        load(str(tmp_path / "absent.toml"), {}, {})


@pytest.mark.parametrize("key", ["database_url", "schema", "slot_name", "publication"])
def test_an_option_naming_one_outbox_is_refused_with_a_config_file(
    tmp_path: Path, key: str
) -> None:
    message = refused(tmp_path, GOOD, {key: "x"})

    assert "cannot be combined with --config" in message
    assert message.startswith("--" + key.replace("_", "-")), message


def test_a_bad_value_given_on_the_command_line_is_named_by_its_flag(tmp_path: Path) -> None:
    message = refused(tmp_path, GOOD, {"batch_size": "0"})

    assert message.startswith("--batch-size (OUTBOX_RELAY_BATCH_SIZE): must be greater"), message


def test_two_cdc_outboxes_on_one_server_need_their_own_slots(tmp_path: Path) -> None:
    message = refused(
        tmp_path,
        f"""
        [defaults]
        mode = "cdc"
        [[outbox]]
        name = "a"
        database_url = "{DB_A}"
        [[outbox]]
        name = "b"
        database_url = "postgresql://relay@db-a:5432/other"
        """,
    )
    assert "slot_name: outbox[1] \"a\" already uses slot 'outbox_relay_public'" in message


def test_variables_expand_in_text_and_a_doubled_dollar_is_literal() -> None:
    env = {"USER_NAME": "app", "EMPTY": ""}
    assert expand("x-${USER_NAME}-${EMPTY}-$${USER_NAME}-$5", env, "w") == "x-app--${USER_NAME}-$5"
    assert expand(["${USER_NAME}"], env, "w") == ["app"]
    assert expand(5, env, "w") == 5
    with pytest.raises(ConfigError, match=r"^w: \$\{1X\} is not a variable name"):
        expand("${1X}", env, "w")


def test_the_example_file_is_valid() -> None:
    example = Path(__file__).parents[2] / "examples" / "relay.toml"
    env = {
        "RABBITMQ_PASSWORD": "pw",
        "ORDERS_DATABASE_URL": DB_A,
        "SHIPPING_DATABASE_URL": DB_B,
        "TENANTS_DATABASE_URL": "postgresql://relay@db-c:5432/saas",
    }

    config = load(str(example), {}, env)

    assert [o.name for o in config.outboxes] == ["orders", "payments", "shipping", "tenants"]
    assert config.outboxes[3].schemas == "tenant_*"
    assert config.outboxes[2].settings.publisher.scheme == "nats"
    assert config.observability.health_port == 8080


def test_a_schemas_glob_is_kept_for_discovery(tmp_path: Path) -> None:
    config = read(
        tmp_path,
        f"""
        [[outbox]]
        name = "tenants"
        database_url = "{DB_A}"
        schemas = "tenant_*"
        batch_size = 10
        """,
    )
    (tenants,) = config.outboxes
    assert (tenants.name, tenants.schemas, tenants.settings.batch_size) == (
        "tenants",
        "tenant_*",
        10,
    )
