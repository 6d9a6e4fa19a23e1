"""``outbox-relay consume --ordered`` as a user runs it: the real relay publishing 5,000 events
over 300 aggregates, four worker processes, one SIGKILLed with its transaction open and another
later, one started again, flaky and poison events: every effect applied exactly once and every
aggregate's events applied in the order the relay published them."""

from __future__ import annotations

import itertools
import json
import random
import signal
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.acceptance.conftest import HANDLER, WorkerProcess, cli_env, run_cli
from tests.conftest import wait_until
from tests.integration.consumer_harness import ConsumerEnv, consumer_env, require_consistent_hash
from tests.integration.relay_harness import kill, start_cli_relay

pytestmark = pytest.mark.acceptance

EVENTS = 5_000
AGGREGATES = 300
POISON = 8  # fail until the switch is turned off: retried, then dead-lettered
FLAKY = 30  # fail their first one or two attempts, then succeed
PARTITIONS = 16


@pytest.fixture
def env(broker_url: str, database_url: str, exchange: str) -> Iterator[ConsumerEnv]:
    require_consistent_hash(broker_url)
    yield from consumer_env(broker_url, database_url, exchange)


def ordered_env(env: ConsumerEnv, queue: str, **app: str) -> dict[str, str]:
    """The variables an ordered worker runs with (OUTBOX_RELAY_ORDERED, as a deployment sets
    it), plus the test handler's own ``app`` variables."""
    variables = cli_env(
        database_url=env.database_url,
        broker_url=env.broker_url,
        exchange=env.exchange,
        queue=queue,
        ordered="true",
        partition_queues=PARTITIONS,
        rebalance_interval=0.5,
        max_attempts=3,
        retry_delay=0.1,
        prefetch=50,
        log_level="info",
    )
    variables.update(app)
    return variables


def start(workers: list[WorkerProcess], tmp_path: Path, variables: dict[str, str]) -> WorkerProcess:
    worker = WorkerProcess(
        variables, tmp_path / f"ordered-{len(workers)}.log", "--handler", HANDLER
    )
    workers.append(worker)
    return worker


def write_outbox(database_url: str) -> tuple[dict[str, tuple[str, int]], set[str]]:
    """5,000 outbox rows, aggregates interleaved, each aggregate's rows in sequence; returns
    event id -> (aggregate, seq) and the poison event ids."""
    rng = random.Random(20)
    streams = {f"order-{n}": 0 for n in range(AGGREGATES)}
    rows: list[tuple[str, str, dict[str, Any]]] = []
    position: dict[str, tuple[str, int]] = {}
    for _ in range(EVENTS):
        aggregate = rng.choice(list(streams))
        seq = streams[aggregate]
        streams[aggregate] += 1
        event_id = str(uuid.uuid4())
        position[event_id] = (aggregate, seq)
        rows.append((event_id, aggregate, {"aggregate": aggregate, "seq": seq}))
    special = rng.sample(range(EVENTS), POISON + FLAKY)
    poison = {rows[i][0] for i in special[:POISON]}
    for i in special[:POISON]:
        rows[i][2]["poison"] = True
    for n, i in enumerate(special[POISON:]):
        rows[i][2]["fail_times"] = 1 + n % 2
    with psycopg.connect(database_url) as conn:
        for start_at in range(0, len(rows), 250):
            chunk = rows[start_at : start_at + 250]
            with conn.transaction():
                conn.cursor().executemany(
                    "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id,"
                    " payload) VALUES (%s, 'order.updated', 'order', %s, %s)",
                    [
                        (event_id, aggregate, Jsonb(payload))
                        for event_id, aggregate, payload in chunk
                    ],
                )
    return position, poison


def applied_seqs(env: ConsumerEnv, position: dict[str, tuple[str, int]]) -> dict[str, list[int]]:
    """aggregate -> the seqs of its applied events, in the order they were applied."""
    per_aggregate: dict[str, list[int]] = defaultdict(list)
    for event_id in env.applied_order():
        aggregate, seq = position[event_id]
        per_aggregate[aggregate].append(seq)
    return per_aggregate


def inversions(per_aggregate: dict[str, list[int]]) -> int:
    return sum(
        1
        for seqs in per_aggregate.values()
        for earlier, later in itertools.combinations(seqs, 2)
        if earlier > later
    )


