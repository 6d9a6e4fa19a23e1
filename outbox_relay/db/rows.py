"""Outbox rows into messages, one row at a time: a row that cannot become a message never fails
its batch.

The table accepts rows no broker message can carry: a ``created_at`` of ``'infinity'`` or the
year 20000 (valid SQL, beyond Python's datetime), headers nested thousands of levels deep (valid
jsonb, beyond json.loads' recursion and any broker's header encoder). Such a row becomes a
message with a ``problem``, which the relay dead-letters at once with that reason, while the
rest of the batch goes on.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from outbox_relay.messages import OutboxMessage

# Deeper headers are refused: no broker needs them, and encoders recurse per level (pika's
# AMQP table encoder fails at about 490).
MAX_HEADER_DEPTH = 32
# Where created_at stands when it cannot be read (the row is dead-lettered, never published).
_NO_TIME = datetime(1970, 1, 1, tzinfo=UTC)
# Bytes for the event id and the fixed properties every message carries.
_FIXED_SIZE = 64


def message_from_row(row: tuple[Any, ...]) -> OutboxMessage:
    """A row of the claim queries as a message (columns: id, event_id, event_type,
    aggregate_type, aggregate_id, payload text, headers text, created_at or NULL when out of
    range, created_at as text when out of range, attempts)."""
    (id_, event_id, event_type, aggregate_type, aggregate_id, payload, headers_text, created,
     created_text, attempts) = row  # fmt: skip
    problem = None
    headers: dict[str, Any] = {}
    if headers_text != "{}":
        try:
            headers = json.loads(headers_text)
            problem = _depth_problem(headers_text, headers)
        except RecursionError:
            problem = f"headers are nested deeper than {MAX_HEADER_DEPTH} levels"
            headers = {}
        except ValueError as exc:  # valid jsonb Python will not read: an integer of 5,000 digits
            problem = f"headers cannot be read: {exc}"
            headers = {}
    if created is None:
        problem = (
            f"created_at {created_text} is outside what a message timestamp can hold "
            "(years 1 to 9999)"
        )
        created = _NO_TIME
    body = payload.encode()
    # Positional: keywords cost about half a microsecond more per row.
    return OutboxMessage(
        id_,
        event_id,
        event_type,
        aggregate_type,
        aggregate_id,
        body,
        headers,
        created,
        attempts,
        problem,
        # In bytes, as brokers count: a character can take four.
        len(body)
        + _utf8_length(headers_text)
        + _utf8_length(event_type)
        + _utf8_length(aggregate_type or "")
        + _utf8_length(aggregate_id or "")
        + _FIXED_SIZE,
    )


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def _depth_problem(text: str, headers: Any) -> str | None:
    # Most headers have a handful of brackets: counting them is enough to know they are flat.
    if text.count("{") + text.count("[") <= MAX_HEADER_DEPTH:
        return None
    if _depth(headers) > MAX_HEADER_DEPTH:
        return f"headers are nested deeper than {MAX_HEADER_DEPTH} levels"
    return None


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item)
    return deepest
