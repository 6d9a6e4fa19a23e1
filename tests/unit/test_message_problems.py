"""What each broker or its protocol can never carry, refused before sending: every publisher's
``message_problem()`` and size limit, on publishers made from settings alone (nothing connects;
what the server announces at connect, RabbitMQ's frame_max or NATS's max_payload, is at its
default or not yet known)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from outbox_relay.messages import OutboxMessage
from outbox_relay.publishers import Publisher, PublisherSettings, create_publisher
from outbox_relay.publishers.base import DEFAULT_MAX_MESSAGE_BYTES
from outbox_relay.publishers.mqtt import MAX_PACKET, PACKET_OVERHEAD, user_properties
from outbox_relay.publishers.nats import MAX_HEADER_BLOCK, nats_headers
from outbox_relay.publishers.redis_streams import PROTO_MAX_BULK_LEN
from outbox_relay.publishers.webhook import MAX_TRACE_HEADER, event_body, is_header_value

NOW = datetime(2026, 1, 1, tzinfo=UTC)
URLS = {
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/%2F",
    "nats": "nats://127.0.0.1:4222",
    "redis": "redis://127.0.0.1:6379/0",
    "mqtt": "mqtt://127.0.0.1:1883",
    "mqtt311": "mqtt://127.0.0.1:1883?version=3.1.1",
    "webhook": "http://127.0.0.1:8080/hooks",
}


def publisher(broker: str, **settings: Any) -> Publisher:
    return create_publisher(PublisherSettings(broker_url=URLS[broker], **settings))


def message(
    headers: dict[str, Any] | None = None,
    *,
    payload: str = '{"order_id": 1}',
    aggregate_id: str | None = "order-1",
    aggregate_type: str | None = "order",
    created_at: datetime = NOW,
    size: int | None = None,
) -> OutboxMessage:
    """A message as db/rows.py makes it from a row; ``size`` as it counts it (characters of the
    payload, the headers' JSON and the ids) unless given."""
    headers = headers or {}
    headers_text = json.dumps(headers, ensure_ascii=False)
    counted = (
        len(payload)
        + len(headers_text)
        + len("order.created")
        + len(aggregate_type or "")
        + len(aggregate_id or "")
        + 64
    )
    return OutboxMessage(
        id=1,
        event_id="0b9c6f1e-3c55-4c8e-9a43-0f6c1d3d2a11",
        event_type="order.created",
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        payload=payload.encode(),
        headers=headers,
        created_at=created_at,
        size=counted if size is None else size,
    )


@pytest.mark.parametrize("broker", sorted(URLS))
def test_an_ordinary_message_has_no_problem_anywhere(broker: str) -> None:
    plain = message(
        {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "n": 1}
    )
    assert publisher(broker).message_problem(plain) is None


# -- RabbitMQ ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [("CC", "order.cc"), ("CC", None), ("CC", {"a": 1}), ("BCC", [1, 2]), ("BCC", ["a", 1])],
)
def test_rabbitmq_refuses_cc_and_bcc_that_are_not_lists_of_routing_keys(
    name: str, value: Any
) -> None:
    # RabbitMQ closes the channel over them (406 unacceptable_type_in_header), null included.
    problem = publisher("rabbitmq").message_problem(message({name: value}))
    assert problem is not None
    assert repr(name) in problem


def test_rabbitmq_takes_cc_and_bcc_lists_of_routing_keys() -> None:
    ok = message({"CC": ["order.copy"], "BCC": []})
    assert publisher("rabbitmq").message_problem(ok) is None


@pytest.mark.parametrize(
    "created_at",
    [datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(1, 1, 2, tzinfo=UTC)],
)
def test_rabbitmq_refuses_a_created_at_before_1970(created_at: datetime) -> None:
    # AMQP timestamps are unsigned seconds since 1970: pika cannot encode an earlier one.
    problem = publisher("rabbitmq").message_problem(message(created_at=created_at))
    assert problem is not None
    assert "1970" in problem


