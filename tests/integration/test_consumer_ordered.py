"""Ordered consumption (``ConsumerSettings(ordered=True)``) against the real RabbitMQ and
PostgreSQL: partitions by aggregate, retries in place, dead letters that let later events go on,
partitions spread over workers and taken over when one leaves."""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pika
import psycopg
import pytest

from outbox_relay.consumer import FAILURE_REASON_HEADER, Consumer, Event, NoHooks, dlq
from outbox_relay.consumer import topology as topo
from outbox_relay.errors import ConfigError
from tests.conftest import wait_until
from tests.integration.consumer_harness import (
    ConsumerEnv,
    WorkerThread,
    consumer_env,
    record_effect,
    require_consistent_hash,
)

pytestmark = pytest.mark.integration

Message = tuple[str, Any, str, bytes | None, dict[str, Any] | None]


@pytest.fixture
def env(broker_url: str, database_url: str, exchange: str) -> Iterator[ConsumerEnv]:
    require_consistent_hash(broker_url)
    yield from consumer_env(broker_url, database_url, exchange)


def event(aggregate: str, seq: int, event_type: str = "order.updated") -> tuple[str, Message]:
    event_id = str(uuid.uuid4())
    payload = {"aggregate": aggregate, "seq": seq}
    return event_id, (event_type, payload, event_id, None, {"aggregate_id": aggregate})


def inversions(applied: list[str], position: dict[str, tuple[str, int]]) -> int:
    """Pairs of one aggregate's events applied in the opposite order of their publication."""
    per_aggregate: dict[str, list[int]] = defaultdict(list)
    for event_id in applied:
        aggregate, seq = position[event_id]
        per_aggregate[aggregate].append(seq)
    return sum(
        1
        for seqs in per_aggregate.values()
        for earlier, later in itertools.combinations(seqs, 2)
        if earlier > later
    )


def partition_of(env: ConsumerEnv, topology: topo.Topology, aggregate: str) -> int:
    """Where the hash exchange sends ``aggregate`` (a probe message, taken off again)."""
    probe_id, message = event(aggregate, -1)
    env.publish_many([message])
    connection = pika.BlockingConnection(pika.URLParameters(env.broker_url))
    try:
        channel = connection.channel()
        for index, queue in enumerate(topology.partition_queues):
            method, props, _ = channel.basic_get(queue, auto_ack=True)
            if method is not None:
                assert props.message_id == probe_id
                return index
    finally:
        connection.close()
    raise AssertionError(f"the probe for {aggregate!r} reached no partition")


def aggregates_on_distinct_partitions(
    env: ConsumerEnv, topology: topo.Topology, count: int
) -> list[str]:
    found: dict[int, str] = {}
    for n in itertools.count():
        aggregate = f"agg-{n}"
        found.setdefault(partition_of(env, topology, aggregate), aggregate)
        if len(found) == count:
            return list(found.values())
    raise AssertionError("unreachable")


class Recorder(NoHooks):
    def __init__(self) -> None:
        self.retried: list[tuple[str, float]] = []
        self.dead: list[str | None] = []

    def on_retried(self, event: Event, delay: float, reason: str) -> None:
        self.retried.append((event.event_id, delay))

    def on_dead_lettered(self, event_id: str | None, event_type: str | None, reason: str) -> None:
        self.dead.append(event_id)


# -- topology ------------------------------------------------------------------------------------


def test_ordered_topology_sends_each_aggregate_to_one_partition_in_publish_order(
    env: ConsumerEnv,
) -> None:
    settings = env.settings(ordered=True, partition_queues=4, bindings=("order.*",))
    topology = settings.topology()
    topo.apply(env.broker_url, topology)
    topo.apply(env.broker_url, topology)  # again: nothing changes

    assert topology.retry_queues == []  # retries happen in place
    published: dict[str, list[int]] = {f"agg-{n}": [] for n in range(40)}
    messages = []
    for seq in range(5):
        for aggregate in published:
            messages.append(event(aggregate, seq)[1])
            published[aggregate].append(seq)
    env.publish_many(messages)

    seen: dict[str, list[tuple[int, int]]] = defaultdict(list)
    connection = pika.BlockingConnection(pika.URLParameters(env.broker_url))
    try:
        channel = connection.channel()
        for index, queue in enumerate(topology.partition_queues):
            while True:
                method, props, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    break
                payload = json.loads(body)
                seen[props.headers["aggregate_id"]].append((index, payload["seq"]))
    finally:
        connection.close()
    assert set(seen) == set(published)
    for aggregate, got in seen.items():
        assert len({index for index, _ in got}) == 1, f"{aggregate} was split over partitions"
        assert [seq for _, seq in got] == published[aggregate]
    assert len({got[0][0] for got in seen.values()}) == 4  # every partition has some
    assert topo.queue_depths(env.broker_url, [settings.queue])[0].messages is None


