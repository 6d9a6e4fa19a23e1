"""``outbox-relay consume``, ``topology apply``, ``dlq`` and ``consumer-status`` run as a user
runs them: subprocesses, real RabbitMQ and PostgreSQL, signals.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.acceptance.conftest import (
    ROOT,
    WorkerProcess,
    cli_env,
    relay_command,
    run_cli,
    start_worker,
)
from tests.conftest import wait_until
from tests.integration.consumer_harness import ConsumerEnv, consumer_env

pytestmark = pytest.mark.acceptance


@pytest.fixture
def env(broker_url: str, database_url: str, exchange: str) -> Iterator[ConsumerEnv]:
    yield from consumer_env(broker_url, database_url, exchange)


def open_transactions(database_url: str) -> int:
    """Worker transactions in progress (mid-handler) in this test's database."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
        ).fetchone()
    return int(row[0]) if row else 0


def redelivered_rows(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM processed_events WHERE redelivered").fetchone()
    return int(row[0]) if row else 0


def test_sigterm_finishes_the_event_in_flight_and_exits_0(
    env: ConsumerEnv, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    settings = env.settings()
    env.declare(settings)
    ids = [env.publish("order.created", {"n": n}) for n in range(5)]
    worker = start_worker(workers, tmp_path, env, settings.queue, CONSUMER_APP_WORK_SECONDS="0.5")
    wait_until(lambda: open_transactions(env.database_url) == 1, timeout=30)
    assert worker.stop(signal.SIGTERM) == 0, worker.log()
    assert "finishing the message in flight" in worker.log()
    applied = env.effect_counts()
    assert len(applied) == 1  # the one in flight, committed and acked
    assert set(applied.values()) == {1}
    assert env.queue_count(settings.queue) == 4  # the rest back in the queue, nothing lost

    start_worker(workers, tmp_path, env, settings.queue)
    wait_until(lambda: len(env.effect_counts()) == 5, timeout=30)
    assert env.effect_counts() == dict.fromkeys(ids, 1)


def test_sigkill_mid_handler_loses_nothing_and_applies_nothing_twice(
    env: ConsumerEnv, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    settings = env.settings()
    env.declare(settings)
    ids = [env.publish("order.created", {"n": n}) for n in range(200)]
    worker = start_worker(
        workers,
        tmp_path,
        env,
        settings.queue,
        CONSUMER_APP_WORK_SECONDS="0.02",
        OUTBOX_RELAY_PREFETCH="50",
    )
    wait_until(lambda: len(env.effect_counts()) >= 40, timeout=60)
    wait_until(lambda: open_transactions(env.database_url) == 1, timeout=10)
    worker.stop(signal.SIGKILL)
    killed_at = len(env.effect_counts())
    assert killed_at < 200

    start_worker(workers, tmp_path, env, settings.queue)
    wait_until(lambda: len(env.effect_counts()) == 200, timeout=60)
    wait_until(lambda: env.queue_count(settings.queue) == 0)
    counts = env.effect_counts()
    assert counts == dict.fromkeys(ids, 1)
    # The killed worker's prefetched, unacked messages came again, flagged as redeliveries.
    assert redelivered_rows(env.database_url) >= 1


def test_poison_event_reaches_the_dlq_and_replay_applies_it(
    env: ConsumerEnv, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE switches (poison_fails boolean NOT NULL)")
        conn.execute("INSERT INTO switches VALUES (true)")
    settings = env.settings(max_attempts=3, retry_delay=0.1)
    env.declare(settings)
    good = env.publish("order.created", {"n": 1})
    poison = env.publish("order.created", {"poison": True})
    start_worker(workers, tmp_path, env, settings.queue)
    variables = cli_env(
        database_url=env.database_url,
        broker_url=env.broker_url,
        queue=settings.queue,
        max_attempts=3,
        retry_delay=0.1,
    )

    def status() -> dict[str, object]:
        done = run_cli("consumer-status", "--json", env=variables)
        assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout)
        return result

    wait_until(lambda: status()["dlq_depth"] == 1, timeout=30)
    current = status()
    assert current["ready"] == 0
    assert current["consumers"] == 1
    inbox = current["inbox"]
    assert isinstance(inbox, dict)
    assert inbox["applied"] == 1
    assert inbox["handler_ms_p50"] is not None

    listed = run_cli("dlq", "list", "--json", env=variables)
    assert listed.returncode == 0, listed.stderr
    dead = json.loads(listed.stdout)
    assert dead["total"] == 1
    [message] = dead["messages"]
    assert message["event_id"] == poison
    assert message["attempts"] == 3
    assert "gave up after 3 attempt(s)" in message["reason"]
    assert "poison order: cannot compute the tax" in message["reason"]
    assert json.loads(message["body"]) == {"poison": True}
    table = run_cli("dlq", "list", env=variables)
    assert poison in table.stdout

    with psycopg.connect(env.database_url, autocommit=True) as conn:
        conn.execute("UPDATE switches SET poison_fails = false")
    replayed = run_cli("dlq", "replay", env=variables)
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 message(s)" in replayed.stdout
    wait_until(lambda: env.effect_counts() == {good: 1, poison: 1}, timeout=30)
    assert status()["dlq_depth"] == 0

    purged = run_cli("dlq", "purge", "--yes", env=variables)
    assert purged.returncode == 0, purged.stderr
    assert "purged 0 message(s)" in purged.stdout


def test_dlq_purge_empties_the_dead_letter_queue(env: ConsumerEnv) -> None:
    settings = env.settings()
    env.declare(settings)
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(env.broker_url))
    channel = connection.channel()
    for _ in range(3):
        channel.basic_publish(settings.topology().dead_letter_exchange, "", b"{}")
    connection.close()
    wait_until(lambda: env.queue_count(settings.topology().dead_letter_queue) == 3)
    variables = cli_env(broker_url=env.broker_url, queue=settings.queue)
    done = run_cli("dlq", "purge", "--yes", env=variables)
    assert done.returncode == 0, done.stderr
    assert "purged 3 message(s)" in done.stdout
    assert env.queue_count(settings.topology().dead_letter_queue) == 0


def test_topology_apply_is_idempotent_and_reports_conflicts_clearly(env: ConsumerEnv) -> None:
    settings = env.settings(queue_type="quorum")
    variables = cli_env(broker_url=env.broker_url, exchange=env.exchange)
    args = ("topology", "apply", "--queue", settings.queue, "--binding", "order.*")
    for _ in range(2):
        done = run_cli(
            *args,
            "--queue-type",
            "quorum",
            "--retry-delay",
            "0.2",
            "--max-attempts",
            "3",
            env=variables,
        )
        assert done.returncode == 0, done.stderr
        assert f"{settings.queue}.dlq" in done.stdout
    conflict = run_cli(
        *args,
        "--queue-type",
        "classic",
        "--retry-delay",
        "0.2",
        "--max-attempts",
        "3",
        env=variables,
    )
    assert conflict.returncode == 3, conflict.stderr  # ExitCode.CONFIG
    assert repr(settings.queue) in conflict.stderr
    assert "x-queue-type" in conflict.stderr
    assert "Traceback" not in conflict.stderr


def test_example_order_service_consumer(
    env: ConsumerEnv, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "examples/order_consumer.py", "--database-url", env.database_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    settings = env.settings(bindings=())
    variables = cli_env(
        database_url=env.database_url,
        broker_url=env.broker_url,
        exchange=env.exchange,
        queue=settings.queue,
        retry_delay=0.1,
    )
    log_path = tmp_path / "example.log"
    worker = WorkerProcess(variables, log_path, "--handler", "examples.order_consumer:consumer")
    workers.append(worker)
    # No --binding: the queue is bound with the handlers' own patterns.
    wait_until(lambda: "consuming" in worker.log())
    created = env.publish(
        "order.created",
        {"customer_email": "ada@example.com", "lines": [{"sku": "book", "quantity": 2}]},
        copies=2,
    )
    env.publish("order.shipped", {})
    greedy = env.publish("order.created", {"lines": [{"sku": "pen", "quantity": 5000}]})

    def shop() -> tuple[int, int, int]:
        with psycopg.connect(env.database_url) as conn:
            row = conn.execute(
                "SELECT (SELECT available FROM stock WHERE sku = 'book'),"
                " (SELECT count(*) FROM email_queue),"
                " (SELECT count(*) FROM processed_events)"
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    wait_until(lambda: shop() == (98, 1, 2), timeout=30)
    wait_until(lambda: env.queue_count(settings.topology().dead_letter_queue) == 1)
    [(_, props, _)] = env.dead_letters(settings)
    assert props.message_id == greedy
    assert "not enough stock of 'pen'" in props.headers["x-outbox-failure-reason"]
    env.publish("order.cancelled", {})  # aggregate o-1: releases the reservation
    wait_until(lambda: shop()[0] == 100, timeout=30)
    assert created
    assert worker.stop() == 0


def _fill_dlq(env: ConsumerEnv, queue: str, count: int) -> list[str]:
    import uuid

    import pika

    from outbox_relay.consumer import ATTEMPTS_HEADER, FAILURE_REASON_HEADER

    ids = [str(uuid.uuid4()) for _ in range(count)]
    connection = pika.BlockingConnection(pika.URLParameters(env.broker_url))
    channel = connection.channel()
    channel.confirm_delivery()
    for event_id in ids:
        channel.basic_publish(
            f"{queue}.dlx",
            queue,
            b"{}",
            pika.BasicProperties(
                message_id=event_id,
                type="order.created",
                delivery_mode=2,
                headers={FAILURE_REASON_HEADER: "boom", ATTEMPTS_HEADER: 5},
            ),
        )
    connection.close()
    return ids


def _drain_ids(env: ConsumerEnv, queue: str) -> list[str]:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(env.broker_url))
    channel = connection.channel()
    ids = []
    while True:
        method, props, _ = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        ids.append(props.message_id)
    connection.close()
    return ids


def test_dlq_replay_killed_midway_loses_nothing(env: ConsumerEnv) -> None:
    settings = env.settings()
    env.declare(settings)
    dead_queue = settings.topology().dead_letter_queue
    ids = _fill_dlq(env, settings.queue, 3000)
    variables = cli_env(broker_url=env.broker_url, queue=settings.queue)
    replay = subprocess.Popen(
        [*relay_command(), "dlq", "replay"],
        env=variables,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: env.queue_count(settings.queue) >= 100, timeout=30)
        replay.kill()
    finally:
        replay.wait()
    moved = env.queue_count(settings.queue)
    assert moved < 3000, "the replay finished before it could be killed"
    # Every message is in one queue or the other (the one in flight possibly in both).
    main_ids, dead_ids = _drain_ids(env, settings.queue), _drain_ids(env, dead_queue)
    assert set(main_ids) | set(dead_ids) == set(ids)
    assert len(set(main_ids) & set(dead_ids)) <= 1


def test_dlq_replay_of_chosen_event_ids(env: ConsumerEnv) -> None:
    settings = env.settings()
    env.declare(settings)
    ids = _fill_dlq(env, settings.queue, 5)
    variables = cli_env(broker_url=env.broker_url, queue=settings.queue)
    done = run_cli("dlq", "replay", ids[1], ids[3], env=variables)
    assert done.returncode == 0, done.stderr
    assert "replayed 2 message(s)" in done.stdout
    assert sorted(_drain_ids(env, settings.queue)) == sorted([ids[1], ids[3]])
    # The others stay in the DLQ, in their order.
    assert _drain_ids(env, settings.topology().dead_letter_queue) == [ids[0], ids[2], ids[4]]


def test_dlq_commands_on_an_unknown_queue_fail_with_a_config_error(env: ConsumerEnv) -> None:
    variables = cli_env(broker_url=env.broker_url, queue="no.such.queue.for.consumer.tests")
    for args in (("dlq", "list"), ("dlq", "replay"), ("dlq", "purge", "--yes")):
        done = run_cli(*args, env=variables)
        assert done.returncode == 3, (args, done.stderr)
        assert "does not exist" in done.stderr
        assert "topology apply" in done.stderr
