"""The core acceptance scenario on NATS JetStream, Redis Streams and MQTT (RabbitMQ has its own
in test_delivery.py): 10,000 events written with plain SQL by 8 concurrent producers over 200
aggregates, relayed by the installed ``outbox-relay serve`` while it is SIGKILLed and restarted
once and the broker is restarted once. Every event must arrive (at least once; duplicates are
counted by event id), and per aggregate the first arrivals must be in commit order.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator

import pytest
import redis

from tests.acceptance.conftest import (
    ProducedEvent,
    RelayProcess,
    Workload,
    cli_env,
    read_status,
)
from tests.brokers import (
    MOSQUITTO,
    MQTT_URL,
    NATS,
    NATS_URL,
    REDIS,
    REDIS_URL,
    MqttSubscriber,
    Received,
    nats_cleanup,
    nats_stream_count,
    nats_stream_messages,
    redis_cleanup,
    redis_client,
    unique,
    wait_for_jetstream,
)
from tests.conftest import wait_until

pytestmark = [pytest.mark.acceptance, pytest.mark.disruptive]

TOTAL = 10_000
BATCH_SIZE = 500
KILL_AT = 2_500  # events arrived when the relay is SIGKILLed
BROKER_RESTART_AT = 6_000  # events produced when the broker restarts: mid-stream by design


# -- one sink per broker: what the relay is pointed at, and a reader of what arrived ---------------


class Sink:
    def options(self) -> dict[str, str]:
        raise NotImplementedError

    def start(self) -> None:
        pass

    def count(self) -> int:
        """Events arrived so far (a cheap, possibly approximate count)."""
        raise NotImplementedError

    def received(self) -> list[Received]:
        raise NotImplementedError

    def restart_broker(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        pass


class NatsSink(Sink):
    """The relay creates the stream; JetStream keeps every message, read back at the end."""

    def __init__(self) -> None:
        self.stream = unique("ACC").upper()
        self.prefix = unique("acc")

    def options(self) -> dict[str, str]:
        return {"broker_url": NATS_URL, "topic_prefix": self.prefix, "nats_stream": self.stream}

    def count(self) -> int:
        try:
            return asyncio.run(nats_stream_count(self.stream))
        except Exception:  # not created yet
            return 0

    def received(self) -> list[Received]:
        return asyncio.run(nats_stream_messages(self.stream))

    def restart_broker(self) -> None:
        try:
            NATS.stop()
        finally:
            NATS.start()
            wait_for_jetstream()

    def cleanup(self) -> None:
        NATS.start()
        nats_cleanup(self.stream)


class RedisSink(Sink):
    """One stream (``--redis-stream-mode single``: one order across event types), read live.

    This Redis keeps nothing across a restart (no RDB, no AOF), so entries must be read before
    it goes down: writes are paused, the reader catches up, then ``shutdown nosave``. The relay's
    pipeline blocked by the pause fails with the connection and is republished.
    """

    def __init__(self) -> None:
        self.key = unique("acc")
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._last = "0-0"
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._read, name="redis-reader", daemon=True)

    def options(self) -> dict[str, str]:
        return {"broker_url": REDIS_URL, "topic_prefix": self.key, "redis_stream_mode": "single"}

    def start(self) -> None:
        self._thread.start()

    def count(self) -> int:
        with self._lock:
            return len(self._received)

    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def _read(self) -> None:
        client: redis.Redis | None = None
        while not self._stopping.is_set():
            try:
                if client is None:
                    client = redis_client()
                chunks = client.xread({self.key: self._last}, count=2000, block=100)
            except (redis.ConnectionError, redis.TimeoutError):
                client = None
                self._stopping.wait(0.05)  # Redis is restarting
                continue
            for _key, entries in chunks or []:
                with self._lock:
                    for entry_id, fields in entries:
                        f = {k.decode(): v for k, v in fields.items()}
                        self._received.append(
                            Received(
                                event_id=f["event_id"].decode(),
                                event_type=f["event_type"].decode(),
                                aggregate_type=f["aggregate_type"].decode(),
                                aggregate_id=f["aggregate_id"].decode(),
                                headers=json.loads(f["headers"]),
                                payload=f["payload"],
                                where=self.key,
                            )
                        )
                        self._last = entry_id.decode()

    def _caught_up(self, client: redis.Redis) -> bool:
        last = client.xinfo_stream(self.key)["last-generated-id"].decode()
        with self._lock:
            mine = self._last

        def as_tuple(entry: str) -> tuple[int, int]:
            ms, seq = entry.split("-")
            return int(ms), int(seq)

        return as_tuple(mine) >= as_tuple(last)

    def restart_broker(self) -> None:
        client = redis_client()
        try:
            client.execute_command("CLIENT", "PAUSE", "15000", "WRITE")
            wait_until(lambda: self._caught_up(client), timeout=15)
            REDIS.stop()
        finally:
            client.close()
            REDIS.start()

    def cleanup(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        redis_cleanup(self.key)


class MqttSink(Sink):
    """A live subscriber on ``<prefix>/#`` with a persistent session (survives the restart)."""

    def __init__(self) -> None:
        self.prefix = unique("acc")
        self.subscriber = MqttSubscriber(f"{self.prefix}/#")

    def options(self) -> dict[str, str]:
        return {"broker_url": MQTT_URL, "topic_prefix": self.prefix}

    def start(self) -> None:
        self.subscriber.start()

    def count(self) -> int:
        return self.subscriber.unique_count()

    def received(self) -> list[Received]:
        return self.subscriber.messages

    def restart_broker(self) -> None:
        try:
            MOSQUITTO.stop()
        finally:
            MOSQUITTO.start()

    def cleanup(self) -> None:
        MOSQUITTO.start()
        self.subscriber.stop()


SINKS: dict[str, Callable[[], Sink]] = {"nats": NatsSink, "redis": RedisSink, "mqtt": MqttSink}


@pytest.fixture(params=sorted(SINKS))
def sink(request: pytest.FixtureRequest) -> Iterator[Sink]:
    made = SINKS[request.param]()
    try:
        yield made
    finally:
        made.cleanup()


# -- checking --------------------------------------------------------------------------------------


def check_arrivals(
    received: list[Received], produced: dict[str, ProducedEvent], versions: dict[str, int]
) -> int:
    """Every event arrived with the contract, first arrivals in commit order; returns duplicates."""
    first: dict[str, Received] = {}
    duplicates = 0
    for record in received:
        assert record.event_id in produced, f"unexpected message {record!r}"
        if record.event_id in first:
            duplicates += 1
            assert record.payload == first[record.event_id].payload
            continue
        first[record.event_id] = record
    missing = set(produced) - set(first)
    assert not missing, f"{len(missing)} event(s) never arrived, e.g. {sorted(missing)[:3]}"
    sequences: dict[str, list[int]] = {}
    for event_id, record in first.items():  # in first-arrival order
        expected = produced[event_id]
        assert record.event_type == expected.event_type
        assert record.aggregate_type == "order"
        assert record.aggregate_id == expected.aggregate_id
        assert record.headers["producer"] == expected.producer
        body = json.loads(record.payload)
        assert body["event"] == event_id
        sequences.setdefault(body["agg"], []).append(body["seq"])
    for aggregate, seqs in sequences.items():
        assert seqs == list(range(1, versions[aggregate] + 1)), (
            f"aggregate {aggregate}: arrival order {seqs[:50]}... is not commit order"
        )
    return duplicates


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
    load = workload(total=TOTAL, producers=8, aggregates=200).start()

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
