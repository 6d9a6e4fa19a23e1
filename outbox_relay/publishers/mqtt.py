"""MQTT 5 (or 3.1.1) via paho-mqtt 2.x, QoS 1 with the PUBACK as the confirm.

Topic = ``<prefix>/<event type with dots as slashes>`` (``events/order/created``). paho's socket
is driven by the relay's own asyncio loop (paho's external-loop hooks: add_reader / add_writer and
a periodic ``loop_misc``), not by a network thread of its own: no lock handoff per message, and
every callback runs on the relay's loop. A whole batch is handed to paho before any PUBACK is
awaited (paho keeps up to ``max_in_flight``, 5,000, unacknowledged). With MQTT 5, headers
travel as user properties and a PUBACK reason code says whether the broker took the message:
"no matching subscribers" is treated like RabbitMQ's unroutable (failed, retried, dead after
--max-attempts); refusals (not authorized, quota, packet too large, ...) fail the event.
MQTT 3.1.1 has no reason codes: a PUBACK is all it can tell. ``--message-format``
cloudevents-*: the CloudEvents MQTT binding (binary mode needs MQTT 5; docs/cloudevents.md).

URL: ``mqtt[s]://[user:password@]host[:port][?version=3.1.1&client_id=...]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import socket
import ssl
import struct
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Annotated, Any
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import Field

from outbox_relay.settings import Flag

try:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode
except ModuleNotFoundError as missing:  # the 'mqtt' extra; its options still show in --help
    MISSING_CLIENT: ModuleNotFoundError | None = missing
else:
    MISSING_CLIENT = None

from outbox_relay import tls
from outbox_relay.envelopes import (
    DATA_CONTENT_TYPE,
    STRUCTURED_CONTENT_TYPE,
    CloudEvents,
    MessageFormat,
)
from outbox_relay.errors import BrokerRejectedMessageError, BrokerUnavailableError, ConfigError
from outbox_relay.messages import CONFIRMED, OutboxMessage, PublishResult, failed
from outbox_relay.publishers.base import BrokerOptions, OnResult, PublisherSettings
from outbox_relay.redact import redact_url

log = logging.getLogger(__name__)

NO_MATCHING_SUBSCRIBERS = 0x10
# Strings are length-prefixed with two bytes.
MAX_STRING = 65_535
# Control characters, surrogates and non-characters: brokers close the connection over them.
_FORBIDDEN = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff"
    "\U0001fffe\U0001ffff\U0002fffe\U0002ffff\U0003fffe\U0003ffff\U0004fffe\U0004ffff"
    "\U0005fffe\U0005ffff\U0006fffe\U0006ffff\U0007fffe\U0007ffff\U0008fffe\U0008ffff"
    "\U0009fffe\U0009ffff\U000afffe\U000affff\U000bfffe\U000bffff\U000cfffe\U000cffff"
    "\U000dfffe\U000dffff\U000efffe\U000effff\U000ffffe\U000fffff\U0010fffe\U0010ffff]"
)
# DISCONNECT reasons naming something that was sent: malformed packet, protocol error, packet
# too large, payload format invalid.
_MESSAGE_FAULTS = frozenset({0x81, 0x82, 0x95, 0x99})
# The protocol's largest packet; a broker may announce a smaller one (Maximum Packet Size).
MAX_PACKET = 268_435_455
# Room for the fixed header, topic and properties length fields of a PUBLISH packet.
PACKET_OVERHEAD = 65_536
# A CONNACK's fixed header: packet type 2, no flags (MQTT 5 section 3.2.1, 3.1.1 section 3.2.1).
CONNACK = 0x20
# Bytes of a first answer looked at (and quoted) before paho reads it.
FIRST_ANSWER_BYTES = 16
# paho's reasons for a connection that ended before the CONNACK: the peer hung up (paho's
# "Unspecified error"), or sent something that is no MQTT packet (malformed, protocol error).
_CONNECTION_LOST = 0x80
_NOT_A_PACKET = frozenset({0x81, 0x82})


def connack_problem(head: bytes, mqtt5: bool) -> str | None:
    """Why ``head``, the first bytes a server answered to CONNECT, cannot start a CONNACK (so
    the server is no MQTT broker), or None (also for nothing: no answer yet).

    A CONNACK is ``0x20`` and its remaining length: exactly 2 in MQTT 3.1.1, at least 2 in
    MQTT 5 (flags, reason code, then properties). RabbitMQ answers its AMQP header, NATS its
    INFO line, Redis an error line starting with ``-`` (0x2D: type 2, but with flags)."""
    if not head:
        return None
    length = head[1] if len(head) > 1 else None
    if head[0] == CONNACK and (length is None or length == 2 or (mqtt5 and length > 2)):
        return None
    return f"it answered {head[:FIRST_ANSWER_BYTES]!r} to CONNECT, not a CONNACK"


class MqttOptions(BrokerOptions):
    mqtt_qos: Annotated[
        int,
        Field(ge=1, le=2, description="1 (PUBACK) or 2 (PUBCOMP) confirms; QoS 0 has none."),
        Flag(panel="MQTT", metavar="1|2"),
    ] = 1


OPTIONS = MqttOptions

_VERSIONS = ("5", "3.1.1")


def mqtt_topic(prefix: str, event_type: str) -> str:
    return "/".join(part for part in (prefix, event_type.replace(".", "/")) if part)


def string_problem(what: str, text: str) -> str | None:
    """Why ``text`` cannot be an MQTT string, or None (MQTT 5 section 1.5.4)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_STRING:
        return f"{what} is over MQTT's {MAX_STRING}-byte string limit"
    bad = _FORBIDDEN.search(text)
    if bad is not None:
        return (
            f"{what} holds U+{ord(bad[0]):04X}, a character MQTT strings must not carry "
            "(control characters and non-characters)"
        )
    return None


