"""Which schemas of a database hold an outbox this relay can serve (``schemas = "GLOB"``)."""

from __future__ import annotations

import fnmatch
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import psycopg

from outbox_relay.db import migrations
from outbox_relay.db.queries import SCHEMA_NAME, schemaless_query


def usable(schema: str) -> bool:
    """Whether the relay can serve ``schema`` by name: plain lowercase identifiers only (it never
    quotes a schema name), and not PostgreSQL's own."""
    return bool(SCHEMA_NAME.fullmatch(schema)) and not schema.startswith("pg_")


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
        if not fnmatch.fnmatchcase(schema, pattern) or not usable(schema):
            continue
        if schema in known:
            found.append(schema)
            continue
        state = migrations.schema_state(conn, schema)
        if not ready or migrations.version_problem(schema, state) is None:
            found.append(schema)
    return found


@dataclass(frozen=True, slots=True)
class GlobMatch:
    """The schemas a glob matches, sorted into what ``migrate --schemas`` does with them."""

    # Hold an outbox (at any version): migrated (upgraded).
    outboxes: list[str]
    # Usable names holding no outbox: skipped (a tenant's outbox is made with migrate --schema).
    without_outbox: list[str]
    # Names the relay cannot serve (not plain lowercase identifiers): skipped.
    unusable: list[str]


def match_schemas(conn: psycopg.Connection[Any], pattern: str) -> GlobMatch:
    """Every schema (but PostgreSQL's own) that the glob ``pattern`` matches, by the same rules
    as :func:`outbox_schemas`."""
    outboxes = outbox_schemas(conn, pattern, ready=False)
    without: list[str] = []
    unusable: list[str] = []
    for (schema,) in conn.execute(schemaless_query("user_schemas")).fetchall():
        if not fnmatch.fnmatchcase(schema, pattern) or schema in outboxes:
            continue
        (without if usable(schema) else unusable).append(schema)
    return GlobMatch(outboxes, without, unusable)
