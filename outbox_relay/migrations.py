"""Forward-only, numbered SQL migrations from ``schema/migrations``, recorded per schema."""

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
from outbox_relay.queries import check_schema_name, render

log = logging.getLogger(__name__)

_MIGRATION_FILE = re.compile(r"(\d{4})_(\w+)\.sql")
_MIGRATION_LOCK = 1868724340  # advisory lock key: one migrate at a time per database


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    text: str


def _migrations_dir() -> Traversable:
    installed = resources.files("outbox_relay").joinpath("schema/migrations")
    if installed.is_dir():
        return installed
    # Editable installs and source checkouts keep schema/ at the repository's top level.
    return Path(__file__).resolve().parent.parent / "schema" / "migrations"


def available_migrations() -> list[Migration]:
    found = []
    for entry in _migrations_dir().iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def latest_version() -> int:
    return available_migrations()[-1].version


def applied_version(conn: psycopg.Connection[Any], schema: str) -> int | None:
    """The schema's migration version, or None when it has no outbox tables at all."""
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL",
        (f"{check_schema_name(schema)}.outbox_schema_version",),
    ).fetchone()
    if not row or not row[0]:
        return None
    version = conn.execute(
        sql.SQL("SELECT max(version) FROM {}.outbox_schema_version").format(sql.Identifier(schema))
    ).fetchone()
    return int(version[0]) if version and version[0] is not None else 0


def version_problem(schema: str, version: int | None) -> str | None:
    """Why a schema at ``version`` (None: no outbox tables) cannot be used, or None if it can."""
    expected = latest_version()
    if version is None:
        return (
            f"schema {schema!r} has no outbox tables in this database: run `outbox-relay migrate`"
        )
    if version < expected:
        return (
            f"outbox schema {schema!r} is at version {version}, this relay needs {expected}: "
            "run `outbox-relay migrate`"
        )
    if version > expected:
        return (
            f"outbox schema {schema!r} is at version {version}, newer than this relay "
            f"understands ({expected}): upgrade outbox-relay"
        )
    return None


def check_schema(conn: psycopg.Connection[Any], schema: str) -> int:
    """Raise SchemaError unless the schema is migrated to exactly what this relay expects."""
    version = applied_version(conn, schema)
    problem = version_problem(schema, version)
    if problem:
        raise SchemaError(problem)
    assert version is not None
    return version


def migrate(conn: psycopg.Connection[Any], schema: str) -> list[Migration]:
    """Apply every migration not yet recorded, each in its own transaction; return those applied.

    Safe to re-run and to run concurrently (an advisory lock serializes migrators).
    """
    check_schema_name(schema)
    applied: list[Migration] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.outbox_schema_version ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(schema))
        )
    for migration in available_migrations():
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
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
                    "INSERT INTO {}.outbox_schema_version (version, name) VALUES (%s, %s)"
                ).format(sql.Identifier(schema)),
                (migration.version, migration.name),
            )
            log.info("applied migration", extra={"version": migration.version, "schema": schema})
            applied.append(migration)
    return applied
