"""The RabbitMQ publisher's own AMQP encoding (outbox_relay.publishers.amqp_wire): byte for byte
what pika writes for the same message, frames and properties alike."""

from __future__ import annotations

import math
from datetime import timedelta, timezone

import pika.exceptions
import pytest
from pika import frame, spec
from pika.spec import Basic, BasicProperties

from outbox_relay.envelopes import STRUCTURED_CONTENT_TYPE, MessageFormat
from outbox_relay.messages import OutboxMessage
from outbox_relay.publishers.amqp_wire import FRAME_OVERHEAD, NativeEncoder, PublishFrames
from outbox_relay.publishers.base import PublisherSettings
from outbox_relay.publishers.rabbitmq import RabbitMQPublisher
from tests.unit.outbox_messages import (
    CREATED,
    TRACEPARENT,
    TYPED_HEADERS,
    outbox_message,
    pika_properties,
)

message = outbox_message


ROWS = [
    message(),
    message(aggregate_type=None, aggregate_id=None, headers={}),
    message(aggregate_type=None, headers={}),
    message(aggregate_id="", headers={"gone": None}),
    # A row header named like the aggregate's: the aggregate wins, the header keeps its place.
    message(headers={"aggregate_id": "forged", "a": "b", "aggregate_type": "x"}),
    message(headers=TYPED_HEADERS),
    message(created_at=CREATED.astimezone(timezone(timedelta(hours=-5)))),
    message(event_id="e" * 255, event_type="order." + "x" * 200, payload=b"[]"),
]
IDS = ["full", "bare", "no-aggregate-type", "empty-id", "clash", "typed", "offset", "long-ids"]


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_native_properties_are_the_bytes_pika_writes(row: OutboxMessage) -> None:
    headers = row.broker_headers()
    if "ratio" in headers:  # AMQP tables have no float in pika: floats travel as JSON text
        headers |= {"ratio": "0.5", "nested": {"a": [1, "ü", "2.5"]}}
    expected = pika_properties(row, "application/json", headers or None)

    assert NativeEncoder().properties(row) == expected


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_structured_properties_are_the_bytes_pika_writes(row: OutboxMessage) -> None:
    settings = PublisherSettings.from_mapping(
        {"message_format": MessageFormat.STRUCTURED, "ce_source": "/shop"}
    )
    headers = None if row.aggregate_id is None else {"aggregate_id": row.aggregate_id}

    _body, properties = RabbitMQPublisher(settings).encode(row)

    assert b"".join(properties.encode()) == pika_properties(row, STRUCTURED_CONTENT_TYPE, headers)


def test_encoded_properties_read_like_pikas() -> None:
    row = message()
    _body, properties = RabbitMQPublisher(PublisherSettings()).encode(row)

    assert properties.message_id == row.event_id
    assert properties.headers == {
        "tenant": "acme",
        "traceparent": TRACEPARENT,
        "tracestate": "k=v",
        "aggregate_type": "order",
        "aggregate_id": "o-42",
    }
    assert properties.delivery_mode == 2


def test_a_header_name_amqp_cannot_carry_is_refused_like_pika_refuses_it() -> None:
    with pytest.raises(pika.exceptions.ShortStringTooLong):
        NativeEncoder().properties(message(headers={"k" * 256: "v"}))
    with pytest.raises(pika.exceptions.UnsupportedAMQPFieldException):
        NativeEncoder().properties(message(headers={"k": object()}))


def _pika_frames(
    channel: int, frame_max: int, exchange: str, routing_key: str, body: bytes, props: bytes
) -> list[bytes]:
    """What pika's Connection._send_message marshals for basic_publish(mandatory=True)."""
    properties = BasicProperties()
    properties.decode(props)
    method = Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True)
    frames = [
        frame.Method(channel, method).marshal(),
        frame.Header(channel, len(body), properties).marshal(),
    ]
    body_max = frame_max - spec.FRAME_HEADER_SIZE - spec.FRAME_END_SIZE
    for chunk in range(math.ceil(len(body) / body_max)):
        fragment = body[chunk * body_max : (chunk + 1) * body_max]
        frames.append(frame.Body(channel, fragment).marshal())
    return frames


@pytest.mark.parametrize(
    "body",
    [b'{"total":12.5}', b"", b"x" * (4096 - FRAME_OVERHEAD), b"y" * 10_000],
    ids=["small", "empty", "one-full-frame", "three-frames"],
)
@pytest.mark.parametrize("exchange", ["events", ""])
def test_publish_frames_are_the_bytes_pika_writes(body: bytes, exchange: str) -> None:
    properties = NativeEncoder().properties(message())
    frames = PublishFrames(channel_number=7, frame_max=4096)
    expected = _pika_frames(7, 4096, exchange, "order.created", body, properties)

    # Twice: the second time from the cached method frame.
    for _ in range(2):
        assert frames.message(exchange, "order.created", body, properties) == b"".join(expected)
    assert frames.frames(body) == len(expected)


def test_an_exchange_name_amqp_cannot_carry_is_refused() -> None:
    with pytest.raises(pika.exceptions.ShortStringTooLong):
        PublishFrames(1, 131072).message("e" * 256, "order.created", b"{}", b"")
