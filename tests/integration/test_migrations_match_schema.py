"""Every migration applied in order yields the schema that ``<set>_schema.sql`` shows.

One fresh database is migrated, another is loaded from the schema file, and ``pg_dump
--schema-only`` of the two must match once comments and whitespace are set aside (procrastinate's
``tests/migration``). A migration added without updating the schema file, or the reverse, fails
here with the difference.
"""

from __future__ import annotations

import difflib
import glob
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbox_relay.consumer.inbox import INBOX_MIGRATIONS, migrate_inbox
from outbox_relay.db.migrations import OUTBOX_MIGRATIONS, MigrationSet, migrate, sql_dir
from outbox_relay.db.queries import SCHEMA_FILE_SUFFIX, render
from tests.conftest import database_url_for
from tests.services import Services

pytestmark = pytest.mark.integration

# Not public: the schema file must name its schema through {{schema}} everywhere, and pg_dump is
# asked for this schema only, so an object created elsewhere shows as missing.
SCHEMA = "migration_check"


def pg_dump_binary() -> str:
    """The newest pg_dump of the Debian/Ubuntu packages, else the one on PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_dump"),
        key=lambda path: int(re.findall(r"/postgresql/(\d+)/", path)[0]),
    )
    binary = found[-1] if found else shutil.which("pg_dump")
    if binary is None:
        pytest.fail(
            "pg_dump not found (looked in /usr/lib/postgresql/*/bin and on PATH): install the "
            "PostgreSQL client tools of the server's major version or newer"
        )
    return binary


def schema_dump(database_url: str) -> list[str]:
    """``pg_dump --schema-only`` of SCHEMA, without comments, blank lines or layout."""
    result = subprocess.run(
        [
            pg_dump_binary(),
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            f"--schema={SCHEMA}",
            f"--dbname={database_url}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"pg_dump failed: {result.stderr}"
    lines = []
    for line in result.stdout.splitlines():
        words = " ".join(line.split())
        # \restrict and \unrestrict (newer pg_dump releases) carry a random key per dump.
        if words and not words.startswith(("--", "\\restrict", "\\unrestrict")):
            lines.append(words)
    return lines


@pytest.fixture
def new_database(services: Services) -> Iterator[Callable[[], str]]:
    """new_database() -> the URL of a fresh, empty database, dropped after the test."""
    made: list[str] = []

    def make() -> str:
        name = f"outbox_schema_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(services.postgres_admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        made.append(name)
        return database_url_for(services.postgres_admin_url, name)

    yield make
    with psycopg.connect(services.postgres_admin_url, autocommit=True) as admin:
        for name in made:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.mark.parametrize(
    ("migration_set", "run_migrations"),
    [(OUTBOX_MIGRATIONS, migrate), (INBOX_MIGRATIONS, migrate_inbox)],
    ids=["outbox", "inbox"],
)
def test_the_migrations_yield_the_schema_file(
    new_database: Callable[[], str],
    migration_set: MigrationSet,
    run_migrations: Callable[[psycopg.Connection[Any], str], object],
) -> None:
    # Given a database migrated from nothing and one loaded from the schema file
    migrated_url, loaded_url = new_database(), new_database()
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        run_migrations(conn, SCHEMA)
    schema_file = sql_dir(f"{migration_set.folder}{SCHEMA_FILE_SUFFIX}").read_text("utf-8")
    with psycopg.connect(loaded_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
        conn.execute(render(schema_file, SCHEMA).encode())

    # When both are dumped, then they are the same schema
    migrated, loaded = schema_dump(migrated_url), schema_dump(loaded_url)
    assert any("CREATE TABLE" in line for line in migrated), "pg_dump saw no table at all"
    difference = "\n".join(
        difflib.unified_diff(
            migrated,
            loaded,
            "applying every migration",
            f"{migration_set.folder}{SCHEMA_FILE_SUFFIX}",
            lineterm="",
        )
    )
    if difference:
        pytest.fail(f"the migrations and the schema file differ:\n{difference}")