def test_ordered_and_unordered_topologies_of_one_queue_refuse_each_other(
    env: ConsumerEnv,
) -> None:
    plain = env.settings()
    topo.apply(env.broker_url, plain.topology())
    with pytest.raises(ConfigError, match="declared without --ordered"):
        topo.apply(env.broker_url, env.settings(plain.queue, ordered=True).topology())

    ordered = env.settings(ordered=True, partition_queues=4)
    topo.apply(env.broker_url, ordered.topology())
    with pytest.raises(ConfigError, match="was declared --ordered"):
        topo.apply(env.broker_url, env.settings(ordered.queue).topology())
    with pytest.raises(ConfigError, match="has 4 partition"):
        topo.apply(
            env.broker_url, env.settings(ordered.queue, ordered=True, partition_queues=8).topology()
        )


# -- one worker ----------------------------------------------------------------------------------


def test_a_failing_event_is_retried_in_place_before_the_next_of_its_aggregate(
    env: ConsumerEnv,
) -> None:
    consumer = Consumer()
    hooks = Recorder()
    failures = {}
    attempts: list[tuple[int, float]] = []

    settings = env.settings(ordered=True, partition_queues=4, max_attempts=4, retry_delay=0.3)
    topology = settings.topology()
    topo.apply(env.broker_url, topology)
    slow, other = aggregates_on_distinct_partitions(env, topology, 2)
    first, first_message = event(slow, 0)
    ids_and_messages = [(first, first_message), event(slow, 1), event(slow, 2), event(other, 0)]
    failures[first] = 2  # fails on attempts 1 and 2

    @consumer.handler("order.*")
    def handle(event: Event, db: psycopg.Connection[Any]) -> None:
        if event.event_id == first:
            attempts.append((event.attempt, time.monotonic()))
        if failures.get(event.event_id, 0) >= event.attempt:
            raise ConnectionError("inventory service down")
        record_effect(event, db)

    env.publish_many([message for _, message in ids_and_messages])
    ids = [event_id for event_id, _ in ids_and_messages]
    with WorkerThread(consumer, settings, hooks=hooks):
        wait_until(lambda: len(env.applied_order()) == 4, timeout=30)
    applied = env.applied_order()
    # The other aggregate's partition did not wait for the retries.
    assert applied == [ids[3], ids[0], ids[1], ids[2]]
    assert [a for a, _ in attempts] == [1, 2, 3]
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.29  # the delays are minimums
    assert gaps[1] >= 0.59
    assert hooks.retried == [(first, 0.3), (first, 0.6)]
    assert env.effect_counts() == dict.fromkeys(ids, 1)
    assert env.dead_letters(settings) == []


def test_a_dead_lettered_event_lets_later_ones_go_on_and_its_replay_runs_after_them(
    env: ConsumerEnv,
) -> None:
    consumer = Consumer()
    hooks = Recorder()
    broken: set[str] = set()

    @consumer.handler("order.*")
    def handle(event: Event, db: psycopg.Connection[Any]) -> None:
        if event.event_id in broken:
            raise RuntimeError("cannot compute the tax")
        record_effect(event, db)

    settings = env.settings(ordered=True, partition_queues=2, max_attempts=3, retry_delay=0.05)
    env.declare(settings)
    published = [event("o-7", seq) for seq in range(4)]
    ids = [event_id for event_id, _ in published]
    broken.add(ids[1])
    env.publish_many([message for _, message in published])
    dead_queue = settings.topology().dead_letter_queue
    with WorkerThread(consumer, settings, hooks=hooks):
        wait_until(lambda: len(env.applied_order()) == 3, timeout=30)
        assert env.applied_order() == [ids[0], ids[2], ids[3]]
        wait_until(lambda: env.queue_count(dead_queue) == 1)
        total, dead = dlq.list_dead(env.broker_url, settings.queue)
        assert (total, dead[0].event_id, dead[0].attempts) == (1, ids[1], 3)
        assert "gave up after 3 attempt(s)" in (dead[0].reason or "")
        assert dead[0].headers["aggregate_id"] == "o-7"

        broken.clear()  # fixed and deployed
        assert dlq.replay(env.broker_url, settings.queue) == 1
        wait_until(lambda: len(env.applied_order()) == 4, timeout=30)
    # Replayed like a late event: after the events of its aggregate that followed it.
    assert env.applied_order() == [ids[0], ids[2], ids[3], ids[1]]
    assert hooks.dead == [ids[1]]
    assert env.queue_count(dead_queue) == 0


