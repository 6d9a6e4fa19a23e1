"""Events written straight to the WAL, for ``--mode cdc``.

An application publishes without writing any table::

    SELECT pg_logical_emit_message(true, 'outbox_relay.public', '{"event_type": "order.created",
        "aggregate_type": "order", "aggregate_id": "42", "payload": {"id": 42},
        "headers": {"traceparent": "..."}, "event_id": "..."}');

The message is transactional: it reaches the relay only if the transaction commits, in commit
order. Only ``event_type`` and ``payload`` are required. Without ``event_id`` the relay derives
a stable one from the message's WAL position, so a message streamed again after a restart keeps
its id.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from outbox_relay.errors import InvalidEventError
from outbox_relay.messages import event_type_problem

# Namespace for event ids derived from (prefix, WAL position).
_EVENT_ID_NAMESPACE = uuid.UUID("7b0f4a4e-52a1-4d53-9a6c-0f0a2a9e3c11")


def default_prefix(schema: str) -> str:
    """Per schema: every slot of a database receives every logical message."""
    return f"outbox_relay.{schema}"


def sweep_prefix(schema: str) -> str:
    """The prefix of a request to read the outbox table at once (``dead retry`` sends it)."""
    return f"outbox_relay_sweep.{schema}"


@dataclass(frozen=True, slots=True)
class WalEvent:
    event_id: str
    event_type: str
    aggregate_type: str | None
    aggregate_id: str | None
    payload: str  # JSON text
    headers: str  # JSON object text
    created_at: datetime


def _optional_text(document: dict[str, Any], key: str) -> str | None:
    value = document.get(key)
    if value is None:
        return None
    if not isinstance(value, str | int):
        raise InvalidEventError(f"{key} must be a string")
    return str(value)


def parse_wal_event(content: bytes, prefix: str, lsn: int, committed_at: datetime) -> WalEvent:
    """Validate one message's JSON; InvalidEventError says what is wrong with it."""
    try:
        document = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEventError(f"not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise InvalidEventError("not a JSON object")
    event_type = document.get("event_type")
    if not isinstance(event_type, str):
        raise InvalidEventError("event_type is missing")
    problem = event_type_problem(event_type)
    if problem:
        raise InvalidEventError(problem)
    if "payload" not in document:
        raise InvalidEventError("payload is missing")
    headers = document.get("headers") or {}
    if not isinstance(headers, dict):
        raise InvalidEventError("headers must be a JSON object")
    raw_id = document.get("event_id")
    try:
        event_id = (
            str(uuid.UUID(str(raw_id)))
            if raw_id is not None
            else str(uuid.uuid5(_EVENT_ID_NAMESPACE, f"{prefix}/{lsn:X}"))
        )
    except ValueError as exc:
        raise InvalidEventError(f"event_id {raw_id!r} is not a UUID") from exc
    return WalEvent(
        event_id=event_id,
        event_type=event_type,
        aggregate_type=_optional_text(document, "aggregate_type"),
        aggregate_id=_optional_text(document, "aggregate_id"),
        payload=json.dumps(document["payload"]),
        headers=json.dumps(headers),
        created_at=committed_at,
    )
