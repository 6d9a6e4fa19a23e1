"""What a handler receives (:class:`Event`), the errors it may raise, and how an AMQP delivery
becomes an event (and a copy of it goes to a retry or dead-letter queue)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pika.spec import Basic, BasicProperties

#: Delivery attempt of this copy of the message (absent on the first delivery: attempt 1).
ATTEMPT_HEADER = "x-outbox-attempt"
#: Set on dead-lettered messages.
FAILURE_REASON_HEADER = "x-outbox-failure-reason"
ATTEMPTS_HEADER = "x-outbox-attempts"
FAILED_AT_HEADER = "x-outbox-failed-at"
LAST_ERROR_HEADER = "x-outbox-last-error"

MAX_REASON = 1000


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
