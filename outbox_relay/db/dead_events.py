"""Inspect and requeue events the relay gave up on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from outbox_relay.cdc.wal_events import sweep_prefix
from outbox_relay.db.queries import Queries


@dataclass(frozen=True, slots=True)
class DeadEvent:
    event_id: str
    event_type: str
    aggregate_id: str | None
    attempts: int
    last_error: str | None
    dead_at: datetime
    created_at: datetime


def list_dead(conn: psycopg.Connection[Any], schema: str, limit: int = 100) -> list[DeadEvent]:
    rows = conn.execute(Queries(schema)["dead_list"], {"limit": limit}).fetchall()
    return [DeadEvent(*row) for row in rows]


def retry_dead(
    conn: psycopg.Connection[Any], schema: str, event_ids: Sequence[str] = (), *, all_: bool = False
) -> list[str]:
    """Make dead events pending again (attempts reset); returns the event ids requeued.

    Relays in ``--mode cdc`` learn of them from a WAL message committed with them (without one
    they would wait for their periodic table sweep); where the server or the role cannot write
    one (wal_level below logical, no privilege), the sweep still finds them."""
    queries = Queries(schema)
    with conn.transaction():
        rows = conn.execute(
            queries["dead_retry"], {"all": all_, "event_ids": list(event_ids)}
        ).fetchall()
        if rows:
            try:
                with conn.transaction():
                    conn.execute(queries["sweep_request"], {"prefix": sweep_prefix(schema)})
            except psycopg.Error:
                pass  # no logical WAL here, or no privilege: the relays' periodic sweep finds them
    return [row[0] for row in rows]
