"""RabbitMQ behind a proxy (HAProxy, a load balancer) restarting: the proxy accepts each new
connection and closes it before the AMQP handshake, which is also what a service of another kind
does with an AMQP client. Once the URL has answered like RabbitMQ, that hang-up is a broker away,
retried like a refused connection, never a wrong URL that stops the relay or the consumer (found
by bench/fault_soak.py: the relay exited with code 3 at every broker restart)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from outbox_relay.consumer import Consumer, Event
from outbox_relay.consumer.topology import connect
from outbox_relay.errors import BrokerUnavailableError, ConfigError
from outbox_relay.publishers import PublisherSettings
from outbox_relay.publishers.rabbitmq import RabbitMQPublisher
from tests.conftest import RabbitQueue, wait_until
from tests.faults import HangingProxy
from tests.integration.consumer_harness import (
    ConsumerEnv,
    WorkerThread,
    consumer_env,
    record_effect,
)
from tests.integration.relay_harness import RelayThread, collect, drain, relay_settings, scalar
from tests.integration.test_relay_disruption import (
    Producer,
    assert_every_event_delivered_in_order,
)

pytestmark = pytest.mark.integration


def via(url: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{port}"))


def proxy_to(url: str) -> HangingProxy:
    parts = urlsplit(url)
    return HangingProxy(parts.port or 5672, parts.hostname or "127.0.0.1")


@contextlib.asynccontextmanager
async def hanging_up() -> AsyncIterator[int]:
    """A port that accepts and closes at once, before any byte."""

    async def close(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def test_the_publisher_retries_a_hang_up_once_the_url_answered_like_rabbitmq(
    broker_url: str, exchange: str
) -> None:
    async def scenario() -> None:
        with proxy_to(broker_url) as proxy:
            publisher = RabbitMQPublisher(
                PublisherSettings(
                    broker_url=via(broker_url, proxy.port), exchange=exchange, confirm_timeout=5
                )
            )
            await publisher.connect()
            proxy.unplug()
            await asyncio.sleep(0.2)
            await publisher.close()
            await publisher.connect()

    with pytest.raises(BrokerUnavailableError) as caught:
        asyncio.run(asyncio.wait_for(scenario(), timeout=30))

    assert not isinstance(caught.value, ConfigError)
    assert "closed the connection before the AMQP handshake" in str(caught.value)


def test_a_hang_up_at_the_first_connection_stays_a_wrong_url() -> None:
    async def scenario() -> None:
        async with hanging_up() as port:
            publisher = RabbitMQPublisher(
                PublisherSettings(broker_url=f"amqp://guest:guest@127.0.0.1:{port}/%2F")
            )
            await publisher.connect()

    with pytest.raises(ConfigError, match="did not answer like an AMQP 0-9-1 server"):
        asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_the_consumers_connection_retries_a_hang_up_once_answered() -> None:
    async def scenario(answered: bool) -> BaseException:
        async with hanging_up() as port:
            url = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
            try:
                # Blocking, on a thread: the hang-up server runs on this loop.
                await asyncio.to_thread(connect, url, answered=answered)
            except (BrokerUnavailableError, ConfigError) as exc:
                return exc
        raise AssertionError("connected to a port that hangs up")

    assert isinstance(asyncio.run(scenario(answered=False)), ConfigError)
    retried = asyncio.run(scenario(answered=True))
    assert isinstance(retried, BrokerUnavailableError)
    assert not isinstance(retried, ConfigError)


def test_the_relay_rides_out_a_broker_restarting_behind_a_proxy(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    producer = Producer(database_url)
    with proxy_to(broker_url) as proxy:
        settings = relay_settings(
            database_url, via(broker_url, proxy.port), exchange, batch_size=50
        )
        with RelayThread(settings) as relay, producer.running():
            arrived = collect(queue, 300)
            proxy.unplug()
            # Several reconnects hang up (backoff 0.1 s to 1 s) while rows pile up.
            committed = producer.committed
            wait_until(lambda: producer.committed >= committed + 300, timeout=60)
            assert relay.running, "the relay stopped on a broker restarting behind a proxy"
            proxy.plug()
            wait_until(lambda: producer.committed >= 3000, timeout=120)
            producer.stop()
            wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0, timeout=60)
            assert relay.running
    arrived += drain(queue)
    assert_every_event_delivered_in_order(arrived, producer.versions())


@pytest.fixture
def env(broker_url: str, database_url: str, exchange: str) -> Iterator[ConsumerEnv]:
    yield from consumer_env(broker_url, database_url, exchange)


def test_the_consumer_rides_out_a_broker_restarting_behind_a_proxy(env: ConsumerEnv) -> None:
    consumer = Consumer()

    @consumer.handler("order.*")
    def handle(event: Event, db: psycopg.Connection[Any]) -> None:
        record_effect(event, db)

    with proxy_to(env.broker_url) as proxy:
        settings = env.settings(broker_url=via(env.broker_url, proxy.port))
        env.declare(settings)
        before = env.publish("order.created", {"n": 1})
        thread = WorkerThread(consumer, settings)
        with thread as worker:
            wait_until(lambda: before in env.effect_counts())
            proxy.unplug()
            wait_until(lambda: not worker.ready.is_set())
            # Reconnects (at most reconnect_max_delay = 1 s apart) hang up for a while.
            after = env.publish("order.paid", {"n": 2})
            time.sleep(3)
            assert thread.error is None, thread.error
            proxy.plug()
            wait_until(lambda: after in env.effect_counts(), timeout=30)
    assert env.effect_counts() == {before: 1, after: 1}
