"""Several active relays on one outbox: membership, partition leases, rebalancing, fencing.

The outbox is split into P partitions by aggregate (a row's partition is its ordering bucket,
``hashtext(aggregate_id) & 1023`` — or the event id's hash for rows without an aggregate —
modulo P; P is the number of lease rows, 64 by default, set by ``migrate --partitions``). Every
relay on the outbox is a *member*; each holds leases on about P / N partitions and claims only
their rows. An aggregate's partition has one owner at a time, so per-aggregate order holds.

Why a lease table rather than advisory locks alone: any role may take any advisory lock, so an
application could hold a relay's and stall the outbox (the app role has no rights on these
tables); and a lease row is what the relay's own claims lock, which makes the fencing exact:

* every claim locks the lease rows of its partitions FOR KEY SHARE (claim.sql) until its batch
  settles, and reads them only while ``relay`` is this one and the lease has not expired;
* a lease changes hands only through SELECT ... FOR UPDATE (``take_leases``, ``release_leases``),
  which waits for those locks: the previous owner's batches in flight have settled before the
  next owner's first claim. Renewal (``expires_at``) does not conflict with them.

Membership is a heartbeat row plus the backend that wrote it: a relay killed outright is gone
the moment PostgreSQL sees its connection close (its backend leaves pg_stat_activity; server
keepalives bound that for a dead host); one whose heartbeat is stale longer than the lease time
(cut off from PostgreSQL, paused) is removed and its connections ended, releasing its locks.
A relay that cannot renew its leases within the lease time stops publishing on its own
(:meth:`Leases.check`), before anyone may take them over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg

from outbox_relay.db.connect import connect_async, translate_errors_async
from outbox_relay.db.queries import Queries
from outbox_relay.errors import ConfigError, DatabaseUnavailableError
from outbox_relay.redact import redact_url
from outbox_relay.relay.settings import RelaySettings

log = logging.getLogger(__name__)

# Seconds between heartbeats: a join, a leave or a death is acted on within about this long.
HEARTBEAT_EVERY = 0.5
# A lease lasts this long past its last renewal; a relay whose heartbeat is older is dead.
LEASE_SECONDS = 10.0
# A relay stops publishing when its last renewal is older than this share of the lease time,
# well before anyone else may take its partitions.
STOP_AT = 0.7


class LeaseLostError(DatabaseUnavailableError):
    """This relay could not renew its leases in time, or was removed as dead: it stops
    publishing, reconnects and joins again."""


class Leases:
    """This relay's membership and leases, kept by a heartbeat task on a connection of its own.

    ``owned`` is what the relay may claim from; ``on_change`` is told (owned, gained, lost)
    after every heartbeat that changed it.
    """

    def __init__(
        self,
        settings: RelaySettings,
        *,
        scope: str = "partition",
        on_change: Callable[[int, int, int], None] | None = None,
    ) -> None:
        self._settings = settings
        self._scope = scope
        self._queries = Queries(settings.schema_name)
        self.relay = settings.relay_name_or_default
        self._on_change = on_change
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._abandoned: asyncio.Future[None] | None = None
        self.count = 0  # partitions (or CDC shards) in the outbox
        self.owned: frozenset[int] = frozenset()
        self.members = 0
        self._renewed_at = 0.0
        self._error: LeaseLostError | None = None
        # Set when this relay must stop publishing at once (see check()); the loop waits on it
        # beside its work, so even a claim hanging on a dead link is abandoned in time.
        self.lost = asyncio.Event()
        self._where = redact_url(settings.database_url)

    # -- lifecycle -------------------------------------------------------------------------

    async def join(self, lanes: list[int]) -> None:
        """Become a member and take a first share (or none, until the others hand some over).
        ``lanes`` are the backend pids of the relay's claiming connections."""
        conn = await connect_async(
            self._settings.database_url,
            autocommit=True,
            application_name=f"outbox-relay:{self._settings.schema_name}:leases",
        )
        self._conn = conn
        rows = await self._fetch("lease_count", {"scope": self._scope})
        self.count = int(rows[0][0])
        if self.count == 0 and self._scope == "cdc-shard":
            # CDC without `migrate --cdc --cdc-shards`: one shard, as before shards existed
            # (the relay creates its slot and publication on first start too).
            await self._fetch("set_lease_count", {"scope": self._scope, "count": 1})
            self.count = 1
        if self.count == 0:
            raise ConfigError(
                f"schema {self._settings.schema_name!r} has no {self._scope} leases: run "
                "`outbox-relay migrate`" + (" --cdc" if self._scope == "cdc-shard" else "")
            )
        busy = await self._fetch(
            "member_alive_elsewhere", {"relay": self.relay, "ttl": LEASE_SECONDS}
        )
        if busy[0][0]:
            raise ConfigError(
                f"--relay-name: another running relay is named {self.relay!r} on schema "
                f"{self._settings.schema_name!r}; give each relay its own name"
            )
        await self._fetch("member_join", {"relay": self.relay, "lanes": lanes})
        self.owned = frozenset()
        self._renewed_at = time.monotonic()
        await self._beat()
        self._error = None
        self.lost.clear()
        self._task = asyncio.ensure_future(self._heartbeats())
        log.info(
            "joined the relays of this outbox",
            extra={
                "relay": self.relay,
                "relays": self.members,
                "owned": len(self.owned),
                "partitions": self.count,
            },
        )

    async def leave(self) -> None:
        """Hand every lease over and end the membership (when stopping, after the batches in
        flight have settled). Best effort: a dead connection ends all of it anyway."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            with contextlib.suppress(psycopg.Error, DatabaseUnavailableError, TimeoutError):
                await asyncio.wait_for(self._fetch("leave", {"relay": self.relay}), timeout=5)
        await self.close()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error, TimeoutError):
                await asyncio.wait_for(conn.close(), timeout=2)
        self.owned = frozenset()

    def check(self) -> None:
        """Raise unless this relay may go on publishing its partitions."""
        if self._error is not None:
            raise self._error
        stale = time.monotonic() - self._renewed_at
        if self._task is not None and stale > LEASE_SECONDS * STOP_AT:
            raise LeaseLostError(
                f"could not renew the outbox leases for {stale:.1f}s (PostgreSQL did not "
                "answer): stopping before another relay may take them over"
            )

    # -- the heartbeat ---------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY)
            left = LEASE_SECONDS * STOP_AT - (time.monotonic() - self._renewed_at)
            beat = asyncio.ensure_future(self._beat())
            # Not wait_for: cancelling a query makes psycopg send a cancel request and wait
            # for the query to end, both over a link that may be dead (10 s more). The lease
            # is lost at its deadline; the cancelled beat ends on its own.
            await asyncio.wait({beat}, timeout=max(left, HEARTBEAT_EVERY))
            try:
                if not beat.done():
                    beat.cancel()
                    self._abandoned = beat  # referenced until it ends; its outcome is moot
                    beat.add_done_callback(lambda done: done.cancelled() or done.exception())
                    raise TimeoutError
                beat.result()
            except TimeoutError:
                self._lose(
                    LeaseLostError(
                        f"could not renew the outbox leases for "
                        f"{time.monotonic() - self._renewed_at:.1f}s (PostgreSQL did not "
                        "answer): stopping before another relay may take them over"
                    )
                )
                return
            except LeaseLostError as exc:
                self._lose(exc)
                return
            except DatabaseUnavailableError as exc:
                # Retried at the next beat while the leases last; check() stops it in time.
                log.warning("lease heartbeat failed: %s", exc)
                if time.monotonic() - self._renewed_at > LEASE_SECONDS * STOP_AT:
                    self._lose(LeaseLostError(f"could not renew the outbox leases: {exc}"))
                    return

    def _lose(self, error: LeaseLostError) -> None:
        log.warning("%s", error)
        self._error = error
        self.lost.set()

    async def _beat(self) -> None:
        relay, ttl, scope = self.relay, LEASE_SECONDS, self._scope
        if not await self._fetch("member_heartbeat", {"relay": relay}):
            raise LeaseLostError(f"relay {relay!r} was removed from the members as dead")
        for dead, ended in await self._fetch("remove_dead_members", {"ttl": ttl}):
            log.warning(
                "removed a relay that stopped answering; its partitions will be taken over",
                extra={"gone": dead, "connections_ended": ended},
            )
        members = [row[0] for row in await self._fetch("live_members", {"ttl": ttl})]
        self.members = len(members)
        share = fair_share(self.count, members, relay)
        owned = {
            int(p)
            for p, _epoch in await self._fetch(
                "renew_leases", {"scope": scope, "relay": relay, "ttl": ttl}
            )
        }
        self._renewed_at = time.monotonic()
        before = self.owned
        if len(owned) > share:
            # Hand the excess over: stop claiming it first, then wait for its batches to settle.
            excess = sorted(owned)[share:]
            self.owned = frozenset(owned - set(excess))
            released = await self._fetch(
                "release_leases", {"scope": scope, "relay": relay, "partitions": excess}
            )
            owned -= {int(row[0]) for row in released}
        elif len(owned) < share:
            taken = await self._fetch(
                "take_leases",
                {"scope": scope, "relay": relay, "ttl": ttl, "wanted": share - len(owned)},
            )
            owned |= {int(row[0]) for row in taken}
        self.owned = frozenset(owned)
        gained, lost = len(self.owned - before), len(before - self.owned)
        if (gained or lost) and self._on_change is not None:
            self._on_change(len(self.owned), gained, lost)
        if gained or lost:
            log.info(
                "holding %d of %d %ss",
                len(self.owned),
                self.count,
                "partition" if scope == "partition" else "CDC shard",
                extra={"relay": relay, "relays": self.members, "gained": gained, "lost": lost},
            )

    async def _fetch(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        conn = self._conn
        if conn is None or conn.closed:
            raise DatabaseUnavailableError("the lease connection is closed")
        async with translate_errors_async(self._where), conn.cursor() as cur:
            await cur.execute(self._queries[name], params)
            return await cur.fetchall() if cur.description else []


def fair_share(partitions: int, members: list[str], relay: str) -> int:
    """This relay's number of partitions: P / N, the first P % N relays (by name) one more."""
    if relay not in members:
        members = sorted([*members, relay])
    count = len(members)
    index = members.index(relay)
    return partitions // count + (1 if index < partitions % count else 0)
