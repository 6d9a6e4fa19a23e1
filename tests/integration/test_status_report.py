"""read_status: backlog, lag, retries, dead letters, throughput and relays, from the database."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import psycopg
import pytest

from outbox_relay.db.migrations import latest_version
from outbox_relay.db.status import OutboxStatus, read_status
from tests.conftest import RabbitQueue, wait_until
from tests.integration.relay_harness import RelayThread, collect, relay_settings, scalar

pytestmark = pytest.mark.integration


def status_of(database_url: str) -> OutboxStatus:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return read_status(conn, "public")


def insert(database_url: str, event_type: str, aggregate_id: str, age_seconds: float = 0) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO outbox (event_type, aggregate_id, payload, created_at)"
            " VALUES (%s, %s, '{}', now() - make_interval(secs => %s))",
            (event_type, aggregate_id, age_seconds),
        )


def test_backlog_and_lag_while_no_relay_runs(database_url: str) -> None:
    first = status_of(database_url)
    assert first.storage is not None
    assert (first.storage.kept_partitions, first.storage.legacy_kept) == (0, 0)
    assert first.storage.retention_behind_seconds is None
    assert first.storage.behind_line is None
    assert dataclasses.replace(first, storage=None) == OutboxStatus(
        schema="public",
        schema_version=latest_version(),
        pending=0,
        oldest_pending_age_seconds=0.0,
        retrying=0,
        dead=0,
        published_last_minute=0,
        published_last_hour=0,
        relays_connected=0,
        leader_pid=None,
        relays=[],
        partitions=64,
    )
    insert(database_url, "order.created", "1", age_seconds=90)
    for n in range(2, 6):
        insert(database_url, "order.created", str(n))

    status = status_of(database_url)
    assert status.pending == 5
    assert 90 <= status.oldest_pending_age_seconds < 120
    assert (status.retrying, status.dead, status.published_last_minute) == (0, 0, 0)
    assert (status.relays_connected, status.leader_pid) == (0, None)
    assert status.as_dict()["pending"] == 5


def test_throughput_after_a_run_and_dead_letters(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    for n in range(5):
        insert(database_url, "order.created", str(n))
    insert(database_url, "audit.recorded", "x")  # nobody is bound: dead after one attempt

    with RelayThread(relay_settings(database_url, broker_url, exchange, max_attempts=1)):
        collect(queue, 5)
        wait_until(lambda: status_of(database_url).dead == 1)
        running = status_of(database_url)
    status = status_of(database_url)

    assert running.relays_connected == 1
    assert running.leader_pid is not None
    assert status.pending == 0
    assert status.oldest_pending_age_seconds == 0.0
    assert status.dead == 1
    assert status.retrying == 0
    assert status.published_last_minute == 5
    assert status.published_last_hour == 5
    assert (status.relays_connected, status.leader_pid) == (0, None)


def test_a_retrying_event_counts_as_pending_and_retrying(
    database_url: str, broker_url: str, exchange: str
) -> None:
    insert(database_url, "audit.recorded", "x")
    settings = relay_settings(
        database_url,
        broker_url,
        exchange,
        max_attempts=5,
        retry_backoff=60.0,
        retry_backoff_max=60.0,
    )
    with RelayThread(settings):
        wait_until(lambda: status_of(database_url).retrying == 1)
    status = status_of(database_url)
    assert (status.pending, status.retrying, status.dead) == (1, 1, 0)
    assert scalar(database_url, "SELECT attempts FROM outbox") == 1
    assert status.published_last_minute == 0
