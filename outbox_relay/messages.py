"""The message contract shared by the relay core and every publisher."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# Dot-separated words: usable unchanged as an AMQP routing key, a NATS subject, a Redis stream
# suffix and (dots turned into slashes) an MQTT topic. No wildcards, no empty words.
EVENT_TYPE_PATTERN = re.compile(r"[A-Za-z0-9_:-]+(\.[A-Za-z0-9_:-]+)*")
MAX_EVENT_TYPE_BYTES = 255


def event_type_problem(event_type: str) -> str | None:
    """Why ``event_type`` cannot be a routing key, or None when it can."""
    if not EVENT_TYPE_PATTERN.fullmatch(event_type):
        return (
            f"event type {event_type!r} must be dot-separated words of letters, digits, "
            "'_', ':' or '-' (e.g. 'order.created')"
        )
    if len(event_type.encode()) > MAX_EVENT_TYPE_BYTES:
        return f"event type is longer than {MAX_EVENT_TYPE_BYTES} bytes"
    return None


# AMQP topic patterns over event types: words as above, ``*`` exactly one word, ``#`` zero or more.
_PATTERN_WORD = r"(?:[A-Za-z0-9_:-]+|\*|#)"
TOPIC_PATTERN = re.compile(rf"{_PATTERN_WORD}(?:\.{_PATTERN_WORD})*")


def topic_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a topic pattern over event types, or None when it is."""
    if not TOPIC_PATTERN.fullmatch(pattern) or len(pattern.encode()) > MAX_EVENT_TYPE_BYTES:
        return (
            f"{pattern!r} is not an event type pattern: dot-separated words of letters, "
            "digits, '_', ':' or '-', where * stands for one word and # for any number "
            "(e.g. 'order.*' or 'order.#')"
        )
    return None


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more words."""
    return _match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _match(rest, words[1:])


def topic_regex(pattern: str) -> str:
    """``pattern`` (checked with :func:`topic_pattern_problem`) as a regular expression that
    PostgreSQL and Python read alike, matching ``'.' || event_type``: with a dot before every
    word, ``#`` is simply "any number of dotted words", zero included."""
    parts = []
    for word in pattern.split("."):
        if word == "#":
            parts.append(r"(?:\.[^.]+)*")
        elif word == "*":
            parts.append(r"\.[^.]+")
        else:
            # Letters, digits, '_', ':' and '-' only: literal in both regex dialects.
            parts.append(r"\." + word)
    return "^" + "".join(parts) + "$"


@dataclass(slots=True)
class OutboxMessage:
    """One outbox row on its way to the broker: a value, never changed once made
    (:meth:`with_headers` makes a copy).

    ``payload`` is the JSON text exactly as PostgreSQL renders the row's jsonb, encoded UTF-8;
    ``headers`` is the row's own headers object (trace context lives there).

    Not ``frozen``: a frozen dataclass sets each field through ``object.__setattr__``, which
    made building one about 1.3 µs slower, once per event on the relay's hottest path.
    """

    id: int
    event_id: str
    event_type: str
    aggregate_type: str | None
    aggregate_id: str | None
    payload: bytes
    headers: dict[str, Any]
    created_at: datetime
    attempts: int = 0
    # Why the row cannot become a message at all (a timestamp Python cannot hold, headers too
    # deeply nested, ...): the relay dead-letters it at once instead of failing its batch.
    problem: str | None = None
    # Bytes the row takes as a message (payload, headers' JSON, ids), as read from PostgreSQL;
    # 0 when unknown (the payload's length is used then).
    size: int = 0

    def with_headers(self, headers: dict[str, Any]) -> OutboxMessage:
        """A copy with other headers (a new trace context)."""
        # dataclasses.replace() inspects the fields on every call: several times slower.
        return OutboxMessage(
            self.id,
            self.event_id,
            self.event_type,
            self.aggregate_type,
            self.aggregate_id,
            self.payload,
            headers,
            self.created_at,
            self.attempts,
            self.problem,
            self.size,
        )

    def broker_headers(self) -> dict[str, Any]:
        """Headers every broker carries: the row's own plus the aggregate (which wins a clash)."""
        headers = dict(self.headers)
        if self.aggregate_type is not None:
            headers["aggregate_type"] = self.aggregate_type
        if self.aggregate_id is not None:
            headers["aggregate_id"] = self.aggregate_id
        return headers


@dataclass(frozen=True, slots=True)
class PublishResult:
    """The broker's verdict on one message.

    ``permanent`` failures (payload too large, headers the broker cannot encode, a webhook's 4xx)
    can never succeed and are dead-lettered at once; the others are retried with backoff.
    """

    confirmed: bool
    reason: str | None = None
    permanent: bool = False


CONFIRMED = PublishResult(confirmed=True)


@dataclass(frozen=True, slots=True)
class Failure:
    """A row whose publish failed, as the relay records it: ``id`` is the outbox row id."""

    id: int
    reason: str
    permanent: bool


def failed(reason: str, *, permanent: bool = False) -> PublishResult:
    return PublishResult(confirmed=False, reason=reason, permanent=permanent)
