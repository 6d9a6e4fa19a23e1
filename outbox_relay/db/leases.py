"""The lease rows as the administrative commands see them (``migrate --partitions``,
``--cdc-shards``); the relays' own use of them is outbox_relay/relay/leases.py."""

from __future__ import annotations

from typing import Any

import psycopg

from outbox_relay.db.queries import Queries


def lease_count(conn: psycopg.Connection[Any], schema: str, scope: str) -> int:
    """Partitions (``scope='partition'``) or CDC shards (``'cdc-shard'``) of the outbox."""
    row = conn.execute(Queries(schema)["lease_count"], {"scope": scope}).fetchone()
    return int(row[0]) if row else 0


def set_lease_count(conn: psycopg.Connection[Any], schema: str, scope: str, count: int) -> None:
    """Make the scope's leases 0..count-1, all free: running relays give their share up and
    take a new one (changing the count is safe while they run; docs/deploy.md)."""
    if lease_count(conn, schema, scope) == count:
        return
    with conn.transaction():
        conn.execute(Queries(schema)["set_lease_count"], {"scope": scope, "count": count})
