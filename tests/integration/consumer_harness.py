"""Helpers for consumer tests: unique topologies, publishing, a worker on a thread, effect counts.

Every test module defines a three-line ``env`` fixture that yields from ``consumer_env``, which
deletes every queue and exchange the test declared.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import pika
import pika.exceptions
import psycopg
import pytest

from outbox_relay.consumer import Consumer, ConsumerHooks, ConsumerSettings, Event, Worker
from outbox_relay.consumer import topology as topo
from tests.conftest import rabbit_cleanup, wait_until

EFFECTS_TABLE = """
CREATE TABLE IF NOT EXISTS effects (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id   text NOT NULL,
    event_type text NOT NULL,
    worker     text
)
"""


def record_effect(event: Event, db: psycopg.Connection[Any], worker: str | None = None) -> None:
    """A handler's own database work: one row per application (no unique key, so doubles show)."""
    db.execute(
        "INSERT INTO effects (event_id, event_type, worker) VALUES (%s, %s, %s)",
        (event.event_id, event.event_type, worker),
    )


# Retry delays (ms) the tests' consumers may use: the doubling series of every base delay the
# tests and the CLI default start from, capped as the CLI caps them.
_TEST_RETRY_DELAYS_MS = sorted(
    {round(base * 2**k * 1000) for base in (0.05, 0.1, 0.2, 0.5, 1.0) for k in range(8)}
    | {2000, 300_000}
)


@dataclasses.dataclass
class ConsumerEnv:
    broker_url: str
    database_url: str
    exchange: str
    topologies: list[topo.Topology] = dataclasses.field(default_factory=list)

    def settings(self, queue: str | None = None, **overrides: Any) -> ConsumerSettings:
        """Settings tuned for tests (short retry delays); the topology is deleted after the test."""
        values: dict[str, Any] = {
            "broker_url": self.broker_url,
            "database_url": self.database_url,
            "queue": queue or f"q.consumer.{uuid.uuid4().hex[:10]}",
            "bindings": ("order.*",),
            "exchange": self.exchange,
            "prefetch": 50,
            "max_attempts": 3,
            "retry_delay": 0.2,
            "retry_delay_max": 2.0,
            "reconnect_max_delay": 1.0,
        }
        values.update(overrides)
        settings = ConsumerSettings(**values)
        self.topologies.append(settings.topology())
        return settings

    def declare(self, settings: ConsumerSettings) -> None:
        topo.apply(self.broker_url, settings.topology())

    def publish(
        self,
        routing_key: str,
        payload: Any = None,
        *,
        event_id: str | None = None,
        body: bytes | None = None,
        headers: dict[str, Any] | None = None,
        copies: int = 1,
    ) -> str:
        """Publish one event as the relay does (confirmed); ``copies`` > 1 duplicates it."""
        event_id = event_id or str(uuid.uuid4())
        self.publish_many([(routing_key, payload, event_id, body, headers)] * copies)
        return event_id

    def publish_many(
        self, messages: list[tuple[str, Any, str, bytes | None, dict[str, Any] | None]]
    ) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.broker_url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            for routing_key, payload, event_id, body, headers in messages:
                channel.basic_publish(
                    self.exchange,
                    routing_key,
                    body if body is not None else json.dumps(payload or {}).encode(),
                    pika.BasicProperties(
                        content_type="application/json",
                        delivery_mode=2,
                        message_id=event_id,
                        type=routing_key,
                        headers={
                            "aggregate_type": "order",
                            "aggregate_id": "o-1",
                            **(headers or {}),
                        },
                    ),
                    mandatory=True,
                )
        finally:
            connection.close()

    def create_effects_table(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(EFFECTS_TABLE)

    def effect_counts(self) -> dict[str, int]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT event_id, count(*) FROM effects GROUP BY event_id"
            ).fetchall()
        return {event_id: int(count) for event_id, count in rows}

    def queue_count(self, name: str) -> int:
        found = topo.queue_depths(self.broker_url, [name])[0].messages
        assert found is not None, f"queue {name} does not exist"
        return found

    def dead_letters(self, settings: ConsumerSettings) -> list[tuple[Any, Any, bytes]]:
        """Every message in the DLQ, removed."""
        connection = pika.BlockingConnection(pika.URLParameters(self.broker_url))
        got = []
        try:
            channel = connection.channel()
            while True:
                method, props, body = channel.basic_get(
                    settings.topology().dead_letter_queue, auto_ack=True
                )
                if method is None:
                    return got
                got.append((method, props, body))
        finally:
            connection.close()

    def applied_order(self) -> list[str]:
        """Event ids of the effects in the order they were written (one aggregate's events are
        applied one after the other, so for them this is the commit order)."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            rows = conn.execute("SELECT event_id FROM effects ORDER BY id").fetchall()
        return [str(row[0]) for row in rows]

    def cleanup(self) -> None:
        def delete(channel: Any) -> None:
            for topology in self.topologies:
                names = [topology.queue, topology.dead_letter_queue, *topology.retry_queues]
                # CLI workers may have declared the ordered variant of a test's queue.
                ordered = topo.Topology(
                    topology.queue, ordered=True, partitions=topology.partitions
                )
                names += [*ordered.partition_queues, ordered.workers_queue, ordered.hungry_queue]
                channel.exchange_delete(ordered.hash_exchange)
                # Workers started through the CLI may have used other retry delays than the
                # settings registered here: delete every retry queue a test could have made.
                names += [f"{topology.queue}.retry.{ms}ms" for ms in _TEST_RETRY_DELAYS_MS]
                for name in dict.fromkeys(names):
                    channel.queue_delete(name)  # deleting a missing queue is not an error
                channel.exchange_delete(topology.dead_letter_exchange)

        rabbit_cleanup(self.broker_url, delete)


def require_consistent_hash(broker_url: str) -> None:
    """Fail (never skip) when RabbitMQ lacks the plugin ``--ordered`` needs."""
    name = f"q.consumer.plugin-check.{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        try:
            channel.exchange_declare(name, topo.HASH_EXCHANGE_TYPE, auto_delete=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            pytest.fail(
                f"RabbitMQ at {broker_url} cannot declare a {topo.HASH_EXCHANGE_TYPE!r} exchange "
                f"({exc.reply_text}): enable the plugin with `rabbitmq-plugins enable "
                "rabbitmq_consistent_hash_exchange` (scripts/services.sh does it locally)"
            )
        channel.exchange_delete(name)
    finally:
        connection.close()


def consumer_env(broker_url: str, database_url: str, exchange: str) -> Iterator[ConsumerEnv]:
    env = ConsumerEnv(broker_url, database_url, exchange)
    env.create_effects_table()
    try:
        yield env
    finally:
        env.cleanup()


class WorkerThread:
    """``with WorkerThread(consumer, settings) as worker:`` runs a Worker until the block ends."""

    def __init__(
        self,
        consumer: Consumer,
        settings: ConsumerSettings,
        *,
        hooks: ConsumerHooks | None = None,
        name: str = "consumer",
    ) -> None:
        self.worker: Worker = consumer.worker(settings, hooks=hooks)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Worker:
        self._thread.start()
        wait_until(lambda: self.worker.ready.is_set() or self.error is not None, timeout=30)
        if self.error is not None:
            raise self.error
        return self.worker

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.worker.stop()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "worker did not stop within 30s"
        if self.error is not None and exc is None:
            raise self.error
