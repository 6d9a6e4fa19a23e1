"""AMQP 0-9-1 as the RabbitMQ publisher writes it: message properties and ``basic.publish``
frames encoded straight to bytes.

pika's own path builds a ``BasicProperties``, a ``Basic.Publish``, a header and a body frame
object per message and marshals each through generic code: on a 1,000-aggregate drain that was
about a quarter of the relay's CPU per event (py-spy). Here what the messages of a channel share
(the method frame of an exchange and routing key, the content type, header and attribute names)
is encoded once, and the rest directly. The bytes are those pika writes for the same message
(tests/unit/test_amqp_wire.py holds them equal), so the broker cannot tell the difference.
"""

from __future__ import annotations

import struct
from typing import Any

import pika.data
import pika.exceptions
from pika import spec
from pika.spec import BasicProperties

from outbox_relay.messages import OutboxMessage

_U16 = struct.Struct(">H").pack
_U32 = struct.Struct(">I").pack
_U64 = struct.Struct(">Q").pack
_LONG_STRING = struct.Struct(">cI").pack
# A frame's header: type, channel, payload size.
_FRAME_HEAD = struct.Struct(">BHI").pack
# A content-header frame up to its properties: the frame's header, then class id, weight and
# body size.
_CONTENT_HEAD = struct.Struct(">BHIHHQ").pack
_FRAME_END = bytes((spec.FRAME_END,))
_BASIC_CLASS = spec.BasicProperties.INDEX
# Frame header and frame-end octet around every frame's payload.
FRAME_OVERHEAD: int = spec.FRAME_HEADER_SIZE + spec.FRAME_END_SIZE
# Encoded names (header keys, method frames) kept per encoder: bounded, should producers make up
# header keys or event types per row.
_CACHED = 1024


def short_string(value: str) -> bytes:
    """An AMQP short string, refused like pika refuses it (ShortStringTooLong)."""
    encoded = value.encode()
    if len(encoded) > 255:
        raise pika.exceptions.ShortStringTooLong(encoded)
    return bytes((len(encoded),)) + encoded


