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

from outbox_relay.db.pool import Coordinator
from outbox_relay.db.queries import Queries
from outbox_relay.errors import ConfigError, DatabaseUnavailableError
from outbox_relay.relay.settings import RelaySettings

log = logging.getLogger(__name__)

# Seconds between heartbeats: a join, a leave or a death is acted on within about this long.
HEARTBEAT_EVERY = 0.5
# With many outboxes on one database (schema per tenant), their relays share one connection
# for heartbeats (db/pool.py, Coordinator), all beating in one round trip per round: rounds
# come this many seconds further apart per relay sharing it, at most SLOWEST_HEARTBEAT apart
# (200 tenants: every 3 s, two chances before STOP_AT).
HEARTBEAT_SHARE = 0.015
SLOWEST_HEARTBEAT = 3.0


def heartbeat_every(relays: int) -> float:
    """Seconds between rounds of heartbeats for ``relays`` sharing the coordinator."""
    return min(SLOWEST_HEARTBEAT, max(HEARTBEAT_EVERY, relays * HEARTBEAT_SHARE))


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
        coordinator: Coordinator,
        *,
        scope: str = "partition",
        on_change: Callable[[int, int, int], None] | None = None,
    ) -> None:
        self._settings = settings
        self._scope = scope
        self._queries = Queries(settings.schema_name)
        self.relay = settings.relay_name_or_default
        self._on_change = on_change
        # Shared by the relays of every outbox of the database (db/pool.py); this relay is a
        # member while it beats on it.
        self._coordinator = coordinator
        self._joined = False
        self.beat_statement = ""  # member_beat bound to this relay (join())
        self._watchdog: asyncio.TimerHandle | None = None  # stops publishing at the deadline
        self._adjusting: asyncio.Task[None] | None = None  # a hand-over or take-over at work
        self._failing = False  # the last round failed (logged once per streak)
        self.count = 0  # partitions (or CDC shards) in the outbox
        self.owned: frozenset[int] = frozenset()
        self.members = 0
        self._renewed_at = 0.0
        self._error: LeaseLostError | None = None
        # Set when this relay must stop publishing at once (see check()); the loop waits on it
        # beside its work, so even a claim hanging on a dead link is abandoned in time.
        self.lost = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------

    async def join(self, lanes: list[int]) -> None:
        """Become a member and take a first share (or none, until the others hand some over).
        ``lanes`` are the backend pids of the relay's claiming connections."""
        await self._coordinator.open()
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
        self.beat_statement = await self._coordinator.mogrify(
            self._queries["member_beat"],
            {"relay": self.relay, "scope": self._scope, "ttl": LEASE_SECONDS},
        )
        self.owned = frozenset()
        self._error = None
        self.lost.clear()
        self._renewed()
        self.beaten(await self._coordinator.beat(self.beat_statement, 0))
        if self._adjusting is not None:
            await self._adjusting
        if self._error is not None:
            raise self._error
        self._joined = True
        self._coordinator.enroll(self, heartbeat_every)
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
        self._coordinator.withdraw(self)
        if self._joined and self._coordinator.connected:
            with contextlib.suppress(psycopg.Error, DatabaseUnavailableError, TimeoutError):
                await asyncio.wait_for(self._fetch("leave", {"relay": self.relay}), timeout=5)
        await self.close()

    async def close(self) -> None:
        self._coordinator.withdraw(self)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        adjusting, self._adjusting = self._adjusting, None
        if adjusting is not None:
            adjusting.cancel()
            await asyncio.gather(adjusting, return_exceptions=True)
        if self._joined and self._error is not None:
            # Lost: the shared connection may hang on a dead link; the next join opens a new one.
            self._coordinator.reset()
        self._joined = False
        self.owned = frozenset()

    def check(self) -> None:
        """Raise unless this relay may go on publishing its partitions."""
        if self._error is not None:
            raise self._error
        stale = time.monotonic() - self._renewed_at
        if self._joined and stale > LEASE_SECONDS * STOP_AT:
            raise LeaseLostError(
                f"could not renew the outbox leases for {stale:.1f}s (PostgreSQL did not "
                "answer): stopping before another relay may take them over"
            )

    # -- the heartbeat ---------------------------------------------------------------------
    # The coordinator runs every member's beat_statement in one round trip per round and hands
    # each relay its row (beaten) or the round's error (beat_failed); a watchdog stops this
    # relay at its deadline when no round comes back in time (a link that hangs).

    def beaten(self, row: tuple[Any, ...] | None) -> None:
        if self._error is not None:
            return
        assert row is not None
        member, renewed, members, dead_waiting = row
        if not member:
            self._lose(LeaseLostError(f"relay {self.relay!r} was removed from the members as dead"))
            return
        self._renewed()
        self._failing = False
        self.members = len(members)
        if self._adjusting is not None and not self._adjusting.done():
            return  # the previous beat's hand-over or take-over is still at work
        owned = {int(p) for p in renewed}
        if dead_waiting or len(owned) != fair_share(self.count, list(members), self.relay):
            self._adjusting = asyncio.ensure_future(
                self._adjust(owned, list(members), dead_waiting)
            )
        else:
            self._hold(owned)

    def beat_failed(self, error: BaseException) -> None:
        if self._error is not None:
            return
        if isinstance(error, DatabaseUnavailableError):
            # Retried at the next round while the leases last; the watchdog stops it in time.
            if not self._failing:
                log.warning("lease heartbeat failed: %s", error)
            self._failing = True
            return
        self._lose(LeaseLostError(f"could not renew the outbox leases: {error}"))

    def _renewed(self) -> None:
        self._renewed_at = time.monotonic()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = asyncio.get_running_loop().call_later(
            LEASE_SECONDS * STOP_AT, self._expired
        )

    def _expired(self) -> None:
        self._lose(
            LeaseLostError(
                f"could not renew the outbox leases for "
                f"{time.monotonic() - self._renewed_at:.1f}s (PostgreSQL did not answer): "
                "stopping before another relay may take them over"
            )
        )

    def _lose(self, error: LeaseLostError) -> None:
        if self._error is not None:
            return
        log.warning("%s", error)
        self._error = error
        self.lost.set()

    async def _adjust(self, owned: set[int], members: list[str], dead_waiting: bool) -> None:
        """Remove dead members, then hand the excess over or take the share's missing part."""
        relay, ttl, scope = self.relay, LEASE_SECONDS, self._scope
        before = self.owned
        try:
            if dead_waiting:
                for dead, ended in await self._fetch("remove_dead_members", {"ttl": ttl}):
                    log.warning(
                        "removed a relay that stopped answering; its partitions will be taken over",
                        extra={"gone": dead, "connections_ended": ended},
                    )
                members = [row[0] for row in await self._fetch("live_members", {"ttl": ttl})]
                self.members = len(members)
            share = fair_share(self.count, members, relay)
            if len(owned) > share:
                # Hand the excess over: stop claiming it first, then wait for its batches to
                # settle.
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
        except LeaseLostError as exc:
            self._lose(exc)
            return
        except DatabaseUnavailableError as exc:
            log.warning("lease heartbeat failed: %s", exc)  # the next beat tries again
            return
        self._hold(owned, before)

    def _hold(self, owned: set[int], before: frozenset[int] | None = None) -> None:
        """Claim from ``owned`` from now on; tell on_change what changed since ``before`` (what
        was held when the change began: a hand-over stops claiming the excess first)."""
        before = self.owned if before is None else before
        self.owned = frozenset(owned)
        gained, lost = len(self.owned - before), len(before - self.owned)
        if (gained or lost) and self._on_change is not None:
            self._on_change(len(self.owned), gained, lost)
        if gained or lost:
            log.info(
                "holding %d of %d %ss",
                len(self.owned),
                self.count,
                "partition" if self._scope == "partition" else "CDC shard",
                extra={
                    "relay": self.relay,
                    "relays": self.members,
                    "gained": gained,
                    "lost": lost,
                },
            )

    async def _fetch(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return await self._coordinator.fetch(self._queries[name], params)


def fair_share(partitions: int, members: list[str], relay: str) -> int:
    """This relay's number of partitions: P / N, the first P % N relays (by name) one more."""
    if relay not in members:
        members = sorted([*members, relay])
    count = len(members)
    index = members.index(relay)
    return partitions // count + (1 if index < partitions % count else 0)
