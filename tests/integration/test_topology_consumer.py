"""Topology as code against the real RabbitMQ: idempotent, quorum-capable, clear on conflicts."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pika
import psycopg
import pytest

from outbox_relay.consumer import Consumer, Event
from outbox_relay.consumer import topology as topo
from outbox_relay.errors import ConfigError
from tests.conftest import wait_until
from tests.integration.consumer_harness import (
    ConsumerEnv,
    WorkerThread,
    consumer_env,
    record_effect,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def env(broker_url: str, database_url: str, exchange: str) -> Iterator[ConsumerEnv]:
    yield from consumer_env(broker_url, database_url, exchange)


def test_apply_is_idempotent_and_declares_bindings_retry_queues_and_dlq(env: ConsumerEnv) -> None:
    settings = env.settings(bindings=("order.*", "payment.captured"), max_attempts=4)
    topology = settings.topology()
    topo.apply(env.broker_url, topology)
    topo.apply(env.broker_url, topology)  # again: no error, nothing changes

    assert topology.retry_queues == [
        f"{settings.queue}.retry.200ms",
        f"{settings.queue}.retry.400ms",
        f"{settings.queue}.retry.800ms",
    ]
    depths = topo.queue_depths(
        env.broker_url, [settings.queue, topology.dead_letter_queue, *topology.retry_queues]
    )
    assert all(d.messages == 0 for d in depths)

    env.publish("order.created", {})
    env.publish("payment.captured", {})
    assert env.queue_count(settings.queue) == 2


def test_a_retry_queue_dead_letters_back_into_the_main_queue_after_its_ttl(
    env: ConsumerEnv,
) -> None:
    settings = env.settings(retry_delay=0.1)
    topology = settings.topology()
    topo.apply(env.broker_url, topology)
    connection = pika.BlockingConnection(pika.URLParameters(env.broker_url))
    try:
        channel = connection.channel()
        channel.basic_publish("", topology.retry_queue(0.1), b"{}")
    finally:
        connection.close()
    wait_until(lambda: env.queue_count(settings.queue) == 1, timeout=10)
    assert env.queue_count(topology.retry_queue(0.1)) == 0


def test_declaring_against_a_queue_with_other_arguments_names_the_argument(
    env: ConsumerEnv,
) -> None:
    settings = env.settings()
    # An older tool made the queue without a dead-letter exchange.
    connection = pika.BlockingConnection(pika.URLParameters(env.broker_url))
    connection.channel().queue_declare(settings.queue, durable=True)
    connection.close()

    with pytest.raises(ConfigError) as raised:
        topo.apply(env.broker_url, settings.topology())
    message = str(raised.value)
    assert repr(settings.queue) in message
    assert "x-dead-letter-exchange" in message


def test_switching_queue_type_is_refused_clearly(env: ConsumerEnv) -> None:
    settings = env.settings(queue_type=topo.QueueType.QUORUM)
    topo.apply(env.broker_url, settings.topology())
    classic = env.settings(settings.queue, queue_type=topo.QueueType.CLASSIC)
    with pytest.raises(ConfigError, match="x-queue-type"):
        topo.apply(env.broker_url, classic.topology())


def test_worker_stops_with_the_config_error_instead_of_retrying(env: ConsumerEnv) -> None:
    settings = env.settings()
    connection = pika.BlockingConnection(pika.URLParameters(env.broker_url))
    connection.channel().queue_declare(settings.queue, durable=True, arguments={"x-max-length": 5})
    connection.close()
    worker = Consumer().worker(settings)
    with pytest.raises(ConfigError, match="inequivalent arg"):
        worker.run()


def test_quorum_queues_carry_the_whole_retry_path(env: ConsumerEnv) -> None:
    consumer = Consumer()
    failed_once = threading.Event()

    @consumer.handler("order.*")
    def handle(event: Event, db: psycopg.Connection[object]) -> None:
        if not failed_once.is_set():
            failed_once.set()
            raise TimeoutError("inventory service slow")
        record_effect(event, db)

    settings = env.settings(queue_type=topo.QueueType.QUORUM, retry_delay=0.1)
    env.declare(settings)
    event_id = env.publish("order.created", {})
    with WorkerThread(consumer, settings):
        wait_until(lambda: env.effect_counts() == {event_id: 1}, timeout=30)
    assert failed_once.is_set()
