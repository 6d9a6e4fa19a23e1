"""One adapter per broker for the publisher contract suite: the settings that point a publisher
at a fresh destination on the real local server, a reader of what arrived there, an event type
the broker will refuse, and how to stop and start the server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import amqp, http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from dateutil.parser import isoparse

from outbox_relay.publishers import PublisherSettings
from tests.acceptance.conftest import rabbitmq_start_app, rabbitmq_stop_app
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
    nats_make_stream,
    nats_stream_messages,
    nats_stream_raw,
    redis_cleanup,
    redis_client,
    redis_entries,
    redis_keys,
    redis_raw_entries,
    unique,
    wait_for_jetstream,
)
from tests.conftest import RabbitQueue
from tests.contract.http_sink import HttpSink, Request

ROUTED = "order.created"  # every adapter arranges for order.* to arrive somewhere
UNROUTED = "unrouted.thing"  # ... and for this type to be refused


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


JSON = JSONFormat()


def _structured(content_type: str | None) -> bool:
    return (content_type or "").lower().startswith("application/cloudevents")


def from_attributes(attributes: dict[str, Any], data: bytes) -> BaseCloudEvent:
    """The SDK's own constructor (it validates every attribute) for transports without an SDK
    binding: the test maps their headers per the binding, the SDK reads the data."""
    if "time" in attributes:
        attributes["time"] = isoparse(attributes["time"])
    return CloudEvent(attributes, JSON.read_data(data, attributes.get("datacontenttype")))


class BrokerUnderTest:
    name = "?"
    dedupes = False  # the broker itself drops a republished event (by event id)
    unroutable_permanent = False  # its refusal can never succeed later
    unroutable_reason = ""  # a fragment of the failure reason

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self.options = options

    def settings(self, **overrides: Any) -> PublisherSettings:
        return PublisherSettings.from_mapping({"broker_url": self.url, **self.options, **overrides})

    def relay_options(self) -> dict[str, Any]:
        """The same destination as RelaySettings keyword arguments."""
        return {"broker_url": self.url, **self.options}

    def received(self) -> list[Received]:
        raise NotImplementedError

    def cloudevents(self) -> list[BaseCloudEvent]:
        """What arrived, decoded by the official CloudEvents SDK (either content mode)."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        pass


class RabbitMQUnderTest(BrokerUnderTest):
    name = "rabbitmq"
    unroutable_reason = "unroutable"

    def __init__(self, url: str, exchange: str, queue: RabbitQueue) -> None:
        super().__init__(url, exchange=exchange, confirm_timeout=10.0)
        self.queue = queue
        self._seen: list[Received] = []
        self._events: list[BaseCloudEvent] = []

    def received(self) -> list[Received]:
        for method, props, body in self.queue.drain():
            headers = {k: _text(v) for k, v in (props.headers or {}).items()}
            self._seen.append(
                Received(
                    event_id=props.message_id,
                    event_type=props.type,
                    aggregate_type=headers.get("aggregate_type"),
                    aggregate_id=headers.get("aggregate_id"),
                    headers=headers,
                    payload=body,
                    where=method.routing_key,
                )
            )
        return list(self._seen)

    def cloudevents(self) -> list[BaseCloudEvent]:
        """The SDK's AMQP binding: pika's headers are the application properties."""
        for _method, props, body in self.queue.drain():
            message = amqp.AMQPMessage(
                properties={"content-type": props.content_type},
                application_properties=dict(props.headers or {}),
                application_data=body,
            )
            self._events.append(amqp.from_amqp_event(message))
        return list(self._events)

    def stop(self) -> None:
        rabbitmq_stop_app()

    def start(self) -> None:
        rabbitmq_start_app()


class NatsUnderTest(BrokerUnderTest):
    """A fresh stream bound to ``<prefix>.order.>`` only, so ``<prefix>.unrouted.*`` has none."""

    name = "nats"
    dedupes = True
    unroutable_reason = "no JetStream stream is bound"

    def __init__(self) -> None:
        self.stream = unique("CT").upper()
        self.prefix = unique("ct")
        super().__init__(NATS_URL, topic_prefix=self.prefix, nats_stream=self.stream)
        asyncio.run(nats_make_stream(self.stream, [f"{self.prefix}.order.>"]))

    def received(self) -> list[Received]:
        return asyncio.run(nats_stream_messages(self.stream))

    def cloudevents(self) -> list[BaseCloudEvent]:
        """NATS binding: Content-Type tells the modes apart; binary mode's ``ce-`` headers
        (datacontenttype too) are percent-encoded UTF-8."""
        events = []
        for headers, body in asyncio.run(nats_stream_raw(self.stream)):
            if _structured(headers.get("Content-Type")):
                events.append(JSON.read(None, body))
                continue
            attributes = {
                name[3:].lower(): unquote(value, errors="strict")
                for name, value in headers.items()
                if name.lower().startswith("ce-")
            }
            events.append(from_attributes(attributes, body))
        return events

    def stop(self) -> None:
        NATS.stop()

    def start(self) -> None:
        NATS.start()
        wait_for_jetstream()

    def cleanup(self) -> None:
        nats_cleanup(self.stream)


