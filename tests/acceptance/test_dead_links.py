"""Links that hang instead of failing: the relay notices within the documented bound, goes
unready with a line naming the link, and once the link is back publishes again within 10 s,
having lost nothing and kept each aggregate's order.

A proxy (tests/faults.py) between the relay and the service stops forwarding without closing
anything: the relay's socket stays open, its writes are accepted by the proxy's kernel, and no
answer ever comes, as with a cut link or a frozen host. TCP keepalives and TCP_USER_TIMEOUT
cannot see that (the proxy's kernel acknowledges), so what is tested is the relay's own
bound: AMQP heartbeats and confirm timeouts for RabbitMQ, lease renewal and connect timeouts
for PostgreSQL (docs/deploy.md, "Dead links").
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

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
from tests.faults import HangingProxy, free_port

pytestmark = pytest.mark.acceptance

# docs/deploy.md: a silent RabbitMQ is noticed within --confirm-timeout (at least 20 s: the
# AMQP heartbeat's own floor); a silent PostgreSQL within 7 s (lease renewal), 10 s while
# connecting. Slack for a loaded two-core machine.
CONFIRM_TIMEOUT = 20.0
RABBITMQ_BOUND = CONFIRM_TIMEOUT
POSTGRES_BOUND = 10.0
SLACK = 10.0
CUT_FOR = 40.0  # longer than every bound: the relay must notice, not wait it out
RESUMES_WITHIN = 10.0


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def via(url: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(
        parts._replace(netloc=f"{userinfo + '@' if userinfo else ''}127.0.0.1:{port}")
    )


def cut_and_restore(
    proxy: HangingProxy,
    relay: RelayProcess,
    consumer: QueueConsumer,
    health_port: int,
    bound: float,
    link_line: str,
) -> None:
    """Freeze mid-stream; assert the relay notices within ``bound`` (+ slack), unready, with
    ``link_line`` logged; thaw; assert publishing resumes within RESUMES_WITHIN."""
    wait_until(lambda: consumer.unique_count() >= 200, timeout=60)
    assert readyz(health_port) == 200
    logged_before = len(relay.log())
    proxy.freeze()
    cut_at = time.monotonic()
    try:
        wait_until(lambda: readyz(health_port) == 503, timeout=bound + SLACK, interval=0.2)
    except AssertionError:
        log = relay.log()[-4000:]
        raise AssertionError(f"still ready {bound + SLACK}s into the cut:\n{log}") from None
    noticed = time.monotonic() - cut_at
    wait_until(lambda: link_line in relay.log()[logged_before:], timeout=SLACK)
    assert noticed <= bound + SLACK, noticed
    # Still unready, and still alive, for as long as the link is dead.
    time.sleep(max(0.0, CUT_FOR - (time.monotonic() - cut_at)))
    assert relay.running
    assert readyz(health_port) == 503
    delivered = consumer.unique_count()
    proxy.thaw()
    back_at = time.monotonic()
    wait_until(lambda: consumer.unique_count() > delivered, timeout=RESUMES_WITHIN + 5)
    resumed = time.monotonic() - back_at
    assert resumed <= RESUMES_WITHIN, resumed
    wait_until(lambda: readyz(health_port) == 200, timeout=RESUMES_WITHIN)


@pytest.mark.parametrize("link", ["rabbitmq", "postgresql"])
def test_a_link_that_hangs_is_noticed_in_bound_and_publishing_resumes_losing_nothing(
    link: str,
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
    workload: Callable[..., Workload],
    consume: Callable[[str, str], QueueConsumer],
) -> None:
    queue = bind_queue("#")
    consumer = consume(broker_url, queue.name)
    health_port = free_port()
    target = urlsplit(broker_url if link == "rabbitmq" else database_url)
    with HangingProxy(target.port or (5672 if link == "rabbitmq" else 5432)) as proxy:
        env = cli_env(
            database_url=via(database_url, proxy.port) if link == "postgresql" else database_url,
            broker_url=via(broker_url, proxy.port) if link == "rabbitmq" else broker_url,
            exchange=exchange,
            mode="notify",
            batch_size=200,
            poll_interval=0.2,
            confirm_timeout=CONFIRM_TIMEOUT,
            health_port=health_port,
        )
        relay = relay_factory(env).start()
        relay.wait_for_log("holding 64 of 64 partitions")
        load = workload(total=6000, producers=2, aggregates=100).start()
        if link == "rabbitmq":
            cut_and_restore(proxy, relay, consumer, health_port, RABBITMQ_BOUND, "RabbitMQ")
        else:
            cut_and_restore(proxy, relay, consumer, health_port, POSTGRES_BOUND, "PostgreSQL")
        load.join()
        wait_until(lambda: consumer.has_all(set(load.produced)), timeout=120)
        assert relay.terminate() == 0
    consumer.stop()
    report = check_deliveries(consumer.deliveries, load.produced, load.versions())
    # Duplicates at most what was in flight when the link hung (a batch and its overlap).
    assert report.relay_duplicates <= 2 * 200, report
    assert read_status(cli_env(database_url=database_url))["pending"] == 0
