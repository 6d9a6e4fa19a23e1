"""Links that hang instead of failing: the relay notices within the documented bound, goes
unready with a line naming the link, and once the link is back publishes again within 10 s,
having lost nothing and kept each aggregate's order.

A proxy (tests/faults.py) between the relay and the service stops forwarding without closing
anything: the relay's socket stays open, its writes are accepted by the proxy's kernel, and no
answer ever comes, as with a cut link or a frozen host. TCP keepalives and TCP_USER_TIMEOUT
cannot see that (the proxy's kernel acknowledges), so what is tested is the relay's own
bound: AMQP heartbeats and confirm timeouts for RabbitMQ, lease renewal and connect timeouts
for PostgreSQL, in every mode (docs/deploy.md, "Dead links"); publish timeouts for NATS, Redis
and MQTT; for the webhook, a request and then a probe unanswered within --webhook-timeout. The
same for a consumer (``outbox-relay consume``, ordered or not): AMQP heartbeats from
--broker-timeout, and on its inbox connection a query unanswered 5 s past --statement-timeout;
every event is still applied exactly once, and in order when ordered. Each link is cut for
tests/faults.py's CUT_FOR (60 s).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.acceptance.conftest import (
    QueueConsumer,
    RelayProcess,
    WorkerProcess,
    Workload,
    check_deliveries,
    cli_env,
    read_status,
    start_worker,
)
from tests.acceptance.sinks import SINKS, Sink, WebhookSink, check_arrivals
from tests.brokers import Received
from tests.cdc_support import drop_slot_eventually, unique_slot_name
from tests.conftest import RabbitQueue, wait_until
from tests.faults import HangingProxy, cut_and_restore, free_port, readyz, via
from tests.integration.consumer_harness import (
    ConsumerEnv,
    consumer_env,
    require_consistent_hash,
)

pytestmark = pytest.mark.acceptance

BATCH_SIZE = 200

# docs/deploy.md: a silent RabbitMQ is noticed within --confirm-timeout (at least 20 s: the
# AMQP heartbeat's own floor); a silent PostgreSQL within 7 s (lease renewal), 10 s while
# connecting. tests/faults.py adds its SLACK to each bound.
CONFIRM_TIMEOUT = 20.0
RABBITMQ_BOUND = CONFIRM_TIMEOUT
POSTGRES_BOUND = 10.0
# The webhook: a request unanswered for --webhook-timeout (10 s by default, left so here),
# then a probe unanswered for as long.
WEBHOOK_TIMEOUT = 10.0
WEBHOOK_BOUND = 2 * WEBHOOK_TIMEOUT
# The consumer: --broker-timeout 20 s (the AMQP heartbeat's floor, 5 s: pika gives up after
# 2 x (5 + 5) s of silence); --statement-timeout 5 s, so a query unanswered for 5 + 5 s.
CONSUMER_BROKER_TIMEOUT = 20.0
CONSUMER_STATEMENT_TIMEOUT = 5.0
CONSUMER_RABBITMQ_BOUND = CONSUMER_BROKER_TIMEOUT
CONSUMER_POSTGRES_BOUND = CONSUMER_STATEMENT_TIMEOUT + 5.0
CONSUMER_EVENTS = 1000
CONSUMER_AGGREGATES = 50
PARTITIONS = 8


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
            batch_size=BATCH_SIZE,
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
            ready=readyz(health_port),
            bound=RABBITMQ_BOUND if link == "rabbitmq" else POSTGRES_BOUND,
            link_line="RabbitMQ" if link == "rabbitmq" else "PostgreSQL",
            in_flight=BATCH_SIZE,
        )
        load.join()
        wait_until(lambda: consumer.has_all(set(load.produced)), timeout=120)
        assert relay.terminate() == 0
    consumer.stop()
    report = check_deliveries(consumer.deliveries, load.produced, load.versions())
    # Duplicates at most what was in flight when the link hung (a batch and its overlap).
    assert report.relay_duplicates <= 2 * BATCH_SIZE, report
    assert read_status(cli_env(database_url=database_url))["pending"] == 0


@pytest.fixture
def consumer_setup(broker_url: str, database_url: str, exchange: str) -> Iterator[ConsumerEnv]:
    yield from consumer_env(broker_url, database_url, exchange)


@pytest.mark.parametrize(
    ("link", "ordered"),
    [
        ("rabbitmq", False),
        ("postgresql", False),
        # `consume --ordered`: partition queues held by exclusive consumers, retries in place.
        ("rabbitmq", True),
        ("postgresql", True),
    ],
)
def test_a_consumer_link_that_hangs_is_noticed_in_bound_and_every_event_applied_once(
    link: str,
    ordered: bool,
    consumer_setup: ConsumerEnv,
    broker_url: str,
    database_url: str,
    tmp_path: Path,
    workers: list[WorkerProcess],
) -> None:
    # Given a queue holding events of 50 aggregates, each aggregate's in sequence, and a worker
    # (`outbox-relay consume`, `--ordered` or not) applying them
    env = consumer_setup
    if ordered:
        require_consistent_hash(broker_url)
        settings = env.settings(ordered=True, partition_queues=PARTITIONS)
    else:
        settings = env.settings()
    env.declare(settings)
    events = [
        (str(uuid.uuid4()), f"order-{n % CONSUMER_AGGREGATES}", n // CONSUMER_AGGREGATES)
        for n in range(CONSUMER_EVENTS)
    ]
    env.publish_many(
        [
            ("order.updated", {"aggregate": aggregate, "seq": seq}, id_, None,
             {"aggregate_id": aggregate})
            for id_, aggregate, seq in events
        ]
    )  # fmt: skip
    health_port = free_port()
    target = urlsplit(broker_url if link == "rabbitmq" else database_url)
    ordering = (
        {
            "OUTBOX_RELAY_ORDERED": "true",
            "OUTBOX_RELAY_PARTITION_QUEUES": str(PARTITIONS),
            "OUTBOX_RELAY_REBALANCE_INTERVAL": "0.5",
        }
        if ordered
        else {}
    )
    with HangingProxy(target.port or (5672 if link == "rabbitmq" else 5432)) as proxy:
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
            **ordering,
        )
        ready = readyz(health_port)
        wait_until(ready, timeout=30)
        # When its link hangs mid-stream, then comes back
        cut_and_restore(
            proxy,
            progress=lambda: len(env.effect_counts()),
            log=worker.log,
            alive=worker.running,
            ready=ready,
            bound=CONSUMER_RABBITMQ_BOUND if link == "rabbitmq" else CONSUMER_POSTGRES_BOUND,
            link_line="RabbitMQ" if link == "rabbitmq" else "PostgreSQL",
            in_flight=1,  # a commit held by the proxy
        )
        wait_until(lambda: len(env.effect_counts()) == CONSUMER_EVENTS, timeout=120)
        queues = settings.topology().partition_queues if ordered else [settings.queue]
        wait_until(lambda: sum(env.queue_count(q) for q in queues) == 0, timeout=30)
        assert worker.stop() == 0, worker.log()[-3000:]
    # Then every event was applied exactly once (the inbox absorbs the redeliveries),
    assert env.effect_counts() == {id_: 1 for id_, _, _ in events}
    if ordered:
        # and, ordered, each aggregate's events in sequence.
        position = {id_: (aggregate, seq) for id_, aggregate, seq in events}
        applied: dict[str, list[int]] = defaultdict(list)
        for event_id in env.applied_order():
            aggregate, seq = position[event_id]
            applied[aggregate].append(seq)
        for aggregate, seqs in applied.items():
            assert seqs == sorted(seqs), f"{aggregate} applied out of order: {seqs}"


# What the relay's log line names, and how soon it must notice, per broker.
BROKER_NAMES = {"nats": "NATS", "redis": "Redis", "mqtt": "MQTT", "webhook": "webhook"}
BROKER_BOUNDS = {
    "nats": CONFIRM_TIMEOUT,
    "redis": CONFIRM_TIMEOUT,
    "mqtt": CONFIRM_TIMEOUT,
    "webhook": WEBHOOK_BOUND,
}
# One POST per event to Python's http.server behind the proxy is slow (tens a second here).
EVENTS = {"nats": 6000, "redis": 6000, "mqtt": 6000, "webhook": 1500}
BROKER_SINKS: dict[str, Callable[[], Sink]] = {**SINKS, "webhook": WebhookSink}


@pytest.mark.parametrize("broker", sorted(BROKER_NAMES))
def test_a_broker_link_that_hangs_is_noticed_in_bound_and_republishes_losing_nothing(
    broker: str,
    database_url: str,
    relay_factory: Callable[..., RelayProcess],
    workload: Callable[..., Workload],
) -> None:
    """NATS, Redis, MQTT: a publish whose acknowledgement never comes times out per
    --confirm-timeout. The webhook (an HTTP endpoint that stops answering without closing): a
    request unanswered within --webhook-timeout (its default) whose probe goes unanswered too."""
    sink = BROKER_SINKS[broker]()
    try:
        sink.start()
        options = sink.options()
        health_port = free_port()
        with HangingProxy(urlsplit(options["broker_url"]).port or 0) as proxy:
            env = cli_env(
                database_url=database_url,
                batch_size=BATCH_SIZE,
                poll_interval=0.2,
                retry_backoff=0.2,
                confirm_timeout=CONFIRM_TIMEOUT,
                health_port=health_port,
                **{**options, "broker_url": via(options["broker_url"], proxy.port)},
            )
            relay = relay_factory(env).start()
            relay.wait_for_log("holding 64 of 64 partitions")
            load = workload(total=EVENTS[broker], producers=2, aggregates=100).start()
            cut_and_restore(
                proxy,
                progress=sink.count,
                log=relay.log,
                alive=lambda: relay.running,
                ready=readyz(health_port),
                bound=BROKER_BOUNDS[broker],
                link_line=BROKER_NAMES[broker],
                in_flight=BATCH_SIZE,
            )
            load.join()
            produced = set(load.produced)

            def everything() -> list[Received] | None:
                got = sink.received()
                return got if produced <= {r.event_id for r in got} else None

            received: list[Received] = wait_until(everything, timeout=120, interval=0.5)
            assert relay.terminate() == 0
        duplicates = check_arrivals(received, load.produced, load.versions())
        # Duplicates at most what was in flight when the link hung (a batch and its overlap).
        assert duplicates <= 2 * BATCH_SIZE, duplicates
        status = read_status(cli_env(database_url=database_url))
        assert status["pending"] == 0
        assert status["dead"] == 0, status
    finally:
        sink.cleanup()
