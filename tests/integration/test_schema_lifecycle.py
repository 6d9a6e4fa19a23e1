"""Schema checks: a relay never runs against a missing or mismatched outbox schema; migrations
are idempotent; a custom schema works end to end."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable

import psycopg
import pytest
from psycopg import conninfo, sql

import outbox_relay
from outbox_relay.db import migrations
from outbox_relay.db.migrations import (
    Migration,
    applied_version,
    available_migrations,
    latest_version,
    migrate,
)
from outbox_relay.db.status import read_status
from outbox_relay.errors import SchemaError
from outbox_relay.publishers import create_publisher
from outbox_relay.relay.loop import Relay
from outbox_relay.relay.settings import RelaySettings
from tests.conftest import RabbitQueue, wait_until
from tests.integration.relay_harness import RelayThread, collect, relay_settings, scalar

pytestmark = pytest.mark.integration

REAL_MIGRATIONS = available_migrations()


def run_relay_until_it_fails(settings: RelaySettings) -> BaseException:
    async def run() -> None:
        relay = Relay(settings, create_publisher(settings.publisher))
        # A schema problem must end run() on its own; the timeout only bounds a broken relay.
        await asyncio.wait_for(relay.run(), timeout=20)

    with pytest.raises(SchemaError) as caught:
        asyncio.run(run())
    return caught.value


def test_relay_on_an_empty_database_says_to_migrate(
    empty_database_url: str, broker_url: str, exchange: str
) -> None:
    error = run_relay_until_it_fails(relay_settings(empty_database_url, broker_url, exchange))
    assert "run `outbox-relay migrate`" in str(error)
    assert "'public'" in str(error)


def test_status_on_an_empty_database_says_to_migrate(empty_database_url: str) -> None:
    with (
        psycopg.connect(empty_database_url, autocommit=True) as conn,
        pytest.raises(SchemaError, match="run `outbox-relay migrate`"),
    ):
        read_status(conn, "public")


def test_relay_refuses_a_schema_from_a_newer_release(
    database_url: str, broker_url: str, exchange: str
) -> None:
    newer = latest_version() + 1
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox_schema_version (version, name) VALUES (%s, 'future')", (newer,)
        )
    error = run_relay_until_it_fails(relay_settings(database_url, broker_url, exchange))
    assert f"version {newer}" in str(error)
    assert "upgrade outbox-relay" in str(error)


def test_relay_runs_on_a_newer_schema_whose_migrations_keep_it_compatible(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    """A rolling upgrade: the new release migrated first, an old relay still runs (or restarts)."""
    queue = bind_queue("order.*")
    newer = latest_version() + 1
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox_schema_version (version, name, relay_compatible_from)"
            " VALUES (%s, 'additive', %s)",
            (newer, latest_version()),
        )
        conn.execute("SELECT outbox_emit('order.created', 'a', '{\"seq\": 1}')")
        assert read_status(conn, "public").schema_version == newer
    with RelayThread(relay_settings(database_url, broker_url, exchange)):
        deliveries = collect(queue, 1)
    assert [d.json()["seq"] for d in deliveries] == [1]


def test_relay_refuses_a_newer_schema_that_needs_a_newer_relay(
    database_url: str, broker_url: str, exchange: str
) -> None:
    newer = latest_version() + 2
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox_schema_version (version, name, relay_compatible_from)"
            " VALUES (%s, 'additive', %s), (%s, 'breaking', %s)",
            (newer - 1, 1, newer, newer - 1),
        )
    error = run_relay_until_it_fails(relay_settings(database_url, broker_url, exchange))
    assert f"needs a relay that knows version {newer - 1}" in str(error)
    assert "upgrade outbox-relay" in str(error)


def test_a_version_table_from_before_compatibility_markers_is_upgraded(
    empty_database_url: str,
) -> None:
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        migrate(conn, "public")
        conn.execute("ALTER TABLE outbox_schema_version DROP COLUMN relay_compatible_from")
        # Readable as it is (an older relay's table) ...
        assert read_status(conn, "public").schema_version == latest_version()
        # ... and the next migrate adds the column back without touching the recorded versions.
        assert migrate(conn, "public") == []
        rows = conn.execute(
            "SELECT version, relay_compatible_from FROM outbox_schema_version ORDER BY version"
        ).fetchall()
    assert [version for version, _ in rows] == list(range(1, latest_version() + 1))
    assert all(compatible is None for _, compatible in rows)


def test_relay_refuses_a_schema_that_is_behind(
    database_url: str, broker_url: str, exchange: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM outbox_schema_version")
    error = run_relay_until_it_fails(relay_settings(database_url, broker_url, exchange))
    assert "is at version 0" in str(error)
    assert "run `outbox-relay migrate`" in str(error)


def test_migrate_twice_is_idempotent(empty_database_url: str) -> None:
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        first = migrate(conn, "public")
        second = migrate(conn, "public")
        assert [m.version for m in first] == list(range(1, latest_version() + 1))
        assert second == []
        assert applied_version(conn, "public") == latest_version()
        assert read_status(conn, "public").schema_version == latest_version()
        row = conn.execute("SELECT count(*) FROM outbox_schema_version").fetchone()
        assert row == (latest_version(),)


def test_a_custom_schema_works_end_to_end(
    empty_database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
) -> None:
    queue = bind_queue("order.*")
    schema = "outbox_custom"
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        migrate(conn, schema)
        assert applied_version(conn, schema) == latest_version()
        # Nothing leaked into public.
        assert applied_version(conn, "public") is None
    with psycopg.connect(empty_database_url) as conn:
        ids = [
            str(
                outbox_relay.emit(
                    conn, "order.created", payload={"seq": n}, aggregate_id="c", schema=schema
                )
            )
            for n in (1, 2)
        ]
        row = conn.execute(
            f"SELECT {schema}.outbox_emit('order.updated', 'c', '{{\"seq\": 3}}')::text"
        ).fetchone()
        assert row is not None
        ids.append(row[0])

    settings = relay_settings(empty_database_url, broker_url, exchange, schema=schema)
    with RelayThread(settings):
        deliveries = collect(queue, 3)
        wait_until(lambda: scalar(empty_database_url, f"SELECT count(*) FROM {schema}.outbox") == 0)
        with psycopg.connect(empty_database_url, autocommit=True) as conn:
            status = read_status(conn, schema)
    assert [d.event_id for d in deliveries] == ids
    assert [d.json()["seq"] for d in deliveries] == [1, 2, 3]
    assert status.leader_pid is not None
    assert status.relays_connected == 1
    assert status.published_last_minute == 3


def test_relays_of_two_schemas_in_one_database_both_lead_each_on_its_own_outbox(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrate(conn, "outbox_other")
    with psycopg.connect(database_url) as conn:
        outbox_relay.emit(conn, "order.created", payload={"in": "other"}, schema="outbox_other")
        outbox_relay.emit(conn, "order.created", payload={"in": "public"})

    public = RelayThread(relay_settings(database_url, broker_url, exchange, schema="public"))
    with public:
        deliveries = collect(queue, 1)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM public.outbox") == 0)
        # The public relay never touched the other schema's outbox...
        assert [d.json() for d in deliveries] == [{"in": "public"}]
        assert scalar(database_url, "SELECT count(*) FROM outbox_other.outbox") == 1
        # ...and a relay for it leads alongside (leadership is per schema).
        other = relay_settings(database_url, broker_url, exchange, schema="outbox_other")
        with RelayThread(other) as other_relay:
            deliveries += collect(queue, 1)
            assert other_relay.leading
            assert public.leading
    assert [d.json() for d in deliveries] == [{"in": "public"}, {"in": "other"}]


def test_a_migration_waiting_for_a_lock_lets_go_and_retries(
    database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay's open batch holds a lock on the outbox: the migration must not queue behind it
    for long (producers' inserts would queue behind the migration), but retry until it is free."""
    extra = Migration(
        latest_version() + 1, "add_column", "ALTER TABLE {{schema}}.outbox ADD COLUMN x int;"
    )
    monkeypatch.setattr(migrations, "available_migrations", lambda: [*REAL_MIGRATIONS, extra])
    monkeypatch.setattr(migrations, "LOCK_TIMEOUT", "100ms")
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT id FROM outbox FOR UPDATE")  # what a relay's claim holds
        release = threading.Timer(2.0, holder.rollback)
        release.start()
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                applied = migrate(conn, "public")
        finally:
            release.join()
    assert [m.name for m in applied] == ["add_column"]
    assert "migration waits for a lock" in caplog.text


def test_migrate_needs_no_create_right_once_the_schema_exists(database_url: str) -> None:
    """An owner on a managed service: owns its schema, may not create schemas in the database."""
    role = f"t_owner_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(sql.SQL("CREATE SCHEMA owned AUTHORIZATION {}").format(sql.Identifier(role)))
    try:
        owner_url = conninfo.make_conninfo(database_url, user=role)
        with psycopg.connect(owner_url, autocommit=True) as conn:
            first = migrate(conn, "owned")
            again = migrate(conn, "owned")
        assert [m.version for m in first] == list(range(1, latest_version() + 1))
        assert again == []
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
