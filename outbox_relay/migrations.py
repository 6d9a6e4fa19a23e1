"""Forward-only, numbered SQL migrations from ``schema/migrations``, recorded per schema.

Rolling upgrades run two relay versions side by side, so a relay accepts a schema newer than it
knows when every migration it lacks says older relays still work: a migration file declares
``-- relay-compatible-from: N`` (relays that know version N or later keep working), recorded in
``outbox_schema_version.relay_compatible_from``. Without the line a migration is breaking: only
relays that ship it may run.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay.errors import SchemaError
from outbox_relay.queries import Queries, check_schema_name, render

log = logging.getLogger(__name__)

_MIGRATION_FILE = re.compile(r"(\d{4})_(\w+)\.sql")
_COMPATIBLE_FROM = re.compile(r"^-- relay-compatible-from: (\d+)\s*$", re.MULTILINE)
MIGRATION_LOCK = 1868724340  # advisory lock key: one migrate at a time per database


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


def schema_dir(name: str) -> Traversable:
    """``schema/<name>``: inside the installed package, or at the top of a source checkout."""
    installed = resources.files("outbox_relay").joinpath("schema", name)
    if installed.is_dir():
        return installed
    # Editable installs and source checkouts keep schema/ at the repository's top level.
    return Path(__file__).resolve().parent.parent / "schema" / name


def available_migrations() -> list[Migration]:
    found = []
    for entry in schema_dir("migrations").iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def latest_version() -> int:
    return available_migrations()[-1].version


def schema_state(conn: psycopg.Connection[Any], schema: str) -> SchemaState | None:
    """The schema's migration state, or None when it has no outbox tables at all."""
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL",
        (f"{check_schema_name(schema)}.outbox_schema_version",),
    ).fetchone()
    if not row or not row[0]:
        return None
    # relay_compatible_from is read through to_jsonb, so this also works on a version table made
    # before that column existed.
    return state_from_row(conn.execute(Queries(schema)["schema_version"]).fetchone())


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


def migrate(conn: psycopg.Connection[Any], schema: str) -> list[Migration]:
    """Apply every migration not yet recorded, each in its own transaction; return those applied.

    Safe to re-run and to run concurrently (an advisory lock serializes migrators).
    """
    check_schema_name(schema)
    applied: list[Migration] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {0}.outbox_schema_version ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now());"
                " ALTER TABLE {0}.outbox_schema_version"
                " ADD COLUMN IF NOT EXISTS relay_compatible_from integer"
            ).format(sql.Identifier(schema))
        )
    for migration in available_migrations():
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            done = conn.execute(
                sql.SQL("SELECT 1 FROM {}.outbox_schema_version WHERE version = %s").format(
                    sql.Identifier(schema)
                ),
                (migration.version,),
            ).fetchone()
            if done:
                continue
            conn.execute(render(migration.text, schema).encode())
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.outbox_schema_version"
                    " (version, name, relay_compatible_from) VALUES (%s, %s, %s)"
                ).format(sql.Identifier(schema)),
                (migration.version, migration.name, migration.relay_compatible_from),
            )
            log.info("applied migration", extra={"version": migration.version, "schema": schema})
            applied.append(migration)
    return applied
