"""Typed relay settings, built once by the CLI (flags or OUTBOX_RELAY_* variables)."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

import psycopg
from psycopg.conninfo import conninfo_to_dict

from outbox_relay.db.queries import check_schema_name
from outbox_relay.errors import ConfigError
from outbox_relay.publishers.base import PublisherSettings
from outbox_relay.redact import redact_url

DEFAULT_DATABASE_URL = "postgresql://localhost/postgres"
DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/%2F"


class Mode(enum.StrEnum):
    NOTIFY = "notify"
    POLL = "poll"
    CDC = "cdc"


class OnSent(enum.StrEnum):
    DELETE = "delete"
    KEEP = "keep"


def check_database_url(url: str) -> str:
    if not url.startswith(("postgresql://", "postgres://")) and "=" not in url:
        raise ConfigError(
            f"--database-url: {redact_url(url)!r} is not a PostgreSQL URL "
            "(expected postgresql://user@host:5432/dbname or a key=value conninfo)"
        )
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        # libpq quotes the whole URL, password included, in its message: redact it, and drop
        # the cause so the CLI's "caused by" lines cannot repeat it.
        reason = str(exc).replace(url, redact_url(url)).strip()
        raise ConfigError(f"--database-url: cannot be parsed: {reason}") from None
    return url


# Slot names allow only lowercase letters, digits and '_' (at most 63 bytes); publications
# share the rule so both can be written unquoted in the docs and in psql.
REPLICATION_NAME = re.compile(r"[a-z0-9_]{1,63}")


def default_replication_name(schema: str) -> str:
    return f"outbox_relay_{schema}"


def check_replication_name(option: str, name: str) -> str:
    if not REPLICATION_NAME.fullmatch(name):
        raise ConfigError(
            f"{option}: {name!r} must be 1-63 lowercase letters, digits or '_' "
            "(e.g. outbox_relay_public)"
        )
    return name


# Rows in flight: enough for the broker to stay busy (about a raw publisher's window of
# unconfirmed messages); also the most a killed relay can publish twice.
DEFAULT_BATCH_SIZE = 4000


@dataclass(frozen=True, slots=True)
class RelaySettings:
    database_url: str = field(repr=False)
    broker_url: str = field(repr=False)
    schema: str = "public"
    mode: Mode = Mode.NOTIFY
    exchange: str = "events"
    batch_size: int = DEFAULT_BATCH_SIZE
    poll_interval: float = 1.0
    max_attempts: int = 10
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    on_sent: OnSent = OnSent.DELETE
    retention: float = 7 * 24 * 3600.0
    confirm_timeout: float = 30.0
    max_message_bytes: int = 128 * 1024 * 1024
    shutdown_timeout: float = 5.0
    # Broker-specific (each publisher reads its own; see docs/brokers.md).
    topic_prefix: str = "events"
    nats_stream: str = "EVENTS"
    redis_stream_mode: str = "per-type"
    redis_maxlen: int | None = None
    mqtt_qos: int = 1
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_timeout: float = 10.0
    webhook_batch: bool = False
    # --mode cdc only: None derives outbox_relay_<schema>; see docs/cdc.md.
    slot_name: str | None = None
    publication: str | None = None
    heartbeat_interval: float = 10.0
    wal_message_prefix: str | None = None  # None: outbox_relay.<schema>

    def __post_init__(self) -> None:
        # Accept the enums' string values from code too ("notify" as well as Mode.NOTIFY).
        for name, enum_type in (("mode", Mode), ("on_sent", OnSent)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum_type(value))
            except ValueError:
                choices = ", ".join(member.value for member in enum_type)
                option = "--" + name.replace("_", "-")
                raise ConfigError(f"{option}: {value!r} is not one of {choices}") from None
        check_database_url(self.database_url)
        check_schema_name(self.schema)
        positive = {
            "--batch-size": self.batch_size,
            "--poll-interval": self.poll_interval,
            "--max-attempts": self.max_attempts,
            "--retry-backoff": self.retry_backoff,
            "--confirm-timeout": self.confirm_timeout,
            "--max-message-bytes": self.max_message_bytes,
            "--heartbeat-interval": self.heartbeat_interval,
        }
        for option, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{option}: must be greater than 0, got {value}")
        check_replication_name("--slot-name", self.slot_name_or_default)
        check_replication_name("--publication", self.publication_or_default)

    @property
    def slot_name_or_default(self) -> str:
        return self.slot_name or default_replication_name(self.schema)

    @property
    def publication_or_default(self) -> str:
        return self.publication or default_replication_name(self.schema)

    def publisher_settings(self) -> PublisherSettings:
        return PublisherSettings(
            url=self.broker_url,
            exchange=self.exchange,
            confirm_timeout=self.confirm_timeout,
            max_message_bytes=self.max_message_bytes,
            topic_prefix=self.topic_prefix,
            nats_stream=self.nats_stream,
            redis_stream_mode=self.redis_stream_mode,
            redis_maxlen=self.redis_maxlen,
            mqtt_qos=self.mqtt_qos,
            webhook_secret=self.webhook_secret,
            webhook_timeout=self.webhook_timeout,
            webhook_batch=self.webhook_batch,
        )

    def describe(self) -> dict[str, object]:
        """Settings safe to log: URLs without passwords."""
        return {
            "database_url": redact_url(self.database_url),
            "broker_url": redact_url(self.broker_url),
            "schema": self.schema,
            "mode": str(self.mode),
            "exchange": self.exchange,
            "batch_size": self.batch_size,
            "on_sent": str(self.on_sent),
            **(
                {"slot_name": self.slot_name_or_default, "publication": self.publication_or_default}
                if self.mode is Mode.CDC
                else {}
            ),
        }
