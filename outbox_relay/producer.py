"""Write events into the outbox inside the caller's own transaction.

Works with a psycopg 3 connection (sync or async) and a SQLAlchemy ``Session`` or ``Connection``.
Nothing here commits: the event becomes visible to the relay when the caller's transaction does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import psycopg

from outbox_relay.db.queries import Queries
from outbox_relay.errors import InvalidEventError
from outbox_relay.messages import event_type_problem
from outbox_relay.observability.tracing import emit_context

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.orm import Session as SASession


def build_row(
    event_type: str,
    *,
    payload: Any,
    aggregate_id: str | int | None,
    aggregate_type: str | None,
    headers: Mapping[str, Any] | None,
    event_id: uuid.UUID | None,
) -> dict[str, Any]:
    """Validate an event and return the parameters of its INSERT."""
    problem = event_type_problem(event_type)
    if problem:
        raise InvalidEventError(problem)
    try:
        payload_json = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        headers_json = json.dumps(dict(headers or {}), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidEventError(f"event {event_type!r} is not JSON-serializable: {exc}") from exc
    return {
        "event_id": event_id or uuid.uuid4(),
        "event_type": event_type,
        "aggregate_type": aggregate_type,
        "aggregate_id": None if aggregate_id is None else str(aggregate_id),
        "payload": payload_json,
        "headers": headers_json,
    }


def emit(
    conn: psycopg.Connection[Any] | SASession | SAConnection,
    event_type: str,
    *,
    payload: Any,
    aggregate_id: str | int | None = None,
    aggregate_type: str | None = None,
    headers: Mapping[str, Any] | None = None,
    event_id: uuid.UUID | None = None,
    schema: str = "public",
) -> uuid.UUID:
    """Write one event in ``conn``'s current transaction and return its event id.

    ``payload`` is any JSON-serializable value; ``aggregate_id`` is the ordering key: events of one
    aggregate reach the broker in the order their transactions commit.
    """
    event_id = event_id or uuid.uuid4()
    # The current trace context travels in the row's headers (and an "outbox emit" span is
    # recorded when tracing is set up), so the relay's publish span continues this trace.
    with emit_context(event_type, str(event_id), headers) as traced_headers:
        row = build_row(
            event_type,
            payload=payload,
            aggregate_id=aggregate_id,
            aggregate_type=aggregate_type,
            headers=traced_headers,
            event_id=event_id,
        )
        if isinstance(conn, psycopg.Connection):
            conn.execute(Queries(schema)["emit_event"], row)
        else:
            from sqlalchemy import text

            conn.execute(text(Queries(schema).sqlalchemy("emit_event")), row)
    return event_id


async def emit_async(
    conn: psycopg.AsyncConnection[Any],
    event_type: str,
    *,
    payload: Any,
    aggregate_id: str | int | None = None,
    aggregate_type: str | None = None,
    headers: Mapping[str, Any] | None = None,
    event_id: uuid.UUID | None = None,
    schema: str = "public",
) -> uuid.UUID:
    """:func:`emit` for a psycopg ``AsyncConnection``."""
    event_id = event_id or uuid.uuid4()
    with emit_context(event_type, str(event_id), headers) as traced_headers:
        row = build_row(
            event_type,
            payload=payload,
            aggregate_id=aggregate_id,
            aggregate_type=aggregate_type,
            headers=traced_headers,
            event_id=event_id,
        )
        await conn.execute(Queries(schema)["emit_event"], row)
    return event_id
