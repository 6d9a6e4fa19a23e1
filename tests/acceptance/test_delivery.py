"""The issue's "done when": 10,000 events written with plain SQL by 8 concurrent producers reach
a queue exactly once (at least once across crashes, with duplicates only from the batch in
flight), per aggregate in commit order, with the message contract, and the backlog drains to 0.

Every test runs the installed ``outbox-relay serve`` as a subprocess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.acceptance.conftest import (
    DeliveryReport,
    QueueConsumer,
    RelayProcess,
    Workload,
    check_deliveries,
    cli_env,
    postgres_ensure_running,
    postgres_restart,
    rabbitmq_start_app,
    rabbitmq_stop_app,
    read_status,
)
from tests.conftest import RabbitQueue, wait_until

pytestmark = pytest.mark.acceptance

BATCH_SIZE = 500
TOTAL = 10_000
# Points in the stream (events received so far) where the disruptive variants strike.
STRIKES = (1_500, 4_000, 6_500)


@dataclass
class Run:
    relay: RelayProcess
    load: Workload
    consumer: QueueConsumer
    queue: RabbitQueue
    env: dict[str, str]
    mid_stream: list[bool] = field(default_factory=list)

    def at(self, received: int) -> None:
        """Wait until ``received`` events have arrived; note whether producers are still busy."""
        wait_until(lambda: self.consumer.unique_count() >= received, timeout=90)
        self.mid_stream.append(self.load.produced_count() < self.load.total)

    def finish(self) -> tuple[DeliveryReport, dict[str, Any]]:
        """Producers done, everything delivered and the outbox empty: check it all."""
        self.load.join()
        produced = set(self.load.produced)
        wait_until(lambda: self.consumer.has_all(produced), timeout=120)
        status = wait_until(lambda: (s := read_status(self.env))["pending"] == 0 and s, 30)
        assert self.relay.terminate() == 0, self.relay.log()[-4000:]
        wait_until(lambda: self.queue.count() == 0, timeout=30)  # the consumer took the rest
        self.consumer.stop()
        assert "Traceback" not in self.relay.log()
        report = check_deliveries(
            self.consumer.deliveries, self.load.produced, self.load.versions()
        )
        return report, status


@pytest.fixture
def start_run(
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
    workload: Callable[..., Workload],
    consume: Callable[[str, str], QueueConsumer],
) -> Callable[[], Run]:
    def start() -> Run:
        queue = bind_queue("#")
        env = cli_env(
            database_url=database_url,
            broker_url=broker_url,
            exchange=exchange,
            batch_size=BATCH_SIZE,
            poll_interval=0.2,
        )
        consumer = consume(broker_url, queue.name)
        relay = relay_factory(env).start()
        relay.wait_for_log("holding 64 of 64 partitions")
        load = workload(total=TOTAL, producers=8, aggregates=200).start()
        return Run(relay, load, consumer, queue, env)

    return start


def test_fault_free_run_delivers_every_event_exactly_once_in_commit_order(
    start_run: Callable[[], Run],
) -> None:
    run = start_run()

    report, status = run.finish()

    assert len(run.consumer.deliveries) == TOTAL  # exactly once: no duplicates at all
    assert report.relay_duplicates == 0
    assert report.consumer_redeliveries == 0
    assert status["dead"] == 0
    assert status["retrying"] == 0
    assert status["published_last_minute"] + status["published_last_hour"] > 0
    assert len(run.load.versions()) == 200
    assert run.relay.starts == 1


def test_relay_killed_mid_stream_loses_nothing_and_keeps_commit_order(
    start_run: Callable[[], Run],
) -> None:
    run = start_run()

    for received in STRIKES:
        run.at(received)
        run.relay.kill()
        run.relay.restart()

    report, _status = run.finish()

    assert run.mid_stream[0], "the first SIGKILL came after producers had finished"
    assert run.relay.starts == 1 + len(STRIKES)
    # Only a batch in flight when the relay died can be published twice.
    assert report.relay_duplicates <= BATCH_SIZE * len(STRIKES)


def test_relay_terminated_mid_stream_exits_cleanly_and_resumes(
    start_run: Callable[[], Run],
) -> None:
    run = start_run()

    for received in STRIKES:
        run.at(received)
        assert run.relay.terminate() == 0, run.relay.log()[-4000:]  # within 5 s
        run.relay.restart()

    report, _status = run.finish()

    assert run.mid_stream[0], "the first SIGTERM came after producers had finished"
    assert run.relay.log().count("received SIGTERM") == len(STRIKES) + 1
    # A graceful stop finishes the batch in flight and commits it: nothing is sent twice.
    assert report.relay_duplicates == 0


@pytest.mark.disruptive
def test_rabbitmq_restart_mid_stream_loses_nothing_and_keeps_commit_order(
    start_run: Callable[[], Run],
) -> None:
    run = start_run()

    run.at(STRIKES[0])
    try:
        rabbitmq_stop_app()
        run.relay.wait_for_log("cannot connect, retrying", timeout=60)
    finally:
        rabbitmq_start_app()

    report, _status = run.finish()

    assert run.mid_stream[0], "RabbitMQ stopped after producers had finished"
    assert run.relay.starts == 1  # the relay rode it out by itself
    assert run.consumer.reconnects > 0  # the broker really went away
    assert report.relay_duplicates <= BATCH_SIZE


@pytest.mark.disruptive
def test_postgres_restart_mid_stream_loses_nothing_and_keeps_commit_order(
    start_run: Callable[[], Run],
) -> None:
    run = start_run()

    run.at(STRIKES[0])
    try:
        postgres_restart()
    finally:
        postgres_ensure_running()

    report, _status = run.finish()

    assert run.mid_stream[0], "PostgreSQL restarted after producers had finished"
    assert run.load.retried_transactions > 0  # producers really lost their connections
    assert "disconnected" in run.relay.log() or "cannot connect" in run.relay.log()
    assert run.relay.starts == 1
    assert report.relay_duplicates <= BATCH_SIZE
