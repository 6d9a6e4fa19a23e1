"""The bench's own playground: a fresh migrated database and a dedicated exchange and queue.

Everything is created under a random name and removed at the end, so a bench run never touches
another engineer's databases, exchanges or queues.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions
import psycopg
from psycopg import sql

from outbox_relay.db.migrations import migrate

EVENT_TYPE = "bench.created"
AGGREGATE_TYPE = "bench"
PAYLOAD_BYTES = 300
# {"n": "000123", "pad": "xxx..."} as PostgreSQL renders jsonb: keys sorted by length, ", " and
# ": " separators. The pad makes the rendered text (the message body) exactly PAYLOAD_BYTES.
_PAYLOAD_SHELL = len('{"n": "000000", "pad": ""}')
PAD = "x" * (PAYLOAD_BYTES - _PAYLOAD_SHELL)


def payload_json(n: int) -> str:
    """The 300-byte payload as jsonb renders it (and so as the relay publishes it)."""
    return f'{{"n": "{n % 1_000_000:06d}", "pad": "{PAD}"}}'


# The same payload built in SQL, for bulk inserts with generate_series (g).
PAYLOAD_SQL = f"jsonb_build_object('n', lpad(mod(g, 1000000)::text, 6, '0'), 'pad', '{PAD}')"


def database_url_for(admin_url: str, dbname: str) -> str:
    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{dbname}"))


@dataclass(frozen=True)
class BenchEnv:
    admin_url: str
    database_url: str
    database: str
    broker_url: str
    exchange: str
    queue: str

    def purge_queue(self) -> int:
        """Empty the bench queue; returns how many messages it held."""
        with amqp_channel(self.broker_url) as channel:
            frame = channel.queue_purge(self.queue)
            return int(frame.method.message_count)

    def queue_depth(self) -> int:
        with amqp_channel(self.broker_url) as channel:
            frame = channel.queue_declare(self.queue, passive=True)
            return int(frame.method.message_count)


@contextmanager
def amqp_channel(url: str) -> Iterator[Any]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection.channel()
    finally:
        connection.close()


@contextmanager
def bench_env(admin_url: str, broker_url: str) -> Iterator[BenchEnv]:
    """Create bench_<random> (migrated), an exchange and a durable queue bound with '#'."""
    tag = uuid.uuid4().hex[:10]
    env = BenchEnv(
        admin_url=admin_url,
        database_url=database_url_for(admin_url, f"bench_{tag}"),
        database=f"bench_{tag}",
        broker_url=broker_url,
        exchange=f"bench.{tag}",
        queue=f"bench.{tag}",
    )
    try:
        _retrying(lambda: _create(env))
        yield env
    finally:
        _teardown(env)


def _create(env: BenchEnv) -> None:
    with psycopg.connect(env.admin_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(env.database))
        )
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(env.database)))
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        migrate(conn, "public")
    with amqp_channel(env.broker_url) as channel:
        channel.exchange_declare(env.exchange, "topic", durable=True)
        channel.queue_declare(env.queue, durable=True)
        channel.queue_bind(env.queue, env.exchange, "#")


def _retrying(action: Callable[[], None], timeout: float = 120) -> None:
    """Other engineers' disruptive tests restart the shared services: wait them out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            action()
            return
        except (psycopg.OperationalError, pika.exceptions.AMQPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def drop_replication_slot(database_url: str, slot: str, timeout: float = 60) -> bool:
    """Drop ``slot`` if it exists (False if it did not). A slot is in use for a moment after
    its relay stops (its walsender exits), and while a restarted server recovers: retried.
    A slot left behind would keep WAL on a shared server for good, so this insists."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
                ).fetchone()
                if row is None:
                    return False
                if row[0] is None:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                    return True
        except (
            psycopg.OperationalError,
            psycopg.errors.ObjectInUse,
            psycopg.errors.UndefinedObject,
        ):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"replication slot {slot!r} still in use after {timeout:.0f}s")
        time.sleep(0.2)


def _drop_slots_of(env: BenchEnv) -> None:
    """Replication slots of the bench database (a CDC run interrupted midway): DROP DATABASE
    refuses while one exists, and each keeps WAL on the shared server."""
    with psycopg.connect(env.admin_url, autocommit=True) as admin:
        names = [
            row[0]
            for row in admin.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (env.database,)
            )
        ]
        admin.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
            " WHERE database = %s AND active_pid IS NOT NULL",
            (env.database,),
        )
    for name in names:
        drop_replication_slot(env.admin_url, name)


def _teardown(env: BenchEnv) -> None:
    def remove_broker_objects() -> None:
        with amqp_channel(env.broker_url) as channel:
            channel.queue_delete(env.queue)
            channel.exchange_delete(env.exchange)

    def drop_database() -> None:
        _drop_slots_of(env)
        with psycopg.connect(env.admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(env.database)
                )
            )

    try:
        _retrying(remove_broker_objects)
    finally:
        _retrying(drop_database)
