"""Relay and consumer metrics recorded through the SDK's in-memory reader; probe verdicts; hooks
that fail without stopping anything."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from outbox_relay.consumer import Event
from outbox_relay.consumer.hooks import CompositeConsumerHooks
from outbox_relay.messages import CONFIRMED, Failure, OutboxMessage, failed
from outbox_relay.observability.health import HealthServer, HealthThread
from outbox_relay.observability.metrics import (
    Backlog,
    ConsumerMetrics,
    RelayMetrics,
    failure_reason,
)
from outbox_relay.relay.hooks import CompositeHooks, NoRelayHooks


def message(n: int, age: float = 2.0) -> OutboxMessage:
    return OutboxMessage(
        id=n,
        event_id=f"e-{n}",
        event_type="order.created",
        aggregate_type=None,
        aggregate_id=None,
        payload=b"{}",
        headers={},
        created_at=datetime.now(UTC) - timedelta(seconds=age),
    )


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    found: dict[str, list[Any]] = {}
    if data is None:  # nothing recorded at all
        return found
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def test_relay_metrics_count_what_the_broker_said() -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("t")
    backlog = Backlog()
    hooks = RelayMetrics(meter, system="rabbitmq", destination="events", backlog=backlog)
    batch = [message(1), message(2), message(3)]
    hooks.after_claim(batch, 0.001)
    hooks.after_publish(
        batch, [CONFIRMED, CONFIRMED, failed("unroutable: 312 NO_ROUTE (exchange ...)")], 0.02
    )
    hooks.on_publish_error(batch[:1], ConnectionError("lost"))
    hooks.after_settle([1, 2], [Failure(3, "unroutable", False)], dead=1, seconds=0.001)
    backlog.pending, backlog.oldest_age = 42, 7.5

    got = points(reader)
    assert [p.value for p in got["outbox_relay.events.published"]] == [2]
    failures = {p.attributes["reason"]: p.value for p in got["outbox_relay.publish.failures"]}
    assert failures == {"unroutable": 1, "broker_unavailable": 1}
    assert [p.value for p in got["outbox_relay.events.dead_lettered"]] == [1]
    (lag,) = got["outbox_relay.delivery.lag"]
    assert lag.count == 2
    assert 3.9 < lag.sum < 10  # two events about 2 s old
    (confirm,) = got["outbox_relay.publish.duration"]
    assert (confirm.count, confirm.sum) == (1, pytest.approx(0.02))
    (size,) = got["outbox_relay.batch.size"]
    assert size.sum == 3
    assert [p.value for p in got["outbox_relay.pending"]] == [42]
    assert [p.value for p in got["outbox_relay.pending.oldest_age"]] == [7.5]
    assert got["outbox_relay.pending"][0].attributes == {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": "events",
    }


def test_a_big_wave_records_a_bounded_sample_of_its_lag() -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("t")
    hooks = RelayMetrics(meter, system="rabbitmq", destination="events", backlog=Backlog())
    wave = [message(n, age=1000 - n) for n in range(1000)]
    hooks.after_publish(wave, [CONFIRMED] * 1000, 0.05)
    got = points(reader)
    assert [p.value for p in got["outbox_relay.events.published"]] == [1000]
    (lag,) = got["outbox_relay.delivery.lag"]
    assert 64 <= lag.count <= 70
    assert lag.max >= 999  # the oldest event is always in the sample


def test_relays_of_one_process_report_apart_under_their_outbox_label() -> None:
    # serve --config: one meter, one RelayMetrics per outbox; every gauge reports each of them.
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("t")
    orders, billing = Backlog(), Backlog()
    first = RelayMetrics(
        meter, system="rabbitmq", destination="o", backlog=orders, relay="r", outbox="orders"
    )
    second = RelayMetrics(
        meter, system="rabbitmq", destination="b", backlog=billing, relay="r", outbox="billing"
    )
    first.after_publish([message(1)], [CONFIRMED], 0.01)
    second.after_publish([message(2), message(3)], [CONFIRMED, CONFIRMED], 0.01)
    first.after_rebalance(owned=64, gained=64, lost=0)
    second.after_rebalance(owned=32, gained=32, lost=0)
    orders.pending, billing.pending = 5, 7

    got = points(reader)

    def by_outbox(name: str) -> dict[str, Any]:
        return {p.attributes["outbox"]: p.value for p in got[name]}

    assert by_outbox("outbox_relay.events.published") == {"orders": 1, "billing": 2}
    assert by_outbox("outbox_relay.partitions.owned") == {"orders": 64, "billing": 32}
    assert by_outbox("outbox_relay.pending") == {"orders": 5, "billing": 7}


def test_backlog_gauges_report_nothing_before_the_first_sample() -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("t")
    RelayMetrics(meter, system="rabbitmq", destination="events", backlog=Backlog())
    assert "outbox_relay.pending" not in points(reader)


@pytest.mark.parametrize(
    ("reason", "permanent", "label"),
    [
        ("unroutable: 312 NO_ROUTE", False, "unroutable"),
        ("nacked by RabbitMQ (internal error or queue overflow)", False, "nacked"),
        ("payload of 9 bytes exceeds the 8-byte limit", True, "too_large"),
        ("headers cannot be encoded as AMQP: ...", True, "unencodable"),
        ("webhook answered 400", True, "rejected"),
        (None, False, "other"),
    ],
)
def test_failure_reasons_are_a_small_set(reason: str | None, permanent: bool, label: str) -> None:
    assert failure_reason(reason, permanent) == label


def event(event_type: str = "order.created") -> Event:
    return Event("e-1", event_type, "order", "o-1", {}, {})


def test_consumer_metrics_count_each_outcome() -> None:
    reader = InMemoryMetricReader()
    hooks = ConsumerMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"), queue="q1")
    hooks.on_handled(event(), 0.01)
    hooks.on_handler_latency("order.created", 0.01)
    hooks.on_deduped(event())
    hooks.on_retried(event(), 1.0, "boom")
    hooks.on_dead_lettered("e-1", "order.created", "boom")
    hooks.on_redelivered("e-1", "order.created")
    got = points(reader)
    for name in ("handled", "deduped", "retried", "dead_lettered", "redelivered"):
        (point,) = got[f"outbox_relay.consumer.{name}"]
        assert point.value == 1, name
        assert point.attributes["event_type"] == "order.created"
    (latency,) = got["outbox_relay.consumer.handler.duration"]
    assert latency.count == 1


class Broken(NoRelayHooks):
    def before_publish(self, messages: Sequence[OutboxMessage]) -> Sequence[OutboxMessage]:
        raise RuntimeError("bug")

    def after_claim(self, messages: Sequence[OutboxMessage], seconds: float) -> None:
        raise RuntimeError("bug")


class Dropping(NoRelayHooks):
    def before_publish(self, messages: Sequence[OutboxMessage]) -> Sequence[OutboxMessage]:
        return messages[1:]


class Counting(NoRelayHooks):
    def __init__(self) -> None:
        self.claimed = 0

    def after_claim(self, messages: Sequence[OutboxMessage], seconds: float) -> None:
        self.claimed += len(messages)


def test_composite_hooks_contain_failures_and_never_lose_messages() -> None:
    counting = Counting()
    hooks = CompositeHooks([Broken(), Dropping(), counting])
    batch = [message(1), message(2)]
    assert hooks.before_publish(batch) == batch
    hooks.after_claim(batch, 0.0)
    assert counting.claimed == 2  # the hook after the broken one still ran


def test_composite_consumer_hooks_contain_failures() -> None:
    reader = InMemoryMetricReader()
    metrics = ConsumerMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"), queue="q")

    class Exploding:
        def on_handled(self, event: Event, seconds: float) -> None:
            raise RuntimeError("bug")

    hooks = CompositeConsumerHooks([Exploding(), metrics])  # type: ignore[list-item]  # a partial hooks object on purpose
    hooks.on_handled(event(), 0.1)
    assert points(reader)["outbox_relay.consumer.handled"][0].value == 1


# -- health ---------------------------------------------------------------------------------------


def test_livez_fails_once_the_heartbeat_is_stale_and_readyz_follows_ready() -> None:
    beat = [time.monotonic()]
    ready = [True]
    server = HealthServer(0, ready=lambda: ready[0], heartbeat=lambda: beat[0], stale_after=30)
    assert server.check("/livez")[0] == 200
    assert server.check("/readyz") == (200, {"status": "ready"})
    beat[0] -= 31
    ready[0] = False
    code, body = server.check("/livez")
    assert code == 503
    assert body["status"] == "stuck"
    assert server.check("/readyz")[0] == 503
    assert server.check("/metrics")[0] == 404


def test_health_server_answers_http_on_its_own_loop() -> None:
    async def scenario() -> tuple[bytes, bytes]:
        server = HealthServer(
            0, ready=lambda: False, heartbeat=time.monotonic, stale_after=30, host="127.0.0.1"
        )
        await server.start()
        try:
            answers = []
            for path in ("/livez", "/readyz"):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                answers.append(await reader.read())
                writer.close()
                await writer.wait_closed()
            return answers[0], answers[1]
        finally:
            await server.close()

    live, ready = asyncio.run(scenario())
    assert live.startswith(b"HTTP/1.1 200 OK\r\n")
    assert ready.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert json.loads(ready.split(b"\r\n\r\n", 1)[1]) == {"status": "not ready"}


def test_health_thread_serves_the_synchronous_consumer() -> None:
    server = HealthServer(
        0, ready=lambda: True, heartbeat=time.monotonic, stale_after=30, host="127.0.0.1"
    )
    thread = HealthThread(server)
    thread.start()
    url = f"http://127.0.0.1:{server.port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as got:
            assert (got.status, json.loads(got.read())) == (200, {"status": "ready"})
    finally:
        thread.close()
    with pytest.raises(urllib.error.URLError, match="refused"):
        urllib.request.urlopen(url, timeout=5)
