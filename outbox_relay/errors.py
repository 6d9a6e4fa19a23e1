"""The project's exception tree.

Driver errors (psycopg, pika, ...) are translated at the boundary into these, keeping the cause
chain, so the CLI can print one readable block and exit with a named code.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 3
    SCHEMA = 4
    UNAVAILABLE = 5
    LAGGING = 6


class OutboxRelayError(Exception):
    """Root of every error this package raises on purpose."""

    exit_code = ExitCode.FAILURE
    # Whether the CLI prints the cause chain under the message; False when the message already
    # says, in the user's terms, all the driver's errors would (they stay in __cause__).
    shows_cause = True


class ConfigError(OutboxRelayError):
    """A setting is missing or invalid; the message names the option."""

    exit_code = ExitCode.CONFIG


class TlsError(ConfigError):
    """A TLS connection failed over certificates or TLS settings (the server's certificate
    does not verify, or the server refused ours): a retry meets the same refusal, and falling
    back to plaintext would hide it. The message names the link and the cause."""

    shows_cause = False


class InvalidEventError(OutboxRelayError, ValueError):
    """An event given to the producer API cannot be written (bad type, payload or headers)."""

    exit_code = ExitCode.USAGE


class StoreError(OutboxRelayError):
    """A problem with the outbox database."""

    exit_code = ExitCode.UNAVAILABLE


class DatabaseUnavailableError(StoreError):
    """PostgreSQL cannot be reached or the connection was lost; retrying may help."""


class SchemaError(StoreError):
    """The outbox schema is missing or older than this relay expects."""

    exit_code = ExitCode.SCHEMA


class PublishError(OutboxRelayError):
    """A problem with the message broker."""

    exit_code = ExitCode.UNAVAILABLE


class BrokerUnavailableError(PublishError):
    """The broker cannot be reached or the connection was lost; retrying may help."""


class BrokerRejectedMessageError(BrokerUnavailableError):
    """The broker closed the connection or channel over something that was sent (a frame too
    large, a value its protocol forbids): one of the messages on the wire is to blame."""


class MissingExtraError(ConfigError):
    """A broker's client library is not installed."""


class ReplicationError(StoreError):
    """A logical-replication (CDC) operation failed; ``__cause__`` holds the driver error."""


class SlotInUseError(ReplicationError):
    """The slot is already streaming to another connection (only one consumer per slot)."""


class SlotNotFoundError(ReplicationError):
    """The replication slot does not exist, or is not a logical pgoutput slot of this database."""


class WalLevelError(ReplicationError, ConfigError):
    """The server runs with ``wal_level`` below ``logical``; needs a config change and restart."""

    exit_code = ExitCode.CONFIG


class ReplicationPrivilegeError(ReplicationError, ConfigError):
    """The role lacks the REPLICATION attribute (or is refused a walsender by the server)."""

    exit_code = ExitCode.CONFIG
