"""What the relay publishes to, per broker other than RabbitMQ, and a reader of what arrived:
NATS JetStream, Redis Streams, MQTT (each can restart its broker) and an HTTP endpoint for the
webhook. ``check_arrivals`` checks what arrived against what was produced.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable

import redis

from tests.acceptance.conftest import ProducedEvent
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
from tests.contract.http_sink import HttpSink

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


class WebhookSink(Sink):
    """An HTTP endpoint (tests/contract/http_sink.py) answering 200 to every event it is POSTed."""

    def __init__(self) -> None:
        self.http = HttpSink()

    def options(self) -> dict[str, str]:
        return {"broker_url": self.http.url}

    def start(self) -> None:
        self.http.start()

    def count(self) -> int:
        return len({r.headers["idempotency-key"] for r in self.http.requests})

    def received(self) -> list[Received]:
        received = []
        for request in self.http.requests:
            body = request.json()
            headers = body["headers"]
            assert isinstance(headers, dict)
            received.append(
                Received(
                    event_id=str(body["event_id"]),
                    event_type=str(body["event_type"]),
                    aggregate_type=str(body["aggregate_type"]),
                    aggregate_id=str(body["aggregate_id"]),
                    headers={
                        k: v if isinstance(v, str) else json.dumps(v) for k, v in headers.items()
                    },
                    payload=json.dumps(body["payload"]).encode(),
                    where=request.path,
                )
            )
        return received

    def cleanup(self) -> None:
        self.http.stop()


# The brokers that can be restarted under a running relay.
SINKS: dict[str, Callable[[], Sink]] = {"nats": NatsSink, "redis": RedisSink, "mqtt": MqttSink}


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