def test_rabbitmq_takes_the_first_second_of_1970_and_the_year_9999() -> None:
    rabbitmq = publisher("rabbitmq")
    for created_at in (
        datetime(1970, 1, 1, 0, 0, 0, 500_000, tzinfo=UTC),
        datetime(9999, 12, 29, tzinfo=UTC),
    ):
        assert rabbitmq.message_problem(message(created_at=created_at)) is None


@pytest.mark.parametrize(
    ("case", "headers", "aggregate_id"),
    [
        ("a value of 200 KB", {"big": "v" * 200_000}, "order-1"),
        ("40,000 four-byte characters", {"big": "😀" * 40_000}, "order-1"),
        ("12,000 headers", {f"h{n:05d}": "v" for n in range(12_000)}, "order-1"),
        ("an aggregate id of 300 KB", {}, "a" * 300_000),
    ],
)
def test_rabbitmq_refuses_a_header_frame_over_the_default_frame_max(
    case: str, headers: dict[str, Any], aggregate_id: str
) -> None:
    # The broker would close the connection (501 FRAME_ERROR) over a larger content header.
    problem = publisher("rabbitmq").message_problem(message(headers, aggregate_id=aggregate_id))
    assert problem is not None, case
    assert "131072-byte AMQP frame" in problem


def test_rabbitmq_takes_a_header_value_under_frame_max() -> None:
    assert publisher("rabbitmq").message_problem(message({"big": "v" * 100_000})) is None


@pytest.mark.parametrize("counted_in", ["characters", "bytes", "unknown"])
def test_rabbitmq_finds_large_headers_behind_a_payload_of_many_byte_characters(
    counted_in: str,
) -> None:
    # A 400 KB payload of 100,000 characters next to 150 KB of headers: counted in characters,
    # size less the payload's bytes is negative, yet the header frame is over frame_max.
    payload = json.dumps("😀" * 100_000, ensure_ascii=False)
    headers = {"big": "v" * 150_000}
    size = {
        "characters": None,
        "bytes": len(payload.encode()) + len(json.dumps(headers).encode()) + 90,
        "unknown": 0,
    }[counted_in]
    problem = publisher("rabbitmq").message_problem(message(headers, payload=payload, size=size))
    assert problem is not None
    assert "frame_max" in problem


def test_rabbitmq_takes_a_large_payload_with_small_headers() -> None:
    big = message({"n": 1}, payload=json.dumps("x" * 3_000_000))
    assert publisher("rabbitmq").message_problem(big) is None


def test_rabbitmq_limit_is_the_setting() -> None:
    assert publisher("rabbitmq").max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    assert publisher("rabbitmq", max_message_bytes=1000).max_message_bytes == 1000


# -- NATS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a b", "a:b", "a(b", "ключ", "", "a\nb", "a\x01b"])
def test_nats_refuses_header_names_that_are_not_tokens(name: str) -> None:
    # nats-py raises BadHeaderError for them (after the rest of the wave was written).
    problem = publisher("nats").message_problem(message({name: "v"}))
    assert problem is not None
    assert "cannot be a NATS header" in problem


@pytest.mark.parametrize(
    "name", ["Nats-Expected-Stream", "Nats-Rollup", "nats-expected-last-msg-id", "NATS-TTL"]
)
def test_nats_refuses_the_servers_own_headers(name: str) -> None:
    # They steer JetStream (expected stream, sequence, rollup, ...): a row must not.
    problem = publisher("nats").message_problem(message({name: "x"}))
    assert problem is not None
    assert "reserved by NATS" in problem


def test_nats_headers_of_the_relays_own_names_are_overwritten_not_refused() -> None:
    spoofed = message({"Nats-Msg-Id": "spoofed", "Outbox-Event-Type": "spoofed"})
    assert publisher("nats").message_problem(spoofed) is None
    sent = nats_headers(spoofed)
    assert sent["Nats-Msg-Id"] == spoofed.event_id
    assert sent["Outbox-Event-Type"] == "order.created"


