"""The outbox as the relay sees it: the named queries, run in transactions on connections of
the database's shared pool (db/pool.py).

Claiming and settling a batch happen in one transaction, so a relay killed at any moment leaves
its claimed rows pending and they are simply published again. A store holds a pooled connection
only while its transaction is open: it takes one at the transaction's first statement and gives
it back at commit or rollback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from outbox_relay.cdc.wal_events import WalEvent
from outbox_relay.db import migrations
from outbox_relay.db.archive import SentArchive
from outbox_relay.db.connect import translate_errors_async
from outbox_relay.db.pool import ConnectionPool
from outbox_relay.db.queries import Queries
from outbox_relay.db.rows import message_from_row
from outbox_relay.errors import DatabaseUnavailableError, SchemaError
from outbox_relay.messages import Failure, OutboxMessage
from outbox_relay.redact import redact_url
from outbox_relay.relay.settings import OnSent, RelaySettings

log = logging.getLogger(__name__)

# last_error is for people: a broker's reason can quote the message (a 300 kB header) or hold a
# NUL, which a text column refuses; either would fail the settle and so the whole batch.
MAX_REASON = 2000

# Ordering buckets: the insert trigger's hashtext(aggregate_id) & 1023 (queries.sql, claim).
BUCKETS = 1024

# Seconds to wait for a transaction the WAL says committed to become visible; a commit is
# normally visible within microseconds of being sent, so this bound is never reached in practice.
VISIBLE_TIMEOUT = 10.0

# Seconds to end a transaction or a connection before dropping it (a link that hangs).
CLOSE_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Share:
    """What this relay may claim: its leases on ``partitions`` of ``count`` in ``scope``
    (relay/leases.py)."""

    relay: str
    partitions: tuple[int, ...]
    count: int
    scope: str = "partition"

    def parameters(self) -> dict[str, Any]:
        return {
            "relay": self.relay,
            "partitions": list(self.partitions),
            "buckets": self.buckets,
            "count": self.count,
            "scope": self.scope,
        }

    @property
    def buckets(self) -> str:
        """The ordering buckets of the partitions (a bucket's partition: bucket mod count), as
        an array literal (``id_array``): every claim sends them, up to 1,024 of them."""
        return _buckets(self.partitions, self.count)


def id_array(ids: Iterable[int]) -> str:
    """Row ids as a PostgreSQL array literal, for ``%(ids)s::bigint[]``. psycopg adapts a list
    element by element in Python (about 0.5 µs each, six times this): every claim passes over
    the few thousand ids in flight, and every settle names its rows, about 1-2 µs per event."""
    return "{" + ",".join(map(str, ids)) + "}"


@functools.lru_cache(maxsize=256)
def _buckets(partitions: tuple[int, ...], count: int) -> str:
    # Built once per share (an idle relay claims with the same one for hours).
    owned = set(partitions)
    return id_array(b for b in range(BUCKETS) if count and b % count in owned)


class OutboxStore:
    def __init__(
        self,
        settings: RelaySettings,
        pool: ConnectionPool,
        role: str = "",
        archive: SentArchive | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        # --on-sent keep: where sent rows go (db/archive.py); shared by the relay's lanes.
        self._archive = archive
        if settings.on_sent is OnSent.KEEP and archive is None:
            raise ValueError("--on-sent keep needs the outbox's SentArchive")
        self._queries = Queries(settings.schema_name)
        self._application_name = self._queries.application_name + (f":{role}" if role else "")
        self._where = redact_url(settings.database_url)
        self._relay = settings.relay_name_or_default
        self._conn: psycopg.AsyncConnection[Any] | None = None  # while a transaction is open

    @property
    def queries(self) -> Queries:
        return self._queries

    @property
    def application_name(self) -> str:
        """This store's name in logs and tests (``outbox-relay:<schema>[:<role>]``)."""
        return self._application_name

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        """The transaction's connection, taken from the pool at its first statement."""
        if self._conn is None:
            self._conn = await self._pool.acquire()
        return self._conn

    def _give_back(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn)

    async def check_schema(self) -> None:
        """The outbox is migrated to the version this relay needs (else SchemaError)."""
        async with translate_errors_async(self._where):
            conn = await self._connection()
            try:
                async with conn.cursor() as cur:
                    await cur.execute(
                        self._queries["relation_exists"],
                        {"relation": f"{self._settings.schema_name}.outbox_schema_version"},
                    )
                    exists = await cur.fetchone()
                    state: migrations.SchemaState | None = None
                    if exists and exists[0]:
                        await cur.execute(self._queries["schema_version"])
                        state = migrations.state_from_row(await cur.fetchone())
                await conn.commit()
            finally:
                await self.rollback()
        problem = migrations.version_problem(self._settings.schema_name, state)
        if problem:
            raise SchemaError(problem)
        log.info("connected to PostgreSQL", extra={"url": self._where})

    async def _fetch(
        self, name: str, params: dict[str, Any] | None = None, *, prepare: bool | None = None
    ) -> list[tuple[Any, ...]]:
        async with translate_errors_async(self._where):
            conn = await self._connection()
            async with conn.cursor() as cur:
                await cur.execute(self._queries[name], params, prepare=prepare)
                return await cur.fetchall() if cur.description else []

    async def commit(self) -> None:
        """End the transaction; its connection goes back to the pool."""
        conn = self._conn
        if conn is None:
            return
        async with translate_errors_async(self._where):
            await conn.commit()
        self._give_back()

    async def rollback(self) -> None:
        """Release a claimed batch; rows stay pending. On a link that hangs this gives up after
        CLOSE_TIMEOUT and the pool drops the connection: the server ends the transaction."""
        conn = self._conn
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error, TimeoutError):
                await asyncio.wait_for(conn.rollback(), timeout=CLOSE_TIMEOUT)
        self._give_back()

    async def claim(
        self, limit: int, share: Share, *, in_flight: Sequence[int] = ()
    ) -> list[OutboxMessage]:
        """Lock the next pending rows of ``share`` in order, passing over ``in_flight`` (the
        rows of the batches this relay holds on its other connections). The transaction stays
        open until settle()."""
        if not share.partitions:
            return []
        # Never prepared: a generic plan, blind to which partitions are asked for, sorts every
        # pending row instead of walking the pending index (queries.sql, claim).
        rows = await self._fetch(
            "claim",
            {"limit": limit, "in_flight": id_array(in_flight), **share.parameters()},
            prepare=False,
        )
        return [message_from_row(row) for row in rows]

    async def settle(self, sent: Sequence[int], failures: Sequence[Failure]) -> int:
        """Mark the confirmed rows sent and record failures, then commit. Returns dead-lettered."""
        try:
            return await self._settle(sent, failures)
        except psycopg.errors.CheckViolation as exc:
            if self._archive is None or exc.diag.table_name != "outbox_sent":
                raise
            # No partition for the sending time: dropped by hand, or a restored database. Not
            # the end of the relay: it reconnects, publishes the batch again (at least once)
            # and the next settle covers first.
            self._archive.forget()
            raise DatabaseUnavailableError(
                f"PostgreSQL at {self._where}: no partition of outbox_sent for the sending "
                "time (dropped?); covering partitions and settling again"
            ) from exc
        except BaseException:
            if self._archive is not None:
                self._archive.forget()
            raise

    async def _settle(self, sent: Sequence[int], failures: Sequence[Failure]) -> int:
        if not failures:
            await self._settle_all_sent(sent)
            return 0
        dead = 0
        if sent:
            await self._cover_if_needed()
            await self._fetch(self._sent_query, {"ids": id_array(sent)})
        if failures:
            rows = await self._fetch(
                "record_failures",
                {
                    "ids": [f.id for f in failures],
                    "reasons": [_storable(f.reason) for f in failures],
                    "permanent": [f.permanent for f in failures],
                    "max_attempts": self._settings.max_attempts,
                    "backoff_base": self._settings.retry_backoff,
                    "backoff_max": self._settings.retry_backoff_max,
                },
            )
            dead = sum(1 for _id, is_dead in rows if is_dead)
        if sent or dead:
            await self._fetch("count_published", {"published": len(sent), "dead": dead})
        await self.commit()
        return dead

    @property
    def _sent_query(self) -> str:
        """Sent rows leave the outbox: deleted, or moved to outbox_sent (db/archive.py)."""
        # One assignment naming both, the form tests/unit/test_queries.py reads query names in.
        query = "delete_sent" if self._settings.on_sent is OnSent.DELETE else "archive_sent"
        return query

    async def _cover_if_needed(self) -> None:
        """Keep mode: partitions for now() exist before rows are moved there. The upkeep pass
        extends them long before they run out; this covers a relay's first settle, and one
        after partitions went missing."""
        archive = self._archive
        if archive is None or not archive.needs_cover():
            return
        rows = await self._fetch("sent_cover", archive.policy.parameters())
        archive.covered(float(rows[0][0]))

    async def _settle_all_sent(self, sent: Sequence[int]) -> None:
        """The common case in one round trip: mark, count and commit sent through libpq's
        pipeline mode instead of waiting for each statement."""
        if sent:
            await self._cover_if_needed()
        async with translate_errors_async(self._where):
            conn = await self._connection()
            async with conn.pipeline():
                if sent:
                    await conn.execute(self._queries[self._sent_query], {"ids": id_array(sent)})
                    await conn.execute(
                        self._queries["count_published"], {"published": len(sent), "dead": 0}
                    )
                await conn.commit()
        self._give_back()

    async def start_listening(self, seconds: float) -> list[int]:
        """Ask producers to NOTIFY; returns the transactions that may not have seen the request."""
        await self._fetch("start_listening", {"seconds": seconds, "relay": self._relay})
        await self.commit()
        rows = await self._fetch("transactions_in_progress")
        await self.commit()
        return list(rows[0][0])

    async def all_ended(self, xids: Sequence[int]) -> bool:
        rows = await self._fetch("all_ended", {"xids": list(xids)})
        await self.commit()
        return bool(rows[0][0])

    async def stop_listening(self, *, commit: bool = True) -> None:
        await self._fetch("stop_listening", {"relay": self._relay})
        if commit:
            await self.commit()

    async def next_retry_in(self) -> float | None:
        rows = await self._fetch("next_retry_in")
        await self.commit()
        value = rows[0][0] if rows else None
        return None if value is None else max(0.0, float(value))

    async def housekeeping(self) -> None:
        """Prune old throughput buckets (kept events: relay/upkeep.py)."""
        await self._fetch("prune_stats")
        await self.commit()

    # -- CDC mode (outbox_relay/cdc.py) ----------------------------------------------------------

    async def claim_ids(self, ids: Sequence[int], share: Share) -> list[OutboxMessage]:
        """Lock the rows of ``share`` with these ids that are still pending. Open until
        settle()/commit()."""
        rows = await self._fetch("cdc_claim_ids", {"ids": id_array(ids), **share.parameters()})
        return [message_from_row(row) for row in rows]

    async def wait_visible(self, xids: Iterable[int]) -> None:
        """Until these committed transactions (the WAL's 32-bit xids) show in new snapshots,
        which takes at most a moment after the WAL tells of their commit."""
        deadline = time.monotonic() + VISIBLE_TIMEOUT
        pause = 0.001
        while not (await self._fetch("cdc_transactions_visible", {"xids": list(xids)}))[0][0]:
            if time.monotonic() >= deadline:
                log.warning("transactions read from the WAL are still not visible: going on")
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def earliest_pending(
        self, aggregates: Sequence[str], ids: Sequence[int], before: int
    ) -> dict[str, int]:
        """Per aggregate, its earliest pending id below ``before`` and not in ``ids``."""
        rows = await self._fetch(
            "cdc_earliest_pending",
            {"aggregates": list(aggregates), "ids": id_array(ids), "before": before},
        )
        return {aggregate: int(first) for aggregate, first in rows}

    async def heartbeat(self, prefix: str) -> None:
        await self._fetch("cdc_heartbeat", {"prefix": prefix})
        await self.commit()

    async def materialize(self, events: Sequence[WalEvent]) -> dict[str, int]:
        """Insert events read from the WAL as pending rows (once); event_id -> row id."""
        await self._fetch(
            "cdc_materialize",
            {
                "event_ids": [e.event_id for e in events],
                "event_types": [e.event_type for e in events],
                "aggregate_types": [e.aggregate_type for e in events],
                "aggregate_ids": [e.aggregate_id for e in events],
                "payloads": [e.payload for e in events],
                "headers": [e.headers for e in events],
                "created": [e.created_at for e in events],
            },
        )
        rows = await self._fetch("cdc_ids_of_events", {"event_ids": [e.event_id for e in events]})
        await self.commit()
        return {event_id: int(id_) for event_id, id_ in rows}


def _storable(reason: str) -> str:
    reason = reason.replace("\x00", "\\0")
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…"