class RedisUnderTest(BrokerUnderTest):
    """Stream per event type; the key of ``unrouted.thing`` holds a string, so XADD fails."""

    name = "redis"
    unroutable_reason = "WRONGTYPE"

    def __init__(self) -> None:
        self.prefix = unique("ct")
        super().__init__(REDIS_URL, topic_prefix=self.prefix)
        client = redis_client()
        client.set(f"{self.prefix}:{UNROUTED}", "not a stream")
        client.close()

    def received(self) -> list[Received]:
        keys = [k for k in redis_keys(f"{self.prefix}:*") if not k.endswith(UNROUTED)]
        return redis_entries(keys)

    def cloudevents(self) -> list[BaseCloudEvent]:
        """The relay's Redis mapping: ``ce_<name>`` fields and ``data``, or ``content_type``
        application/cloudevents+json and the JSON event format as ``data``."""
        keys = [k for k in redis_keys(f"{self.prefix}:*") if not k.endswith(UNROUTED)]
        events = []
        for fields in redis_raw_entries(keys):
            content_type = fields.get("content_type")
            if content_type is not None and _structured(content_type.decode()):
                events.append(JSON.read(None, fields["data"]))
                continue
            attributes = {k[3:]: v.decode() for k, v in fields.items() if k.startswith("ce_")}
            events.append(from_attributes(attributes, fields["data"]))
        return events

    def stop(self) -> None:
        REDIS.stop()

    def start(self) -> None:
        REDIS.start()

    def cleanup(self) -> None:
        redis_cleanup(f"{self.prefix}:*")


class MqttUnderTest(BrokerUnderTest):
    """A subscriber on ``<prefix>/order/#``: nothing subscribes to ``<prefix>/unrouted/...``."""

    name = "mqtt"
    unroutable_reason = "no subscriber matches"

    def __init__(self) -> None:
        self.prefix = unique("ct")
        super().__init__(MQTT_URL, topic_prefix=self.prefix, confirm_timeout=10.0)
        self.subscriber = MqttSubscriber(f"{self.prefix}/order/#").start()

    def received(self) -> list[Received]:
        return self.subscriber.messages

    def cloudevents(self) -> list[BaseCloudEvent]:
        """MQTT binding: structured when the Content Type says so (or is absent: MQTT 3.1.1);
        binary: user properties named as the attributes, Content Type = datacontenttype."""
        events = []
        for content_type, properties, payload in self.subscriber.raw:
            if content_type is None or _structured(content_type):
                events.append(JSON.read(None, payload))
                continue
            attributes: dict[str, Any] = dict(properties)
            attributes["datacontenttype"] = content_type
            events.append(from_attributes(attributes, payload))
        return events

    def stop(self) -> None:
        MOSQUITTO.stop()

    def start(self) -> None:
        MOSQUITTO.start()

    def cleanup(self) -> None:
        MOSQUITTO.start()
        self.subscriber.stop()


class WebhookUnderTest(BrokerUnderTest):
    """An HTTP server that answers 422 to ``unrouted.*`` events and 200 to the rest."""

    name = "webhook"
    unroutable_permanent = True
    unroutable_reason = "422"
    secret = "contract-secret"

    def __init__(self) -> None:
        self.sink = HttpSink(self._respond).start()
        super().__init__(self.sink.url, webhook_secret=self.secret, webhook_timeout=5.0)
        self.respond_override: Callable[[Request], int] | None = None

    def _respond(self, request: Request) -> int:
        if self.respond_override is not None:
            return self.respond_override(request)
        if request.headers.get("x-outbox-event-type", "").startswith("unrouted."):
            return 422
        return 200

    def received(self) -> list[Received]:
        got = []
        for request in self.sink.requests:
            if self._respond(request) != 200:
                continue
            body = json.loads(request.body)
            events = body.get("events", [body])
            for event in events:
                got.append(
                    Received(
                        event_id=event["event_id"],
                        event_type=event["event_type"],
                        aggregate_type=event["aggregate_type"],
                        aggregate_id=event["aggregate_id"],
                        headers={k: _text(v) for k, v in event["headers"].items()},
                        payload=json.dumps(event["payload"], separators=(",", ":")).encode(),
                        where=request.headers.get("x-outbox-event-type", event["event_type"]),
                    )
                )
        return got

    def cloudevents(self) -> list[BaseCloudEvent]:
        """The SDK's HTTP binding; a batch (application/cloudevents-batch+json) is a JSON array
        of events in the JSON format."""
        events = []
        for request in self.sink.requests:
            content_type = request.headers.get("content-type", "")
            if content_type.startswith("application/cloudevents-batch"):
                batch = json.loads(request.body)
                events.extend(JSON.read(None, json.dumps(item)) for item in batch)
            else:
                message = http.HTTPMessage(headers=dict(request.headers), body=request.body)
                events.append(http.from_http_event(message))
        return events

    def stop(self) -> None:
        self.sink.stop()

    def start(self) -> None:
        self.sink.start()

    def cleanup(self) -> None:
        self.sink.stop()