# User properties the relay sets itself; a row's header of the same name is left out.
OWN_PROPERTIES = frozenset({"event_id", "event_type", "created_at"})


def user_properties(message: OutboxMessage) -> list[tuple[str, str]]:
    """The row's headers, the aggregate and the event id as MQTT 5 user properties.

    MQTT allows a name twice, and a consumer reading them as a mapping keeps the last one: a
    row's own ``event_id`` header would then replace the id consumers deduplicate on. The
    relay's properties win, as ``aggregate_type``/``aggregate_id`` do over the row's headers."""
    props = [("event_id", message.event_id), ("event_type", message.event_type)]
    props.append(("created_at", message.created_at.isoformat()))
    for key, value in message.broker_headers().items():
        if key in OWN_PROPERTIES:
            continue
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        props.append((key, text))
    return props


def cloudevents_user_properties(ce: CloudEvents, message: OutboxMessage) -> list[tuple[str, str]]:
    """MQTT 5 binding, binary mode: every attribute but datacontenttype (the Content Type
    property) as a user property named as the attribute, with its canonical string."""
    attributes = ce.text_attributes(message)
    del attributes["datacontenttype"]
    return list(attributes.items())


class _Target:
    """Where and how to connect, parsed from the broker URL."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        version = query.get("version", "5")
        if version not in _VERSIONS:
            raise ConfigError(f"--broker-url: MQTT version {version!r} is not one of 5, 3.1.1")
        self.mqtt5 = version == "5"
        self.tls = parts.scheme == "mqtts"
        self.host = parts.hostname or "localhost"
        try:
            self.port = parts.port or (8883 if self.tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"--broker-url: invalid MQTT port in {redact_url(url)}") from exc
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.client_id = query.get("client_id") or f"outbox-relay-{uuid.uuid4().hex[:12]}"


class MqttPublisher:
    """Publishes each event with QoS 1 (or 2) and waits for the broker's acknowledgement."""

    name = "mqtt"

    def __init__(self, settings: PublisherSettings) -> None:
        self._settings = settings
        self._options = MqttOptions.of(settings)
        self._router = settings.router()
        self._target = _Target(settings.broker_url)
        self._ce = settings.cloudevents
        self._format = settings.message_format
        if self._format is MessageFormat.BINARY and not self._target.mqtt5:
            raise ConfigError(
                "--message-format cloudevents-binary: MQTT 3.1.1 has no properties to carry "
                "the attributes in (the CloudEvents MQTT binding allows structured mode only); "
                "use cloudevents-structured, or MQTT 5 (drop version=3.1.1 from --broker-url)"
            )
        # mqtts:// only: verifies the chain (--broker-ca-file) and the URL's host name.
        self._tls = settings.broker_tls_context()
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = False
        self._failure: BaseException | None = None
        self._acks: dict[int, asyncio.Future[PublishResult]] = {}
        self._connack: asyncio.Future[None] | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._loop_thread: int | None = None
        self._max_packet = MAX_PACKET
        # Once a CONNACK came from the URL, it is an MQTT broker's: later odd answers (a broker
        # restarting, a proxy without a backend) are retried, not called a wrong URL.
        self._answered = False
        self._read_error: str | None = None  # paho's last failed read before the CONNACK

    @property
    def mqtt5(self) -> bool:
        return self._target.mqtt5

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        target = self._target
        where = redact_url(self._settings.broker_url)
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=target.client_id,
            protocol=paho.MQTTv5 if target.mqtt5 else paho.MQTTv311,
        )
        if target.username is not None:
            client.username_pw_set(target.username, target.password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.connect_timeout = min(self._settings.confirm_timeout, 10.0)
        client.max_inflight_messages_set(self._settings.max_in_flight)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        # Until the CONNACK only: paho formats every log line for it, a cost per message.
        client.on_log = self._on_log
        self._read_error = None
        self._connack = loop.create_future()
        self._failure = None
        self._client = client
        try:
            # A clean session: the relay republishes whatever was in flight. clean_start is
            # MQTT 5's flag; a 3.1.1 client is clean by default. The TCP connect blocks, hence
            # the thread; the socket hooks it triggers hop back to the loop.
            if self.mqtt5:
                await asyncio.to_thread(
                    lambda: client.connect(target.host, target.port, 30, clean_start=True)
                )
            else:
                await asyncio.to_thread(client.connect, target.host, target.port, 30)
        except (OSError, paho.WebsocketConnectionError) as exc:
            self._client = None
            refused = tls.refused("the MQTT broker", where, exc)
            if refused is not None:
                raise refused from exc
            raise BrokerUnavailableError(
                f"cannot connect to MQTT broker at {where}: {exc}"
            ) from exc
        self._housekeeping = loop.create_task(self._misc(client))
        try:
            await asyncio.wait_for(
                asyncio.shield(self._connack), timeout=self._settings.confirm_timeout
            )
        except TimeoutError as exc:
            await self.close()
            # Silence is no proof of another service (a broker may be starting): retried.
            raise BrokerUnavailableError(
                f"no CONNACK from the MQTT broker at {where} within "
                f"{self._settings.confirm_timeout:g}s (is it an MQTT broker?)"
            ) from exc
        except BaseException:
            await self.close()
            raise
        client.on_log = None
        self._connected = self._answered = True
        log.info("connected to broker", extra={"broker": "mqtt", "url": where})

    async def close(self) -> None:
        client, self._client = self._client, None
        self._connected = False
        if client is None:
            return
        housekeeping, self._housekeeping = self._housekeeping, None
        if housekeeping is not None:
            housekeeping.cancel()
        with contextlib.suppress(OSError, ValueError):
            client.disconnect()  # paho closes the socket once DISCONNECT is written
        with contextlib.suppress(OSError, ValueError):
            client.loop_write()
        sock = client.socket()
        if sock is not None:
            # Not written yet (a dead peer): drop the socket from the loop and close it.
            self._on_socket_close(client, None, sock)
            with contextlib.suppress(OSError):
                sock.close()
        self._fail_pending(BrokerUnavailableError("MQTT publisher closed"))

    async def _misc(self, client: paho.Client) -> None:
        """paho's timers: keepalive PINGREQ, and noticing a broker that stopped answering."""
        while True:
            await asyncio.sleep(1.0)
            if client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    def is_healthy(self) -> bool:
        return self._client is not None and self._connected

    # -- publishing ------------------------------------------------------------------------

    @property
    def max_message_bytes(self) -> int:
        """The broker's Maximum Packet Size (MQTT 5 CONNACK), else the protocol's own limit."""
        return min(self._settings.max_message_bytes, self._max_packet - PACKET_OVERHEAD)

    def topic(self, message: OutboxMessage) -> str:
        """Its --route's prefix (or --topic-prefix), then the event type, dots as slashes."""
        return mqtt_topic(self._router.destination(message), message.event_type)

    def message_problem(self, message: OutboxMessage) -> str | None:
        """MQTT strings are length-prefixed UTF-8 without control characters or
        non-characters (a broker drops the connection over one, Mosquitto does)."""
        topic = self.topic(message)
        problem = string_problem("topic", topic)
        if problem or not self.mqtt5 or self._format is MessageFormat.STRUCTURED:
            return problem
        for key, value in self._user_properties(message):
            problem = string_problem(f"header name {key[:80]!r}", key) or string_problem(
                f"header {key[:80]!r}", value
            )
            if problem:
                return problem
        return None

    def _user_properties(self, message: OutboxMessage) -> list[tuple[str, str]]:
        if self._ce is None:
            return user_properties(message)
        return cloudevents_user_properties(self._ce, message)

    def _encode(self, message: OutboxMessage) -> tuple[bytes, Properties | None]:
        """Payload and MQTT 5 properties (None with MQTT 3.1.1) in the chosen format."""
        ce = self._ce
        structured = ce is not None and self._format is MessageFormat.STRUCTURED
        payload = ce.structured(message) if ce is not None and structured else message.payload
        if not self.mqtt5:
            return payload, None
        # paho-mqtt leaves its Properties constructor unannotated.
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.PayloadFormatIndicator = 1
        if structured:
            properties.ContentType = STRUCTURED_CONTENT_TYPE
        else:
            properties.ContentType = DATA_CONTENT_TYPE
            properties.UserProperty = self._user_properties(message)
        return payload, properties

    async def publish_batch(
        self, messages: Sequence[OutboxMessage], on_result: OnResult | None = None
    ) -> list[PublishResult]:
        client = self._client
        if client is None or not self._connected:
            raise BrokerUnavailableError("not connected to the MQTT broker") from self._failure
        loop = asyncio.get_running_loop()
        results: list[PublishResult | None] = [None] * len(messages)
        pending: dict[int, asyncio.Future[PublishResult]] = {}

        def report(index: int, result: PublishResult) -> None:
            if results[index] is None:
                results[index] = result
                if on_result is not None:
                    on_result(index, result)

        def acked(index: int, future: asyncio.Future[PublishResult]) -> None:
            if not future.cancelled() and future.exception() is None:
                report(index, future.result())

        try:
            # Synchronous on purpose: PUBACKs reach self._acks through call_soon_threadsafe, so
            # none can be looked up before every mid of the batch is registered.
            for index, message in enumerate(messages):
                payload, properties = self._encode(message)
                try:
                    info = client.publish(
                        self.topic(message),
                        payload,
                        qos=self._options.mqtt_qos,
                        properties=properties,
                    )
                except (ValueError, struct.error) as exc:  # paho encodes before sending
                    report(index, failed(f"cannot publish over MQTT: {exc}", permanent=True))
                    continue
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    raise BrokerUnavailableError(
                        f"MQTT publish failed: {paho.error_string(info.rc)}"
                    ) from self._failure
                future = loop.create_future()
                future.add_done_callback(functools.partial(acked, index))
                pending[index] = future
                self._acks[info.mid] = future
            if pending:
                await self._await_acks(list(pending.values()))
        finally:
            mine = set(pending.values())
            for mid in [mid for mid, f in self._acks.items() if f in mine]:
                del self._acks[mid]
            for future in mine:
                if future.done() and not future.cancelled():
                    future.exception()  # one failure fails them all; mark the rest as seen
        for index, future in pending.items():
            report(index, future.result())
        return [result if result is not None else CONFIRMED for result in results]

    async def _await_acks(self, futures: list[asyncio.Future[PublishResult]]) -> None:
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout=self._settings.confirm_timeout)
        except TimeoutError as exc:
            unacked = sum(1 for f in futures if not f.done())
            raise BrokerUnavailableError(
                f"the MQTT broker did not acknowledge {unacked} message(s) "
                f"within {self._settings.confirm_timeout}s"
            ) from exc

    def _result(self, reason_code: ReasonCode | int) -> PublishResult:
        value = reason_code.value if isinstance(reason_code, ReasonCode) else int(reason_code)
        if value == NO_MATCHING_SUBSCRIBERS:
            return failed(
                "unroutable: no subscriber matches the topic (MQTT 5 PUBACK reason 16); "
                "subscribe a (persistent) session to it"
            )
        if value >= 0x80:
            name = reason_code.getName() if isinstance(reason_code, ReasonCode) else str(value)
            return failed(f"refused by the MQTT broker: {name} (reason code {value})")
        return CONFIRMED

    def _fail_pending(self, exc: BaseException) -> None:
        for future in self._acks.values():
            if not future.done():
                future.set_exception(exc)
        self._acks.clear()

    # -- paho callbacks --------------------------------------------------------------------

    # Mostly called on the loop (from loop_read/loop_write), but during connect() on the thread
    # doing the TCP connect, hence call_soon_threadsafe. Each hands the client over too: a late
    # callback of a closed client must not touch the state of the one that replaced it.

    def _on_socket_open(self, client: paho.Client, _u: Any, sock: Any) -> None:
        self._on_loop(self._watch, sock, "r", functools.partial(self._readable, client, sock))

    def _on_socket_close(self, _client: paho.Client, _u: Any, sock: Any) -> None:
        self._on_loop(self._watch, sock, "r", None)
        self._on_loop(self._watch, sock, "w", None)

    def _on_socket_register_write(self, client: paho.Client, _u: Any, sock: Any) -> None:
        self._on_loop(self._watch, sock, "w", client.loop_write)

    def _on_socket_unregister_write(self, _client: paho.Client, _u: Any, sock: Any) -> None:
        self._on_loop(self._watch, sock, "w", None)

    def _on_loop(self, function: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        assert loop is not None
        if self._loop_thread == threading.get_ident():
            function(*args)
        else:
            with contextlib.suppress(RuntimeError):  # the relay's loop already closed
                loop.call_soon_threadsafe(function, *args)

    def _readable(self, client: paho.Client, sock: Any) -> None:
        """paho's loop_read; until the CONNACK, a look at the answer first (paho would read
        another service's bytes as packets: a PUBACK of 77 bytes for RabbitMQ's AMQP header,
        then wait for the rest, or call the garbage a protocol error of a broker)."""
        connack = self._connack
        if (
            client is self._client
            and connack is not None
            and not connack.done()
            # Peeking needs the bytes as received: through TLS they are records, not packets
            # (and a peer closing before the CONNACK is caught by _lost either way).
            and isinstance(sock, socket.socket)
            and not isinstance(sock, ssl.SSLSocket)
        ):
            try:
                head = sock.recv(FIRST_ANSWER_BYTES, socket.MSG_PEEK)
            except OSError:
                head = b""  # a reset: paho's read below finds out too, and _lost reports it
            # Nothing (the peer hung up) is left to paho too: _lost reports it.
            problem = connack_problem(head, self.mqtt5)
            if problem is not None:
                self._watch(sock, "r", None)
                connack.set_exception(self._not_a_broker(problem))
                return
        client.loop_read()

    def _not_a_broker(self, why: str) -> Exception:
        where = redact_url(self._settings.broker_url)
        if self._answered:
            return BrokerUnavailableError(f"the MQTT broker at {where} sent no CONNACK: {why}")
        return ConfigError(
            f"--broker-url: {where} did not answer like an MQTT broker ({why}; is the host or "
            "port that of another service?)"
        )

    def _watch(self, sock: Any, kind: str, callback: Callable[[], Any] | None) -> None:
        """Add or drop (callback None) the loop's read or write watch on paho's socket."""
        loop = self._loop
        assert loop is not None
        if sock.fileno() < 0:  # closed meanwhile; the loop forgot it with the descriptor
            return
        if kind == "r":
            if callback is None:
                loop.remove_reader(sock)
            else:
                loop.add_reader(sock, callback)
        elif callback is None:
            loop.remove_writer(sock)
        else:
            loop.add_writer(sock, callback)

    def _on_connect(
        self, client: paho.Client, _u: Any, _flags: Any, reason_code: ReasonCode, props: Any
    ) -> None:
        # MQTT 5: a broker may announce a smaller packet limit than the protocol's.
        announced = getattr(props, "MaximumPacketSize", None)
        self._max_packet = int(announced) if announced else MAX_PACKET
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the relay's loop already closed
            self._loop.call_soon_threadsafe(self._connected_result, client, reason_code)

    def _on_disconnect(
        self, client: paho.Client, _u: Any, _flags: Any, reason_code: ReasonCode, _p: Any
    ) -> None:
        # The relay reconnects (and republishes the batch in flight); paho never does here,
        # since reconnecting is the job of its loop_forever, which is not used.
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._lost, client, reason_code)

    def _on_log(self, _client: paho.Client, _u: Any, level: int, text: str) -> None:
        # paho reports why a read failed only in a log line, then calls the connection lost:
        # through TLS the reason may be the broker's alert refusing our client certificate
        # (TLS 1.3 sends it after the handshake, at the first read), which must be told apart
        # from a service hanging up on a CONNECT.
        if level == paho.MQTT_LOG_ERR and text.startswith("failed to receive on socket"):
            self._read_error = text

    def _on_publish(
        self, client: paho.Client, _u: Any, mid: int, reason_code: ReasonCode, _p: Any
    ) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._acked, client, mid, reason_code)

    # -- the same, on the relay's loop -------------------------------------------------------

    def _connected_result(self, client: paho.Client, reason_code: ReasonCode) -> None:
        connack = self._connack
        if client is not self._client or connack is None or connack.done():
            return
        if not reason_code.is_failure:
            connack.set_result(None)
            return
        where = redact_url(self._settings.broker_url)
        error_class = (
            ConfigError if reason_code.value in (0x86, 0x87, 0x85) else BrokerUnavailableError
        )
        connack.set_exception(
            error_class(f"the MQTT broker at {where} refused the connection: {reason_code}")
        )

    def _lost(self, client: paho.Client, reason: ReasonCode) -> None:
        if client is not self._client:
            return
        self._connected = False
        exc: Exception
        connack = self._connack
        if connack is not None and not connack.done():
            exc = self._before_connack(reason)
            connack.set_exception(exc)
        elif getattr(reason, "value", None) in _MESSAGE_FAULTS:
            exc = BrokerRejectedMessageError(f"the MQTT broker closed the connection: {reason}")
        else:
            exc = BrokerUnavailableError(f"lost the MQTT connection: {reason}")
        self._failure = exc
        self._fail_pending(exc)

    def _before_connack(self, reason: ReasonCode) -> Exception:
        """The connection ended before any CONNACK. An MQTT broker answers CONNECT with one,
        even to refuse it: a peer that hangs up on a CONNECT (PostgreSQL does) or answers what
        is no MQTT packet (paho: malformed packet, protocol error) is another kind of service.
        paho's own keepalive timer ending a silent connection proves nothing: retried."""
        value = getattr(reason, "value", None)
        if value == _CONNECTION_LOST:
            if self._tls is not None and self._read_error is not None:
                where = redact_url(self._settings.broker_url)
                refused = tls.refused("the MQTT broker", where, OSError(self._read_error))
                if refused is not None:
                    return refused
            return self._not_a_broker("it closed the connection without a CONNACK")
        if value in _NOT_A_PACKET:
            return self._not_a_broker(f"its answer to CONNECT was not a CONNACK: {reason}")
        where = redact_url(self._settings.broker_url)
        return BrokerUnavailableError(
            f"no CONNACK from the MQTT broker at {where}: {reason} (is it an MQTT broker?)"
        )

    def _acked(self, client: paho.Client, mid: int, reason_code: ReasonCode) -> None:
        if client is not self._client:
            return
        future = self._acks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(self._result(reason_code))
