"""The core acceptance scenario on NATS JetStream, Redis Streams and MQTT (RabbitMQ has its own
in test_delivery.py): 10,000 events written with plain SQL by 8 concurrent producers over 200
aggregates, relayed by the installed ``outbox-relay serve`` while it is SIGKILLed and restarted
once and the broker is restarted once. Every event must arrive (at least once; duplicates are
counted by event id), and per aggregate the first arrivals must be in commit order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.acceptance.conftest import RelayProcess, Workload, cli_env, read_status
from tests.acceptance.sinks import SINKS, Sink, check_arrivals
from tests.brokers import Received
from tests.conftest import wait_until

pytestmark = [pytest.mark.acceptance, pytest.mark.disruptive]

TOTAL = 10_000
BATCH_SIZE = 500
KILL_AT = 2_500  # events arrived when the relay is SIGKILLed
BROKER_RESTART_AT = 6_000  # events produced when the broker restarts: mid-stream by design
# Few enough producers that the last 4,000 events are still being written while the broker
# restarts (a relay that has caught up sends nothing to a broker going down, so it would not
# be tested): 8 producers could finish inside the restart's first moments.
PRODUCERS = 3


@pytest.fixture(params=sorted(SINKS))
def sink(request: pytest.FixtureRequest) -> Iterator[Sink]:
    made = SINKS[request.param]()
    try:
        yield made
    finally:
        made.cleanup()


# -- the scenario ------------------------------------------------------------------------------------


def test_every_event_arrives_in_commit_order_through_a_relay_kill_and_a_broker_restart(
    sink: Sink,
    database_url: str,
    relay_factory: Callable[..., RelayProcess],
    workload: Callable[..., Workload],
) -> None:
    env = cli_env(
        database_url=database_url,
        batch_size=BATCH_SIZE,
        poll_interval=0.2,
        retry_backoff=0.2,
        confirm_timeout=10,
        **sink.options(),
    )
    sink.start()
    relay = relay_factory(env).start()
    relay.wait_for_log("holding 64 of 64 partitions")
    load = workload(total=TOTAL, producers=PRODUCERS, aggregates=200).start()

    wait_until(lambda: sink.count() >= KILL_AT, timeout=60, interval=0.1)
    relay.kill()
    relay.restart()
    relay.wait_for_log(
        "holding 64 of 64 partitions", count=2
    )  # the new process is connected and publishing

    # Producers are faster than some brokers take events, so go by what was produced: the
    # restart must hit while events are still being written.
    wait_until(lambda: load.produced_count() >= BROKER_RESTART_AT, timeout=60, interval=0.02)
    mid_stream = load.produced_count() < TOTAL
    sink.restart_broker()
    relay.wait_for_log("disconnected", timeout=30)

    load.join()
    produced_ids = set(load.produced)
    wait_until(lambda: sink.count() >= TOTAL, timeout=60, interval=0.2)

    def everything() -> list[Received] | None:
        got = sink.received()
        return got if produced_ids <= {r.event_id for r in got} else None

    received: list[Received] = wait_until(everything, timeout=60, interval=0.5)
    status = wait_until(lambda: (s := read_status(env))["pending"] == 0 and s, timeout=30)
    assert relay.terminate() == 0, relay.log()[-4000:]

    duplicates = check_arrivals(received, load.produced, load.versions())
    assert status["dead"] == 0
    assert relay.starts == 2
    assert mid_stream, "the broker restarted after the producers had finished"
    assert "Traceback" not in relay.log(), relay.log()[-4000:]
    # Only batches in flight at the kill and at the restart can be published twice.
    assert duplicates <= 2 * BATCH_SIZE