def test_permanent_failures_are_dead_lettered_at_once_in_ordered_mode(env: ConsumerEnv) -> None:
    consumer = Consumer(transient=(ConnectionError,))
    calls: list[str] = []

    @consumer.handler("order.refused")
    def refused(event: Event) -> None:
        calls.append(event.event_id)
        raise ValueError("not retried: only ConnectionError is transient")

    consumer.add_handler("order.*", record_effect)
    settings = env.settings(ordered=True, partition_queues=2, max_attempts=5)
    env.declare(settings)
    bad, bad_message = event("o-1", 0, "order.refused")
    good, good_message = event("o-1", 1)
    env.publish_many([bad_message, good_message])
    with WorkerThread(consumer, settings):
        wait_until(lambda: env.effect_counts() == {good: 1})
    assert calls == [bad]
    [(_, props, _)] = env.dead_letters(settings)
    assert props.message_id == bad
    assert "not retried" in props.headers[FAILURE_REASON_HEADER]


# -- several workers -----------------------------------------------------------------------------


def test_partitions_spread_over_workers_and_move_when_workers_come_and_go(
    env: ConsumerEnv,
) -> None:
    consumer = Consumer()
    consumer.add_handler("order.*", record_effect)
    settings = env.settings(ordered=True, partition_queues=8, rebalance_interval=0.1)
    env.declare(settings)
    threads = [WorkerThread(consumer, settings, name=f"w{n}") for n in range(3)]

    def spread(*workers: WorkerThread) -> list[int]:
        held = [w.worker.partitions for w in workers]
        everything = sorted(itertools.chain.from_iterable(held))
        return sorted(len(h) for h in held) if everything == list(range(8)) else []

    first, second, third = threads
    with first:
        wait_until(lambda: spread(first) == [8])
        with second:
            wait_until(lambda: spread(first, second) == [4, 4])
            with third:
                wait_until(lambda: spread(first, second, third) == [2, 3, 3])
            # The third left: its partitions go to the others.
            wait_until(lambda: spread(first, second) == [4, 4])


def test_four_workers_apply_every_aggregate_in_order_exactly_once_while_workers_change(
    env: ConsumerEnv,
) -> None:
    consumer = Consumer()

    @consumer.handler("order.*")
    def handle(event: Event, db: psycopg.Connection[Any]) -> None:
        record_effect(event, db, threading.current_thread().name)

    settings = env.settings(ordered=True, partition_queues=16, prefetch=50, rebalance_interval=0.2)
    env.declare(settings)
    position: dict[str, tuple[str, int]] = {}
    streams: dict[str, list[Message]] = {}
    for n in range(150):
        aggregate = f"order-{n}"
        streams[aggregate] = []
        for seq in range(20):
            event_id, message = event(aggregate, seq)
            position[event_id] = (aggregate, seq)
            streams[aggregate].append(message)
            if random.random() < 0.1:  # a duplicate right behind (a relay republish)
                streams[aggregate].append(message)
    # Interleave the aggregates, each one's events in order, as the relay publishes them.
    messages: list[Message] = []
    cursors = {aggregate: 0 for aggregate in streams}
    while cursors:
        aggregate = random.choice(list(cursors))
        messages.append(streams[aggregate][cursors[aggregate]])
        cursors[aggregate] += 1
        if cursors[aggregate] == len(streams[aggregate]):
            del cursors[aggregate]

    workers = [WorkerThread(consumer, settings, name=f"w{n}") for n in range(4)]
    for worker in workers[:3]:
        worker.__enter__()
    try:
        publisher = threading.Thread(target=env.publish_many, args=(messages,))
        publisher.start()
        wait_until(lambda: len(env.effect_counts()) >= 800, timeout=60)
        workers[3].__enter__()  # one joins
        wait_until(lambda: len(env.effect_counts()) >= 1600, timeout=60)
        workers[0].__exit__(None, None, None)  # one leaves
        publisher.join(60)
        wait_until(lambda: len(env.effect_counts()) == len(position), timeout=120, interval=0.5)
    finally:
        for worker in workers[1:]:
            worker.__exit__(None, None, None)
    assert set(env.effect_counts().values()) == {1}
    assert inversions(env.applied_order(), position) == 0
    with psycopg.connect(env.database_url) as conn:
        row = conn.execute("SELECT count(DISTINCT worker) FROM effects").fetchone()
    assert row == (4,)  # all four took part
