"""Which schemas of a database hold an outbox this relay can serve (``schemas = "GLOB"``)."""

from __future__ import annotations

import fnmatch
from collections.abc import Collection
from typing import Any

import psycopg

from outbox_relay.db import migrations
from outbox_relay.db.queries import SCHEMA_NAME, schemaless_query


def outbox_schemas(
    conn: psycopg.Connection[Any],
    pattern: str,
    *,
    ready: bool = True,
    known: Collection[str] = (),
) -> list[str]:
    """The schemas matching the glob ``pattern`` that hold an outbox; with ``ready``, only those
    migrated far enough for this relay (one still being migrated, or too new, is left alone
    until it is ready). Names that are not plain lowercase identifiers are skipped: the relay
    never quotes a schema name. Schemas in ``known`` (relayed already) are not checked again:
    a look at hundreds of tenants stays one query."""
    found = []
    table = migrations.OUTBOX_MIGRATIONS.version_table
    rows = conn.execute(schemaless_query("outbox_schemas"), {"version_table": table}).fetchall()
    for (schema,) in rows:
        if not fnmatch.fnmatchcase(schema, pattern) or not SCHEMA_NAME.fullmatch(schema):
            continue
        if schema.startswith("pg_"):
            continue
        if schema in known:
            found.append(schema)
            continue
        state = migrations.schema_state(conn, schema)
        if not ready or migrations.version_problem(schema, state) is None:
            found.append(schema)
    return found
