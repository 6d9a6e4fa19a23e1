"""`outbox-relay status`: what an operator (or a monitoring probe) sees of the backlog."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.acceptance.conftest import RelayProcess, cli_env, read_status, run_cli
from tests.conftest import RabbitQueue, wait_until

pytestmark = pytest.mark.acceptance

WAITING = 37


def insert_events(database_url: str, count: int) -> None:
    with psycopg.connect(database_url) as conn:
        for n in range(count):
            conn.execute(
                "INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload)"
                " VALUES ('order.created', 'order', %s, %s::jsonb)",
                (f"order-{n % 5}", json.dumps({"n": n})),
            )


def status_with_lag_limit(env: dict[str, str], seconds: str) -> tuple[int, dict[str, Any]]:
    done = run_cli("status", "--json", "--fail-on-lag", seconds, env=env)
    assert "Traceback" not in done.stderr
    return done.returncode, json.loads(done.stdout)


def test_status_reports_the_waiting_backlog_and_a_growing_lag_while_no_relay_runs(
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
) -> None:
    env = cli_env(database_url=database_url)

    # Given an empty outbox: nothing pending, no lag, the probe passes.
    code, empty = status_with_lag_limit(env, "1")
    assert code == 0
    assert empty["pending"] == 0
    assert empty["oldest_pending_age_seconds"] == 0
    assert empty["lagging"] is False

    # When events are written and no relay runs, they wait and their age grows.
    insert_events(database_url, WAITING)
    first = read_status(env)
    assert first["pending"] == WAITING
    assert first["relays_connected"] == 0
    assert first["leader_pid"] is None
    later = wait_until(
        lambda: (
            (s := read_status(env))["oldest_pending_age_seconds"]
            > first["oldest_pending_age_seconds"]
            and s
        ),
        timeout=10,
    )
    assert later["pending"] == WAITING

    # Then the lag probe fails (exit 6) once the oldest event is over the limit, not before.
    code, generous = status_with_lag_limit(env, "3600")
    assert code == 0
    assert generous["lagging"] is False
    wait_until(lambda: read_status(env)["oldest_pending_age_seconds"] > 1.0, timeout=10)
    code, lagging = status_with_lag_limit(env, "1")
    assert code == 6
    assert lagging["lagging"] is True
    assert lagging["pending"] == WAITING

    # And once a relay drains the outbox the probe passes again.
    queue = bind_queue("order.*")
    relay = relay_factory(
        cli_env(
            database_url=database_url, broker_url=broker_url, exchange=exchange, poll_interval=0.2
        )
    ).start()
    wait_until(lambda: read_status(env)["pending"] == 0, timeout=30)
    code, drained = status_with_lag_limit(env, "1")
    assert code == 0
    assert drained["lagging"] is False
    assert drained["oldest_pending_age_seconds"] == 0
    assert drained["relays_connected"] >= 1
    assert drained["leader_pid"] is not None
    assert drained["published_last_minute"] == WAITING
    assert relay.terminate() == 0
    assert queue.count() == WAITING


def test_status_table_for_humans_shows_the_backlog(database_url: str) -> None:
    insert_events(database_url, 3)

    done = run_cli("status", env=cli_env(database_url=database_url))

    assert done.returncode == 0, done.stderr
    pending_row = next(line for line in done.stdout.splitlines() if "pending" in line)
    assert "3" in pending_row
