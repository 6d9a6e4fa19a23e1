"""The migration files themselves: numbering and their rolling-upgrade compatibility markers."""

from __future__ import annotations

from outbox_relay.db.migrations import Migration, SchemaState, available_migrations, version_problem


def test_migrations_are_numbered_without_gaps() -> None:
    versions = [m.version for m in available_migrations()]
    assert versions == list(range(1, len(versions) + 1))


def test_a_migration_without_a_marker_is_breaking() -> None:
    assert Migration(7, "x", "ALTER TABLE t ADD c int;").relay_compatible_from == 7


def test_a_marker_lets_older_relays_run_but_never_names_a_later_version() -> None:
    assert Migration(7, "x", "-- relay-compatible-from: 5\nSELECT 1;").relay_compatible_from == 5
    assert Migration(7, "x", "-- relay-compatible-from: 9\nSELECT 1;").relay_compatible_from == 7


def test_the_emit_change_keeps_relays_of_the_previous_schema_working() -> None:
    emit = next(m for m in available_migrations() if m.name == "emit_without_returning")
    assert emit.relay_compatible_from < emit.version


def test_version_problem_accepts_exactly_the_compatible_schemas() -> None:
    latest = available_migrations()[-1].version
    assert version_problem("public", SchemaState(latest, latest)) is None
    assert version_problem("public", SchemaState(latest + 3, latest)) is None
    assert "upgrade outbox-relay" in str(
        version_problem("public", SchemaState(latest + 1, latest + 1))
    )
    assert "run `outbox-relay migrate`" in str(
        version_problem("public", SchemaState(latest - 1, 1))
    )
    assert "no outbox tables" in str(version_problem("public", None))
