"""What an operator needs at a glance: backlog, lag, throughput, dead letters, relays."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from outbox_relay import migrations
from outbox_relay.errors import SchemaError
from outbox_relay.queries import Queries


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    schema: str
    schema_version: int
    pending: int
    oldest_pending_age_seconds: float
    retrying: int
    dead: int
    published_last_minute: int
    published_last_hour: int
    relays_connected: int
    leader_pid: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_status(conn: psycopg.Connection[Any], schema: str) -> OutboxStatus:
    version = migrations.applied_version(conn, schema)
    problem = migrations.version_problem(schema, version)
    if problem:
        raise SchemaError(problem)
    queries = Queries(schema)
    row = conn.execute(
        queries["status"],
        {"schema": schema, "application_name": queries.application_name},
    ).fetchone()
    assert row is not None
    pending, oldest, retrying, dead, last_minute, last_hour, relays, leader, version = row
    return OutboxStatus(
        schema=schema,
        schema_version=int(version),
        pending=int(pending),
        oldest_pending_age_seconds=round(float(oldest or 0.0), 3),
        retrying=int(retrying),
        dead=int(dead),
        published_last_minute=int(last_minute),
        published_last_hour=int(last_hour),
        relays_connected=int(relays),
        leader_pid=leader,
    )
