"""Shared fixtures: real PostgreSQL and RabbitMQ, a fresh database and exchange per test."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import psycopg
import pytest
from psycopg import sql

from outbox_relay.db.migrations import migrate
from tests.services import Services, provide_services


def database_url_for(admin_url: str, dbname: str) -> str:
    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{dbname}"))


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    with provide_services() as found:
        yield found


@pytest.fixture(scope="session")
def template_database(services: Services) -> Iterator[str]:
    """A database migrated once per session, cloned by every test that needs one."""
    name = f"outbox_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(services.postgres_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(
        database_url_for(services.postgres_admin_url, name), autocommit=True
    ) as conn:
        migrate(conn, "public")
    yield name
    with psycopg.connect(services.postgres_admin_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def empty_database_url(services: Services) -> Iterator[str]:
    """A fresh database with no outbox schema."""
    name = f"outbox_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(services.postgres_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield database_url_for(services.postgres_admin_url, name)
    _drop_database(services.postgres_admin_url, name)


@pytest.fixture
def database_url(services: Services, template_database: str) -> Iterator[str]:
    """A fresh, migrated database (schema ``public``) for this test alone."""
    name = f"outbox_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(services.postgres_admin_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_database)
            )
        )
    yield database_url_for(services.postgres_admin_url, name)
    _drop_database(services.postgres_admin_url, name)


def _drop_database(admin_url: str, name: str) -> None:
    # PostgreSQL may be restarting after a disruptive test; give it a moment.
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture
def broker_url(services: Services) -> str:
    return services.rabbitmq_url


@dataclass
class RabbitQueue:
    """A durable queue bound to the test's exchange, drained with basic_get."""

    url: str
    exchange: str
    name: str
    bindings: list[str] = field(default_factory=list)

    def _channel(self) -> tuple[pika.BlockingConnection, Any]:
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        return conn, conn.channel()

    def drain(self) -> list[tuple[Any, Any, bytes]]:
        """Every message now in the queue: (method, properties, body), acked."""
        conn, ch = self._channel()
        got = []
        try:
            while True:
                method, props, body = ch.basic_get(self.name, auto_ack=True)
                if method is None:
                    return got
                got.append((method, props, body))
        finally:
            conn.close()

    def count(self) -> int:
        conn, ch = self._channel()
        try:
            return int(ch.queue_declare(self.name, passive=True).method.message_count)
        finally:
            conn.close()


@pytest.fixture
def exchange(broker_url: str) -> Iterator[str]:
    """A unique durable topic exchange for this test."""
    name = f"events.test.{uuid.uuid4().hex[:10]}"
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    conn.channel().exchange_declare(name, "topic", durable=True)
    conn.close()
    yield name
    rabbit_cleanup(broker_url, lambda ch: ch.exchange_delete(name))


@pytest.fixture
def bind_queue(broker_url: str, exchange: str) -> Iterator[Callable[..., RabbitQueue]]:
    """bind_queue('order.*', ...) -> a fresh durable queue bound to the test exchange."""
    made: list[str] = []

    def make(*bindings: str) -> RabbitQueue:
        name = f"q.test.{uuid.uuid4().hex[:10]}"
        conn = pika.BlockingConnection(pika.URLParameters(broker_url))
        ch = conn.channel()
        ch.queue_declare(name, durable=True)
        for key in bindings:
            ch.queue_bind(name, exchange, key)
        conn.close()
        made.append(name)
        return RabbitQueue(broker_url, exchange, name, list(bindings))

    yield make
    for name in made:
        rabbit_cleanup(broker_url, lambda ch, n=name: ch.queue_delete(n))


def rabbit_cleanup(url: str, action: Callable[[Any], Any]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = pika.BlockingConnection(pika.URLParameters(url))
            action(conn.channel())
            conn.close()
            return
        except pika.exceptions.AMQPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with a clear message on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition}")
        time.sleep(interval)
