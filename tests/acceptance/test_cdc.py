"""``outbox-relay serve --mode cdc`` as a user runs it: the core issue's 10,000-event scenario
(8 producers, 200 aggregates) through SIGKILLs and a broker restart, a second relay taking over the
slot, and the slot's status / drop commands.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg import conninfo, sql

from tests.acceptance.conftest import (
    DeliveryReport,
    QueueConsumer,
    RelayProcess,
    Workload,
    check_deliveries,
    cli_env,
    rabbitmq_start_app,
    rabbitmq_stop_app,
    read_status,
    run_cli,
)
from tests.cdc_support import drop_slot_eventually, slot_row, unique_slot_name
from tests.conftest import RabbitQueue, wait_until

pytestmark = pytest.mark.acceptance

BATCH_SIZE = 500
TOTAL = 10_000
STREAMING = "streaming replication slot"


@pytest.fixture
def slot(database_url: str) -> Iterator[str]:
    name = unique_slot_name()
    yield name
    drop_slot_eventually(database_url, name)


@pytest.fixture
def cdc_env(slot: str, database_url: str, broker_url: str, exchange: str) -> dict[str, str]:
    """The environment for CLI runs; ``slot`` comes first so it is dropped after the relays
    (relay_factory) are killed."""
    return cli_env(
        database_url=database_url,
        broker_url=broker_url,
        exchange=exchange,
        mode="cdc",
        slot_name=slot,
        publication=slot,
        batch_size=BATCH_SIZE,
        poll_interval=0.5,
        heartbeat_interval=1,
    )


def test_10k_events_survive_sigkills_in_cdc_mode_exactly_once_per_commit_order(
    cdc_env: dict[str, str],
    broker_url: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
    workload: Callable[..., Workload],
    consume: Callable[[str, str], QueueConsumer],
) -> None:
    queue = bind_queue("#")
    consumer = consume(broker_url, queue.name)
    relay = relay_factory(cdc_env).start()
    relay.wait_for_log(STREAMING)
    load = workload(total=TOTAL, producers=8, aggregates=200).start()

    mid_stream = []
    for received in (2_000, 5_000):
        wait_until(lambda r=received: consumer.unique_count() >= r, timeout=90)
        mid_stream.append(load.produced_count() < TOTAL)
        relay.kill()
        relay.restart()
        relay.wait_for_log(STREAMING, count=relay.starts)

    report = finish(relay, load, consumer, queue, cdc_env)

    assert mid_stream[0], "the first SIGKILL came after producers had finished"
    assert relay.starts == 3
    # Only what was in flight when the relay died can be published twice.
    assert report.relay_duplicates <= BATCH_SIZE * 2


@pytest.mark.disruptive
def test_10k_events_survive_a_sigkill_and_a_broker_restart_in_cdc_mode(
    cdc_env: dict[str, str],
    broker_url: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
    workload: Callable[..., Workload],
    consume: Callable[[str, str], QueueConsumer],
) -> None:
    queue = bind_queue("#")
    consumer = consume(broker_url, queue.name)
    relay = relay_factory(cdc_env).start()
    relay.wait_for_log(STREAMING)
    load = workload(total=TOTAL, producers=8, aggregates=200).start()

    wait_until(lambda: consumer.unique_count() >= 1_500, timeout=90)
    relay.kill()
    relay.restart()
    wait_until(lambda: consumer.unique_count() >= 4_000, timeout=90)
    # Mid-stream: events still to deliver (producers may or may not be done by now: how fast
    # the relay catches up after the SIGKILL depends on the machine's load).
    broker_stopped_mid_stream = consumer.unique_count() < TOTAL
    try:
        rabbitmq_stop_app()
        relay.wait_for_log("cannot connect, retrying", timeout=60)
    finally:
        rabbitmq_start_app()

    report = finish(relay, load, consumer, queue, cdc_env)

    assert broker_stopped_mid_stream, "RabbitMQ stopped after every event had arrived"
    assert consumer.reconnects > 0  # the broker really went away
    assert relay.starts == 2  # the broker restart was ridden out without a restart
    assert report.relay_duplicates <= BATCH_SIZE * 2


def finish(
    relay: RelayProcess,
    load: Workload,
    consumer: QueueConsumer,
    queue: RabbitQueue,
    env: dict[str, str],
) -> DeliveryReport:
    load.join()
    produced = set(load.produced)
    wait_until(lambda: consumer.has_all(produced), timeout=120)
    status = wait_until(lambda: (s := read_status(env))["pending"] == 0 and s, 30)
    assert status["slot_active"] is True
    assert status["dead"] == 0
    assert relay.terminate() == 0, relay.log()[-4000:]
    wait_until(lambda: queue.count() == 0, timeout=30)
    consumer.stop()
    assert "Traceback" not in relay.log()
    return check_deliveries(consumer.deliveries, load.produced, load.versions())


def test_a_second_relay_holds_no_shard_and_takes_over_the_slot_when_the_first_dies(
    cdc_env: dict[str, str],
    database_url: str,
    slot: str,
    broker_url: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
) -> None:
    queue = bind_queue("#")
    first = relay_factory(cdc_env).start()
    first.wait_for_log(STREAMING)
    second = relay_factory(cdc_env).start()
    # One CDC shard (the default): the second relay joins, holds nothing, streams nothing.
    second.wait_for_log("joined the relays of this outbox")
    assert STREAMING not in second.log()

    first.kill()
    second.wait_for_log(STREAMING, timeout=30)
    event_id = emit_cli(cdc_env, "order.created", "T-1")

    wait_until(lambda: queue.count() == 1, timeout=20)
    (_method, props, _body) = queue.drain()[0]
    assert props.message_id == event_id
    row = slot_row(database_url, slot)
    assert row is not None
    assert row["active"]


def test_status_shows_the_slot_and_slot_drop_removes_it(
    cdc_env: dict[str, str],
    database_url: str,
    slot: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
) -> None:
    queue = bind_queue("#")
    relay = relay_factory(cdc_env).start()
    relay.wait_for_log(STREAMING)
    emit_cli(cdc_env, "order.created", "Z-1")
    wait_until(lambda: queue.count() == 1, timeout=20)

    status = read_status(cdc_env)
    assert status["slot_name"] == slot
    assert status["slot_active"] is True
    assert "/" in status["slot_confirmed_flush_lsn"]
    assert isinstance(status["slot_retained_wal_bytes"], int)
    over = run_cli("status", "--json", "--fail-on-wal-bytes", "0", env=cdc_env)
    assert over.returncode == 6, over.stderr
    assert json.loads(over.stdout)["lagging"] is True
    refused = run_cli("slot", "drop", env=cdc_env)
    assert refused.returncode != 0
    assert "stop the relay" in refused.stderr

    assert relay.terminate() == 0
    wait_until(lambda: not (s := slot_row(database_url, slot)) or not s["active"], timeout=15)
    dropped = run_cli("slot", "drop", "--with-publication", env=cdc_env)

    assert dropped.returncode == 0, dropped.stderr
    assert f"replication slot {slot!r}: dropped" in dropped.stdout
    assert slot_row(database_url, slot) is None
    after = read_status(cdc_env)
    assert [after[k] for k in ("slot_name", "slot_active", "slot_retained_wal_bytes")] == [
        None,
        None,
        None,
    ]


def test_migrate_cdc_creates_the_publication_and_slot_once(
    cdc_env: dict[str, str], database_url: str, slot: str
) -> None:
    first = run_cli("migrate", "--cdc", env=cdc_env)
    again = run_cli("migrate", "--cdc", env=cdc_env)

    assert first.returncode == 0, first.stderr
    assert f"publication {slot!r}: created" in first.stdout
    assert f"replication slot {slot!r}: created" in first.stdout
    assert again.returncode == 0, again.stderr
    assert f"replication slot {slot!r}: already there" in again.stdout
    row = slot_row(database_url, slot)
    assert row is not None
    assert row["active"] is False


def emit_cli(env: dict[str, str], event_type: str, aggregate_id: str) -> str:
    done = run_cli("emit", event_type, "--aggregate-id", aggregate_id, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_role_without_replication_gets_a_clear_error_naming_the_fix(
    cdc_env: dict[str, str], database_url: str
) -> None:
    migrated = run_cli("migrate", "--cdc", env=cdc_env)  # as the superuser: publication and slot
    assert migrated.returncode == 0, migrated.stderr
    role = f"outbox_norepl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOREPLICATION").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}"
            ).format(sql.Identifier(role))
        )
    try:
        env = {
            **cdc_env,
            "OUTBOX_RELAY_DATABASE_URL": conninfo.make_conninfo(database_url, user=role),
        }
        done = run_cli("serve", env=env, timeout=60)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))

    assert done.returncode == 3, done.stderr
    assert "ALTER ROLE <role> REPLICATION" in done.stderr
    assert "Traceback" not in done.stderr


def test_status_and_slot_commands_cover_every_cdc_shard(
    cdc_env: dict[str, str], database_url: str, slot: str
) -> None:
    # Given an outbox with 3 CDC shards (a slot and a publication each)
    made = run_cli("migrate", "--cdc", "--cdc-shards", "3", env=cdc_env)
    assert made.returncode == 0, made.stderr
    names = [slot, f"{slot}_s1", f"{slot}_s2"]
    try:
        # Then status lists each shard's slot, and the WAL limit watches all of them
        status = read_status(cdc_env)
        assert [s["slot"] for s in status["slots"]] == names
        assert [s["shard"] for s in status["slots"]] == [0, 1, 2]
        assert status["slot_name"] == slot
        over = run_cli("status", "--json", "--fail-on-wal-bytes", "0", env=cdc_env)
        assert over.returncode == 6, over.stderr
        shown = run_cli("slot", "status", "--json", env=cdc_env)
        assert shown.returncode == 0, shown.stderr
        report = json.loads(shown.stdout)
        assert report["name"] == slot
        assert [s["slot"] for s in report["shards"]] == names
        text = run_cli("slot", "status", env=cdc_env)
        assert all(f"replication slot {name!r}: inactive" in text.stdout for name in names)
        # And slot drop --with-publication removes every shard's slot and publication
        dropped = run_cli("slot", "drop", "--with-publication", env=cdc_env)
        assert dropped.returncode == 0, dropped.stderr
        assert all(slot_row(database_url, name) is None for name in names)
        with psycopg.connect(database_url) as conn:
            left = conn.execute(
                "SELECT count(*) FROM pg_publication WHERE pubname = ANY(%s)", (names,)
            ).fetchone()
        assert left == (0,)
        assert read_status(cdc_env)["slots"] == []
    finally:
        for name in names[1:]:
            drop_slot_eventually(database_url, name)


def published_columns(database_url: str, publication: str) -> tuple[list[str], str | None]:
    """The outbox columns a publication streams, and its row filter."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT attnames, rowfilter FROM pg_publication_tables"
            " WHERE pubname = %s AND tablename = 'outbox'",
            (publication,),
        ).fetchone()
    assert row is not None, f"publication {publication!r} does not cover the outbox"
    return list(row[0]), row[1]


def test_publications_stream_the_id_column_only_and_old_ones_are_narrowed(
    cdc_env: dict[str, str], database_url: str, slot: str
) -> None:
    # Given a publication as an earlier version made it (every column) for shard 1 of 2
    old = f"{slot}_s1"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE PUBLICATION {} FOR TABLE public.outbox WHERE (mod(coalesce("
                "hashtext(aggregate_id), uuid_hash(event_id)) & 1023, 2) = 1)"
                " WITH (publish = 'insert')"
            ).format(sql.Identifier(old))
        )
    assert len(published_columns(database_url, old)[0]) > 1
    try:
        # When migrate --cdc makes shard 0's and meets shard 1's
        made = run_cli("migrate", "--cdc", "--cdc-shards", "2", env=cdc_env)
        assert made.returncode == 0, made.stderr

        # Then both stream the id only, each keeping its shard's row filter
        for name, shard in ((slot, 0), (old, 1)):
            columns, row_filter = published_columns(database_url, name)
            assert columns == ["id"]
            assert row_filter is not None
            assert f"= {shard})" in row_filter
    finally:
        dropped = run_cli("slot", "drop", "--with-publication", env=cdc_env)
        assert dropped.returncode == 0, dropped.stderr
