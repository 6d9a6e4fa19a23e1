"""The consumer against real RabbitMQ and PostgreSQL: exactly-once effects, retries, dead letters."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import psycopg
import pytest

from outbox_relay.consumer import (
    ATTEMPTS_HEADER,
    FAILURE_REASON_HEADER,
    Consumer,
    Event,
    NoHooks,
    PermanentError,
    dlq,
)
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


class CountingHooks(NoHooks):
    def __init__(self) -> None:
        self.handled: list[str] = []
        self.deduped: list[str] = []
        self.retried: list[tuple[str, float]] = []
        self.dead: list[tuple[str | None, str]] = []
        self.redelivered: list[str | None] = []

    def on_handled(self, event: Event, seconds: float) -> None:
        self.handled.append(event.event_id)

    def on_deduped(self, event: Event) -> None:
        self.deduped.append(event.event_id)

    def on_retried(self, event: Event, delay: float, reason: str) -> None:
        self.retried.append((event.event_id, delay))

    def on_dead_lettered(self, event_id: str | None, event_type: str | None, reason: str) -> None:
        self.dead.append((event_id, reason))

    def on_redelivered(self, event_id: str | None, event_type: str | None) -> None:
        self.redelivered.append(event_id)


def test_handler_receives_a_typed_event_in_the_inbox_transaction(env: ConsumerEnv) -> None:
    consumer = Consumer()
    seen: list[Event] = []

    @consumer.handler("order.*")
    def handle(event: Event, db: psycopg.Connection[Any]) -> None:
        seen.append(event)
        record_effect(event, db)
        # The inbox row is written in this very transaction, before the handler runs.
        row = db.execute(
            "SELECT count(*) FROM processed_events WHERE event_id = %s", (event.event_id,)
        ).fetchone()
        assert row == (1,)

    settings = env.settings()
    env.declare(settings)
    event_id = env.publish(
        "order.created", {"total": 12.5}, headers={"traceparent": "00-abc-def-01"}
    )
    with WorkerThread(consumer, settings):
        wait_until(lambda: env.effect_counts() == {event_id: 1})
    event = seen[0]
    assert (event.event_id, event.event_type) == (event_id, "order.created")
    assert (event.aggregate_type, event.aggregate_id) == ("order", "o-1")
    assert event.payload == {"total": 12.5}
    assert event.headers["traceparent"] == "00-abc-def-01"
    assert (event.attempt, event.redelivered) == (1, False)


def test_duplicate_publish_and_forced_redelivery_apply_each_event_once(env: ConsumerEnv) -> None:
    consumer = Consumer()
    hooks = CountingHooks()
    holder: dict[str, WorkerThread] = {}
    dropped: set[str] = set()

    @consumer.handler("order.*")
    def handle(event: Event, db: psycopg.Connection[Any]) -> None:
        record_effect(event, db)
        if event.payload.get("drop_connection") and event.event_id not in dropped:
            # The work is done and about to commit, but the broker connection goes away before
            # the ack: RabbitMQ requeues the message and redelivers it after the reconnect.
            dropped.add(event.event_id)
            connection = holder["thread"].worker.connection
            assert connection is not None
            connection.close()

    settings = env.settings()
    env.declare(settings)
    duplicated = env.publish("order.created", {"n": 1}, copies=2)
    redelivered = env.publish("order.paid", {"drop_connection": True})
    holder["thread"] = WorkerThread(consumer, settings, hooks=hooks)
    with holder["thread"]:
        # The dropped delivery's ack never happened, so it counts neither as handled nor deduped.
        wait_until(lambda: len(hooks.handled) + len(hooks.deduped) == 3, timeout=30)
        wait_until(lambda: env.queue_count(settings.queue) == 0)
    assert env.effect_counts() == {duplicated: 1, redelivered: 1}
    assert hooks.handled == [duplicated]
    assert sorted(hooks.deduped) == sorted([duplicated, redelivered])
    assert redelivered in hooks.redelivered


def test_transient_failures_are_retried_after_the_configured_delays(env: ConsumerEnv) -> None:
    consumer = Consumer()
    hooks = CountingHooks()
    attempts: list[tuple[int, float]] = []

    @consumer.handler("order.*")
    def flaky(event: Event, db: psycopg.Connection[Any]) -> None:
        attempts.append((event.attempt, time.monotonic()))
        record_effect(event, db)  # rolled back with the failure
        if event.attempt < 3:
            raise ConnectionError(f"payment service down (attempt {event.attempt})")

    settings = env.settings(max_attempts=4, retry_delay=0.2)
    env.declare(settings)
    event_id = env.publish("order.created", {"n": 1})
    with WorkerThread(consumer, settings, hooks=hooks):
        wait_until(lambda: env.effect_counts() == {event_id: 1}, timeout=30)
    assert [a for a, _ in attempts] == [1, 2, 3]
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(attempts)]
    # Delays double: 0.2 s before attempt 2, 0.4 s before attempt 3 (the TTL is a lower bound).
    assert gaps[0] >= 0.19
    assert gaps[1] >= 0.39
    assert hooks.retried == [(event_id, 0.2), (event_id, 0.4)]
    assert hooks.handled == [event_id]
    assert env.dead_letters(settings) == []


def test_poison_message_is_dead_lettered_after_max_attempts_and_replay_brings_it_back(
    env: ConsumerEnv,
) -> None:
    consumer = Consumer()
    hooks = CountingHooks()
    broken = threading.Event()
    broken.set()

    seen: list[Event] = []

    @consumer.handler("order.*")
    def handle(event: Event, db: psycopg.Connection[Any]) -> None:
        seen.append(event)
        if broken.is_set():
            raise RuntimeError("cannot parse the shipping address")
        record_effect(event, db)

    settings = env.settings(max_attempts=3, retry_delay=0.05)
    env.declare(settings)
    event_id = env.publish("order.created", {"address": "???"}, headers={"tenant": "acme"})
    dead_queue = settings.topology().dead_letter_queue
    with WorkerThread(consumer, settings, hooks=hooks):
        wait_until(lambda: env.queue_count(dead_queue) == 1, timeout=30)
        total, dead = dlq.list_dead(env.broker_url, settings.queue)
        assert total == 1
        assert dead[0].event_id == event_id
        assert dead[0].attempts == 3
        assert dead[0].reason is not None
        assert "gave up after 3 attempt(s)" in dead[0].reason
        assert "cannot parse the shipping address" in dead[0].reason
        assert dead[0].headers["tenant"] == "acme"
        assert dead[0].body == b'{"address": "???"}'
        assert env.effect_counts() == {}

        broken.clear()  # the bug is fixed and deployed
        assert dlq.replay(env.broker_url, settings.queue) == 1
        wait_until(lambda: env.effect_counts() == {event_id: 1}, timeout=30)
    assert env.queue_count(dead_queue) == 0
    assert [e for e, _ in hooks.dead] == [event_id]
    # The replayed copy starts afresh: attempt 1, no failure headers, original headers kept.
    assert [e.attempt for e in seen] == [1, 2, 3, 1]
    assert FAILURE_REASON_HEADER not in seen[-1].headers
    assert ATTEMPTS_HEADER not in seen[-1].headers
    assert seen[-1].headers["tenant"] == "acme"


def test_permanent_failures_go_straight_to_the_dlq(env: ConsumerEnv) -> None:
    consumer = Consumer()
    calls: list[str] = []

    def must_have_total(payload: Any) -> None:
        if "total" not in payload:
            raise ValueError("missing total")

    @consumer.handler("order.created", validate=must_have_total)
    def created(event: Event) -> None:
        calls.append(event.event_id)

    @consumer.handler("order.refused")
    def refused(event: Event) -> None:
        calls.append(event.event_id)
        raise PermanentError("order belongs to a deleted tenant")

    settings = env.settings(max_attempts=5)
    env.declare(settings)
    bad_json = env.publish("order.created", body=b"{not json")
    invalid = env.publish("order.created", {"lines": []})
    rejected = env.publish("order.refused", {"total": 1})
    unhandled = env.publish("order.shipped", {"total": 1})
    dead_queue = settings.topology().dead_letter_queue
    with WorkerThread(consumer, settings):
        wait_until(lambda: env.queue_count(dead_queue) == 4, timeout=30)
    dead = {props.message_id: (props, body) for _, props, body in env.dead_letters(settings)}
    reasons = {
        event_id: props.headers[FAILURE_REASON_HEADER] for event_id, (props, _) in dead.items()
    }
    assert "invalid JSON body" in reasons[bad_json]
    assert "validation failed" in reasons[invalid]
    assert "missing total" in reasons[invalid]
    assert "order belongs to a deleted tenant" in reasons[rejected]
    assert "no handler for event type 'order.shipped'" in reasons[unhandled]
    assert all(props.headers[ATTEMPTS_HEADER] == 1 for props, _ in dead.values())
    assert dead[bad_json][1] == b"{not json"
    assert calls == [rejected]  # tried once, never retried


def test_only_configured_exception_types_are_retried(env: ConsumerEnv) -> None:
    consumer = Consumer(transient=(ConnectionError,))
    attempts: list[int] = []

    @consumer.handler("order.*")
    def handle(event: Event) -> None:
        attempts.append(event.attempt)
        raise KeyError("bug in the handler")

    settings = env.settings(max_attempts=5)
    env.declare(settings)
    env.publish("order.created", {})
    with WorkerThread(consumer, settings):
        wait_until(lambda: env.queue_count(settings.topology().dead_letter_queue) == 1)
    assert attempts == [1]


def test_racing_consumers_on_one_event_id_apply_it_once(env: ConsumerEnv) -> None:
    """Two copies of one event reach two workers at once: the second waits, then skips."""
    consumer = Consumer()
    inside = threading.Event()
    release = threading.Event()

    @consumer.handler("order.*")
    def handle(event: Event, db: psycopg.Connection[Any]) -> None:
        record_effect(event, db, threading.current_thread().name)
        if not inside.is_set():
            inside.set()
            release.wait(10)  # hold the transaction open while the racer arrives

    settings = env.settings(prefetch=1)
    env.declare(settings)
    hooks = CountingHooks()
    with (
        WorkerThread(consumer, settings, hooks=hooks, name="w1"),
        WorkerThread(consumer, settings, hooks=hooks, name="w2"),
    ):
        event_id = env.publish("order.created", {}, copies=2)
        wait_until(inside.is_set)
        # The racer's INSERT into the inbox is blocked on the first one's uncommitted row.
        wait_until(lambda: _waiting_on_lock(env.database_url), timeout=10)
        release.set()
        wait_until(lambda: len(hooks.handled) + len(hooks.deduped) == 2)
    assert env.effect_counts() == {event_id: 1}
    assert hooks.deduped == [event_id]


def _waiting_on_lock(database_url: str) -> bool:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return bool(row and row[0] >= 1)


def test_sigterm_style_stop_finishes_the_message_in_flight(env: ConsumerEnv) -> None:
    consumer = Consumer()
    started = threading.Event()
    proceed = threading.Event()

    @consumer.handler("order.*")
    def slow(event: Event, db: psycopg.Connection[Any]) -> None:
        record_effect(event, db)
        started.set()
        proceed.wait(10)

    settings = env.settings(prefetch=10)
    env.declare(settings)
    ids = [env.publish("order.created", {"n": n}) for n in range(5)]
    thread = WorkerThread(consumer, settings)
    with thread as worker:
        wait_until(started.is_set)
        worker.stop()  # what SIGTERM does
        proceed.set()
        wait_until(lambda: not worker.ready.is_set())
    # The in-flight event was applied and acked; the prefetched rest went back to the queue.
    assert env.effect_counts() == {ids[0]: 1}
    assert env.queue_count(settings.queue) == 4


def test_four_workers_apply_each_of_10000_events_exactly_once(env: ConsumerEnv) -> None:
    consumer = Consumer()

    @consumer.handler("order.*")
    def handle(event: Event, db: psycopg.Connection[Any]) -> None:
        record_effect(event, db, threading.current_thread().name)

    settings = env.settings(prefetch=200)
    env.declare(settings)
    ids = [str(uuid.uuid4()) for _ in range(10_000)]
    messages: list[tuple[str, Any, str, bytes | None, dict[str, Any] | None]] = []
    for n, event_id in enumerate(ids):
        messages.append(("order.created", None, event_id, b'{"n": %d}' % n, None))
        if n % 10 == 0:  # every tenth event published twice, back to back: copies race
            messages.append(("order.created", None, event_id, b'{"n": %d}' % n, None))
    threads = [WorkerThread(consumer, settings, name=f"w{n}") for n in range(4)]
    for thread in threads:
        thread.__enter__()
    try:
        env.publish_many(messages)
        wait_until(lambda: len(env.effect_counts()) == len(ids), timeout=240, interval=0.5)
        wait_until(lambda: env.queue_count(settings.queue) == 0)
    finally:
        for thread in threads:
            thread.__exit__(None, None, None)
    counts = env.effect_counts()
    assert set(counts) == set(ids)
    assert set(counts.values()) == {1}
    with psycopg.connect(env.database_url) as conn:
        per_worker = conn.execute("SELECT count(DISTINCT worker) FROM effects").fetchone()
    assert per_worker == (4,)  # all four took part


def test_worker_reconnects_after_losing_its_database_connection(env: ConsumerEnv) -> None:
    consumer = Consumer()
    consumer.add_handler("order.*", record_effect)
    settings = env.settings()
    env.declare(settings)
    first = env.publish("order.created", {})
    with WorkerThread(consumer, settings):
        wait_until(lambda: env.effect_counts() == {first: 1})
        with psycopg.connect(env.database_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (f"outbox-relay-consumer:{settings.queue}",),
            ).fetchone()
        assert killed == (1,)
        second = env.publish("order.created", {})
        wait_until(lambda: env.effect_counts() == {first: 1, second: 1}, timeout=30)


def test_messages_without_a_type_keep_their_event_type_through_retries(env: ConsumerEnv) -> None:
    consumer = Consumer()
    types: list[str] = []

    @consumer.handler("order.created")
    def handle(event: Event, db: psycopg.Connection[Any]) -> None:
        types.append(event.event_type)
        if event.attempt == 1:
            raise ConnectionError("try again")
        record_effect(event, db)

    settings = env.settings(retry_delay=0.05)
    env.declare(settings)
    connection = pika.BlockingConnection(pika.URLParameters(env.broker_url))
    connection.channel().basic_publish(
        env.exchange, "order.created", b"{}", pika.BasicProperties(message_id="no-type-1")
    )
    connection.close()
    with WorkerThread(consumer, settings):
        wait_until(lambda: env.effect_counts() == {"no-type-1": 1})
    # The retry came back through the default exchange (routing key = queue name), yet it is
    # still an order.created: the type travels in the message's properties.
    assert types == ["order.created", "order.created"]
