"""Forward-only, numbered SQL migrations, recorded per schema: the outbox's from
``db/sql/outbox`` and the consumer inbox's from ``db/sql/inbox``, both through :func:`run`.

Rolling upgrades run two relay versions side by side, so a relay accepts a schema newer than it
knows when every migration it lacks says older relays still work: a migration file declares
``-- relay-compatible-from: N`` (relays that know version N or later keep working), recorded in
``outbox_schema_version.relay_compatible_from``. Without the line a migration is breaking: only
relays that ship it may run.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random

from outbox_relay.db.queries import Queries, render
from outbox_relay.errors import SchemaError

log = logging.getLogger(__name__)

_MIGRATION_FILE = re.compile(r"(\d{4})_(\w+)\.sql")
_COMPATIBLE_FROM = re.compile(r"^-- relay-compatible-from: (\d+)\s*$", re.MULTILINE)
MIGRATION_LOCK = 1868724340  # advisory lock key: one migrate at a time per database


@dataclass(frozen=True, slots=True)
class MigrationSet:
    """One series of migrations: its files, the table that records them, its lock."""

    folder: str  # db/sql/<folder>/NNNN_<name>.sql
    version_table: str  # in the migrated schema
    lock_key: int  # advisory lock: one migrator of this set at a time per database
    label: str  # what the log calls one of its migrations


OUTBOX_MIGRATIONS = MigrationSet("outbox", "outbox_schema_version", MIGRATION_LOCK, "migration")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    text: str

    @property
    def relay_compatible_from(self) -> int:
        """The oldest schema version a relay may know and still run once this is applied."""
        match = _COMPATIBLE_FROM.search(self.text)
        return min(int(match[1]), self.version) if match else self.version


@dataclass(frozen=True, slots=True)
class SchemaState:
    version: int  # the highest migration applied (0: the version table is empty)
    relay_compatible_from: int  # relays must know at least this version


def sql_dir(name: str) -> Traversable:
    """``outbox_relay/db/sql/<name>``: migrations (``outbox``, ``inbox``) and ``grants``."""
    return resources.files("outbox_relay.db").joinpath("sql", name)


def migration_files(migration_set: MigrationSet) -> list[Migration]:
    found = []
    for entry in sql_dir(migration_set.folder).iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def available_migrations() -> list[Migration]:
    return migration_files(OUTBOX_MIGRATIONS)


def latest_version() -> int:
    return available_migrations()[-1].version


def schema_state(conn: psycopg.Connection[Any], schema: str) -> SchemaState | None:
    """The schema's migration state, or None when it has no outbox tables at all."""
    queries = Queries(schema)
    if not _table_exists(conn, queries, OUTBOX_MIGRATIONS.version_table):
        return None
    # relay_compatible_from is read through to_jsonb, so this also works on a version table made
    # before that column existed.
    return state_from_row(conn.execute(queries["schema_version"]).fetchone())


def state_from_row(row: tuple[Any, ...] | None) -> SchemaState:
    if row is None or row[0] is None:
        return SchemaState(0, 0)
    return SchemaState(int(row[0]), int(row[1]))


def applied_version(conn: psycopg.Connection[Any], schema: str) -> int | None:
    """The schema's migration version, or None when it has no outbox tables at all."""
    state = schema_state(conn, schema)
    return None if state is None else state.version


def version_problem(schema: str, state: SchemaState | None) -> str | None:
    """Why a schema in ``state`` (None: no outbox tables) cannot be used, or None if it can."""
    expected = latest_version()
    if state is None:
        return (
            f"schema {schema!r} has no outbox tables in this database: run `outbox-relay migrate`"
        )
    if state.version < expected:
        return (
            f"outbox schema {schema!r} is at version {state.version}, this relay needs "
            f"{expected}: run `outbox-relay migrate`"
        )
    if state.relay_compatible_from > expected:
        return (
            f"outbox schema {schema!r} is at version {state.version}, which needs a relay that "
            f"knows version {state.relay_compatible_from}; this one knows {expected}: "
            "upgrade outbox-relay"
        )
    return None


def check_schema(conn: psycopg.Connection[Any], schema: str) -> int:
    """Raise SchemaError unless this relay can run on the schema; return its version."""
    state = schema_state(conn, schema)
    problem = version_problem(schema, state)
    if problem:
        raise SchemaError(problem)
    assert state is not None
    return state.version