def open_transaction_of(database_url: str, pid: int) -> bool:
    """Whether worker ``pid`` is inside a handler's transaction (effect written, not committed)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND state LIKE 'idle in transaction%%'",
            (f"consumer-app-{pid}",),
        ).fetchone()
    return bool(row and row[0])


def test_ordered_workers_killed_and_restarted_apply_every_event_once_in_publish_order(
    env: ConsumerEnv, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    # Given the ordered topology, applied as an operator would.
    settings = env.settings(ordered=True, partition_queues=PARTITIONS)
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE switches (poison_fails boolean NOT NULL)")
        conn.execute("INSERT INTO switches VALUES (true)")
    admin = cli_env(broker_url=env.broker_url, exchange=env.exchange, queue=settings.queue)
    applied = run_cli(
        "topology", "apply", "--ordered", "--partition-queues", str(PARTITIONS), "--binding", "order.*",
        env=admin,
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    assert f"{settings.queue}.p15" in applied.stdout

    # and four ordered workers sharing the partitions,
    variables = ordered_env(
        env, settings.queue, CONSUMER_APP_WORK_SECONDS="0.01", CONSUMER_APP_MARK_TRANSACTIONS="1"
    )
    for _ in range(4):
        start(workers, tmp_path, variables)
    status_env = cli_env(
        broker_url=env.broker_url, database_url=env.database_url, queue=settings.queue
    )

    def status() -> dict[str, Any]:
        done = run_cli("consumer-status", "--json", env=status_env)
        assert done.returncode == 0, done.stderr
        report: dict[str, Any] = json.loads(done.stdout)
        return report

    wait_until(
        lambda: (
            (s := status())["consumers"] == 4 and all(p["consumers"] == 1 for p in s["partitions"])
        ),
        timeout=30,
    )
    report = status()
    assert report["ordered"] is True
    assert len(report["partitions"]) == PARTITIONS
    assert report["retrying"] is None
    table = run_cli("consumer-status", env=status_env)
    assert f"{PARTITIONS} of {PARTITIONS}" in table.stdout, table.stdout + table.stderr

    # When the relay publishes 5,000 events of 300 aggregates
    position, poison = write_outbox(env.database_url)
    relay = start_cli_relay(
        env.database_url, env.broker_url, env.exchange, tmp_path / "relay.log", poll_interval="0.2"
    )
    try:
        # and one worker is SIGKILLed while its handler's transaction is open,
        wait_until(lambda: len(env.effect_counts()) >= 800, timeout=60)
        first = workers[0]
        wait_until(lambda: open_transaction_of(env.database_url, first.process.pid), timeout=10)
        first.stop(signal.SIGKILL)
        # another later, while a new worker joins,
        wait_until(lambda: len(env.effect_counts()) >= 2_000, timeout=60)
        start(workers, tmp_path, variables)
        wait_until(lambda: len(env.effect_counts()) >= 3_000, timeout=60)
        workers[1].stop(signal.SIGKILL)

        # then every event but the poison ones is applied, and those are dead-lettered.
        wait_until(lambda: len(env.effect_counts()) == EVENTS - POISON, timeout=120, interval=0.5)
        dead_queue = settings.topology().dead_letter_queue
        wait_until(lambda: env.queue_count(dead_queue) >= POISON, timeout=30)
    finally:
        kill(relay)
    counts = env.effect_counts()
    assert set(counts) == set(position) - poison
    assert set(counts.values()) == {1}, "an event was applied twice"
    before_replay = applied_seqs(env, position)
    assert inversions(before_replay) == 0
    for aggregate, seqs in before_replay.items():
        assert seqs == sorted(seqs), aggregate
    # The killed workers' unacked events came again, flagged as redeliveries (and deduplicated
    # when their transaction had committed).
    with psycopg.connect(env.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM processed_events WHERE redelivered").fetchone()
    assert row is not None
    assert row[0] >= 1

    listed = run_cli("dlq", "list", "--json", env=status_env)
    assert listed.returncode == 0, listed.stderr
    dead = json.loads(listed.stdout)
    assert {m["event_id"] for m in dead["messages"]} == poison
    assert all("gave up after 3 attempt(s)" in m["reason"] for m in dead["messages"])

    # When the bug is fixed and the dead letters replayed, they run after their successors.
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        conn.execute("UPDATE switches SET poison_fails = false")
    replayed = run_cli("dlq", "replay", env=status_env)
    assert replayed.returncode == 0, replayed.stderr
    wait_until(lambda: len(env.effect_counts()) == EVENTS, timeout=60)
    assert set(env.effect_counts().values()) == {1}
    after_replay = applied_seqs(env, position)
    replayed_seqs: dict[str, set[int]] = defaultdict(set)
    for event_id in poison:
        aggregate, seq = position[event_id]
        replayed_seqs[aggregate].add(seq)
    for aggregate, seqs in after_replay.items():
        late = len(replayed_seqs[aggregate])
        assert seqs[: len(seqs) - late] == before_replay[aggregate]
        assert set(seqs[len(seqs) - late :]) == replayed_seqs[aggregate]
    for worker in workers:
        if worker.running():
            assert worker.stop(signal.SIGTERM) == 0, worker.log()[-3000:]
