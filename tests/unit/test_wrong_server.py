"""A broker URL pointing at another kind of service is a configuration error (exit code 3, one
line naming --broker-url) as soon as the peer answers something else or hangs up; a broker that
cannot be reached, or says nothing, stays a retried error. And a listen address given without
its port is refused.

The peers here are tiny servers on the loopback interface that answer what RabbitMQ, NATS,
PostgreSQL and Mosquitto answer a client of another protocol (tests/acceptance has the real ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from outbox_relay.errors import BrokerUnavailableError, ConfigError
from outbox_relay.observability.settings import ObservabilitySettings
from outbox_relay.publishers import PublisherSettings
from outbox_relay.publishers.mqtt import MqttPublisher, connack_problem
from outbox_relay.publishers.redis_streams import RedisStreamsPublisher, reply_problem

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
NATS_INFO = b'INFO {"server_id":"N","version":"2.10.0","max_payload":1048576}\r\n'

# -- what a peer does with a connection ------------------------------------------------------------

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def answers(data: bytes, *, then_close: bool = True) -> Behaviour:
    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the client's first bytes
        writer.write(data)
        await writer.drain()
        if not then_close:
            await reader.read()  # until the client hangs up

    return behave


async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)  # PostgreSQL reads a startup packet's length, then closes


async def resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def says_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # reads whatever comes, answers nothing (Redis to an MQTT CONNECT)


@contextlib.asynccontextmanager
async def peer(behave: Behaviour) -> AsyncIterator[int]:
    """A server on 127.0.0.1 doing ``behave`` with each connection; yields its port."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            with contextlib.suppress(OSError):
                await behave(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


def free_port() -> int:
    """A port nothing listens on: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings(url: str) -> PublisherSettings:
    return PublisherSettings(broker_url=url, confirm_timeout=1.0)


# -- MQTT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "mqtt5"),
    [
        (b"\x20\x03\x00\x00\x00", True),  # MQTT 5: flags, reason code, no properties
        (b"\x20\x09\x00\x00\x06\x22\x00\x0a", True),  # with properties
        (b"\x20\x02\x00\x01", True),  # a 3.1.1 broker refusing version 5: still a CONNACK
        (b"\x20\x02\x00\x00", False),
        (b"\x20\x02\x00\x05", False),  # refused (not authorized): a CONNACK
        (b"\x20", True),  # only the first byte yet
        (b"", True),  # nothing yet (a hang-up is judged when the connection ends)
    ],
)
def test_a_connack_is_recognised_by_its_first_bytes(head: bytes, mqtt5: bool) -> None:
    assert connack_problem(head, mqtt5) is None


@pytest.mark.parametrize(
    ("head", "mqtt5"),
    [
        (AMQP_HEADER, True),  # RabbitMQ
        (NATS_INFO, False),  # NATS
        (b"-ERR unknown command\r\n", True),  # Redis: 0x2D is type 2 with flags
        (b"HTTP/1.1 400 Bad Request\r\n", True),
        (b"\x20\x00", True),  # too short for a CONNACK
        (b"\x20\x03\x00\x00\x00", False),  # a 3.1.1 CONNACK is exactly 2 bytes long
        (b"\x30\x02\x00\x00", True),  # a PUBLISH before any CONNACK
    ],
)
def test_anything_else_first_is_not_a_connack(head: bytes, mqtt5: bool) -> None:
    problem = connack_problem(head, mqtt5)

    assert problem is not None
    assert "not a CONNACK" in problem
    assert repr(head[:16]) in problem


async def mqtt_connect(url: str) -> MqttPublisher:
    publisher = MqttPublisher(settings(url))
    try:
        await publisher.connect()
    finally:
        await publisher.close()
    return publisher


@pytest.mark.parametrize("version", ["5", "3.1.1"])
@pytest.mark.parametrize(
    ("behave", "says"),
    [
        (answers(AMQP_HEADER), "it answered b'AMQP\\x00\\x00\\t\\x01' to CONNECT"),
        (answers(NATS_INFO, then_close=False), "it answered b'INFO {"),
        (answers(b"garbage that stays open", then_close=False), "not a CONNACK"),
        (hangs_up, "it closed the connection without a CONNACK"),
        (resets, "it closed the connection without a CONNACK"),
    ],
    ids=["amqp-header", "nats-info", "garbage", "hang-up", "reset"],
)
def test_mqtt_at_another_service_is_a_config_error_naming_the_url(
    behave: Behaviour, says: str, version: str
) -> None:
    async def scenario() -> None:
        async with peer(behave) as port:
            await mqtt_connect(f"mqtt://relay:s3cret@127.0.0.1:{port}?version={version}")

    with pytest.raises(ConfigError) as caught:
        asyncio.run(asyncio.wait_for(scenario(), timeout=5))

    message = str(caught.value)
    assert message.startswith("--broker-url: mqtt://relay:***@127.0.0.1:")
    assert "did not answer like an MQTT broker" in message
    assert says in message
    assert "s3cret" not in message
    assert "\n" not in message


def test_mqtt_at_a_silent_peer_is_retried_saying_why() -> None:
    async def scenario() -> None:
        async with peer(says_nothing) as port:
            await mqtt_connect(f"mqtt://127.0.0.1:{port}")

    with pytest.raises(BrokerUnavailableError) as caught:
        asyncio.run(asyncio.wait_for(scenario(), timeout=5))

    assert "no CONNACK" in str(caught.value)
    assert "within 1s (is it an MQTT broker?)" in str(caught.value)
    assert not isinstance(caught.value, ConfigError)


def test_mqtt_at_a_closed_port_is_retried() -> None:
    with pytest.raises(BrokerUnavailableError) as caught:
        asyncio.run(mqtt_connect(f"mqtt://127.0.0.1:{free_port()}"))

    assert "cannot connect to MQTT broker" in str(caught.value)


@pytest.mark.parametrize(
    ("version", "connack"),
    [("5", b"\x20\x03\x00\x00\x00"), ("3.1.1", b"\x20\x02\x00\x00")],
)
def test_mqtt_connects_to_a_peer_answering_a_connack(version: str, connack: bytes) -> None:
    async def scenario() -> bool:
        async with peer(answers(connack, then_close=False)) as port:
            publisher = MqttPublisher(settings(f"mqtt://127.0.0.1:{port}?version={version}"))
            await publisher.connect()
            healthy = publisher.is_healthy()
            await publisher.close()
            return healthy

    assert asyncio.run(asyncio.wait_for(scenario(), timeout=5))


def test_mqtt_refused_credentials_stay_the_brokers_refusal() -> None:
    # A CONNACK refusing the connection (0x86 bad user name or password) is an MQTT answer.
    async def scenario() -> None:
        async with peer(answers(b"\x20\x03\x00\x86\x00")) as port:
            await mqtt_connect(f"mqtt://u:p@127.0.0.1:{port}")

    with pytest.raises(ConfigError) as caught:
        asyncio.run(asyncio.wait_for(scenario(), timeout=5))

    assert "refused the connection" in str(caught.value)
    assert "did not answer like" not in str(caught.value)


# -- Redis -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [b"+PONG\r\n", b"-NOAUTH Authentication required.\r\n", b"-LOADING loading\r\n", b"*1\r\n"],
)
def test_a_redis_reply_is_recognised_by_its_first_byte(answer: bytes) -> None:
    assert reply_problem(answer) is None


@pytest.mark.parametrize("answer", [AMQP_HEADER, NATS_INFO, b"HTTP/1.1 400 Bad Request\r\n"])
def test_anything_else_is_not_a_redis_reply(answer: bytes) -> None:
    assert reply_problem(answer) == f"it answered {answer[:16]!r} to PING"


def test_a_hang_up_before_any_reply_is_not_a_redis_server() -> None:
    assert reply_problem(b"") == "it closed the connection without answering PING"


async def redis_connect(url: str) -> None:
    publisher = RedisStreamsPublisher(settings(url))
    try:
        await publisher.connect()
    finally:
        await publisher.close()


@pytest.mark.parametrize(
    ("behave", "says"),
    [
        (answers(AMQP_HEADER), "it answered b'AMQP\\x00\\x00\\t\\x01' to PING"),
        (answers(NATS_INFO, then_close=False), "it answered b'INFO {"),
        (hangs_up, "it closed the connection without answering PING"),
        (resets, "it closed the connection without answering PING"),
    ],
    ids=["amqp-header", "nats-info", "hang-up", "reset"],
)
def test_redis_at_another_service_is_a_config_error_naming_the_url(
    behave: Behaviour, says: str
) -> None:
    async def scenario() -> None:
        async with peer(behave) as port:
            await redis_connect(f"redis://:s3cret@127.0.0.1:{port}/0")

    with pytest.raises(ConfigError) as caught:
        asyncio.run(asyncio.wait_for(scenario(), timeout=5))

    message = str(caught.value)
    assert message.startswith("--broker-url: redis://:***@127.0.0.1:")
    assert "did not answer like a Redis server" in message
    assert says in message
    assert "s3cret" not in message
    assert "\n" not in message


def test_redis_at_a_silent_peer_is_retried_saying_why() -> None:
    async def scenario() -> None:
        async with peer(says_nothing) as port:
            await redis_connect(f"redis://127.0.0.1:{port}/0")

    with pytest.raises(BrokerUnavailableError) as caught:
        asyncio.run(asyncio.wait_for(scenario(), timeout=5))

    assert "no answer to PING" in str(caught.value)
    assert "(is it a Redis server?)" in str(caught.value)


def test_redis_at_a_closed_port_is_retried() -> None:
    with pytest.raises(BrokerUnavailableError) as caught:
        asyncio.run(redis_connect(f"redis://127.0.0.1:{free_port()}/0"))

    assert "cannot connect to Redis" in str(caught.value)


def test_a_redis_error_reply_passes_the_probe() -> None:
    # -NOAUTH is Redis refusing the (missing) credentials: the server is Redis, and the
    # client's own connection then reports the credentials, not another service.
    async def scenario() -> None:
        async with peer(answers(b"-NOAUTH Authentication required.\r\n")) as port:
            await redis_connect(f"redis://127.0.0.1:{port}/0")

    with pytest.raises(ConfigError) as caught:
        asyncio.run(asyncio.wait_for(scenario(), timeout=5))

    assert "refused the credentials" in str(caught.value)


# -- listen addresses without their ports ------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "host", "port"),
    [
        ({"metrics_host": "0.0.0.0"}, "--metrics-host", "--metrics-port"),
        ({"health_host": "0.0.0.0"}, "--health-host", "--health-port"),
        ({"health_host": "::", "metrics_port": "9464"}, "--health-host", "--health-port"),
        ({"metrics_host": "0.0.0.0", "health_port": "8080"}, "--metrics-host", "--metrics-port"),
    ],
)
def test_a_listen_address_without_its_port_is_refused_naming_both(
    values: dict[str, str], host: str, port: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)

    with pytest.raises(ConfigError) as caught:
        ObservabilitySettings.from_mapping(values)

    message = str(caught.value)
    assert message.startswith(f"{host} (OUTBOX_RELAY_")
    assert f"applies only with {port}" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"metrics_host": "0.0.0.0", "metrics_port": "9464"},
        {"health_host": "0.0.0.0", "health_port": "8080"},
        {"metrics_port": "9464", "health_port": "8080"},
        # What every deploy artefact sets.
        {
            "metrics_host": "0.0.0.0",
            "metrics_port": "9464",
            "health_host": "0.0.0.0",
            "health_port": "8080",
        },
    ],
)
def test_listen_addresses_with_their_ports_are_accepted(
    values: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)

    ObservabilitySettings.from_mapping(values)


def test_metrics_host_serves_the_prometheus_exporter_without_metrics_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # OTEL_METRICS_EXPORTER=prometheus serves on OTEL_EXPORTER_PROMETHEUS_PORT, at
    # --metrics-host unless OTEL_EXPORTER_PROMETHEUS_HOST says otherwise: it takes effect.
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp,prometheus")

    settings = ObservabilitySettings.from_mapping({"metrics_host": "0.0.0.0"})

    assert settings.metrics_host == "0.0.0.0"
    with pytest.raises(ConfigError, match="--health-host"):
        ObservabilitySettings.from_mapping({"health_host": "0.0.0.0"})


# -- once answered, later odd answers are retried ----------------------------------------------------


def first_then(first: Behaviour, then: Behaviour) -> Behaviour:
    """``first`` for the first connection(s) a publisher makes, ``then`` for later ones."""
    seen: list[int] = []

    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(1)
        await (first if len(seen) == 1 else then)(reader, writer)

    return behave


def test_mqtt_hanging_up_after_a_connack_once_is_retried() -> None:
    # A broker restarting, or a proxy whose broker is gone: the URL was an MQTT broker's.
    async def scenario() -> None:
        connack = answers(b"\x20\x03\x00\x00\x00", then_close=False)
        async with peer(first_then(connack, hangs_up)) as port:
            publisher = MqttPublisher(settings(f"mqtt://127.0.0.1:{port}"))
            await publisher.connect()
            await publisher.close()
            await publisher.connect()

    with pytest.raises(BrokerUnavailableError) as caught:
        asyncio.run(asyncio.wait_for(scenario(), timeout=5))

    assert not isinstance(caught.value, ConfigError)
    assert "sent no CONNACK: it closed the connection without a CONNACK" in str(caught.value)


async def fake_redis(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers the client's handshake and PING like a Redis 5: no HELLO (RESP2 then), +PONG
    to PING, +OK to anything else."""
    while True:
        header = await reader.readline()
        if not header.startswith(b"*"):
            return
        words = []
        for _ in range(int(header[1:])):
            length = int((await reader.readline())[1:])
            words.append((await reader.readexactly(length + 2))[:-2])
        command = words[0].upper()
        if command == b"HELLO":
            writer.write(b"-ERR unknown command 'HELLO'\r\n")
        else:
            writer.write(b"+PONG\r\n" if command == b"PING" else b"+OK\r\n")
        await writer.drain()


def test_redis_hanging_up_after_answering_once_is_retried() -> None:
    async def scenario() -> None:
        # The probe's connection and the client's are Redis; then the peer hangs up.
        seen: list[int] = []

        async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(1)
            await (fake_redis if len(seen) <= 2 else hangs_up)(reader, writer)

        async with peer(behave) as port:
            publisher = RedisStreamsPublisher(settings(f"redis://127.0.0.1:{port}/0"))
            await publisher.connect()
            assert publisher.is_healthy()
            await publisher.close()
            await publisher.connect()

    with pytest.raises(BrokerUnavailableError) as caught:
        asyncio.run(asyncio.wait_for(scenario(), timeout=5))

    assert not isinstance(caught.value, ConfigError)
    assert "cannot connect to Redis" in str(caught.value)
