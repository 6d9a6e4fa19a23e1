"""What a handler receives (:class:`Event`), the errors it may raise, and how an AMQP delivery
becomes an event (and a copy of it goes to a retry or dead-letter queue).

A delivery may be in the relay's native format or a CloudEvent in either content mode of the
AMQP binding (``--message-format``): the handler gets the same :class:`Event` from all three
(docs/cloudevents.md), and the inbox dedupes on the CloudEvents ``id``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pika.spec import Basic, BasicProperties

from outbox_relay.envelopes import AGGREGATE_TYPE

#: Delivery attempt of this copy of the message (absent on the first delivery: attempt 1).
ATTEMPT_HEADER = "x-outbox-attempt"
#: Set on dead-lettered messages.
FAILURE_REASON_HEADER = "x-outbox-failure-reason"
ATTEMPTS_HEADER = "x-outbox-attempts"
FAILED_AT_HEADER = "x-outbox-failed-at"
LAST_ERROR_HEADER = "x-outbox-last-error"

MAX_REASON = 1000

# The AMQP binding's prefixes of CloudEvents attributes (":" is the spec's, "_" the JMS-safe
# variant other SDKs write).
CE_PREFIXES = ("cloudEvents:", "cloudEvents_")
_CE_ID_HEADERS = tuple(prefix + "id" for prefix in CE_PREFIXES)
# Attributes that are not extensions (they fill the Event's own fields).
_CE_CONTEXT = frozenset(
    {"specversion", "id", "source", "type", "datacontenttype", "dataschema", "subject", "time"}
)


class PermanentError(Exception):
    """Raise from a handler when the event can never succeed: it is dead-lettered at once."""


class Reject(PermanentError):
    """Same as PermanentError (the name the AMQP world uses for 'do not requeue')."""


@dataclass(frozen=True, slots=True)
class Event:
    """One event as a handler sees it."""

    event_id: str
    event_type: str
    aggregate_type: str | None
    aggregate_id: str | None
    payload: Any
    headers: dict[str, Any]
    attempt: int = 1
    redelivered: bool = False
    created_at: datetime | None = None


class Undeliverable(Exception):
    """A message that cannot be decoded or has no handler: dead-lettered, never retried."""


def copy_properties(
    properties: BasicProperties, headers: dict[str, Any], *, event_type: str | None = None
) -> BasicProperties:
    """The message's own properties (id, type, timestamp, ...) with ``headers``, persistent."""
    return BasicProperties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        delivery_mode=2,
        correlation_id=properties.correlation_id,
        message_id=properties.message_id,
        timestamp=properties.timestamp,
        type=properties.type or event_type,
        app_id=properties.app_id,
        headers=headers,
    )


def str_or_none(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


def attempt_of(headers: dict[str, Any]) -> int:
    try:
        return max(1, int(headers.get(ATTEMPT_HEADER, 1)))
    except (TypeError, ValueError):
        return 1


def decode(
    event_id: str | None,
    event_type: str,
    properties: BasicProperties,
    headers: dict[str, Any],
    body: bytes,
    attempt: int,
    method: Basic.Deliver,
) -> Event:
    """The event a delivery carries, native or CloudEvents (binary or structured mode)."""
    content_type = (properties.content_type or "").lower()
    if content_type.startswith("application/cloudevents"):
        if not content_type.startswith("application/cloudevents+json"):
            raise Undeliverable(f"unsupported CloudEvents format {properties.content_type!r}")
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Undeliverable(f"invalid JSON CloudEvent: {exc}") from exc
        if not isinstance(document, dict):
            raise Undeliverable("a structured CloudEvent must be a JSON object")
        others = {k: v for k, v in headers.items() if not k.startswith(CE_PREFIXES)}
        return _cloudevent(document, _structured_data(document), others, attempt, method)
    if _CE_ID_HEADERS[0] in headers or _CE_ID_HEADERS[1] in headers:
        attributes: dict[str, Any] = {}
        others = {}
        for key, value in headers.items():
            if key.startswith(CE_PREFIXES):
                attributes[key[len(CE_PREFIXES[0]) :]] = value  # both prefixes are 12 long
            else:
                others[key] = value
        return _cloudevent(attributes, _json(body, content_type), others, attempt, method)
    if not event_id:
        raise Undeliverable("message has no message_id and no event_id header")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Undeliverable(f"invalid JSON body: {exc}") from exc
    created_at = (
        datetime.fromtimestamp(properties.timestamp, UTC)
        if isinstance(properties.timestamp, int)
        else None
    )
    return Event(
        event_id=event_id,
        event_type=event_type,
        aggregate_type=str_or_none(headers.get("aggregate_type")),
        aggregate_id=str_or_none(headers.get("aggregate_id")),
        payload=payload,
        headers=headers,
        attempt=attempt,
        redelivered=bool(method.redelivered),
        created_at=created_at,
    )


def _json(body: bytes, content_type: str) -> Any:
    """Event data as the handler gets it: parsed JSON (the relay's), else the bytes as sent."""
    if content_type and "json" not in content_type:
        return body
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Undeliverable(f"invalid JSON body: {exc}") from exc


def _structured_data(document: dict[str, Any]) -> Any:
    if "data" in document:
        return document["data"]
    encoded = document.get("data_base64")
    if encoded is None:
        return None
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise Undeliverable(f"invalid data_base64: {exc}") from exc
    return _json(raw, str(document.get("datacontenttype") or "").lower())


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):  # an AMQP timestamp (pika: naive, UTC)
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int):
        return datetime.fromtimestamp(value / 1000, UTC)  # AMQP 1.0: milliseconds
    text = str_or_none(value)
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise Undeliverable(f"invalid CloudEvents time {text[:80]!r}") from exc


def _cloudevent(
    attributes: dict[str, Any],
    payload: Any,
    others: dict[str, Any],
    attempt: int,
    method: Basic.Deliver,
) -> Event:
    """The Event of a CloudEvent: ``id``, ``type``, ``subject`` (the aggregate id), ``time``;
    the extensions become headers, ``aggregatetype`` as ``aggregate_type``, next to the
    delivery's other headers (the consumer's own, the relay's ``aggregate_id``)."""
    event_id = str_or_none(attributes.get("id"))
    event_type = str_or_none(attributes.get("type"))
    if not event_id or not event_type:
        raise Undeliverable("CloudEvent without id or type")
    headers = dict(others)
    for name, value in attributes.items():
        if name not in _CE_CONTEXT and name != "data" and name != "data_base64":
            headers[name] = value.decode() if isinstance(value, bytes) else value
    aggregate_type = headers.pop(AGGREGATE_TYPE, None)
    if aggregate_type is not None:
        headers["aggregate_type"] = aggregate_type
    aggregate_id = str_or_none(attributes.get("subject"))
    if aggregate_id is not None:
        headers["aggregate_id"] = aggregate_id
    else:
        aggregate_id = str_or_none(headers.get("aggregate_id"))
    return Event(
        event_id=event_id,
        event_type=event_type,
        aggregate_type=str_or_none(aggregate_type),
        aggregate_id=aggregate_id,
        payload=payload,
        headers=headers,
        attempt=attempt,
        redelivered=bool(method.redelivered),
        created_at=_time(attributes.get("time")),
    )