@pytest.mark.parametrize(
    ("case", "headers", "aggregate_id", "reason"),
    [
        ("CR LF in a value", {"v": "a\r\nInjected: 1"}, "order-1", "line break"),
        ("a newline in the aggregate id", {}, "agg\nX", "line break"),
        ("blanks around a value", {"v": " padded "}, "order-1", "blanks"),
        ("blanks around the aggregate id", {}, " padded ", "blanks"),
    ],
)
def test_nats_refuses_values_its_header_lines_would_change(
    case: str, headers: dict[str, Any], aggregate_id: str, reason: str
) -> None:
    # nats-py turns CR/LF into spaces and strips values: the message would arrive changed.
    problem = publisher("nats").message_problem(message(headers, aggregate_id=aggregate_id))
    assert problem is not None, case
    assert reason in problem


@pytest.mark.parametrize("value", ["a\tb", "a\x01b", "a\ufffeb", "", "ünïcode"])
def test_nats_carries_other_characters_in_values(value: str) -> None:
    assert publisher("nats").message_problem(message({"v": value})) is None


def test_nats_refuses_a_header_block_over_jetstreams_limit() -> None:
    nats = publisher("nats")
    assert nats.message_problem(message({"big": "v" * 60_000})) is None
    problem = nats.message_problem(message({"big": "v" * MAX_HEADER_BLOCK}))
    assert problem is not None
    assert f"JetStream's {MAX_HEADER_BLOCK}-byte limit" in problem


def test_nats_counts_headers_and_payload_against_the_limit() -> None:
    # Not connected: the server's max_payload is not known yet, the setting is the limit.
    nats = publisher("nats", max_message_bytes=10_000)
    assert nats.max_message_bytes == 10_000
    assert nats.message_problem(message(payload=json.dumps("x" * 9_000))) is None
    problem = nats.message_problem(message({"h": "v" * 2_000}, payload=json.dumps("x" * 9_000)))
    assert problem is not None
    assert "10000-byte limit" in problem


def test_nats_counts_the_payload_in_bytes() -> None:
    nats = publisher("nats", max_message_bytes=10_000)
    four_bytes_each = message(payload=json.dumps("😀" * 3_000, ensure_ascii=False))
    assert nats.message_problem(four_bytes_each) is not None


# -- MQTT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("character", "shown"),
    [
        ("\r", "U+000D"),
        ("\n", "U+000A"),
        ("\t", "U+0009"),
        ("\x01", "U+0001"),
        ("\x7f", "U+007F"),
        ("\x85", "U+0085"),
        ("\ufffe", "U+FFFE"),
        ("\ufdd0", "U+FDD0"),
        ("\U0010ffff", "U+10FFFF"),
    ],
)
def test_mqtt_refuses_characters_mosquitto_drops_the_connection_over(
    character: str, shown: str
) -> None:
    mqtt = publisher("mqtt")
    for problem in (
        mqtt.message_problem(message({"v": f"a{character}b"})),
        mqtt.message_problem(message({f"a{character}b": "v"})),
        mqtt.message_problem(message(aggregate_id=f"agg{character}")),
        mqtt.message_problem(message(aggregate_type=f"order{character}")),
    ):
        assert problem is not None
        assert shown in problem


@pytest.mark.parametrize(
    ("case", "headers", "aggregate_id"),
    [
        ("a value of 70,000 bytes", {"big": "v" * 70_000}, "order-1"),
        ("20,000 four-byte characters", {"big": "😀" * 20_000}, "order-1"),
        ("an aggregate id of 300 KB", {}, "a" * 300_000),
        ("a name of 70,000 bytes", {"k" * 70_000: "v"}, "order-1"),
    ],
)
def test_mqtt_refuses_strings_over_65535_bytes(
    case: str, headers: dict[str, Any], aggregate_id: str
) -> None:
    # paho would raise struct.error packing the two-byte length.
    problem = publisher("mqtt").message_problem(message(headers, aggregate_id=aggregate_id))
    assert problem is not None, case
    assert "65535-byte string limit" in problem


