"""The machine's NATS, Redis and Mosquitto for the tests: where they are, how to stop and start
them (disruptive tests), and readers that turn what each broker holds into one record type.

Stopping uses each service's own means (``redis-cli shutdown nosave``, SIGTERM to the server
process); starting uses the same commands as ``scripts/services.sh``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import paho.mqtt.client as paho
import redis
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import wait_until

NATS_URL = os.environ.get("OUTBOX_RELAY_TEST_NATS_URL", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("OUTBOX_RELAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MQTT_URL = os.environ.get("OUTBOX_RELAY_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")

REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
    "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip
NATS_START = [
    "start-stop-daemon", "--start", "--oknodo", "--background", "--exec", "/usr/sbin/nats-server",
    "--", "-a", "127.0.0.1", "-p", "4222", "-js", "-sd", "/var/lib/nats-server",
    "-l", "/var/log/nats-server.log",
]  # fmt: skip
MOSQUITTO_START = ["mosquitto", "-d", "-c", "/etc/mosquitto/mosquitto.conf"]
MOSQUITTO_PID_FILE = Path("/run/mosquitto/mosquitto.pid")


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


# -- service control ------------------------------------------------------------------------------


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed: {done.stdout}{done.stderr}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _terminate(pids: list[int]) -> None:
    """SIGTERM (the server saves its state and exits), then wait until each process is gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not any(_pid_alive(p) for p in pids), timeout=30)


def _pids_of(executable: str) -> list[int]:
    done = subprocess.run(["pgrep", "-x", executable], capture_output=True, text=True, check=False)
    return [int(p) for p in done.stdout.split()]


@dataclass(frozen=True)
class Service:
    name: str
    port: int
    stop_action: Callable[[], None]
    start_command: list[str]

    def stop(self) -> None:
        self.stop_action()
        wait_until(lambda: not port_open(self.port), timeout=30)

    def start(self) -> None:
        """Start it if it is down (idempotent: safe in a ``finally``)."""
        if not port_open(self.port):
            _run(*self.start_command)
        wait_until(lambda: port_open(self.port), timeout=60)


def _stop_redis() -> None:
    subprocess.run(
        ["redis-cli", "-p", "6379", "shutdown", "nosave"],
        capture_output=True,
        timeout=30,
        check=False,
    )


def _stop_nats() -> None:
    _terminate(_pids_of("nats-server"))


def _stop_mosquitto() -> None:
    pids = [int(MOSQUITTO_PID_FILE.read_text().strip())] if MOSQUITTO_PID_FILE.exists() else []
    _terminate(pids or _pids_of("mosquitto"))


REDIS = Service("redis", 6379, _stop_redis, REDIS_START)
NATS = Service("nats", 4222, _stop_nats, NATS_START)
MOSQUITTO = Service("mosquitto", 1883, _stop_mosquitto, MOSQUITTO_START)


def wait_for_jetstream(timeout: float = 30.0) -> None:
    """After a restart NATS accepts connections before JetStream has recovered its streams."""

    async def ready() -> bool:
        try:
            nc = await nats.connect(
                NATS_URL, allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=1
            )
        except Exception:
            return False
        try:
            await nc.jetstream().account_info()
            return True
        except Exception:
            return False
        finally:
            await nc.close()

    wait_until(lambda: asyncio.run(ready()), timeout=timeout, interval=0.2)


# -- what arrived, broker-independent ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    event_id: str
    event_type: str
    aggregate_type: str | None
    aggregate_id: str | None
    headers: dict[str, str]  # every header as text (JSON text for non-strings)
    payload: bytes
    where: str  # subject / stream / topic / path


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


# NATS: read the stream back (it keeps every message) --------------------------------------------


async def nats_stream_messages(stream: str) -> list[Received]:
    """Every message the stream holds, in stream order (an ordered push consumer)."""
    nc = await nats.connect(NATS_URL, allow_reconnect=False)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        total = info.state.messages
        if not total:
            return []
        [subject] = info.config.subjects or [">"]
        sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
        received = []
        try:
            while len(received) < total:
                msg = await sub.next_msg(timeout=10)
                headers = dict(msg.headers or {})
                received.append(
                    Received(
                        event_id=headers["Nats-Msg-Id"],
                        event_type=headers["Outbox-Event-Type"],
                        aggregate_type=headers.get("aggregate_type"),
                        aggregate_id=headers.get("aggregate_id"),
                        headers=headers,
                        payload=msg.data,
                        where=msg.subject,
                    )
                )
        finally:
            await sub.unsubscribe()
        return received
    finally:
        await nc.close()


async def nats_stream_raw(stream: str) -> list[tuple[dict[str, str], bytes]]:
    """Every message the stream holds as sent: (headers, body), in stream order."""
    nc = await nats.connect(NATS_URL, allow_reconnect=False)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        total = info.state.messages
        if not total:
            return []
        [subject] = info.config.subjects or [">"]
        sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
        got = []
        try:
            while len(got) < total:
                msg = await sub.next_msg(timeout=10)
                got.append((dict(msg.headers or {}), msg.data))
        finally:
            await sub.unsubscribe()
        return got
    finally:
        await nc.close()


async def nats_stream_count(stream: str) -> int:
    nc = await nats.connect(NATS_URL, allow_reconnect=False, max_reconnect_attempts=1)
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.state.messages)
    finally:
        await nc.close()


