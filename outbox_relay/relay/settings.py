"""The relay's settings (``outbox-relay serve``): each field is a flag, a variable and a key."""

from __future__ import annotations

import enum
import os
import re
import socket
from typing import Annotated, Any

from pydantic import AfterValidator, Field, model_validator

from outbox_relay.envelopes import MessageFormat, default_source
from outbox_relay.publishers.base import PublisherSettings
from outbox_relay.settings import (
    DEFAULT_DATABASE_URL,
    Count,
    DatabaseUrl,
    Duration,
    Flag,
    Schema,
    Seconds,
    Settings,
    route,
)


class Mode(enum.StrEnum):
    NOTIFY = "notify"
    POLL = "poll"
    CDC = "cdc"


class OnSent(enum.StrEnum):
    DELETE = "delete"
    KEEP = "keep"


# Slot names allow only lowercase letters, digits and '_' (at most 63 bytes); publications
# share the rule so both can be written unquoted in the docs and in psql.
REPLICATION_NAME = re.compile(r"[a-z0-9_]{1,63}")


def default_replication_name(schema: str) -> str:
    return f"outbox_relay_{schema}"


def check_replication_name(name: str | None) -> str | None:
    if name is not None and not REPLICATION_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} must be 1-63 lowercase letters, digits or '_' (e.g. outbox_relay_public)"
        )
    return name


RELAY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,47}")


def check_relay_name(name: str | None) -> str | None:
    if name is not None and not RELAY_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} must be 1-48 letters, digits, '.', '_' or '-' (e.g. orders-relay-1)"
        )
    return name