@pytest.mark.parametrize(
    "headers",
    [
        {"a:b": "v", "a b": "v", "ключ": "v", "": "v", "k" * 300: "v"},
        {"obj": {"k\n": "v\x01\ufffe"}},  # non-strings travel as JSON, control characters escaped
        {"v": "ünïcode 😀"},
        {"v": ""},
    ],
)
def test_mqtt_carries_what_its_strings_can_hold(headers: dict[str, Any]) -> None:
    assert publisher("mqtt").message_problem(message(headers)) is None


def test_mqtt_3_1_1_has_no_user_properties_to_refuse() -> None:
    # Headers are not sent over MQTT 3.1.1: only the topic must be a valid string.
    mqtt = publisher("mqtt311")
    assert mqtt.message_problem(message({"v": "a\r\nb", "big": "v" * 70_000})) is None


def test_mqtt_properties_of_the_relays_own_names_win_over_the_rows_headers() -> None:
    # A consumer reading the properties as a mapping keeps the last of a name: a row's own
    # event_id header must not replace the id consumers deduplicate on.
    spoofed = message(
        {"event_id": "spoofed", "event_type": "spoofed", "created_at": "spoofed", "x": "1"}
    )
    properties = user_properties(spoofed)
    names = [name for name, _value in properties]
    assert len(names) == len(set(names))
    assert dict(properties)["event_id"] == spoofed.event_id
    assert dict(properties)["event_type"] == "order.created"
    assert dict(properties)["created_at"] == NOW.isoformat()
    assert dict(properties)["x"] == "1"


def test_mqtt_limit_is_the_protocols_packet_size_or_the_setting() -> None:
    # Mosquitto announces no Maximum Packet Size: the protocol's limit stands.
    assert publisher("mqtt").max_message_bytes == min(
        DEFAULT_MAX_MESSAGE_BYTES, MAX_PACKET - PACKET_OVERHEAD
    )
    assert publisher("mqtt", max_message_bytes=1000).max_message_bytes == 1000


# -- Redis Streams ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"big": "v" * 300_000},
        {"v": "a\r\n\x01\ufffe"},
        {"a b:(ключ)": "v", "": ""},
        {"Nats-Expected-Stream": "x", "CC": None},
    ],
)
def test_redis_carries_any_value_within_the_size_limit(headers: dict[str, Any]) -> None:
    # XADD is binary-safe; headers travel as one JSON field.
    assert publisher("redis").message_problem(message(headers, aggregate_id="a\n" * 1000)) is None


def test_redis_limit_is_proto_max_bulk_len_or_the_setting() -> None:
    assert publisher("redis").max_message_bytes == min(
        DEFAULT_MAX_MESSAGE_BYTES, PROTO_MAX_BULK_LEN
    )
    assert publisher("redis", max_message_bytes=1000).max_message_bytes == 1000


# -- webhook ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": "00-ü4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
        {"traceparent": "00-abc-def-01\r\nX-Injected: 1"},
        {"tracestate": "k=" + "v" * 100_000},
        {"traceparent": 12, "tracestate": {"a": "b"}},
        {"v": "a\r\n\x01\ufffe", "k" * 300: "v"},
    ],
)
def test_webhook_carries_any_headers_in_the_body(headers: dict[str, Any]) -> None:
    poison = message(headers, aggregate_id="agg\nX")
    assert publisher("webhook").message_problem(poison) is None
    body = json.loads(event_body(poison))
    assert body["headers"] == headers
    assert body["aggregate_id"] == "agg\nX"


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),
        ("k=" + "v" * (MAX_TRACE_HEADER - 2), True),
        ("k=" + "v" * (MAX_TRACE_HEADER - 1), False),  # servers refuse long header lines
        ("00-ü-01", False),  # HTTP header values are ASCII
        ("00-abc\r\nX-Injected: 1", False),  # header injection
        ("a\tb", False),
    ],
)
def test_webhook_sends_only_short_printable_ascii_trace_headers(value: str, sent: bool) -> None:
    assert is_header_value(value) is sent


def test_webhook_limit_is_the_setting() -> None:
    assert publisher("webhook", max_message_bytes=1000).max_message_bytes == 1000