# A migration that alters the outbox waits for its lock behind the relay's open batch and, while
# it waits, blocks every producer's INSERT queued behind it (the inbox: a consumer's transaction,
# and the consumers queued behind). Wait briefly, then let go and retry.
LOCK_TIMEOUT = "5s"
LOCK_ATTEMPTS = 12


def migrate(conn: psycopg.Connection[Any], schema: str) -> list[Migration]:
    """Apply every outbox migration not yet recorded, each in its own transaction; return those
    applied.

    Safe to re-run and to run concurrently (an advisory lock serializes migrators). ``conn``
    must be in autocommit mode. Needs CREATE on the database only while the schema is missing.
    """
    return run(conn, schema, OUTBOX_MIGRATIONS, available_migrations())


def run(
    conn: psycopg.Connection[Any],
    schema: str,
    migration_set: MigrationSet,
    migrations: Sequence[Migration],
) -> list[Migration]:
    """Apply those of ``migrations`` (of ``migration_set``) not yet recorded in ``schema``."""
    queries = Queries(schema)
    version_table = sql.Identifier(schema, migration_set.version_table)
    with conn.transaction():
        conn.execute(queries["migration_lock"], {"key": migration_set.lock_key})
        # Checked first: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the
        # schema exists, which an owner on a managed service often lacks.
        found = conn.execute(queries["namespace_exists"], {"schema": schema}).fetchone()
        if not (found and found[0]):
            conn.execute(queries["create_schema"].format(schema=sql.Identifier(schema)))
        if not _table_exists(conn, queries, migration_set.version_table):
            conn.execute(queries["create_version_table"].format(version_table=version_table))
        elif not _has_compatibility_column(conn, queries, migration_set):
            conn.execute(
                queries["add_version_compatibility_column"].format(version_table=version_table)
            )
    applied: list[Migration] = []
    for migration in migrations:
        retrying = Retrying(
            retry=retry_if_exception_type(pg_errors.LockNotAvailable),
            stop=stop_after_attempt(LOCK_ATTEMPTS),
            wait=wait_random(1, 3),
            before_sleep=lambda state: log.warning(
                "migration waits for a lock held by a relay or an application; retrying",
                extra={"attempt": state.attempt_number, "schema": schema},
            ),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                if _apply(conn, queries, migration_set, migration):
                    applied.append(migration)
    return applied


def _table_exists(conn: psycopg.Connection[Any], queries: Queries, table: str) -> bool:
    relation = f"{queries.schema}.{table}"
    found = conn.execute(queries["relation_exists"], {"relation": relation}).fetchone()
    return bool(found and found[0])


def _has_compatibility_column(
    conn: psycopg.Connection[Any], queries: Queries, migration_set: MigrationSet
) -> bool:
    """Version tables made before relay_compatible_from existed lack it."""
    row = conn.execute(
        queries["version_table_has_compatibility_column"],
        {"version_table": f"{queries.schema}.{migration_set.version_table}"},
    ).fetchone()
    return bool(row and row[0])


def _apply(
    conn: psycopg.Connection[Any],
    queries: Queries,
    migration_set: MigrationSet,
    migration: Migration,
) -> bool:
    """Apply one migration unless it is recorded already; True if it was applied now."""
    version_table = sql.Identifier(queries.schema, migration_set.version_table)
    with conn.transaction():
        conn.execute(queries["migration_lock"], {"key": migration_set.lock_key})
        done = conn.execute(
            queries["migration_applied"].format(version_table=version_table),
            {"version": migration.version},
        ).fetchone()
        if done:
            return False
        conn.execute(
            queries["set_migration_lock_timeout"].format(lock_timeout=sql.Literal(LOCK_TIMEOUT))
        )
        conn.execute(render(migration.text, queries.schema).encode())
        conn.execute(
            queries["record_migration"].format(version_table=version_table),
            {
                "version": migration.version,
                "name": migration.name,
                "relay_compatible_from": migration.relay_compatible_from,
            },
        )
    log.info(
        "applied %s",
        migration_set.label,
        extra={"version": migration.version, "schema": queries.schema},
    )
    return True
