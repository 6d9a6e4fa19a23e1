"""The broker or the database restarts under a running relay: it resumes by itself, no loss."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

import outbox_relay
from tests.background import BackgroundLoop
from tests.conftest import RabbitQueue, wait_until
from tests.integration.relay_harness import (
    Delivery,
    RelayThread,
    collect,
    drain,
    first_deliveries,
    per_aggregate,
    relay_settings,
    rows,
    scalar,
)

pytestmark = [pytest.mark.integration, pytest.mark.disruptive]

AGGREGATES = [f"agg-{n}" for n in range(10)]
BATCH_SIZE = 50
MAX_EVENTS = 3000


class Producer(BackgroundLoop):
    """Writes events on a thread until stopped, each stamped with its aggregate's version taken
    under the aggregate's row lock (= its commit order). Survives a PostgreSQL restart by
    reconnecting; a commit lost with the connection rolls back, so versions stay gapless."""

    def __init__(self, database_url: str) -> None:
        super().__init__("producer", join_timeout=60)
        self._url = database_url
        self.committed = 0
        self.reconnects = 0
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE aggregates (id text PRIMARY KEY, version int NOT NULL)")
            conn.execute("INSERT INTO aggregates SELECT unnest(%s::text[]), 0", (AGGREGATES,))

    def _connect(self) -> psycopg.Connection[Any] | None:
        try:
            return psycopg.connect(self._url, connect_timeout=2)
        except psycopg.OperationalError:
            return None

    def work(self) -> None:
        rng = random.Random(7)
        conn: psycopg.Connection[Any] | None = None
        while not self.stopping.is_set() and self.committed < MAX_EVENTS:
            if conn is None or conn.closed:
                conn = wait_until(self._connect, timeout=60, interval=0.2)
                self.reconnects += 1
            aggregate = rng.choice(AGGREGATES)
            try:
                row = conn.execute(
                    "UPDATE aggregates SET version = version + 1 WHERE id = %s RETURNING version",
                    (aggregate,),
                ).fetchone()
                assert row is not None
                outbox_relay.emit(
                    conn, "order.updated", payload={"seq": row[0]}, aggregate_id=aggregate
                )
                conn.commit()
                self.committed += 1
            except psycopg.OperationalError:
                conn.close()
        if conn is not None:
            conn.close()

    @contextmanager
    def running(self) -> Iterator[Producer]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def versions(self) -> dict[str, int]:
        return {
            aggregate: version
            for aggregate, version in rows(self._url, "SELECT id, version FROM aggregates")
            if version
        }


def assert_every_event_delivered_in_order(
    deliveries: list[Delivery], versions: dict[str, int]
) -> None:
    first = first_deliveries(deliveries)
    assert per_aggregate(first) == {a: list(range(1, v + 1)) for a, v in versions.items()}
    # Republished after the outage: at most the batches that were in flight (two lanes).
    assert len(deliveries) - len(first) <= 2 * BATCH_SIZE


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=120)


@contextmanager
def rabbitmq_stopped() -> Iterator[None]:
    run("rabbitmqctl", "stop_app")
    try:
        yield
    finally:
        run("rabbitmqctl", "start_app")
        run("rabbitmqctl", "await_startup")


def postgres_online() -> bool:
    result = subprocess.run(
        ["pg_lsclusters", "--no-header"], check=True, capture_output=True, text=True
    )
    return any(
        line.split()[:2] == ["15", "main"] and "online" in line
        for line in result.stdout.splitlines()
    )


def test_relay_survives_a_broker_restart_mid_stream(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    producer = Producer(database_url)
    settings = relay_settings(database_url, broker_url, exchange, batch_size=BATCH_SIZE)
    with RelayThread(settings), producer.running():
        arrived = collect(queue, 300)
        with rabbitmq_stopped():
            # Rows pile up while the broker is away; none is lost, marked or dead-lettered.
            wait_until(
                lambda: scalar(database_url, "SELECT count(*) FROM outbox") >= 500, timeout=60
            )
            assert (
                scalar(database_url, "SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL") == 0
            )
        # The relay reconnects on its own and drains what piled up and what keeps coming.
        wait_until(lambda: producer.committed >= MAX_EVENTS, timeout=60)
        producer.stop()
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0, timeout=60)
    arrived += drain(queue)
    assert producer.committed == MAX_EVENTS
    assert_every_event_delivered_in_order(arrived, producer.versions())


def test_relay_survives_a_postgresql_restart_mid_run(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    producer = Producer(database_url)
    settings = relay_settings(database_url, broker_url, exchange, batch_size=BATCH_SIZE)
    with RelayThread(settings) as relay, producer.running():
        arrived = collect(queue, 300)
        try:
            run("pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "restart")
        finally:
            if not postgres_online():
                run("pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "start")
        # The relay reconnects, leads again and drains everything, old and new.
        wait_until(lambda: producer.committed >= MAX_EVENTS, timeout=60)
        producer.stop()
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0, timeout=60)
        wait_until(lambda: relay.leading)
    arrived += drain(queue)
    assert producer.reconnects >= 2, "the producer saw the restart too"
    assert_every_event_delivered_in_order(arrived, producer.versions())
