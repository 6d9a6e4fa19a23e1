"""The outbox as ``outbox-relay replay`` sees it: kept rows of a selection read again in id order,
and each named replay's progress in ``outbox_replays`` (queries in ``sql/replays.sql``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from outbox_relay.db import migrations
from outbox_relay.db.connect import connect_async, describe, translate_errors_async
from outbox_relay.db.queries import Queries
from outbox_relay.db.rows import message_from_row
from outbox_relay.errors import SchemaError
from outbox_relay.messages import OutboxMessage


@dataclass(frozen=True, slots=True)
class Selection:
    """Which rows a replay sends, as the queries take it (times resolved, patterns as regexes)."""

    since: datetime | None = None
    until: datetime | None = None
    patterns: tuple[str, ...] = ()  # messages.topic_regex of each --event-type
    aggregate_types: tuple[str, ...] = ()
    aggregate_ids: tuple[str, ...] = ()

    def parameters(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "until": self.until,
            "patterns": list(self.patterns),
            "aggregate_types": list(self.aggregate_types),
            "aggregate_ids": list(self.aggregate_ids),
        }


@dataclass(frozen=True, slots=True)
class TypeCount:
    event_type: str
    kept: int
    dead: int


@dataclass(frozen=True, slots=True)
class ReplayRecord:
    """One row of ``outbox_replays``."""

    name: str
    selection: dict[str, Any]
    destination: str
    upper_id: int
    position: int
    replayed: int
    dead_skipped: int
    state: str
    last_error: str | None
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "selection": self.selection,
            "destination": self.destination,
            "upper_id": self.upper_id,
            "position": self.position,
            "replayed": self.replayed,
            "dead_skipped": self.dead_skipped,
            "state": self.state,
            "last_error": self.last_error,
            "started_at": self.started_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


def list_replays(
    conn: psycopg.Connection[Any], schema: str, limit: int = 100
) -> list[ReplayRecord]:
    """The most recently started replays first."""
    migrations.check_schema(conn, schema)
    rows = conn.execute(Queries(schema)["replay_list"], {"limit": limit}).fetchall()
    return [ReplayRecord(*row) for row in rows]


class ReplayStore:
    """One autocommit connection: reads pages of the selection, records progress."""

    def __init__(self, database_url: str, schema: str) -> None:
        self._url = database_url
        self._where = describe(database_url)
        self._queries = Queries(schema)
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def connect(self) -> None:
        self._conn = await connect_async(
            self._url,
            application_name=f"outbox-relay replay:{self._queries.schema}",
            autocommit=True,
        )
        state: migrations.SchemaState | None = None
        relation = f"{self._queries.schema}.outbox_schema_version"
        if value(await self._fetch("relation_exists", {"relation": relation})):
            state = migrations.state_from_row(first(await self._fetch("schema_version")))
        problem = migrations.version_problem(self._queries.schema, state)
        if problem:
            await self.close()
            raise SchemaError(problem)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            await conn.close()

    async def _fetch(
        self, name: str, params: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        if self._conn is None:
            raise RuntimeError("ReplayStore used before connect()")
        async with translate_errors_async(self._where), self._conn.cursor() as cur:
            await cur.execute(self._queries[name], params)
            return await cur.fetchall() if cur.description else []

    async def lock(self, name: str) -> bool:
        """Hold the replay's lock for this session; False when another process holds it."""
        return bool(value(await self._fetch("replay_lock", {"name": name})))

    async def kept_range(self) -> tuple[datetime | None, datetime | None]:
        """When the oldest and the newest kept event were sent (None, None: nothing is kept)."""
        row = first(await self._fetch("replay_kept_range"))
        return (row[0], row[1]) if row else (None, None)

    async def upper_id(self) -> int:
        return int(value(await self._fetch("replay_upper_id")) or 0)

    async def count(self, selection: Selection, after: int, upper_id: int) -> list[TypeCount]:
        rows = await self._fetch(
            "replay_count", {"after": after, "upper_id": upper_id, **selection.parameters()}
        )
        return [TypeCount(t, int(kept), int(dead)) for t, kept, dead in rows]

    async def page(
        self, selection: Selection, after: int, upper_id: int, limit: int, *, include_dead: bool
    ) -> list[tuple[OutboxMessage, bool]]:
        """The next ``limit`` rows after ``after``, in id order: (message, dead)."""
        rows = await self._fetch(
            "replay_page",
            {
                "after": after,
                "upper_id": upper_id,
                "limit": limit,
                "include_dead": include_dead,
                **selection.parameters(),
            },
        )
        return [(message_from_row(row[:-1]), bool(row[-1])) for row in rows]

    async def get(self, name: str) -> ReplayRecord | None:
        row = first(await self._fetch("replay_get", {"name": name}))
        return ReplayRecord(*row) if row else None

    async def start(
        self, name: str, selection: dict[str, Any], destination: str, upper_id: int
    ) -> None:
        await self._fetch(
            "replay_start",
            {
                "name": name,
                "selection": Jsonb(selection),
                "destination": destination,
                "upper_id": upper_id,
            },
        )

    async def resume(self, name: str) -> None:
        await self._fetch("replay_resume", {"name": name})

    async def checkpoint(self, name: str, position: int, replayed: int, dead_skipped: int) -> None:
        await self._fetch(
            "replay_checkpoint",
            {
                "name": name,
                "position": position,
                "replayed": replayed,
                "dead_skipped": dead_skipped,
            },
        )

    async def finish(
        self,
        name: str,
        *,
        position: int,
        replayed: int,
        dead_skipped: int,
        state: str,
        last_error: str | None = None,
    ) -> None:
        await self._fetch(
            "replay_finish",
            {
                "name": name,
                "position": position,
                "replayed": replayed,
                "dead_skipped": dead_skipped,
                "state": state,
                "last_error": last_error,
            },
        )


def first(rows: list[tuple[Any, ...]]) -> tuple[Any, ...] | None:
    return rows[0] if rows else None


def value(rows: list[tuple[Any, ...]]) -> Any:
    return rows[0][0] if rows else None


def counts_total(counts: Sequence[TypeCount]) -> tuple[int, int]:
    """(kept, dead) over every event type."""
    return sum(c.kept for c in counts), sum(c.dead for c in counts)
