"""Typed relay settings, built once by the CLI (flags or OUTBOX_RELAY_* variables)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from outbox_relay.errors import ConfigError
from outbox_relay.publishers.base import PublisherSettings
from outbox_relay.queries import check_schema_name
from outbox_relay.redact import redact_url

DEFAULT_DATABASE_URL = "postgresql://localhost/postgres"
DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/%2F"


class Mode(enum.StrEnum):
    NOTIFY = "notify"
    POLL = "poll"


class OnSent(enum.StrEnum):
    DELETE = "delete"
    KEEP = "keep"


def check_database_url(url: str) -> str:
    if not url.startswith(("postgresql://", "postgres://")) and "=" not in url:
        raise ConfigError(
            f"--database-url: {redact_url(url)!r} is not a PostgreSQL URL "
            "(expected postgresql://user@host:5432/dbname or a key=value conninfo)"
        )
    return url


@dataclass(frozen=True, slots=True)
class RelaySettings:
    database_url: str = field(repr=False)
    broker_url: str = field(repr=False)
    schema: str = "public"
    mode: Mode = Mode.NOTIFY
    exchange: str = "events"
    batch_size: int = 1000
    poll_interval: float = 1.0
    max_attempts: int = 10
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    on_sent: OnSent = OnSent.DELETE
    retention: float = 7 * 24 * 3600.0
    confirm_timeout: float = 30.0
    max_message_bytes: int = 128 * 1024 * 1024
    shutdown_timeout: float = 5.0

    def __post_init__(self) -> None:
        check_database_url(self.database_url)
        check_schema_name(self.schema)
        positive = {
            "--batch-size": self.batch_size,
            "--poll-interval": self.poll_interval,
            "--max-attempts": self.max_attempts,
            "--retry-backoff": self.retry_backoff,
            "--confirm-timeout": self.confirm_timeout,
            "--max-message-bytes": self.max_message_bytes,
        }
        for option, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{option}: must be greater than 0, got {value}")

    def publisher_settings(self) -> PublisherSettings:
        return PublisherSettings(
            url=self.broker_url,
            exchange=self.exchange,
            confirm_timeout=self.confirm_timeout,
            max_message_bytes=self.max_message_bytes,
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
        }