def amqp_value(value: Any) -> Any:
    """AMQP tables have no float type in pika; carry floats as their JSON text."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {k: amqp_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [amqp_value(v) for v in value]
    return value


def table_field(key: bytes, value: Any) -> bytes:
    """One field of an AMQP table, its name encoded already; as pika encodes it (floats as
    their JSON text)."""
    if isinstance(value, str):
        encoded = value.encode()
        return key + _LONG_STRING(b"S", len(encoded)) + encoded
    pieces = [key]
    pika.data.encode_value(pieces, amqp_value(value))  # booleans, numbers, nesting: rare
    return b"".join(pieces)


class EncodedProperties(BasicProperties):
    """Basic properties already in the wire encoding BasicProperties.encode() would give them:
    pika writes them as they are. Their fields are decoded when first read (tests, a debugger,
    the raw publisher of the benches); publishing never reads them."""

    def __init__(self, encoded: bytes) -> None:  # no super().__init__(): decode() sets fields
        self._encoded = encoded

    def encode(self) -> list[bytes]:
        return [self._encoded]

    def __getattr__(self, name: str) -> Any:
        # Reached only for what is not set: every field until the first read decodes them all.
        if name.startswith("_"):
            raise AttributeError(name)
        self.decode(self._encoded)
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return repr(BasicProperties().decode(self._encoded))


# Every format sets these properties, in this (the encoding's) order: content_type, headers
# (when there are any), delivery_mode, message_id, timestamp, type. All flags fit the first
# flag word.
_FLAGS = (
    BasicProperties.FLAG_CONTENT_TYPE
    | BasicProperties.FLAG_DELIVERY_MODE
    | BasicProperties.FLAG_MESSAGE_ID
    | BasicProperties.FLAG_TIMESTAMP
    | BasicProperties.FLAG_TYPE
)
_PERSISTENT = b"\x02"  # delivery_mode 2


class PropertiesEncoder:
    """The properties of one content type: the table of headers given per message, message_id,
    type and timestamp from the row (returns, retries and dead letters are matched and routed by
    them), persistent delivery. Table keys are the names given with ``key_prefix`` before them
    (CloudEvents binary mode: ``cloudEvents:``)."""

    __slots__ = ("_key_prefix", "_keys", "_with_headers", "_without_headers")

    def __init__(self, content_type: str, key_prefix: str = "") -> None:
        self._key_prefix = key_prefix
        self._keys: dict[str, bytes] = {}
        content_type_field = short_string(content_type)
        self._with_headers = _U16(_FLAGS | BasicProperties.FLAG_HEADERS) + content_type_field
        self._without_headers = _U16(_FLAGS) + content_type_field

    def key(self, name: str) -> bytes:
        """A table key, encoded once per name."""
        key = self._keys.get(name)
        if key is None:
            key = short_string(self._key_prefix + name)
            if len(self._keys) < _CACHED:
                self._keys[name] = key
        return key

    def field(self, name: str, value: Any) -> bytes:
        return table_field(self.key(name), value)

    def encode(self, message: OutboxMessage, table: bytes | None) -> bytes:
        """The properties with ``table`` (the encoded fields of the headers; None: no headers)."""
        if table is None:
            head = self._without_headers
            headers = b""
        else:
            head = self._with_headers
            headers = _U32(len(table)) + table
        return b"".join(
            (
                head,
                headers,
                _PERSISTENT,
                short_string(message.event_id),
                _U64(int(message.created_at.timestamp())),
                short_string(message.event_type),
            )
        )


class NativeEncoder:
    """The relay's own format: the payload as the body, the row's headers plus
    ``aggregate_type``/``aggregate_id`` (which win a clash) as the AMQP headers table."""

    __slots__ = ("_id_key", "_properties", "_type_key")

    def __init__(self, content_type: str = "application/json") -> None:
        self._properties = PropertiesEncoder(content_type)
        self._type_key = short_string("aggregate_type")
        self._id_key = short_string("aggregate_id")

    def properties(self, message: OutboxMessage) -> bytes:
        headers = message.headers
        field = self._properties.field
        if "aggregate_type" in headers or "aggregate_id" in headers:
            # A row header named like the aggregate's: the merged table keeps its place.
            fields = [field(name, value) for name, value in message.broker_headers().items()]
        else:
            fields = [field(name, value) for name, value in headers.items()]
            if message.aggregate_type is not None:
                fields.append(table_field(self._type_key, message.aggregate_type))
            if message.aggregate_id is not None:
                fields.append(table_field(self._id_key, message.aggregate_id))
        return self._properties.encode(message, b"".join(fields) if fields else None)


class PublishFrames:
    """``basic.publish`` (mandatory) with its content header and body frames on one channel,
    as one piece of bytes ready for the socket."""

    __slots__ = ("_body_max", "_channel", "_methods")

    def __init__(self, channel_number: int, frame_max: int) -> None:
        self._channel = channel_number
        self._body_max: int = frame_max - FRAME_OVERHEAD
        # (exchange, routing key) -> the whole method frame: event types are few.
        self._methods: dict[tuple[str, str], bytes] = {}

    def _method(self, exchange: str, routing_key: str) -> bytes:
        frame = self._methods.get((exchange, routing_key))
        if frame is None:
            # Basic.Publish: ticket 0, exchange, routing key, bits (mandatory=1, immediate=0).
            payload = b"".join(
                (
                    _U32(spec.Basic.Publish.INDEX),
                    _U16(0),
                    short_string(exchange),
                    short_string(routing_key),
                    b"\x01",
                )
            )
            frame = _FRAME_HEAD(spec.FRAME_METHOD, self._channel, len(payload)) + payload
            frame += _FRAME_END
            if len(self._methods) < _CACHED:
                self._methods[(exchange, routing_key)] = frame
        return frame

    def message(self, exchange: str, routing_key: str, body: bytes, properties: bytes) -> bytes:
        channel = self._channel
        size = len(body)
        pieces = [
            self._method(exchange, routing_key),
            _CONTENT_HEAD(spec.FRAME_HEADER, channel, 12 + len(properties), _BASIC_CLASS, 0, size),
            properties,
            _FRAME_END,
        ]
        body_max = self._body_max
        if size <= body_max:  # nearly always: one body frame (none for an empty body)
            if size:
                pieces += (_FRAME_HEAD(spec.FRAME_BODY, channel, size), body, _FRAME_END)
        else:
            for start in range(0, size, body_max):
                fragment = body[start : start + body_max]
                pieces += (
                    _FRAME_HEAD(spec.FRAME_BODY, channel, len(fragment)),
                    fragment,
                    _FRAME_END,
                )
        return b"".join(pieces)

    def frames(self, body: bytes) -> int:
        """How many frames :meth:`message` writes for ``body``."""
        return 2 + -(-len(body) // self._body_max)  # ceiling division
