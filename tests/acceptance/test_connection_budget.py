"""A connection budget for many outboxes: one ``serve --config`` process relaying every tenant
schema of a database stays within ``max_db_connections`` to it (the outboxes share a claiming
pool, one lease connection and one LISTEN connection), and its relays share one RabbitMQ
connection (a channel each), one NATS connection, one Redis client."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pika
import psycopg
import pytest

from outbox_relay.db.migrations import migrate
from outbox_relay.publishers.redis_streams import SHARED_CONNECTIONS
from tests.acceptance.conftest import QueueConsumer, RelayProcess, cli_env
from tests.acceptance.sinks import NatsSink, RedisSink
from tests.conftest import rabbit_cleanup, wait_until

pytestmark = pytest.mark.acceptance

TENANTS = 30
BUDGET = 6
EVENTS_PER_TENANT = 20


class ConnectionSampler:
    """The most connections the relay held to the database, sampled every 50 ms."""

    def __init__(self, database_url: str, application_name: str) -> None:
        self.most = 0
        self._url = database_url
        self._name = application_name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with psycopg.connect(self._url, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name LIKE %s",
                    (self._name,),
                ).fetchone()
                assert row is not None
                self.most = max(self.most, int(row[0]))
                time.sleep(0.05)


def broker_connections_of(pid: int, port: int) -> int:
    """TCP connections process ``pid`` holds to ``port`` (the broker's)."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return sum(1 for line in out.splitlines() if f"pid={pid}," in line)


def test_thirty_tenant_schemas_share_a_budget_of_six_connections_and_one_broker_connection(
    tmp_path: Path,
    database_url: str,
    broker_url: str,
    exchange: str,
    relay_factory: Callable[..., RelayProcess],
    consume: Callable[[str, str], QueueConsumer],
) -> None:
    # Given 30 migrated tenant schemas, each with a backlog, and a file relaying them all with a
    # budget of 6 connections to their database
    prefix = f"b{uuid.uuid4().hex[:8]}_"
    sent: set[str] = set()
    with psycopg.connect(database_url, autocommit=True) as conn:
        for n in range(TENANTS):
            schema = f"{prefix}{n:02d}"
            migrate(conn, schema)
            rows = conn.execute(
                f"INSERT INTO {schema}.outbox (event_type, aggregate_type, aggregate_id, payload)"
                " SELECT 'order.created', 'order', 'a' || (g %% 3), '{}'::jsonb"
                " FROM generate_series(1, %s) AS g RETURNING event_id",
                (EVENTS_PER_TENANT,),
            ).fetchall()
            sent |= {str(row[0]) for row in rows}
    path = tmp_path / "relay.toml"
    path.write_text(
        "[[outbox]]\n"
        'name = "tenants"\n'
        'database_url = "${TEST_DB}"\n'
        f'schemas = "{prefix}*"\n'
        f'exchange = "{exchange}"\n'
        f"max_db_connections = {BUDGET}\n"
        "poll_interval = 0.5\n"
    )
    env = {**cli_env(), "TEST_DB": database_url, "OUTBOX_RELAY_BROKER_URL": broker_url}
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    queue = f"q.test.{prefix}"
    connection.channel().queue_declare(queue, durable=True)
    connection.channel().queue_bind(queue, exchange, "order.*")
    connection.close()
    consumer = consume(broker_url, queue)

    try:
        with ConnectionSampler(database_url, "outbox-relay%") as sampled:
            relay = relay_factory(env, "--config", str(path)).start()
            # When it drains every tenant, then idles a while
            wait_until(lambda: consumer.has_all(sent), timeout=120)
            late = emit_late(database_url, f"{prefix}07")
            wait_until(lambda: consumer.has_all({late}), timeout=30)
            time.sleep(2)

            # Then every event arrived with at most 6 connections to the database
            assert sampled.most <= BUDGET, f"{sampled.most} connections for a budget of {BUDGET}"
            assert sampled.most >= 3  # it was measured: leases, LISTEN and claiming at least
            # and the 30 relays publish on one RabbitMQ connection
            assert relay.process is not None
            port = urlsplit(broker_url).port or 5672
            assert broker_connections_of(relay.process.pid, port) == 1
            for n in range(TENANTS):
                assert f"found schema '{prefix}{n:02d}'" in relay.log()
        assert relay.terminate() == 0
        assert "Traceback" not in relay.log()
    finally:
        rabbit_cleanup(broker_url, lambda ch: ch.queue_delete(queue))
        with psycopg.connect(database_url, autocommit=True) as conn:
            for n in range(TENANTS):
                conn.execute(f"DROP SCHEMA IF EXISTS {prefix}{n:02d} CASCADE")


def emit_late(database_url: str, schema: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            f"INSERT INTO {schema}.outbox (event_type, aggregate_type, aggregate_id, payload)"
            " VALUES ('order.created', 'order', 'late', '{}') RETURNING event_id"
        ).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("broker", ["nats", "redis"])
def test_outboxes_on_one_nats_or_redis_server_share_its_connection(
    broker: str,
    tmp_path: Path,
    database_url: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    # Given three outboxes (schemas of one database) on one NATS or Redis server
    sink = NatsSink() if broker == "nats" else RedisSink()
    prefix = f"s{uuid.uuid4().hex[:8]}_"
    sent: set[str] = set()
    with psycopg.connect(database_url, autocommit=True) as conn:
        for n in range(3):
            migrate(conn, f"{prefix}{n}")
            rows = conn.execute(
                f"INSERT INTO {prefix}{n}.outbox (event_type, aggregate_type, aggregate_id,"
                " payload) SELECT 'order.created', 'order', 'a', '{}'::jsonb"
                " FROM generate_series(1, 20) RETURNING event_id"
            ).fetchall()
            sent |= {str(row[0]) for row in rows}
    options = "".join(f'{key} = "{value}"\n' for key, value in sink.options().items())
    path = tmp_path / "relay.toml"
    path.write_text(
        f'[defaults]\ndatabase_url = "${{TEST_DB}}"\n{options}'
        + "".join(f'[[outbox]]\nname = "o{n}"\nschema = "{prefix}{n}"\n' for n in range(3))
    )
    sink.start()
    try:
        relay = relay_factory({**cli_env(), "TEST_DB": database_url}, "--config", str(path))
        relay.start()
        # When they have relayed their events
        wait_until(lambda: sink.count() >= len(sent), timeout=60)
        assert {r.event_id for r in sink.received()} >= sent
        # Then the process holds one connection to the server for all three (Redis: the
        # shared client's two, one pipeline on the wire while the next is sent)
        assert relay.process is not None
        port = int(urlsplit(sink.options()["broker_url"]).port or 0)
        most = 1 if broker == "nats" else SHARED_CONNECTIONS
        assert 1 <= broker_connections_of(relay.process.pid, port) <= most
        assert relay.terminate() == 0
        assert "Traceback" not in relay.log()
    finally:
        sink.cleanup()
        with psycopg.connect(database_url, autocommit=True) as conn:
            for n in range(3):
                conn.execute(f"DROP SCHEMA IF EXISTS {prefix}{n} CASCADE")
