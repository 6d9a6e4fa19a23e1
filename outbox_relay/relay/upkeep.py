"""The outbox's storage kept bounded while the relay runs (db/archive.py, docs/retention.md).

In the background of the relay's loop, never in its way:

* every VACUUM_CHECK_EVERY seconds, the outbox's dead row versions are read from the
  statistics (one statement in the coordinator's shared round); past VACUUM_DEAD_ROWS, and as
  many as the live rows, the relay vacuums the outbox on a pooled connection, when its role may;
* in keep mode, every RETENTION_EVERY seconds: partitions of ``outbox_sent`` are created ahead,
  those past --retention dropped, those whose time is over analyzed (once), and sent rows kept
  in the outbox by relays before migration 0006 moved over in batches.

A pass that fails is logged and tried again at the next turn; settling never depends on it
(a settle covers partitions itself when they run short, see OutboxStore).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay.db.archive import SentArchive
from outbox_relay.db.connect import translate_errors_async
from outbox_relay.db.pool import DatabaseHub
from outbox_relay.db.queries import Queries
from outbox_relay.errors import OutboxRelayError
from outbox_relay.redact import redact_url
from outbox_relay.relay.settings import RelaySettings

log = logging.getLogger(__name__)

VACUUM_CHECK_EVERY = 5.0
CHECKS_SHARING = 20  # outboxes sharing a database before each checks less often
# About seven seconds of events at 3,000/s: the table stays a few MiB, and each vacuum has
# little to do (a small table's pages and its indexes).
VACUUM_DEAD_ROWS = 20_000
RETENTION_EVERY = 60.0
RETRY_AFTER = 10.0  # a failed pass (a lock timeout, a server restarting)
LEGACY_BATCH = 5_000
LEGACY_BATCHES_PER_PASS = 20  # at most 100,000 legacy rows moved per pass: the pass stays short


class StorageUpkeep:
    def __init__(
        self,
        settings: RelaySettings,
        hub: DatabaseHub,
        queries: Queries,
        archive: SentArchive | None,
    ) -> None:
        self._hub = hub
        self._queries = queries
        self._archive = archive
        self._where = redact_url(settings.database_url)
        self._task: asyncio.Task[None] | None = None
        self._next_vacuum_check = 0.0
        self._next_retention = 0.0
        self._may_vacuum: bool | None = None  # learned at the first check
        self._failing = False  # the last pass failed: logged once until one succeeds
        self.vacuums = 0  # for tests and the debug log

    def poke(self) -> None:
        """At every turn of the relay's loop: start a pass in the background if one is due."""
        if self._task is not None and not self._task.done():
            return
        now = time.monotonic()
        vacuum_due = now >= self._next_vacuum_check
        retention_due = self._archive is not None and now >= self._next_retention
        if vacuum_due or retention_due:
            if vacuum_due:
                # Many outboxes on one database: each checks less often (200 tenants would ask
                # 40 times a second; a few more seconds of dead rows cost nothing).
                sharing = max(1.0, self._hub.coordinator.members / CHECKS_SHARING)
                self._next_vacuum_check = now + VACUUM_CHECK_EVERY * sharing
            if retention_due:
                self._next_retention = now + RETENTION_EVERY
            self._task = asyncio.get_running_loop().create_task(
                self._pass(vacuum=vacuum_due, retention=retention_due)
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _pass(self, *, vacuum: bool, retention: bool) -> None:
        try:
            if retention:
                await self.enforce_retention()
            if vacuum:
                await self.vacuum_if_needed()
        except (OutboxRelayError, psycopg.Error) as exc:
            if not self._failing:
                log.warning("outbox upkeep failed, trying again shortly: %s", exc)
            self._failing = True
            # Soon, not at the next scheduled pass: a lock timeout is usually momentary.
            self._next_retention = min(self._next_retention, time.monotonic() + RETRY_AFTER)
        else:
            if self._failing:
                log.info("outbox upkeep works again")
            self._failing = False

    async def vacuum_if_needed(self) -> bool:
        """Vacuum the outbox if dead rows piled up and this role may; True if it did."""
        rows = await self._hub.coordinator.fetch(self._queries["outbox_dead_rows"], {})
        dead, live, may = int(rows[0][0]), int(rows[0][1]), bool(rows[0][2])
        if may != self._may_vacuum:
            self._may_vacuum = may
            if not may:
                log.info(
                    "this role does not own the outbox table: vacuuming it is left to "
                    "autovacuum (docs/retention.md)"
                )
        # A vacuum reads the whole table: waiting for as many dead rows as live ones keeps its
        # cost per dead row bounded while a large backlog drains (the steady state is a few
        # hundred live rows, so there the fixed threshold decides).
        if not may or dead < max(VACUUM_DEAD_ROWS, live):
            return False
        started = time.perf_counter()
        await self._autocommit(self._queries["vacuum_outbox"])
        self.vacuums += 1
        log.debug(
            "vacuumed the outbox",
            extra={"dead_rows": dead, "seconds": round(time.perf_counter() - started, 3)},
        )
        return True

    async def enforce_retention(self) -> None:
        """Keep mode: partitions ahead, expired ones dropped, legacy kept rows moved."""
        archive = self._archive
        if archive is None:
            return
        policy = archive.policy.parameters()
        conn = await self._hub.lanes.acquire()
        try:
            async with translate_errors_async(self._where), conn.cursor() as cur:
                await cur.execute(self._queries["upkeep_lock_timeout"])
                await cur.execute(self._queries["sent_cover"], policy)
                until = await cur.fetchone()
                await cur.execute(self._queries["sent_policy"], policy)
                await cur.execute(self._queries["sent_drop_expired"], policy)
                dropped = await cur.fetchone()
                await conn.commit()
                await cur.execute(self._queries["sent_analyze_closed"])
                await conn.commit()
                if until is not None:
                    archive.covered(float(until[0]))
                if dropped and dropped[0]:
                    log.info("dropped %d partitions of sent events past --retention", dropped[0])
                await self._move_legacy(cur, policy)
        finally:
            with contextlib.suppress(psycopg.Error):
                await conn.rollback()
            self._hub.lanes.release(conn)

    async def _move_legacy(self, cur: psycopg.AsyncCursor[Any], policy: dict[str, float]) -> None:
        """Sent rows an earlier relay kept in the outbox go to outbox_sent, a batch per
        transaction (cheap when there are none: one index probe)."""
        await cur.execute(self._queries["legacy_kept_from"], policy)
        first = await cur.fetchone()
        if first is not None and first[0] is not None:
            await cur.execute(self._queries["legacy_cover"], {**policy, "since": first[0]})
        await cur.connection.commit()
        for _ in range(LEGACY_BATCHES_PER_PASS):
            await cur.execute(self._queries["archive_legacy"], {**policy, "limit": LEGACY_BATCH})
            row = await cur.fetchone()
            await cur.connection.commit()
            moved = int(row[0]) if row else 0
            if moved:
                log.info("moved %d sent rows kept in the outbox to outbox_sent", moved)
            if moved < LEGACY_BATCH:
                return

    async def _autocommit(self, statement: sql.SQL) -> None:
        """A statement that cannot run in a transaction (VACUUM), on a pooled connection."""
        conn = await self._hub.lanes.acquire()
        try:
            async with translate_errors_async(self._where):
                await conn.set_autocommit(True)
                try:
                    await conn.execute(statement)
                finally:
                    await conn.set_autocommit(False)
        finally:
            self._hub.lanes.release(conn)
