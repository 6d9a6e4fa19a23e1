"""CloudEvents mapping (outbox_relay.envelopes): extension names, attribute values, the default
source, the attribute set and the JSON format as the official SDK reads them; the settings that
choose a format; the consumer decoding all three formats of RabbitMQ into one Event."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any

import pika.exceptions
import pytest
from cloudevents.core.formats.json import JSONFormat
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pika.spec import Basic, BasicProperties

from outbox_relay.consumer.events import Event, Undeliverable, decode
from outbox_relay.envelopes import (
    DATA_CONTENT_TYPE,
    CloudEvents,
    MessageFormat,
    default_source,
    extension_names,
    extension_value,
    percent_encoded,
    rfc3339,
)
from outbox_relay.errors import ConfigError
from outbox_relay.messages import OutboxMessage
from outbox_relay.observability.tracing.consumer import ConsumerTracing
from outbox_relay.publishers import create_publisher
from outbox_relay.publishers.base import PublisherSettings
from outbox_relay.publishers.rabbitmq import CE_PREFIX, RabbitMQPublisher
from outbox_relay.relay.settings import RelaySettings
from tests.unit.outbox_messages import (
    CREATED,
    TRACEPARENT,
    TYPED_HEADERS,
    outbox_message,
    pika_properties,
)

message = outbox_message


# -- extension names ------------------------------------------------------------------------


def test_header_keys_that_are_extension_names_keep_them() -> None:
    assert extension_names(("tenant", "traceparent", "v2")) == ("tenant", "traceparent", "v2")


def test_other_keys_are_lowercased_and_stripped_to_letters_and_digits() -> None:
    assert extension_names(("Tenant-ID", "x_request_id", "Ünit")) == (
        "tenantid",
        "xrequestid",
        "nit",
    )


def test_reserved_empty_and_taken_names_get_a_digest_of_the_key() -> None:
    names = extension_names(("id", "--", "tenant", "Tenant", "aggregatetype"))
    assert names[2] == "tenant"  # a valid key claims its name before any sanitised one
    for name, base in zip(
        names[:2] + names[3:], ("id", "header", "tenant", "aggregatetype"), strict=True
    ):
        assert name.startswith(base)
        assert len(name) == len(base) + 8
        assert name[len(base) :].isalnum()
    assert len(set(names)) == len(names)


def test_names_depend_on_the_set_of_keys_not_their_order() -> None:
    keys = ("Tenant", "TENANT", "te-nant", "tenant")
    forward = dict(zip(keys, extension_names(keys), strict=True))
    backward = dict(zip(keys[::-1], extension_names(keys[::-1]), strict=True))
    assert forward == backward
    assert forward["tenant"] == "tenant"


def test_values_keep_cloudevents_types_and_other_json_becomes_text() -> None:
    assert extension_value("a") == "a"
    assert extension_value(True) is True
    assert extension_value(7) == 7
    assert extension_value(2**40) == str(2**40)  # CloudEvents Integer is 32-bit
    assert extension_value(1.5) == "1.5"
    assert extension_value({"b": [1, "ü"]}) == '{"b":[1,"ü"]}'


def test_header_values_are_percent_encoded_per_the_http_and_nats_bindings() -> None:
    assert percent_encoded("Euro € 😀") == "Euro%20%E2%82%AC%20%F0%9F%98%80"
    assert percent_encoded('a"b%c') == "a%22b%25c"
    assert percent_encoded(TRACEPARENT) == TRACEPARENT


def test_time_is_rfc3339_with_z_for_utc() -> None:
    assert rfc3339(CREATED) == "2026-03-01T12:30:45.123456Z"
    assert rfc3339(CREATED.astimezone(timezone(timedelta(hours=2)))).endswith("+02:00")


@pytest.mark.parametrize(
    ("url", "source"),
    [
        (
            "postgresql://relay:s3cret@db.example:5433/shop",
            "postgresql://db.example:5433/shop/sales",
        ),
        ("postgresql://db.example/shop?sslmode=require", "postgresql://db.example/shop/sales"),
        (
            "host=/var/run/postgresql dbname=shop password=x",
            "postgresql://%2Fvar%2Frun%2Fpostgresql/shop/sales",
        ),
    ],
)
def test_the_default_source_names_the_outbox_without_credentials(url: str, source: str) -> None:
    assert default_source(url, "sales") == source


# -- the attribute set and the JSON format ----------------------------------------------------


def test_the_attribute_set_of_a_row() -> None:
    attributes = CloudEvents("/shop").attributes(message(headers={"tenant": "acme", "n": 3}))
    assert attributes == {
        "specversion": "1.0",
        "id": "8d4f6a53-1c1e-4a0e-9a55-1f0a3f2b8c11",
        "source": "/shop",
        "type": "order.created",
        "datacontenttype": "application/json",
        "time": "2026-03-01T12:30:45.123456Z",
        "subject": "o-42",
        "aggregatetype": "order",
        "tenant": "acme",
        "n": 3,
    }


class _ClocksGoBack(tzinfo):
    """A zone whose clocks go back an hour: the first pass (fold 0) is +02:00, the second +01:00."""

    def utcoffset(self, dt: datetime | None) -> timedelta:
        return timedelta(hours=1 if dt is not None and dt.fold else 2)

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None


def test_the_time_of_the_previous_row_is_reused_only_for_the_same_moment_zone_and_fold() -> None:
    ce = CloudEvents("/shop")
    zone = _ClocksGoBack()
    first_pass = datetime(2026, 10, 25, 2, 30, tzinfo=zone)
    moments = [
        CREATED,
        CREATED.replace(),  # equal, another object: the remembered text
        CREATED.astimezone(timezone(timedelta(hours=2))),  # equal, another zone
        CREATED.replace(microsecond=0),
        first_pass,
        first_pass.replace(fold=1),  # equal within the zone, an hour later
        CREATED.replace(tzinfo=None),  # naive: UTC
    ]

    assert [ce.time(moment) for moment in moments] == [
        "2026-03-01T12:30:45.123456Z",
        "2026-03-01T12:30:45.123456Z",
        "2026-03-01T14:30:45.123456+02:00",
        "2026-03-01T12:30:45Z",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:30:00+01:00",
        "2026-03-01T12:30:45.123456Z",
    ]


def test_no_subject_or_aggregatetype_without_an_aggregate_and_no_null_headers() -> None:
    attributes = CloudEvents("/shop").attributes(
        message(aggregate_type=None, aggregate_id=None, headers={"gone": None})
    )
    assert not {"subject", "aggregatetype", "gone"} & set(attributes)


def test_the_structured_event_is_read_by_the_official_sdk_with_every_attribute() -> None:
    row = message()
    body = CloudEvents("postgresql://db/shop/public").structured(row)

    event = JSONFormat().read(None, body)

    assert event.get_specversion() == "1.0"
    assert event.get_id() == row.event_id
    assert event.get_source() == "postgresql://db/shop/public"
    assert event.get_type() == "order.created"
    assert event.get_datacontenttype() == "application/json"
    assert event.get_time() == CREATED
    assert event.get_subject() == "o-42"
    assert event.get_extension("aggregatetype") == "order"
    assert event.get_extension("tenant") == "acme"
    assert event.get_extension("traceparent") == TRACEPARENT
    assert event.get_extension("tracestate") == "k=v"
    assert event.get_data() == {"total": 12.5, "note": "grüße"}


# -- settings ----------------------------------------------------------------------------------


def test_native_is_the_default_and_builds_no_cloudevents() -> None:
    settings = PublisherSettings()
    assert settings.message_format is MessageFormat.NATIVE
    assert settings.cloudevents is None


def test_ce_source_without_a_cloudevents_format_is_refused() -> None:
    with pytest.raises(ConfigError, match="--ce-source: applies to --message-format"):
        PublisherSettings.from_mapping({"ce_source": "/shop"})


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ConfigError, match="--message-format"):
        PublisherSettings.from_mapping({"message_format": "cloudevents-json"})


def test_serve_defaults_the_source_to_the_outbox_and_keeps_a_given_one() -> None:
    relay = RelaySettings.from_mapping(
        {
            "database_url": "postgresql://relay:pw@db.internal/shop",
            "schema": "sales",
            "message_format": "cloudevents-binary",
        }
    )
    assert relay.publisher.ce_source == "postgresql://db.internal/shop/sales"
    given = RelaySettings.from_mapping(
        {"message_format": "cloudevents-structured", "ce_source": "https://shop.example/orders"}
    )
    assert given.publisher.ce_source == "https://shop.example/orders"


def test_mqtt_3_1_1_refuses_binary_mode_in_one_line() -> None:
    settings = PublisherSettings.from_mapping(
        {"broker_url": "mqtt://localhost?version=3.1.1", "message_format": "cloudevents-binary"}
    )
    with pytest.raises(ConfigError, match=r"MQTT 3\.1\.1 has no properties"):
        create_publisher(settings)


def test_webhook_batches_refuse_binary_mode_in_one_line() -> None:
    settings = PublisherSettings.from_mapping(
        {
            "broker_url": "http://localhost:9/hook",
            "message_format": "cloudevents-binary",
            "webhook_batch": True,
        }
    )
    with pytest.raises(ConfigError, match="binary mode carries one event per request"):
        create_publisher(settings)


# -- the consumer reads all three formats --------------------------------------------------------


def _delivery(message_format: MessageFormat, row: OutboxMessage) -> tuple[BasicProperties, bytes]:
    """What the RabbitMQ publisher sends for ``row``, as a consumer receives it."""
    settings = PublisherSettings.from_mapping(
        {"message_format": message_format}
        | ({} if message_format is MessageFormat.NATIVE else {"ce_source": "/shop"})
    )
    publisher = RabbitMQPublisher(settings)
    body, properties = publisher.encode(row)  # the encoding alone
    # Through the AMQP codec and back, as pika delivers it.
    encoded = b"".join(properties.encode())
    received = BasicProperties()
    received.decode(encoded, 0)
    return received, body


def _binary_settings() -> PublisherSettings:
    return PublisherSettings.from_mapping(
        {"message_format": MessageFormat.BINARY, "ce_source": "postgresql://db/shop/public"}
    )


@pytest.mark.parametrize(
    "row",
    [
        message(),
        message(aggregate_type=None, aggregate_id=None, headers={}),
        message(aggregate_id="", headers={"gone": None}),  # no subject, an empty aggregate_id
        message(headers=TYPED_HEADERS),
        message(created_at=CREATED.astimezone(timezone(timedelta(hours=-5)))),
        message(event_id="e" * 255, event_type="order." + "x" * 200, payload=b"[]"),
    ],
    ids=["full", "bare", "empty-aggregate", "typed-headers", "offset", "long-ids"],
)
def test_binary_properties_are_the_bytes_pika_writes_for_the_binding(row: OutboxMessage) -> None:
    """The binary encoder writes the properties itself (every row's shared part encoded once):
    byte for byte what pika encodes for the AMQP binding's mapping of the same row."""
    settings = _binary_settings()
    ce = settings.cloudevents
    assert ce is not None
    attributes = ce.attributes(row)
    assert attributes.pop("datacontenttype") == DATA_CONTENT_TYPE  # the content type instead
    headers = {CE_PREFIX + name: value for name, value in attributes.items()}
    if row.aggregate_id is not None:
        headers["aggregate_id"] = row.aggregate_id  # the ordered consumer hashes it
    expected = pika_properties(row, DATA_CONTENT_TYPE, headers)

    body, properties = RabbitMQPublisher(settings).encode(row)

    assert body == row.payload
    assert b"".join(properties.encode()) == expected


def test_binary_properties_read_like_any_others() -> None:
    row = message()
    _body, properties = RabbitMQPublisher(_binary_settings()).encode(row)

    assert properties.message_id == row.event_id
    assert properties.type == "order.created"
    assert properties.headers["cloudEvents:id"] == row.event_id
    assert properties.headers["cloudEvents:time"] == "2026-03-01T12:30:45.123456Z"
    assert properties.priority is None
    assert "cloudEvents:source" in repr(properties)
    with pytest.raises(AttributeError):
        _ = properties.no_such_property


def test_a_binary_attribute_name_amqp_cannot_carry_is_refused_like_pika_refuses_it() -> None:
    publisher = RabbitMQPublisher(_binary_settings())
    row = message(headers={"k" * 250: "v"})  # cloudEvents: + 250 letters > 255 bytes

    with pytest.raises(pika.exceptions.ShortStringTooLong):
        publisher.encode(row)
    assert "headers cannot be encoded as AMQP" in (publisher.message_problem(row) or "")


def _decode(properties: BasicProperties, body: bytes) -> Event:
    headers = dict(properties.headers or {})
    method = Basic.Deliver(routing_key="order.created", redelivered=False)
    return decode(properties.message_id, properties.type, properties, headers, body, 1, method)


@pytest.mark.parametrize("fmt", [MessageFormat.BINARY, MessageFormat.STRUCTURED])
def test_the_consumer_builds_the_same_event_from_every_format(fmt: MessageFormat) -> None:
    row = message()
    native = _decode(*_delivery(MessageFormat.NATIVE, row))

    event = _decode(*_delivery(fmt, row))

    assert event.created_at == CREATED  # CloudEvents carry microseconds
    assert native.created_at == CREATED.replace(microsecond=0)  # AMQP timestamps: seconds
    assert event == Event(**{**_fields(native), "created_at": CREATED})


def _fields(event: Event) -> dict[str, Any]:
    return {name: getattr(event, name) for name in Event.__dataclass_fields__}


def test_a_foreign_structured_event_is_read_by_its_cloudevents_id() -> None:
    body = json.dumps(
        {
            "specversion": "1.0",
            "id": "ce-1",
            "source": "/elsewhere",
            "type": "order.created",
            "subject": "o-1",
            "data": {"a": 1},
        }
    ).encode()
    properties = BasicProperties(content_type="application/cloudevents+json", message_id="other")

    event = _decode(properties, body)

    assert (event.event_id, event.event_type, event.aggregate_id) == (
        "ce-1",
        "order.created",
        "o-1",
    )
    assert event.payload == {"a": 1}


def test_a_binary_event_with_the_jms_prefix_is_read_too() -> None:
    properties = BasicProperties(
        content_type="application/json",
        headers={
            "cloudEvents_id": "x-1",
            "cloudEvents_type": "order.created",
            "cloudEvents_specversion": "1.0",
        },
    )
    event = _decode(properties, b"[1]")
    assert (event.event_id, event.payload) == ("x-1", [1])


def test_batched_cloudevents_are_undeliverable() -> None:
    properties = BasicProperties(content_type="application/cloudevents-batch+json")
    with pytest.raises(Undeliverable, match="unsupported CloudEvents format"):
        _decode(properties, b"[]")


def test_consumer_spans_continue_the_trace_of_a_binary_cloudevent() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = ConsumerTracing(provider.get_tracer("t"))
    properties, _body = _delivery(MessageFormat.BINARY, message())
    assert "traceparent" not in (properties.headers or {})  # only cloudEvents:traceparent

    method = Basic.Deliver(routing_key="order.created", exchange="events")
    with tracing.handling(method, properties):
        pass

    [span] = exporter.get_finished_spans()
    assert span.context.trace_id == int("4bf92f3577b34da6a3ce929d0e0e4736", 16)
    assert span.parent is not None
    assert span.parent.span_id == int("00f067aa0ba902b7", 16)
