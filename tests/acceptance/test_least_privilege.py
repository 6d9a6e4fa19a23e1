"""``outbox-relay migrate --grants``: an application role that may only add events and a relay
role with exactly what the relay needs, used as a user would (the CLI, plain SQL, the relay
running as that role in notify and cdc modes).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from tests.acceptance.conftest import RelayProcess, Roles, cli_env, run_cli
from tests.cdc_support import drop_slot_eventually, unique_slot_name
from tests.conftest import RabbitQueue, wait_until

pytestmark = pytest.mark.acceptance


def run_grants(env: dict[str, str], roles: Roles, *extra: str) -> Any:
    """``outbox-relay migrate --grants`` for this test's roles, as whoever ``env`` logs in as."""
    return run_cli(
        "migrate", "--grants", "--app-role", roles.app, "--relay-role", roles.relay, *extra, env=env
    )


def grant(database_url: str, roles: Roles, *extra: str) -> str:
    done = run_grants(cli_env(database_url=database_url), roles, *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout


def add_login(database_url: str, roles: Roles) -> str:
    """An application's own login role, given the insert right the way the docs say."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                sql.Identifier(roles.login), sql.Identifier(roles.app)
            )
        )
    return roles.url(database_url, roles.login)


def refused(url: str, statement: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            conn.execute(statement.encode())
        except errors.InsufficientPrivilege:
            return True
    return False


def test_the_app_role_may_only_insert_events(database_url: str, roles: Roles) -> None:
    output = grant(database_url, roles)
    assert f"role {roles.app!r}: created (NOLOGIN)" in output
    assert f"role {roles.relay!r}: created (LOGIN)" in output
    app_url = add_login(database_url, roles)

    event_id = uuid.uuid4()
    with psycopg.connect(app_url) as conn:
        conn.execute(
            "INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload)"
            " VALUES ('order.created', 'order', '1', '{\"order_id\": 1}')"
        )
        row = conn.execute(
            "SELECT outbox_emit('order.paid', '1', '{}', 'order', '{}', %s)", (event_id,)
        ).fetchone()
        assert row == (event_id,)

    for statement in (
        "SELECT event_id FROM outbox",
        "UPDATE outbox SET attempts = 0",
        "DELETE FROM outbox",
        "TRUNCATE outbox",
        "SELECT * FROM outbox_relay_stats",
        "INSERT INTO outbox_relay_wakeup VALUES (true, now())",
        "INSERT INTO outbox_relay_listeners VALUES ('app', now() + interval '1 hour')",
        "CREATE TABLE outbox_shadow (id int)",
        # Only the producer's columns: no explicit id (it would collide with a later one), no
        # relay bookkeeping (an event born sent, dead or backing off).
        "INSERT INTO outbox (id, event_type, payload) VALUES (10000, 'a.b', '{}')",
        "INSERT INTO outbox (event_type, payload, published_at) VALUES ('a.b', '{}', now())",
        "INSERT INTO outbox (event_type, payload, dead_at) VALUES ('a.b', '{}', now())",
        "INSERT INTO outbox (event_type, payload, attempts) VALUES ('a.b', '{}', 99)",
        "INSERT INTO outbox (event_type, payload, next_attempt_at)"
        " VALUES ('a.b', '{}', now() + interval '1 year')",
        "INSERT INTO outbox (event_type, payload, last_error) VALUES ('a.b', '{}', 'x')",
        # Nothing of the relays' share of the outbox: it cannot take, hold or fake a lease.
        "SELECT * FROM outbox_relay_leases",
        "UPDATE outbox_relay_leases SET relay = 'app'",
        "SELECT * FROM outbox_relay_leases FOR KEY SHARE",
        "INSERT INTO outbox_relay_members (relay, pid, backend_start) VALUES ('x', 1, now())",
        "DELETE FROM outbox_relay_members",
    ):
        assert refused(app_url, statement), statement
    with psycopg.connect(database_url) as conn:
        types = conn.execute("SELECT event_type FROM outbox ORDER BY id").fetchall()
    assert types == [("order.created",), ("order.paid",)]


def test_the_relay_runs_as_the_relay_role(
    database_url: str,
    roles: Roles,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
) -> None:
    grant(database_url, roles)
    app_url = add_login(database_url, roles)
    relay_url = roles.url(database_url, roles.relay)
    queue = bind_queue("order.*")
    env = cli_env(database_url=relay_url, broker_url=broker_url, exchange=exchange)
    relay = relay_factory(env, "--poll-interval", "0.2").start()
    relay.wait_for_log("holding 64 of 64 partitions")

    with psycopg.connect(app_url) as conn:
        for number in range(20):
            conn.execute(
                "SELECT outbox_emit('order.created', %s, %s)",
                (str(number % 3), json.dumps({"n": number})),
            )
            conn.commit()
    got: list[bytes] = []
    wait_until(lambda: got.extend(body for *_, body in queue.drain()) or len(got) >= 20)
    assert [json.loads(body)["n"] for body in got] == list(range(20))
    wait_until(lambda: json.loads(run_cli("status", "--json", env=env).stdout)["pending"] == 0)
    assert relay.terminate() == 0
    assert "permission denied" not in relay.log()

    # What the relay may not do: write or change events, change the schema, stream the WAL.
    assert refused(relay_url, "INSERT INTO outbox (event_type, payload) VALUES ('a.b', '{}')")
    assert refused(relay_url, "UPDATE outbox SET payload = '{}'")
    assert refused(relay_url, "UPDATE outbox SET event_type = 'order.refunded'")
    assert refused(relay_url, "UPDATE outbox SET headers = '{}', aggregate_id = 'other'")
    assert refused(relay_url, "TRUNCATE outbox")
    assert refused(relay_url, "CREATE TABLE relay_shadow (id int)")
    assert refused(relay_url, "DROP TABLE outbox")
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT rolreplication, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles"
            " WHERE rolname = %s",
            (roles.relay,),
        ).fetchone()
    assert row == (False, False, False, False)


def test_the_relay_role_keeps_sent_events_in_partitions_it_may_not_touch_otherwise(
    database_url: str,
    roles: Roles,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
) -> None:
    grant(database_url, roles)
    app_url = add_login(database_url, roles)
    relay_url = roles.url(database_url, roles.relay)
    queue = bind_queue("order.*")
    env = cli_env(database_url=relay_url, broker_url=broker_url, exchange=exchange)
    relay = relay_factory(
        env, "--poll-interval", "0.2", "--on-sent", "keep", "--retention", "1h"
    ).start()
    relay.wait_for_log("holding 64 of 64 partitions")
    with psycopg.connect(app_url) as conn:
        for number in range(10):
            conn.execute(
                "SELECT outbox_emit('order.created', '1', %s)", (json.dumps({"n": number}),)
            )
            conn.commit()
    got: list[bytes] = []
    wait_until(lambda: got.extend(body for *_, body in queue.drain()) or len(got) >= 10)
    wait_until(lambda: json.loads(run_cli("status", "--json", env=env).stdout)["pending"] == 0)
    # Made by the relay role through the owner's function: partitions an hour ahead.
    wait_until(
        lambda: (
            json.loads(run_cli("status", "--json", env=env).stdout)["storage"]["retention_seconds"]
            == 3600
        )
    )
    assert relay.terminate() == 0
    assert "permission denied" not in relay.log()
    assert "vacuuming it is left to autovacuum" in relay.log()
    with psycopg.connect(database_url) as conn:
        kept = conn.execute("SELECT payload->>'n' FROM outbox_sent ORDER BY id").fetchall()
        partition = conn.execute("SELECT name FROM outbox_sent_partitions LIMIT 1").fetchone()
    assert [int(n) for (n,) in kept] == list(range(10))
    assert partition is not None

    # The relay may add kept events and drop expired partitions, never change or delete them.
    assert refused(relay_url, "UPDATE outbox_sent SET payload = '{}'")
    assert refused(relay_url, "DELETE FROM outbox_sent")
    assert refused(relay_url, "TRUNCATE outbox_sent")
    assert refused(relay_url, f"DROP TABLE {partition[0]}")
    assert refused(relay_url, "DELETE FROM outbox_sent_partitions")
    # The application role may neither read kept events nor manage partitions.
    assert refused(app_url, "SELECT * FROM outbox_sent")
    assert refused(app_url, "SELECT * FROM outbox_history")
    assert refused(app_url, "SELECT outbox_sent_drop_before(now())")
    assert refused(app_url, "SELECT outbox_sent_cover(now(), now(), interval '1 hour')")


def test_the_cdc_relay_runs_as_the_relay_role_with_replication(
    database_url: str,
    roles: Roles,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
) -> None:
    slot = unique_slot_name()
    try:
        output = grant(database_url, roles, "--cdc", "--slot-name", slot, "--publication", slot)
        assert "REPLICATION" in output
        app_url = add_login(database_url, roles)
        queue = bind_queue("order.*")
        env = cli_env(
            database_url=roles.url(database_url, roles.relay),
            broker_url=broker_url,
            exchange=exchange,
            mode="cdc",
            slot_name=slot,
            publication=slot,
            heartbeat_interval=1,
        )
        relay = relay_factory(env).start()
        relay.wait_for_log("streaming replication slot")
        with psycopg.connect(app_url) as conn:
            for number in range(10):
                conn.execute(
                    "SELECT outbox_emit('order.created', 'a', %s)", (json.dumps({"n": number}),)
                )
                conn.commit()
        got: list[bytes] = []
        wait_until(lambda: got.extend(body for *_, body in queue.drain()) or len(got) >= 10)
        assert [json.loads(body)["n"] for body in got] == list(range(10))
        assert relay.terminate() == 0
    finally:
        drop_slot_eventually(database_url, slot)


def test_grants_are_exact_on_every_run(database_url: str, roles: Roles) -> None:
    slot = unique_slot_name()
    grant(database_url, roles, "--cdc", "--slot-name", slot, "--publication", slot)
    drop_slot_eventually(database_url, slot)
    relay_url = roles.url(database_url, roles.relay)
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Rights someone added by hand, outside the listed ones.
        conn.execute(sql.SQL("GRANT TRUNCATE ON outbox TO {}").format(sql.Identifier(roles.relay)))
    second = grant(database_url, roles)
    assert "created" not in second  # the roles exist: nothing is created twice

    with psycopg.connect(database_url) as conn:
        rights = conn.execute(
            "SELECT privilege_type FROM information_schema.role_table_grants"
            " WHERE grantee = %s AND table_name = 'outbox' ORDER BY 1",
            (roles.relay,),
        ).fetchall()
        columns = conn.execute(
            "SELECT privilege_type, column_name FROM information_schema.column_privileges"
            " WHERE grantee = %s AND table_name = 'outbox' AND privilege_type = 'UPDATE'"
            " ORDER BY 2",
            (roles.relay,),
        ).fetchall()
        replication = conn.execute(
            "SELECT rolreplication FROM pg_roles WHERE rolname = %s", (roles.relay,)
        ).fetchone()
    assert rights == [("DELETE",), ("SELECT",)]
    # Only the bookkeeping columns may change: never an event's type, payload or headers.
    assert [name for _kind, name in columns] == [
        "attempts",
        "dead_at",
        "last_error",
        "next_attempt_at",
        "published_at",
    ]
    assert replication == (False,)  # REPLICATION only while the grants are for --cdc
    assert refused(relay_url, "TRUNCATE outbox")


def test_grants_refuse_a_superuser_role(database_url: str) -> None:
    done = run_cli(
        "migrate", "--grants", "--relay-role", "postgres", env=cli_env(database_url=database_url)
    )
    assert done.returncode == 3
    assert "'postgres' is a superuser" in done.stderr
    assert "Traceback" not in done.stderr


def test_migrate_as_the_relay_role_says_who_may(database_url: str, roles: Roles) -> None:
    grant(database_url, roles)
    done = run_cli(
        "migrate",
        "--schema",
        "elsewhere",
        env=cli_env(database_url=roles.url(database_url, roles.relay)),
    )
    assert done.returncode == 3
    assert "as the database owner" in done.stderr
    assert "Traceback" not in done.stderr


def test_grants_without_createrole_say_how_to_make_the_roles(
    database_url: str, roles: Roles
) -> None:
    """An owner that may create tables but not roles: the roles must be made by someone else."""
    done = run_grants(_owner_env(database_url, roles), roles)
    assert done.returncode == 3
    assert "CREATEROLE" in done.stderr
    assert f"CREATE ROLE {roles.app} NOLOGIN" in done.stderr
    assert "Traceback" not in done.stderr


def _owner_env(database_url: str, roles: Roles, *attributes: str) -> dict[str, str]:
    """An ordinary role (no superuser) that owns a schema ``owned``, as on managed PostgreSQL."""
    owner = roles.login  # dropped by the roles fixture
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN " + " ".join(attributes)).format(sql.Identifier(owner))
        )
        conn.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(conn.info.dbname), sql.Identifier(owner)
            )
        )
    env = cli_env(database_url=roles.url(database_url, owner), schema="owned")
    assert run_cli("migrate", env=env).returncode == 0
    return env


def _may_replicate(database_url: str, role: str) -> bool:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT rolreplication FROM pg_roles WHERE rolname = %s", (role,)
        ).fetchone()
    return bool(row and row[0])


def test_cdc_grants_without_a_superuser_keep_the_rights_and_say_who_sets_replication(
    database_url: str, roles: Roles
) -> None:
    env = _owner_env(database_url, roles, "CREATEROLE")
    done = run_grants(env, roles)
    assert done.returncode == 0, done.stderr
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} REPLICATION").format(sql.Identifier(roles.relay)))
    # Plain --grants may not remove the attribute either: it says so and succeeds.
    done = run_grants(env, roles)
    assert done.returncode == 0, done.stderr
    assert "keeps REPLICATION" in done.stderr
    assert _may_replicate(database_url, roles.relay)

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} NOREPLICATION").format(sql.Identifier(roles.relay)))
    grants_only = _apply_cdc_grants_without_slot(database_url, env, roles)
    assert grants_only.returncode == 3
    assert f'have a superuser run ALTER ROLE "{roles.relay}" REPLICATION' in grants_only.stderr
    assert "rds_replication" in grants_only.stderr
    assert "Traceback" not in grants_only.stderr
    # The outbox rights were granted all the same: the relay role can claim rows.
    relay_url = roles.url(database_url, roles.relay)
    with psycopg.connect(relay_url) as conn:
        conn.execute("SELECT id FROM owned.outbox FOR UPDATE").fetchall()
        conn.execute("INSERT INTO owned.outbox (event_type, payload) VALUES ('a.b', '{}')")


def test_rds_replication_membership_counts_as_replication(database_url: str, roles: Roles) -> None:
    env = _owner_env(database_url, roles, "CREATEROLE")
    assert run_grants(env, roles).returncode == 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        made = conn.execute("SELECT FROM pg_roles WHERE rolname = 'rds_replication'").fetchone()
        if made is None:
            conn.execute("CREATE ROLE rds_replication NOLOGIN")
        conn.execute(sql.SQL("GRANT rds_replication TO {}").format(sql.Identifier(roles.relay)))
    try:
        done = _apply_cdc_grants_without_slot(database_url, env, roles)
        assert done.returncode == 0, done.stderr
        assert "may relay them, REPLICATION" in done.stdout
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("REVOKE rds_replication FROM {}").format(sql.Identifier(roles.relay))
            )
            if made is None:
                conn.execute("DROP ROLE rds_replication")


def _apply_cdc_grants_without_slot(database_url: str, env: dict[str, str], roles: Roles) -> Any:
    """``--grants --cdc`` as the owner, the publication and slot made first by a superuser (as
    a DBA would on a managed service, where the owner may not create slots)."""
    slot = unique_slot_name()
    try:
        admin = cli_env(database_url=database_url, schema="owned")
        made = run_cli("migrate", "--cdc", "--slot-name", slot, "--publication", slot, env=admin)
        assert made.returncode == 0, made.stderr
        return run_grants(env, roles, "--cdc", "--slot-name", slot, "--publication", slot)
    finally:
        drop_slot_eventually(database_url, slot)


def test_grants_refuse_roles_that_are_members_of_one_another(
    database_url: str, roles: Roles
) -> None:
    grant(database_url, roles)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("GRANT {} TO {}").format(sql.Identifier(roles.app), sql.Identifier(roles.relay))
        )
    done = run_grants(cli_env(database_url=database_url), roles)
    assert done.returncode == 3
    assert "members of one another" in done.stderr
