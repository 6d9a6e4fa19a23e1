"""Two ``outbox-relay serve`` processes on one outbox: both publish their share of the partitions,
and when one dies the other takes its share over, without losing events or breaking
per-aggregate order."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.acceptance.conftest import (
    QueueConsumer,
    RelayProcess,
    Workload,
    check_deliveries,
    cli_env,
    read_status,
)
from tests.conftest import RabbitQueue, wait_until

pytestmark = pytest.mark.acceptance

BATCH_SIZE = 200


def shares(env: dict[str, str]) -> dict[str, int]:
    return {r["relay"]: len(r["partitions"]) for r in read_status(env)["relays"]}


def test_the_survivor_takes_over_when_a_relay_is_killed(
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
    workload: Callable[..., Workload],
    consume: Callable[[str, str], QueueConsumer],
) -> None:
    queue = bind_queue("order.*")
    consumer = consume(broker_url, queue.name)
    env = cli_env(
        database_url=database_url,
        broker_url=broker_url,
        exchange=exchange,
        batch_size=BATCH_SIZE,
        poll_interval=0.2,
    )
    doomed = relay_factory({**env, "OUTBOX_RELAY_RELAY_NAME": "doomed"}).start()
    doomed.wait_for_log("holding 64 of 64 partitions")
    survivor = relay_factory({**env, "OUTBOX_RELAY_RELAY_NAME": "survivor"}).start()
    survivor.wait_for_log("holding 32 of 64 partitions")
    wait_until(lambda: shares(env) == {"doomed": 32, "survivor": 32}, timeout=15)
    status = read_status(env)
    assert status["relays_connected"] == 2
    assert status["leader_pid"] is not None

    load = workload(total=3_000, producers=4, aggregates=50).start()
    wait_until(lambda: consumer.unique_count() >= 800, timeout=60)
    mid_stream = load.produced_count() < load.total
    doomed.kill()
    survivor.wait_for_log("holding 64 of 64 partitions", timeout=15)
    load.join()
    wait_until(lambda: consumer.has_all(set(load.produced)), timeout=60)
    wait_until(lambda: read_status(env)["pending"] == 0, timeout=30)
    after = read_status(env)
    assert survivor.terminate() == 0
    wait_until(lambda: queue.count() == 0, timeout=30)
    consumer.stop()

    assert mid_stream, "the relay died after producers had finished"
    assert after["relays_connected"] == 1
    assert [r["relay"] for r in after["relays"]] == ["survivor"]
    report = check_deliveries(consumer.deliveries, load.produced, load.versions())
    assert report.relay_duplicates <= BATCH_SIZE