def default_relay_name() -> str:
    """``<host>-<pid>``: unique among the relays of a fleet, and what an operator recognises."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "relay"
    return f"{host[:36]}-{os.getpid()}"


def check_wal_message_prefix(prefix: str | None) -> str | None:
    if prefix is not None and not (0 < len(prefix) <= 200 and prefix.isprintable()):
        raise ValueError(f"{prefix!r} must be 1-200 printable characters")
    return prefix


ReplicationName = Annotated[
    str | None, AfterValidator(check_replication_name), Flag(metavar="NAME", panel="CDC mode")
]
SlotName = Annotated[
    ReplicationName,
    Field(description="CDC: logical replication slot [default: outbox_relay_<schema>]."),
]
Publication = Annotated[
    ReplicationName,
    Field(description="CDC: publication on <schema>.outbox [default: outbox_relay_<schema>]."),
]

_DEFAULT_RELAY_NAME = default_relay_name()

# Rows in flight: enough for the broker to stay busy (about a raw publisher's window of
# unconfirmed messages); also the most a killed relay can publish twice.
DEFAULT_BATCH_SIZE = 4000


CDC_ONLY = frozenset({"slot_name", "publication", "heartbeat_interval", "wal_message_prefix"})


class RelaySettings(Settings):
    """Everything ``serve`` needs but the observability options. Broker settings (``broker_url``,
    ``exchange``, ``nats_stream``, ...) may be given flat: they go into ``publisher``."""

    database_url: DatabaseUrl = DEFAULT_DATABASE_URL
    schema_name: Schema = "public"
    mode: Annotated[
        Mode,
        Field(
            description="notify: LISTEN/NOTIFY wake-ups plus polling; poll: polling only; cdc: "
            "stream inserts from the WAL (logical replication, see docs/cdc.md)."
        ),
    ] = Mode.NOTIFY
    batch_size: Annotated[
        Count,
        Field(
            le=1_000_000,
            description="Most rows in flight at once (claimed as two overlapping halves); a "
            "killed relay publishes at most this many twice.",
        ),
    ] = DEFAULT_BATCH_SIZE
    poll_interval: Annotated[
        Seconds,
        Field(
            le=3600,
            description="Seconds between polls when idle (the fallback for missed wake-ups).",
        ),
    ] = 1.0
    max_db_connections: Annotated[
        Count,
        Field(
            ge=3,
            le=1000,
            description="Connections one process opens to one database at most, shared by all "
            "its outboxes there: one for leases, one for LISTEN, the rest claim (each outbox "
            "uses at most 3 of those at once). CDC's replication connections come on top.",
        ),
    ] = 10
    max_attempts: Annotated[
        Count, Field(description="Failed publishes before an event is dead.")
    ] = 10
    retry_backoff: Annotated[
        Seconds, Field(description="First retry delay in seconds; doubles per attempt.")
    ] = 1.0
    retry_backoff_max: Annotated[Seconds, Field(description="Longest retry delay.")] = 300.0
    on_sent: Annotated[
        OnSent,
        Field(
            description="delete: remove rows once confirmed; keep: move them to outbox_sent "
            "(partitioned by sending time, dropped after --retention; docs/retention.md)."
        ),
    ] = OnSent.DELETE
    retention: Annotated[
        Duration,
        Field(
            description="How long kept events stay in outbox_sent (e.g. 24h, 7d); whole "
            "partitions are dropped once older."
        ),
    ] = 7 * 24 * 3600.0
    shutdown_timeout: Annotated[
        float,
        Field(
            ge=0,
            le=3600,
            description="On SIGTERM, seconds to finish the batch in flight before releasing it.",
        ),
        Flag(metavar="SECONDS"),
    ] = 5.0
    # --mode cdc only: see docs/cdc.md.
    slot_name: SlotName = None
    publication: Publication = None
    heartbeat_interval: Annotated[
        Seconds,
        Field(
            description="CDC: seconds of outbox silence before a WAL heartbeat lets the slot "
            "advance."
        ),
        Flag(panel="CDC mode"),
    ] = 10.0
    wal_message_prefix: Annotated[
        str | None,
        AfterValidator(check_wal_message_prefix),
        Field(
            description="CDC: also publish events written with pg_logical_emit_message(true, "
            "PREFIX, json) [default: outbox_relay.<schema>]."
        ),
        Flag(metavar="PREFIX", panel="CDC mode"),
    ] = None
    relay_name: Annotated[
        str | None,
        AfterValidator(check_relay_name),
        Field(
            description="This relay's name among the relays of the outbox, in logs, metrics and "
            "status [default: <host>-<pid>]."
        ),
        Flag(metavar="NAME"),
    ] = None
    publisher: Annotated[PublisherSettings, Flag(cli=False)] = Field(
        default_factory=PublisherSettings
    )

    @model_validator(mode="before")
    @classmethod
    def _broker_settings_go_into_publisher(cls, values: Any) -> Any:
        return route(values, cls, "publisher")

    @model_validator(mode="after")
    def _consistent(self) -> RelaySettings:
        if self.retry_backoff > self.retry_backoff_max:
            raise ValueError(
                f"--retry-backoff ({self.retry_backoff:g}s) is longer than --retry-backoff-max "
                f"({self.retry_backoff_max:g}s)"
            )
        # An option that cannot take effect is a mistake worth one line, not silence.
        given = self.model_fields_set
        if self.mode is not Mode.CDC:
            for name in sorted(given & CDC_ONLY):
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag}: applies to --mode cdc only (--mode is {self.mode})")
        if self.on_sent is OnSent.DELETE and "retention" in given:
            raise ValueError("--retention: applies to --on-sent keep only (sent rows are deleted)")
        publisher = self.publisher
        if publisher.message_format is not MessageFormat.NATIVE and publisher.ce_source is None:
            # The default source names the outbox, which only the relay's settings know.
            source = default_source(self.database_url, self.schema_name)
            # Frozen model, still being validated: the one place it is completed.
            object.__setattr__(
                self, "publisher", publisher.model_copy(update={"ce_source": source})
            )
        return self

    @property
    def relay_name_or_default(self) -> str:
        return self.relay_name or _DEFAULT_RELAY_NAME

    @property
    def slot_name_or_default(self) -> str:
        return self.slot_name or default_replication_name(self.schema_name)

    @property
    def publication_or_default(self) -> str:
        return self.publication or default_replication_name(self.schema_name)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if self.mode is not Mode.CDC:
            for key in ("slot_name", "publication", "heartbeat_interval", "wal_message_prefix"):
                described.pop(key, None)
        else:
            described["slot_name"] = self.slot_name_or_default
            described["publication"] = self.publication_or_default
        return described
