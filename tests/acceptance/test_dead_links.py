"""Links that hang instead of failing: the relay notices within the documented bound, goes
unready with a line naming the link, and once the link is back publishes again within 10 s,
having lost nothing and kept each aggregate's order.

A proxy (tests/faults.py) between the relay and the service stops forwarding without closing
anything: the relay's socket stays open, its writes are accepted by the proxy's kernel, and no
answer ever comes, as with a cut link or a frozen host. TCP keepalives and TCP_USER_TIMEOUT
cannot see that (the proxy's kernel acknowledges), so what is tested is the relay's own
bound: AMQP heartbeats and confirm timeouts for RabbitMQ, lease renewal and connect timeouts
for PostgreSQL, in every mode (docs/deploy.md, "Dead links"). The same for a consumer
(``outbox-relay consume``): AMQP heartbeats from --broker-timeout, and on its inbox connection a
query unanswered 5 s past --statement-timeout; every event is still applied exactly once.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
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
from tests.acceptance.test_brokers_acceptance import SINKS, check_arrivals
from tests.acceptance.test_consumer_cli import WorkerProcess, start_worker
from tests.brokers import Received
from tests.cdc_support import drop_slot_eventually, unique_slot_name
from tests.conftest import RabbitQueue, wait_until
from tests.faults import HangingProxy, free_port
from tests.integration.consumer_harness import ConsumerEnv, consumer_env

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
# The consumer: --broker-timeout 20 s (the AMQP heartbeat's floor, 5 s: pika gives up after
# 2 x (5 + 5) s of silence); --statement-timeout 5 s, so a query unanswered for 5 + 5 s.
CONSUMER_BROKER_TIMEOUT = 20.0
CONSUMER_STATEMENT_TIMEOUT = 5.0
CONSUMER_RABBITMQ_BOUND = CONSUMER_BROKER_TIMEOUT
CONSUMER_POSTGRES_BOUND = CONSUMER_STATEMENT_TIMEOUT + 5.0
CONSUMER_EVENTS = 1000


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
    *,
    progress: Callable[[], int],
    log: Callable[[], str],
    alive: Callable[[], bool],
    health_port: int,
    bound: float,
    link_line: str,
    flowing_at: int = 200,
) -> None:
    """Freeze once ``progress()`` (events delivered or applied) reaches ``flowing_at``: assert
    the process notices within ``bound`` (+ slack), unready, with ``link_line`` logged; thaw;
    assert progress resumes within RESUMES_WITHIN and readiness comes back."""
    wait_until(lambda: progress() >= flowing_at, timeout=60)
    assert readyz(health_port) == 200
    logged_before = len(log())
    proxy.freeze()
    cut_at = time.monotonic()
    try:
        wait_until(lambda: readyz(health_port) == 503, timeout=bound + SLACK, interval=0.2)
    except AssertionError:
        raise AssertionError(
            f"still ready {bound + SLACK}s into the cut:\n{log()[-4000:]}"
        ) from None
    noticed = time.monotonic() - cut_at
    wait_until(lambda: link_line in log()[logged_before:], timeout=SLACK)
    assert noticed <= bound + SLACK, noticed
    # Still unready, and still alive, for as long as the link is dead.
    time.sleep(max(0.0, CUT_FOR - (time.monotonic() - cut_at)))
    assert alive()
    assert readyz(health_port) == 503
    done = progress()
    proxy.thaw()
    back_at = time.monotonic()
    wait_until(lambda: progress() > done, timeout=RESUMES_WITHIN + 5)
    resumed = time.monotonic() - back_at
    assert resumed <= RESUMES_WITHIN, resumed
    wait_until(lambda: readyz(health_port) == 200, timeout=RESUMES_WITHIN)
    print(f"{link_line}: noticed after {noticed:.1f}s (bound {bound:g}s), resumed {resumed:.1f}s")


@pytest.fixture
def slot(database_url: str) -> Iterator[str]:
    """Dropped after the relays (requested before relay_factory); unused outside cdc mode."""
    name = unique_slot_name()
    yield name
    drop_slot_eventually(database_url, name)


@pytest.mark.parametrize(
    ("link", "mode"),
    [
        ("rabbitmq", "notify"),
        ("postgresql", "notify"),
        ("postgresql", "poll"),
        # Every connection through the proxy: claim lanes, leases and the replication stream.
        ("postgresql", "cdc"),
    ],
)
def test_a_link_that_hangs_is_noticed_in_bound_and_publishing_resumes_losing_nothing(
    link: str,
    mode: str,
    database_url: str,
    broker_url: str,
    exchange: str,
    slot: str,
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
            mode=mode,
            batch_size=200,
            poll_interval=0.2,
            confirm_timeout=CONFIRM_TIMEOUT,
            health_port=health_port,
            **({"slot_name": slot, "publication": slot} if mode == "cdc" else {}),
        )
        relay = relay_factory(env).start()
        relay.wait_for_log(
            "streaming replication slot" if mode == "cdc" else "holding 64 of 64 partitions"
        )
        load = workload(total=6000, producers=2, aggregates=100).start()
        cut_and_restore(
            proxy,
            progress=consumer.unique_count,
            log=relay.log,
            alive=lambda: relay.running,
            health_port=health_port,
            bound=RABBITMQ_BOUND if link == "rabbitmq" else POSTGRES_BOUND,
            link_line="RabbitMQ" if link == "rabbitmq" else "PostgreSQL",
        )
        load.join()
        wait_until(lambda: consumer.has_all(set(load.produced)), timeout=120)
        assert relay.terminate() == 0
    consumer.stop()
    report = check_deliveries(consumer.deliveries, load.produced, load.versions())
    # Duplicates at most what was in flight when the link hung (a batch and its overlap).
    assert report.relay_duplicates <= 2 * 200, report
    assert read_status(cli_env(database_url=database_url))["pending"] == 0


@pytest.fixture
def consumer_setup(broker_url: str, database_url: str, exchange: str) -> Iterator[ConsumerEnv]:
    yield from consumer_env(broker_url, database_url, exchange)


@pytest.mark.parametrize("link", ["rabbitmq", "postgresql"])
def test_a_consumer_link_that_hangs_is_noticed_in_bound_and_every_event_applied_once(
    link: str,
    consumer_setup: ConsumerEnv,
    broker_url: str,
    database_url: str,
    tmp_path: Path,
) -> None:
    # Given a queue holding events and a worker (`outbox-relay consume`) applying them
    env = consumer_setup
    settings = env.settings()
    env.declare(settings)
    ids = [str(uuid.uuid4()) for _ in range(CONSUMER_EVENTS)]
    env.publish_many([("order.created", {"n": n}, id_, None, None) for n, id_ in enumerate(ids)])
    health_port = free_port()
    target = urlsplit(broker_url if link == "rabbitmq" else database_url)
    workers: list[WorkerProcess] = []
    with HangingProxy(target.port or (5672 if link == "rabbitmq" else 5432)) as proxy:
        try:
            worker = start_worker(
                workers,
                tmp_path,
                env,
                settings.queue,
                OUTBOX_RELAY_BROKER_URL=via(broker_url, proxy.port)
                if link == "rabbitmq"
                else broker_url,
                OUTBOX_RELAY_DATABASE_URL=via(database_url, proxy.port)
                if link == "postgresql"
                else database_url,
                OUTBOX_RELAY_HEALTH_PORT=str(health_port),
                OUTBOX_RELAY_BROKER_TIMEOUT=str(CONSUMER_BROKER_TIMEOUT),
                OUTBOX_RELAY_STATEMENT_TIMEOUT=str(CONSUMER_STATEMENT_TIMEOUT),
                OUTBOX_RELAY_PREFETCH="50",
                CONSUMER_APP_WORK_SECONDS="0.01",  # still applying when the link hangs
            )
            wait_until(lambda: readyz(health_port) == 200, timeout=30)
            # When its link hangs mid-stream, then comes back
            cut_and_restore(
                proxy,
                progress=lambda: len(env.effect_counts()),
                log=worker.log,
                alive=worker.running,
                health_port=health_port,
                bound=CONSUMER_RABBITMQ_BOUND if link == "rabbitmq" else CONSUMER_POSTGRES_BOUND,
                link_line="RabbitMQ" if link == "rabbitmq" else "PostgreSQL",
            )
            wait_until(lambda: len(env.effect_counts()) == CONSUMER_EVENTS, timeout=120)
            wait_until(lambda: env.queue_count(settings.queue) == 0, timeout=30)
            assert worker.stop() == 0, worker.log()[-3000:]
        finally:
            for started in workers:
                if started.running():
                    started.process.kill()
                    started.process.wait()
    # Then every event was applied exactly once (the inbox absorbs the redeliveries)
    assert env.effect_counts() == dict.fromkeys(ids, 1)


# What the relay's log line names, per broker.
BROKER_NAMES = {"nats": "NATS", "redis": "Redis", "mqtt": "MQTT"}


@pytest.mark.parametrize("broker", sorted(BROKER_NAMES))
def test_a_broker_link_that_hangs_times_out_per_confirm_timeout_and_republishes_losing_nothing(
    broker: str,
    database_url: str,
    relay_factory: Callable[..., RelayProcess],
    workload: Callable[..., Workload],
) -> None:
    sink = SINKS[broker]()
    try:
        options = sink.options()
        health_port = free_port()
        with HangingProxy(urlsplit(options["broker_url"]).port or 0) as proxy:
            env = cli_env(
                database_url=database_url,
                batch_size=200,
                poll_interval=0.2,
                retry_backoff=0.2,
                confirm_timeout=CONFIRM_TIMEOUT,
                health_port=health_port,
                **{**options, "broker_url": via(options["broker_url"], proxy.port)},
            )
            sink.start()
            relay = relay_factory(env).start()
            relay.wait_for_log("holding 64 of 64 partitions")
            load = workload(total=6000, producers=2, aggregates=100).start()
            # A publish whose acknowledgement never comes times out per --confirm-timeout.
            cut_and_restore(
                proxy,
                progress=sink.count,
                log=relay.log,
                alive=lambda: relay.running,
                health_port=health_port,
                bound=CONFIRM_TIMEOUT,
                link_line=BROKER_NAMES[broker],
            )
            load.join()
            produced = set(load.produced)

            def everything() -> list[Received] | None:
                got = sink.received()
                return got if produced <= {r.event_id for r in got} else None

            received: list[Received] = wait_until(everything, timeout=120, interval=0.5)
            assert relay.terminate() == 0
        duplicates = check_arrivals(received, load.produced, load.versions())
        assert duplicates <= 2 * 200, duplicates
        assert read_status(cli_env(database_url=database_url))["pending"] == 0
    finally:
        sink.cleanup()
