"""Two ``outbox-relay serve`` processes on one outbox: one leads, the other stands by and takes
over when the leader dies, without losing events or breaking per-aggregate order."""

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


def test_standby_takes_over_when_the_leader_is_killed(
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
    leader = relay_factory(env).start()
    leader.wait_for_log("leading")
    standby = relay_factory(env).start()
    standby.wait_for_log("standby")
    status = read_status(env)
    assert status["relays_connected"] == 2
    assert status["leader_pid"] is not None

    load = workload(total=3_000, producers=4, aggregates=50).start()
    wait_until(lambda: consumer.unique_count() >= 800, timeout=60)
    mid_stream = load.produced_count() < load.total
    leader.kill()
    standby.wait_for_log("leading", timeout=15)
    load.join()
    wait_until(lambda: consumer.has_all(set(load.produced)), timeout=60)
    wait_until(lambda: read_status(env)["pending"] == 0, timeout=30)
    after = read_status(env)
    assert standby.terminate() == 0
    wait_until(lambda: queue.count() == 0, timeout=30)
    consumer.stop()

    assert mid_stream, "the leader died after producers had finished"
    assert after["relays_connected"] == 1
    assert after["leader_pid"] not in (None, status["leader_pid"])
    report = check_deliveries(consumer.deliveries, load.produced, load.versions())
    assert report.relay_duplicates <= BATCH_SIZE
    assert "standby" not in leader.log()