async def nats_make_stream(stream: str, subjects: list[str]) -> None:
    nc = await nats.connect(NATS_URL, allow_reconnect=False)
    try:
        await nc.jetstream().add_stream(name=stream, subjects=subjects)
    finally:
        await nc.close()


async def nats_delete_stream(stream: str) -> None:
    nc = await nats.connect(NATS_URL, allow_reconnect=False)
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


def nats_cleanup(stream: str) -> None:
    wait_for_jetstream()
    asyncio.run(nats_delete_stream(stream))


# Redis: read the streams back --------------------------------------------------------------------


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def redis_entries(keys: list[str]) -> list[Received]:
    """Every entry of the given streams; one key keeps its order, several are concatenated."""
    client = redis_client()
    received = []
    try:
        for key in keys:
            start = "-"
            while True:
                chunk = client.xrange(key, min=start, count=5000)
                if not chunk:
                    break
                for _entry_id, fields in chunk:
                    f = {k.decode(): v for k, v in fields.items()}
                    headers = json.loads(f["headers"])
                    received.append(
                        Received(
                            event_id=f["event_id"].decode(),
                            event_type=f["event_type"].decode(),
                            aggregate_type=f["aggregate_type"].decode()
                            if "aggregate_type" in f
                            else None,
                            aggregate_id=f["aggregate_id"].decode()
                            if "aggregate_id" in f
                            else None,
                            headers={k: _text(v) for k, v in headers.items()},
                            payload=f["payload"],
                            where=key,
                        )
                    )
                last = chunk[-1][0].decode()
                start = "(" + last
    finally:
        client.close()
    return received


def redis_raw_entries(keys: list[str]) -> list[dict[str, bytes]]:
    """Every entry of the given streams as its fields (names decoded, values as stored)."""
    client = redis_client()
    try:
        return [
            {k.decode(): v for k, v in fields.items()}
            for key in keys
            for _entry_id, fields in client.xrange(key)
        ]
    finally:
        client.close()


def redis_keys(pattern: str) -> list[str]:
    client = redis_client()
    try:
        return sorted(k.decode() for k in client.scan_iter(match=pattern, count=1000))
    finally:
        client.close()


def redis_cleanup(pattern: str) -> None:
    REDIS.start()
    client = redis_client()
    try:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# MQTT: a live subscriber with a persistent session ------------------------------------------------


class MqttSubscriber:
    """Subscribes (QoS 1, MQTT 5, a persistent session) and records messages in arrival order.

    The session outlives a broker restart (Mosquitto persists it on SIGTERM), and the subscriber
    reconnects by itself within ~50 ms, so messages confirmed to the relay while it was away are
    delivered once it is back. A large receive maximum keeps Mosquitto from queueing (and, past
    its max_queued_messages, dropping) messages for a slow reader.
    """

    def __init__(self, topic_filter: str, port: int = 1883) -> None:
        self.topic_filter = topic_filter
        self.port = port
        self.client_id = unique("contract-sub-")
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        # As sent: (Content Type or None, user properties in order, payload).
        self._raw: list[tuple[str | None, list[tuple[str, str]], bytes]] = []
        self._ids: set[str] = set()
        self._stopping = threading.Event()
        self._subscribed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.client_id, daemon=True)
        self.connects = 0

    def start(self) -> MqttSubscriber:
        self._thread.start()
        wait_until(self._subscribed.is_set, timeout=30)
        return self

    def stop(self, *, forget_session: bool = True) -> None:
        self._stopping.set()
        self._thread.join(timeout=15)
        if forget_session and port_open(self.port):
            # Connect once with a clean start so Mosquitto drops the persisted session.
            client = self._client()
            client.connect("127.0.0.1", self.port, clean_start=True)
            client.disconnect()

    @property
    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._messages)

    @property
    def raw(self) -> list[tuple[str | None, list[tuple[str, str]], bytes]]:
        with self._lock:
            return list(self._raw)

    def unique_count(self) -> int:
        with self._lock:
            return len(self._ids)

    def has_all(self, ids: set[str]) -> bool:
        with self._lock:
            return ids <= self._ids

    def _client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5
        )
        client.max_inflight_messages_set(0)
        return client

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        user_properties = list(getattr(msg.properties, "UserProperty", []) or [])
        props = dict(user_properties)
        record = Received(
            event_id=props.get("event_id", ""),
            event_type=props.get("event_type", ""),
            aggregate_type=props.get("aggregate_type"),
            aggregate_id=props.get("aggregate_id"),
            headers=props,
            payload=msg.payload,
            where=msg.topic,
        )
        content_type = getattr(msg.properties, "ContentType", None)
        with self._lock:
            self._messages.append(record)
            self._raw.append((content_type, user_properties, msg.payload))
            self._ids.add(record.event_id)

    def _run(self) -> None:
        connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
        connect_props.SessionExpiryInterval = 600
        connect_props.ReceiveMaximum = 65535
        while not self._stopping.is_set():
            client = self._client()
            client.on_message = self._on_message
            client.on_subscribe = lambda *_args: self._subscribed.set()
            try:
                client.connect(
                    "127.0.0.1",
                    self.port,
                    keepalive=30,
                    clean_start=False,
                    properties=connect_props,
                )
            except OSError:
                self._stopping.wait(0.05)
                continue
            self.connects += 1
            client.subscribe(self.topic_filter, qos=1)
            while not self._stopping.is_set():
                if client.loop(timeout=0.05) != paho.MQTT_ERR_SUCCESS:
                    break
            with contextlib.suppress(OSError):
                client.disconnect()
