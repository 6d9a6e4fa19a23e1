"""RabbitMQ via pika's asyncio adapter, with pipelined publisher confirms.

A wave is written to the socket in one go (``mandatory`` so unroutable messages come back as
``basic.return``; ``delivery_mode=2``), then the broker's acks and nacks, which may cover many
delivery tags at once (``multiple``), settle it; each message's result is reported the moment its
ack arrives. RabbitMQ sends a message's ``basic.return`` before its ``basic.ack``, so a returned
message is known to have failed by the time it is acked. Several waves may be in flight on the
channel at once; each delivery tag maps to its wave.

Messages are encoded to their frames by ``amqp_wire`` (what pika would write, without its
per-message objects) and written through pika's connection, which keeps everything else: the
handshake, heartbeats, channels, confirms, returns.

What RabbitMQ would close the connection or the channel for is refused before sending: a
content-header frame larger than the negotiated frame_max, ``CC``/``BCC`` headers that are not
lists of strings (sender-selected distribution), values AMQP cannot encode.

``--message-format`` cloudevents-*: the CloudEvents AMQP binding (``cloudEvents:`` application
properties, or an ``application/cloudevents+json`` body; docs/cloudevents.md).

pika pin: ``_CorkedConnection`` overrides ``AsyncioConnection._adapter_emit_data`` (a private
method, stable across pika 1.x), hence ``pika>=1.3,<2`` in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Sequence
from itertools import takewhile
from typing import Any

import pika
import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from outbox_relay import amqp
from outbox_relay.envelopes import (
    DATA_CONTENT_TYPE,
    STRUCTURED_CONTENT_TYPE,
    CloudEvents,
    MessageFormat,
)
from outbox_relay.errors import BrokerRejectedMessageError, BrokerUnavailableError, ConfigError
from outbox_relay.messages import CONFIRMED, OutboxMessage, PublishResult, failed
from outbox_relay.publishers.amqp_wire import (
    EncodedProperties,
    NativeEncoder,
    PropertiesEncoder,
    PublishFrames,
    short_string,
    table_field,
)
from outbox_relay.publishers.base import BrokerOptions, OnResult, PublisherSettings
from outbox_relay.redact import redact_url

log = logging.getLogger(__name__)

# A content-header frame: 7 bytes of frame header, class id, weight and body size (12), the
# encoded properties, the frame-end octet.
HEADER_FRAME_OVERHEAD = 20
# Headers of sender-selected distribution: RabbitMQ closes the channel unless they hold a list.
_ROUTING_HEADERS = ("CC", "BCC")
# The AMQP binding's prefix of CloudEvents attributes among the application properties.
CE_PREFIX = "cloudEvents:"
# What encoding a message can raise: pika's UnsupportedAMQPFieldException (a value AMQP has no
# type for); ShortStringTooLong (a header name over 255 bytes: an AMQPError, but no sign of a
# broken link); struct.error (an integer header outside 64 bits); RecursionError (nesting).
_UNENCODABLE = (
    pika.exceptions.UnsupportedAMQPFieldException,
    pika.exceptions.ShortStringTooLong,
    struct.error,
    ValueError,
    TypeError,
    RecursionError,
)
# Reply codes with which RabbitMQ closes a channel or connection over something it was sent.
_MESSAGE_FAULTS = {406, 501, 502, 503, 505}


def _routing_keys(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# Encoded AMQP bytes per character of the row's JSON, at most: a character is up to 4 bytes of
# UTF-8, and the shortest JSON items grow most (``0,`` is a 5-byte AMQP integer).
_AMQP_BYTES_PER_CHARACTER = 5


def _properties_bound(message: OutboxMessage) -> int | None:
    """An upper bound of the message's header frame in bytes, cheap to compute (None: unknown).

    ``size`` counts characters (of the payload, the headers' JSON, the ids and the event
    type), while the payload is bytes: it holds at least a quarter as many characters, so
    ``size`` less a quarter of the payload bounds the characters of everything else."""
    if not message.size:
        return None
    rest = max(message.size - len(message.payload) // 4, 0)
    return HEADER_FRAME_OVERHEAD + _AMQP_BYTES_PER_CHARACTER * rest


class _BinaryEncoder:
    """The AMQP binding's binary mode, written straight as the content header's properties.

    Through pika's generic table encoder, a binary message cost about twice a native one to
    encode (a row with a trace context makes 9 table fields here, 3 in native): about 7 µs more
    relay CPU per event. So what every row shares is encoded once (the flags and content type,
    the ``specversion`` and ``source`` fields, the attribute names with their ``cloudEvents:``
    prefix), and the rest directly. The bytes are those pika would write for the same
    properties (tests/unit/test_envelopes.py holds them equal)."""

    __slots__ = ("_aggregate_id_key", "_ce", "_fixed", "_properties")

    def __init__(self, ce: CloudEvents) -> None:
        self._ce = ce
        # Attribute names are encoded with their prefix once (properties.key).
        self._properties = PropertiesEncoder(DATA_CONTENT_TYPE, key_prefix=CE_PREFIX)
        self._aggregate_id_key = short_string("aggregate_id")
        field = self._properties.field
        self._fixed = b"".join(field(name, value) for name, value in ce.fixed.items())

    def properties(self, message: OutboxMessage) -> bytes:
        """Attributes as ``cloudEvents:`` application properties (native AMQP boolean/long,
        else canonical strings: ``time`` keeps its microseconds), datacontenttype as
        content_type; ``aggregate_id`` stays a plain header too (the consumer's ordered mode
        hashes it); message_id, type and timestamp as in every format."""
        field = self._properties.field
        fields = [self._fixed]
        fields += [field(name, value) for name, value in self._ce.varying(message).items()]
        if message.aggregate_id is not None:
            fields.append(table_field(self._aggregate_id_key, message.aggregate_id))
        return self._properties.encode(message, b"".join(fields))


class _CorkedConnection(AsyncioConnection):
    """pika hands every AMQP frame to the socket on its own: three send() calls per message, which
    costs more than encoding it. While corked, frames are collected and written in one piece."""

    _corked: list[bytes] | None = None

    def cork(self) -> None:
        self._corked = []

    def uncork(self) -> None:
        frames, self._corked = self._corked, None
        if frames and self.is_open:
            super()._adapter_emit_data(b"".join(frames))

    def write_frames(self, data: bytes, frames: int) -> None:
        """Frames encoded already (amqp_wire.PublishFrames), counted like pika counts its own."""
        self.bytes_sent += len(data)
        self.frames_sent += frames
        self._adapter_emit_data(data)

    def _adapter_emit_data(self, data: bytes) -> None:
        if self._corked is None:
            super()._adapter_emit_data(data)
        else:
            self._corked.append(data)

    def _on_connection_workflow_done(self, conn_or_exc: Any) -> None:
        # pika 1.3 reports a handshake aborted by close() with the exception's class rather than
        # an instance, then fails its own assertion in a callback (and never reports the end):
        # hand it an instance, so closing a connection still opening ends cleanly.
        if isinstance(conn_or_exc, type) and issubclass(conn_or_exc, Exception):
            conn_or_exc = conn_or_exc()
        super()._on_connection_workflow_done(conn_or_exc)


class AmqpConnections:
    """One AMQP connection per broker for the relays of one process (``serve --config``): each
    relay publishes on a channel of its own (confirms and delivery tags are per channel), so
    200 outboxes cost the broker one connection, not 200. A lost connection fails every relay on
    it; each reconnects, and the first to do so opens the next connection for all."""

    def __init__(self) -> None:
        self._shared: dict[tuple[str, object], _SharedConnection] = {}

    async def attach(self, publisher: RabbitMQPublisher) -> _CorkedConnection:
        key = (publisher._settings.broker_url, publisher._settings.broker_tls)
        shared = self._shared.get(key)
        if shared is None or shared.connection.is_closing or shared.connection.is_closed:
            shared = self._shared[key] = _SharedConnection(publisher._parameters)
            try:
                await shared.opened(publisher)
            except BaseException:
                if self._shared.get(key) is shared:
                    del self._shared[key]
                raise
        else:
            await shared.opened(publisher)
        shared.users.add(publisher)
        return shared.connection

    def detach(self, publisher: RabbitMQPublisher) -> None:
        """``publisher`` closed its channel: the last one out closes the connection."""
        for key, shared in list(self._shared.items()):
            shared.users.discard(publisher)
            if not shared.users and shared.opening.done():
                del self._shared[key]
                if shared.connection.is_open:
                    shared.connection.close()


class _SharedConnection:
    def __init__(self, parameters: pika.URLParameters) -> None:
        loop = asyncio.get_running_loop()
        self.opening: asyncio.Future[None] = loop.create_future()
        self.users: set[RabbitMQPublisher] = set()
        self.connection = _CorkedConnection(
            parameters,
            on_open_callback=lambda _connection: self._settle(None),
            on_open_error_callback=lambda _connection, exc: self._settle(exc),
            on_close_callback=self._closed,
            custom_ioloop=loop,
        )

    async def opened(self, publisher: RabbitMQPublisher) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.opening), timeout=amqp.CONNECT_TIMEOUT + 5)
        except TimeoutError as exc:
            self.connection.close()
            raise BrokerUnavailableError(
                f"no AMQP handshake from {redact_url(publisher._settings.broker_url)} within "
                f"{amqp.CONNECT_TIMEOUT:g}s (is it a RabbitMQ server, and reachable?)"
            ) from exc
        except BaseException as exc:
            raise amqp.translate(
                exc, publisher._settings.broker_url, answered=publisher._answered
            ) from exc

    def _settle(self, error: BaseException | str | None) -> None:
        if self.opening.done():
            return
        if error is None:
            self.opening.set_result(None)
        else:
            self.opening.set_exception(
                error if isinstance(error, BaseException) else Exception(error)
            )

    def _closed(self, connection: AsyncioConnection, exc: BaseException) -> None:
        self._settle(exc)
        for publisher in list(self.users):
            publisher._on_connection_closed(connection, exc)


class RabbitMQOptions(BrokerOptions):
    """RabbitMQ needs nothing beyond the common settings (--exchange, --confirm-timeout, ...)."""


OPTIONS = RabbitMQOptions

# Messages encoded between two hand-offs to the event loop: large enough to amortize the write,
# small enough that the broker starts on a batch at once and acks are read while it is sent.
_CHUNK = 200


class _Wave:
    """One publish_batch call in flight: its results, filled in as the broker settles them."""

    __slots__ = (
        "_positions",
        "done",
        "messages",
        "on_result",
        "results",
        "returned",
        "tags",
        "unsettled",
    )

    def __init__(self, messages: Sequence[OutboxMessage], on_result: OnResult | None) -> None:
        self.messages = messages
        self.on_result = on_result
        self.results: list[PublishResult | None] = [None] * len(messages)
        self.returned: dict[int, str] = {}
        self.tags: list[int] = []
        self.unsettled = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._positions: dict[str, int] | None = None

    def index_of(self, event_id: str) -> int | None:
        """The position of the message with this event id (built on the first call: only a
        returned message is looked up)."""
        if self._positions is None:
            self._positions = {m.event_id: i for i, m in enumerate(self.messages)}
        return self._positions.get(event_id)

    def settle(self, index: int, result: PublishResult) -> None:
        reason = self.returned.get(index)
        if reason and result.confirmed:
            result = failed(reason)
        self.results[index] = result
        self.unsettled -= 1
        if self.on_result is not None:
            self.on_result(index, result)

    def refuse(self, index: int, result: PublishResult) -> None:
        """A message never sent: its result is known at once."""
        self.results[index] = result
        if self.on_result is not None:
            self.on_result(index, result)

    def maybe_done(self) -> None:
        if not self.unsettled and not self.done.done():
            self.done.set_result(None)


class RabbitMQPublisher:
    """Publishes to a durable topic exchange (``events`` by default), routing key = event type."""

    name = "rabbitmq"

    def __init__(
        self, settings: PublisherSettings, connections: AmqpConnections | None = None
    ) -> None:
        self._settings = settings
        # Shared with the other relays of the process (serve --config), or None: its own.
        self._connections = connections
        RabbitMQOptions.of(settings)
        self._router = settings.router()
        self._declaring = settings.exchange  # the exchange being declared, for errors
        self._ce = settings.cloudevents
        self._native_encoder = NativeEncoder()
        self._binary_encoder = None if self._ce is None else _BinaryEncoder(self._ce)
        self._structured_encoder = PropertiesEncoder(STRUCTURED_CONTENT_TYPE)
        # basic.publish frames for the open channel (set when it opens).
        self._frames: PublishFrames | None = None
        # Body and properties of one message, in the chosen format; picked once.
        self._encode = {
            MessageFormat.NATIVE: self._native,
            MessageFormat.BINARY: self._binary,
            MessageFormat.STRUCTURED: self._structured,
        }[settings.message_format]
        # What the CloudEvents attributes add to a header frame at most (the source and the
        # names of the attributes), for the cheap frame_max bound.
        self._bound_extra = 0 if self._ce is None else 5 * len(self._ce.source) + 512
        # A silent broker (a cut link, a frozen host) is noticed by the heartbeat within
        # --confirm-timeout even while idle; while publishing, the confirm timeout says so too.
        self._parameters = amqp.parameters(
            settings.broker_url,
            tls_files=settings.broker_tls,
            heartbeat=amqp.heartbeat_for(settings.confirm_timeout),
        )
        self._connection: _CorkedConnection | None = None
        self._channel: Channel | None = None
        # Several waves may be in flight at once (the relay sends the next before the previous
        # is confirmed). Delivery tag -> (wave, position), in tag order.
        self._unconfirmed: dict[int, tuple[_Wave, int]] = {}
        self._waves: set[_Wave] = set()
        self._next_tag = 1
        self._failure: BaseException | None = None
        self._opening: asyncio.Future[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        self._frame_max = 131072  # until the broker says otherwise (Connection.Tune)
        # Once the URL answered like RabbitMQ, a later hang-up before the handshake is retried
        # (amqp.translate), not called a wrong URL.
        self._answered = False

    @property
    def max_message_bytes(self) -> int:
        """RabbitMQ's own limit (max_message_size) is not announced: the setting decides."""
        return self._settings.max_message_bytes

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        where = redact_url(self._settings.broker_url)

        def on_open(connection: AsyncioConnection) -> None:
            connection.channel(on_open_callback=on_channel)

        def on_open_error(_connection: AsyncioConnection, exc: BaseException | str) -> None:
            if not opened.done():
                error = exc if isinstance(exc, BaseException) else Exception(exc)
                opened.set_exception(
                    amqp.translate(error, self._settings.broker_url, answered=self._answered)
                )

        def on_channel(channel: Channel) -> None:
            self._channel = channel
            channel.add_on_close_callback(self._on_channel_closed)
            channel.add_on_return_callback(self._on_return)

            def on_confirm(frame: Any) -> None:
                # Delivery tags restart on every channel: a late ack from a channel given up on
                # must not settle this one's messages.
                if channel is self._channel:
                    self._on_confirm(frame)

            channel.confirm_delivery(ack_nack_callback=on_confirm, callback=on_confirming)

        # Every exchange an event may go to (--exchange, then each --route's), one at a time.
        undeclared: list[str] = []

        def on_confirming(_frame: Any) -> None:
            undeclared[:] = self._router.destinations()
            declare_next(None)

        def declare_next(_frame: Any) -> None:
            if not undeclared:
                if not opened.done():
                    opened.set_result(None)
                return
            assert self._channel is not None
            self._declaring = undeclared.pop(0)
            self._channel.exchange_declare(
                exchange=self._declaring,
                exchange_type="topic",
                durable=True,
                callback=declare_next,
            )

        self._failure = None
        self._next_tag = 1
        self._unconfirmed.clear()
        if self._connections is not None:
            self._connection = await self._connections.attach(self)
            self._connection.channel(on_open_callback=on_channel)
        else:
            self._connection = _CorkedConnection(
                self._parameters,
                on_open_callback=on_open,
                on_open_error_callback=on_open_error,
                on_close_callback=self._on_connection_closed,
                custom_ioloop=loop,
            )
        self._opening = opened
        try:
            # pika gives up itself after amqp.CONNECT_TIMEOUT (stack_timeout); this is a backstop.
            # Shielded: when connecting is cancelled, close() waits on it for the handshake's end.
            await asyncio.wait_for(asyncio.shield(opened), timeout=amqp.CONNECT_TIMEOUT + 5)
        except TimeoutError as exc:
            await self.close()
            raise BrokerUnavailableError(
                f"no AMQP handshake from {where} within {amqp.CONNECT_TIMEOUT:g}s (is it a "
                "RabbitMQ server, and reachable?)"
            ) from exc
        except BaseException:
            await self.close()
            raise
        finally:
            self._opening = None
        self._frame_max = int(self._connection.params.frame_max)
        assert self._channel is not None
        self._frames = PublishFrames(self._channel.channel_number, self._frame_max)
        self._answered = True
        log.info("connected to broker", extra={"broker": "rabbitmq", "url": where})

    async def close(self) -> None:
        if self._connections is not None:
            channel, self._channel = self._channel, None
            self._connection = None
            if channel is not None and channel.is_open:
                with contextlib.suppress(pika.exceptions.AMQPError):
                    channel.close()
            self._connections.detach(self)
            return
        connection, self._connection = self._connection, None
        self._channel = None
        if connection is None or connection.is_closed or connection.is_closing:
            return
        closed = asyncio.get_running_loop().create_future()
        self._closing = closed
        # A connection still opening ends through on_open_error (settling ``opening``), not
        # through on_close.
        opening = self._opening
        ends = [closed] if opening is None or opening.done() else [closed, opening]
        try:
            connection.close()
            await asyncio.wait(ends, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        except pika.exceptions.AMQPError:
            pass
        if opening is not None and opening.done() and not opening.cancelled():
            opening.exception()  # retrieved: it is the outcome of an attempt given up on

    def is_healthy(self) -> bool:
        return (
            self._connection is not None
            and self._connection.is_open
            and self._channel is not None
            and self._channel.is_open
        )

    # -- what RabbitMQ cannot take -------------------------------------------------------------

    def message_problem(self, message: OutboxMessage) -> str | None:
        """What would make RabbitMQ close the channel or connection, or pika refuse to encode."""
        headers = message.headers if self._ce is None else {}  # CloudEvents: no row headers
        for name in _ROUTING_HEADERS:
            # Present but null is refused too: RabbitMQ closes the channel over a void CC.
            if name in headers and not _routing_keys(headers[name]):
                return (
                    f"header {name!r} must be a list of routing keys (RabbitMQ's sender-selected "
                    "distribution) or absent"
                )
        if message.created_at.timestamp() <= -1:
            return (
                f"created_at {message.created_at.isoformat()} is before 1970: an AMQP timestamp "
                "counts seconds since 1970 and cannot be negative"
            )
        # The header frame is bounded by frame_max; only a big message can come near it, so
        # most messages skip the encoding this check needs.
        bound = _properties_bound(message)
        if bound is not None and bound + self._bound_extra <= self._frame_max:
            return None
        try:
            size = HEADER_FRAME_OVERHEAD + len(self._encode(message)[1])
        except _UNENCODABLE as exc:
            return f"headers cannot be encoded as AMQP: {exc!r}"
        if size > self._frame_max:
            return (
                f"headers and properties take {size} bytes, over the {self._frame_max}-byte "
                "AMQP frame the broker allows for them (frame_max)"
            )
        return None

    def encode(self, message: OutboxMessage) -> tuple[bytes, BasicProperties]:
        """The message's body and properties as they go on the wire, in the chosen format
        (bench/raw_publisher.py sends exactly these to measure a format's cost to the broker)."""
        body, properties = self._encode(message)
        return body, EncodedProperties(properties)

    def _native(self, message: OutboxMessage) -> tuple[bytes, bytes]:
        return message.payload, self._native_encoder.properties(message)

    def _binary(self, message: OutboxMessage) -> tuple[bytes, bytes]:
        """AMQP binding, binary mode: the payload as the body, the attributes in the properties
        (:meth:`_BinaryEncoder.properties`)."""
        assert self._binary_encoder is not None
        return message.payload, self._binary_encoder.properties(message)

    def _structured(self, message: OutboxMessage) -> tuple[bytes, bytes]:
        """AMQP binding, structured mode: the JSON event format as the body."""
        ce = self._ce
        assert ce is not None
        encoder = self._structured_encoder
        table = (
            None
            if message.aggregate_id is None
            else encoder.field("aggregate_id", message.aggregate_id)
        )
        return ce.structured(message), encoder.encode(message, table)

    # -- publishing ------------------------------------------------------------------------

    async def publish_batch(
        self, messages: Sequence[OutboxMessage], on_result: OnResult | None = None
    ) -> list[PublishResult]:
        channel = self._channel
        if channel is None or not self.is_healthy():
            raise BrokerUnavailableError("not connected to RabbitMQ") from self._failure
        wave = _Wave(messages, on_result)
        self._waves.add(wave)
        exchange = self._settings.exchange
        router = self._router if self._router else None
        connection = self._connection
        frames = self._frames
        assert connection is not None
        assert frames is not None
        encode = self._encode
        unconfirmed = self._unconfirmed
        tags = wave.tags
        try:
            for index, message in enumerate(messages):
                if index % _CHUNK == 0:
                    connection.uncork()
                    if index:
                        await asyncio.sleep(0)  # let the loop write the chunk and read acks
                    if not self.is_healthy():
                        raise BrokerUnavailableError(
                            "lost the RabbitMQ connection"
                        ) from self._failure
                    connection.cork()
                try:
                    body, properties = encode(message)
                    data = frames.message(
                        exchange if router is None else router.destination(message),
                        message.event_type,
                        body,
                        properties,
                    )
                except _UNENCODABLE as exc:
                    # Encoded before anything is written, so nothing was sent.
                    wave.refuse(
                        index, failed(f"headers cannot be encoded as AMQP: {exc!r}", permanent=True)
                    )
                    continue
                connection.write_frames(data, frames.frames(body))
                tag = self._next_tag
                unconfirmed[tag] = (wave, index)
                tags.append(tag)
                wave.unsettled += 1
                self._next_tag = tag + 1
            connection.uncork()
            wave.maybe_done()
            try:
                await asyncio.wait_for(
                    asyncio.shield(wave.done), timeout=self._settings.confirm_timeout
                )
            except TimeoutError as exc:
                raise BrokerUnavailableError(
                    f"RabbitMQ did not confirm {wave.unsettled} message(s) "
                    f"within {self._settings.confirm_timeout}s"
                ) from exc
        finally:
            connection.uncork()
            self._forget(wave)
        return [result if result is not None else CONFIRMED for result in wave.results]

    # -- pika callbacks --------------------------------------------------------------------

    def _forget(self, wave: _Wave) -> None:
        self._waves.discard(wave)
        if wave.done.done() and not wave.done.cancelled():
            wave.done.exception()  # raised already in another form; not worth a log line
        for tag in wave.tags:
            self._unconfirmed.pop(tag, None)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if isinstance(method, Basic.Ack):
            result = CONFIRMED
        else:
            result = failed("nacked by RabbitMQ (internal error or queue overflow)")
        tag = method.delivery_tag
        # _unconfirmed is in ascending tag order, so the tags an ack with multiple covers are
        # a prefix of it.
        covered = list(takewhile(tag.__ge__, self._unconfirmed)) if method.multiple else [tag]
        touched: set[_Wave] = set()
        for covered_tag in covered:
            entry = self._unconfirmed.pop(covered_tag, None)
            if entry is None:
                continue
            wave, index = entry
            wave.settle(index, result)
            touched.add(wave)
        for wave in touched:
            wave.maybe_done()

    def _on_return(
        self, channel: Channel, method: Basic.Return, properties: BasicProperties, _body: bytes
    ) -> None:
        if channel is not self._channel or properties.message_id is None:
            return
        # Returns are rare (nothing bound for a routing key): the message is looked for among
        # the waves in flight, instead of indexing every message sent by its id.
        for wave in self._waves:
            index = wave.index_of(properties.message_id)
            if index is not None:
                wave.returned[index] = (
                    f"unroutable: {method.reply_code} {method.reply_text} (exchange "
                    f"{method.exchange!r}, routing key {method.routing_key!r}); bind a queue or "
                    "set an alternate exchange"
                )
                return

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        opening = self._opening
        if opening is not None and not opening.done():
            opening.set_exception(self._describe(exc, opening=True))
        for wave in self._waves:
            if not wave.done.done():
                wave.done.set_exception(self._describe(exc, opening=False))

    def _describe(self, exc: BaseException, *, opening: bool) -> BaseException:
        code = getattr(exc, "reply_code", None)
        text = getattr(exc, "reply_text", "")
        if opening and isinstance(exc, pika.exceptions.ChannelClosedByBroker) and code == 406:
            return ConfigError(
                f"RabbitMQ refused the exchange {self._declaring!r}: {text} (it exists "
                "with another type or flags; it must be a durable topic exchange)"
            )
        if opening:
            return amqp.translate(exc, self._settings.broker_url, answered=self._answered)
        if code in _MESSAGE_FAULTS:
            # Closed over something we sent: the relay finds out which message (see window.py).
            return BrokerRejectedMessageError(f"RabbitMQ closed the channel: ({code}) {text}")
        return BrokerUnavailableError(f"lost the RabbitMQ connection: {exc!r}")

    def _on_channel_closed(self, channel: Channel, exc: BaseException) -> None:
        if channel is not self._channel:
            return  # one given up on, or closed on purpose
        self._channel = None
        self._fail(exc)
        connection = self._connection
        if connection is not None and connection.is_open and self._connections is None:
            connection.close()

    def _on_connection_closed(self, connection: AsyncioConnection, exc: BaseException) -> None:
        if connection is self._connection:  # not one given up on, nor closed on purpose
            self._channel = None
            self._fail(exc)
        closing = self._closing
        if closing is not None and not closing.done():
            closing.set_result(None)
