"""CDC set-up and inspection: the server's wal_level, the outbox publication, the replication slot.

Synchronous (psycopg 3, autocommit connection): used by ``migrate --cdc``, ``slot drop|status``,
``status`` and, at every start of ``serve --mode cdc``, from the CDC worker thread.
Creating the slot needs the REPLICATION attribute; creating the publication needs ownership of
the outbox table (or superuser).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from outbox_relay.db.queries import Queries
from outbox_relay.errors import (
    ConfigError,
    ReplicationPrivilegeError,
    SlotInUseError,
    SlotNotFoundError,
    WalLevelError,
)

log = logging.getLogger(__name__)

WAL_LEVEL_FIX = (
    "logical replication needs wal_level = logical (the server runs with {level!r}): run "
    "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL (on managed services, set "
    "the equivalent parameter, e.g. rds.logical_replication = 1 on RDS)"
)


@dataclass(frozen=True, slots=True)
class SlotStatus:
    name: str
    active: bool
    active_pid: int | None
    confirmed_flush_lsn: str | None
    retained_wal_bytes: int | None


def shard_name(base: str, shard: int) -> str:
    """A CDC shard's slot (or publication) name: shard 0 keeps the single-slot name, shard
    s > 0 adds ``_s<s>`` (the base shortened so the name stays within 63 bytes)."""
    suffix = f"_s{shard}" if shard else ""
    return base[: 63 - len(suffix)] + suffix


def shard_count(conn: psycopg.Connection[Any], schema: str) -> int:
    """The outbox's CDC shards (``migrate --cdc --cdc-shards S``; 1 before it ever ran)."""
    row = conn.execute(Queries(schema)["lease_count"], {"scope": "cdc-shard"}).fetchone()
    return max(1, int(row[0]) if row else 0)


def check_wal_level(conn: psycopg.Connection[Any], schema: str) -> None:
    row = conn.execute(Queries(schema)["cdc_wal_level"]).fetchone()
    level = row[0] if row else "unknown"
    if level != "logical":
        raise WalLevelError(WAL_LEVEL_FIX.format(level=level))


def ensure_publication(
    conn: psycopg.Connection[Any], schema: str, publication: str, *, shard: int = 0, shards: int = 1
) -> bool:
    """Create the insert-only publication on ``<schema>.outbox`` unless it exists; True if made.
    With several shards, it carries only its shard's rows (a row filter on their partition).
    It streams the id column only; one made by an earlier version is narrowed when the role may."""
    queries = Queries(schema)
    shard_literals = {"shard": sql.Literal(shard), "shards": sql.Literal(shards)}
    row = conn.execute(queries["cdc_publication_exists"], {"publication": publication}).fetchone()
    if row and row[0]:
        _narrow(conn, schema, publication, shard_literals if shards > 1 else None)
        return False
    name = sql.Identifier(publication)
    if shards > 1:
        create = queries["cdc_create_shard_publication"].format(publication=name, **shard_literals)
    else:
        create = queries["cdc_create_publication"].format(publication=name)
    try:
        conn.execute(create)
    except pg_errors.DuplicateObject:  # another relay created it a moment ago
        return False
    except pg_errors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"cannot create publication {publication!r}: {exc.diag.message_primary}; run "
            f"`outbox-relay migrate --cdc` once as the owner of {schema}.outbox (or a superuser)"
        ) from exc
    return True


def _narrow(
    conn: psycopg.Connection[Any],
    schema: str,
    publication: str,
    shard_literals: dict[str, sql.Literal] | None,
) -> None:
    """Narrow an existing publication to the id column (it works either way, only slower)."""
    queries = Queries(schema)
    row = conn.execute(queries["cdc_publication_columns"], {"publication": publication}).fetchone()
    if row is None or list(row[0] or ()) == ["id"]:
        return
    name = sql.Identifier(publication)
    if shard_literals is not None:
        narrow = queries["cdc_narrow_shard_publication"].format(publication=name, **shard_literals)
    else:
        narrow = queries["cdc_narrow_publication"].format(publication=name)
    try:
        with conn.transaction():
            conn.execute(narrow)
    except pg_errors.InsufficientPrivilege:
        log.info(
            "publication %r streams every outbox column; `outbox-relay migrate --cdc` as the "
            "table's owner narrows it to the id column (less WAL decoding per event)",
            publication,
        )
    else:
        log.info("publication %r narrowed to the outbox id column", publication)


def drop_publication(conn: psycopg.Connection[Any], schema: str, publication: str) -> None:
    conn.execute(
        Queries(schema)["cdc_drop_publication"].format(publication=sql.Identifier(publication))
    )


def slot_status(conn: psycopg.Connection[Any], schema: str, slot: str) -> SlotStatus | None:
    row = conn.execute(Queries(schema)["cdc_slot"], {"slot": slot}).fetchone()
    if row is None:
        return None
    _type, _plugin, _same_db, active, pid, confirmed, retained = row
    return SlotStatus(
        name=slot,
        active=bool(active),
        active_pid=pid,
        confirmed_flush_lsn=confirmed,
        retained_wal_bytes=None if retained is None else int(retained),
    )


def ensure_slot(conn: psycopg.Connection[Any], schema: str, slot: str) -> bool:
    """Create the logical pgoutput slot unless it exists; True if it was created."""
    queries = Queries(schema)
    row = conn.execute(queries["cdc_slot"], {"slot": slot}).fetchone()
    if row is None:
        try:
            conn.execute(queries["cdc_create_slot"], {"slot": slot})
            return True
        except pg_errors.DuplicateObject:
            row = conn.execute(queries["cdc_slot"], {"slot": slot}).fetchone()
        except pg_errors.InsufficientPrivilege as exc:
            raise ReplicationPrivilegeError(
                f"cannot create replication slot {slot!r}: {exc.diag.message_primary}; "
                "grant it with ALTER ROLE <role> REPLICATION (or create the slot as a superuser "
                "with `outbox-relay migrate --cdc`)"
            ) from exc
        except pg_errors.ObjectNotInPrerequisiteState as exc:  # wal_level below logical
            raise WalLevelError(WAL_LEVEL_FIX.format(level="replica")) from exc
    if row is None:
        raise SlotNotFoundError(f"replication slot {slot!r} vanished during creation")
    slot_type, plugin, same_db = row[0], row[1], row[2]
    if slot_type != "logical" or plugin != "pgoutput" or same_db is not True:
        raise SlotNotFoundError(
            f"replication slot {slot!r} exists but is not a logical pgoutput slot of this "
            f"database (type={slot_type}, plugin={plugin}): pick another --slot-name"
        )
    return False


def drop_slot(conn: psycopg.Connection[Any], schema: str, slot: str) -> bool:
    """Drop the slot; False if there was none. A slot streaming to a relay cannot be dropped."""
    try:
        conn.execute(Queries(schema)["cdc_drop_slot"], {"slot": slot})
    except pg_errors.UndefinedObject:
        return False
    except pg_errors.ObjectInUse as exc:
        raise SlotInUseError(
            f"cannot drop replication slot {slot!r}: {exc.diag.message_primary}; "
            "stop the relay that streams it first"
        ) from exc
    return True
