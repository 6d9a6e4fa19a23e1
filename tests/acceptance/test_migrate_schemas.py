"""``outbox-relay migrate --schemas GLOB``: upgrades every existing schema of the database that
matches the glob and holds an outbox, reports each, and skips (saying how to create one) a
matching schema that holds none; refused with one line, exit 3, next to --schema or --config."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest

from outbox_relay.db import migrations
from tests.acceptance.cli_batch import run_all
from tests.acceptance.conftest import cli_env, run_cli

pytestmark = pytest.mark.acceptance

EXIT_CONFIG = 3
OLD_VERSION = 2  # a schema left at an older version, to be upgraded


def migrate_to(conn: psycopg.Connection[object], schema: str, version: int) -> None:
    wanted = [m for m in migrations.available_migrations() if m.version <= version]
    migrations.run(conn, schema, migrations.OUTBOX_MIGRATIONS, wanted)


def version_of(database_url: str, schema: str) -> int | None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return migrations.applied_version(conn, schema)


def test_migrate_schemas_upgrades_every_matching_schema_that_holds_an_outbox(
    database_url: str,
) -> None:
    # Given, in one database: an old and a current outbox matching the glob, a matching schema
    # without an outbox, a matching name the relay cannot serve, and an old outbox not matching
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    other = f"u{uuid.uuid4().hex[:8]}_old"
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrate_to(conn, prefix + "old", OLD_VERSION)
        migrations.migrate(conn, prefix + "current")
        conn.execute(f"CREATE SCHEMA {prefix}bare")
        conn.execute(f'CREATE SCHEMA "{prefix}Odd"')
        migrate_to(conn, other, OLD_VERSION)
    latest = migrations.latest_version()

    # When every schema matching the glob is migrated
    done = run_cli(
        "migrate", "--database-url", database_url, "--schemas", f"{prefix}*", "--partitions", "8",
        env=cli_env(),
    )  # fmt: skip

    # Then the old one is upgraded, the current one left as it is, each reported
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(
        line.startswith(f"schema '{prefix}old': applied 0003_") and line.endswith(f"{latest}")
        for line in lines
    ), done.stdout
    assert f"schema '{prefix}current': already at version {latest}, nothing to do" in lines
    assert done.stdout.count("partitions: 8") == 2
    # and the schema without an outbox is skipped, saying how to create one
    assert (
        f"schema '{prefix}bare': holds no outbox, skipped (create one with "
        f"`outbox-relay migrate --schema {prefix}bare`)"
    ) in lines
    assert f"schema '{prefix}Odd': skipped, not a plain lowercase identifier" in done.stdout
    assert lines[-1] == f"2 schema(s) matching '{prefix}*' migrated, 2 skipped"
    assert version_of(database_url, prefix + "old") == latest
    assert version_of(database_url, prefix + "bare") is None
    assert version_of(database_url, other) == OLD_VERSION  # not matched: untouched
    assert done.stderr == ""


def test_migrate_schemas_matching_no_outbox_migrates_nothing_and_says_so(
    database_url: str,
) -> None:
    pattern = f"n{uuid.uuid4().hex[:8]}_*"

    done = run_cli("migrate", "--database-url", database_url, "--schemas", pattern, env=cli_env())

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"no schema matching {pattern!r} holds an outbox: nothing migrated\n"


def test_migrate_schemas_next_to_what_names_one_schema_is_one_line_exit_3(tmp_path: Path) -> None:
    # A port nothing listens on: every refusal comes before anything connects.
    url = "postgresql://postgres@127.0.0.1:1/nowhere"
    path = tmp_path / "relay.toml"
    path.write_text(f'[[outbox]]\nname = "a"\ndatabase_url = "{url}"\n')
    glob = ["migrate", "--database-url", url, "--schemas", "tenant_*"]
    runs = [
        ([*glob, "--schema", "tenant_1"], cli_env()),
        (glob, cli_env(schema="tenant_1")),
        (["migrate", "--config", str(path), "--schemas", "tenant_*"], cli_env()),
        ([*glob, "--cdc", "--slot-name", "one_slot"], cli_env()),
        (["migrate", "--database-url", url, "--schemas", " "], cli_env()),
    ]
    expected = [
        "error: --schemas: not with --schema (OUTBOX_RELAY_SCHEMA): give one schema or a glob",
        "error: --schemas: not with --schema (OUTBOX_RELAY_SCHEMA): give one schema or a glob",
        f"error: --schemas: not with --config {path}: ",
        "error: --slot-name (OUTBOX_RELAY_SLOT_NAME): would be shared by every schema",
        "error: --schemas: must be a glob of schema names",
    ]

    done = run_all(runs)

    for (args, _env), outcome, start in zip(runs, done, expected, strict=True):
        assert outcome.returncode == EXIT_CONFIG, (args, outcome.stderr)
        assert len(outcome.stderr.splitlines()) == 1, (args, outcome.stderr)
        assert outcome.stderr.startswith(start), (args, outcome.stderr)
        assert outcome.stdout == ""
