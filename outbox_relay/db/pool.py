"""The relay's PostgreSQL connections to one database, shared by every outbox relayed there.

A relay needs a connection only while a transaction is open: from a claim until its batch
settles, or for one short statement while idle. So the outboxes of one database (every schema
of a schema-per-tenant database, say) share a fixed budget of connections (``--max-db-
connections``) instead of holding three or more each:

* :class:`ConnectionPool`: the claiming connections. A store takes one when a transaction
  starts and gives it back when the transaction ends (transaction pooling); waiters are served
  first come, first served, so a backlog in one outbox cannot starve the others.
* :class:`Coordinator`: one autocommit connection for every relay's membership and lease
  heartbeats (relay/leases.py), one statement at a time.
* :class:`Listener`: one LISTEN connection for every outbox's wake-up channel.

Not psycopg_pool: it reconnects in the background and reports a failed connect only as a
timeout, while the relay must surface the reason (a wrong password is a configuration error with
its own exit code, a server down is retried by the relay's own loop) and must drop every
connection of a link found dead at once, not one by one as each is next used.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import psycopg
from psycopg import pq, sql

from outbox_relay.db.connect import connect_async, describe, translate_errors_async
from outbox_relay.db.queries import schemaless_query
from outbox_relay.errors import DatabaseUnavailableError

log = logging.getLogger(__name__)

# Seconds to end a connection before dropping it (a link that hangs).
CLOSE_TIMEOUT = 2.0
# The budget's part that is not claiming connections: the coordinator and the LISTEN connection.
OVERHEAD = 2
# Seconds between reads of the LISTEN connection when nothing arrives: subscribing a new
# channel (a relay starting) waits at most this long.
LISTEN_TICK = 0.2

Connection = psycopg.AsyncConnection[Any]


def _usable(conn: Connection) -> bool:
    return (
        not conn.closed
        and not conn.broken
        and conn.info.transaction_status is pq.TransactionStatus.IDLE
    )


async def _connect(url: str, application_name: str, *, autocommit: bool) -> Connection:
    """A connection the server probes: the relay's locks (claimed rows, membership) live as long
    as the server thinks its session does, and after a node failure nothing closes the socket."""
    async with translate_errors_async(describe(url)):
        conn = await connect_async(url, autocommit=autocommit, application_name=application_name)
        await conn.execute(schemaless_query("session_keepalives"))
        if not autocommit:
            await conn.commit()
    return conn


async def _close(conn: Connection) -> None:
    """Bounded: on a link that hangs, the connection is dropped without a goodbye."""
    if not conn.closed:
        with contextlib.suppress(psycopg.Error, TimeoutError):
            await asyncio.wait_for(conn.close(), timeout=CLOSE_TIMEOUT)


class ConnectionPool:
    """At most ``size`` claiming connections; see the module docstring."""

    def __init__(self, url: str, size: int, application_name: str) -> None:
        self.size = size
        self._url = url
        self._application_name = application_name
        self._idle: collections.deque[Connection] = collections.deque()
        self._open: dict[Connection, int] = {}  # every connection -> its generation
        self._opening = 0
        self._closing = 0
        # Waiters, first come first served; resolved with a connection, or None for "a place
        # came free: open one".
        self._waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
        # Raised by reset(): connections of an older generation are closed when given back.
        self._generation = 0
        self._wanted = 0  # connections to open ahead of use (see reserve())

    @property
    def connected(self) -> bool:
        """Some connection is open and not known to be broken."""
        return any(not c.closed and not c.broken for c in self._open)

    def pids(self) -> list[int]:
        """The server processes of the open connections (what a dead relay's fencing ends)."""
        return [c.info.backend_pid for c in self._open if not c.closed]

    def reserve(self, count: int) -> None:
        """A relay joins: open up to ``count`` more connections ahead of use (open())."""
        self._wanted = min(self.size, self._wanted + count)

    def unreserve(self, count: int) -> None:
        self._wanted = max(0, self._wanted - count)

    async def open(self) -> None:
        """Open the reserved connections not open yet (a relay's start fails fast on a server
        that is down, and the connections' pids are known to the lease table from the start)."""
        while self._in_budget() < self._wanted:
            self.release(await self._open_one())

    async def acquire(self) -> Connection:
        """A connection with no transaction open, for the caller alone until release()."""
        woken = False  # told a place came free: it may open one ahead of later waiters
        while True:
            if woken or not self._waiters:
                while self._idle:
                    conn = self._idle.popleft()
                    if _usable(conn) and self._open.get(conn) == self._generation:
                        return conn
                    self._forget(conn)
                if self._in_budget() < self.size:
                    return await self._open_one()
            waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
            if woken:
                # Woken, but the place is not free yet (a connection still closing): it keeps
                # its place at the head of the line.
                self._waiters.appendleft(waiter)
            else:
                self._waiters.append(waiter)
            try:
                given = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    handed = waiter.result()
                    if handed is not None:
                        self.release(handed)
                    else:
                        self._wake_one(None)
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                raise
            if given is not None:
                return given
            woken = True

    def release(self, conn: Connection) -> None:
        """Give a connection back (its transaction ended); a broken one, or one of a link
        found dead since it was taken, is closed and its place given to the next waiter."""
        if not _usable(conn) or self._open.get(conn) != self._generation:
            self._forget(conn)
            return
        if not self._wake_one(conn):
            self._idle.append(conn)

    def reset(self) -> None:
        """The link to this database was found dead: close every idle connection now and every
        one in use when it is given back, so that nobody waits on the dead link again."""
        self._generation += 1
        while self._idle:
            self._forget(self._idle.popleft())

    async def close(self) -> None:
        """Close every connection, those in use too (their transactions end unfinished)."""
        self._generation += 1
        conns, self._open = list(self._open), {}
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()
        self._waiters.clear()
        await asyncio.gather(*(_close(conn) for conn in conns))
        await _closed_in_background()

    def _in_budget(self) -> int:
        return len(self._open) + self._opening + self._closing

    def _wake_one(self, conn: Connection | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def _forget(self, conn: Connection) -> None:
        """Close a connection; until it is closed it still counts against the budget."""
        if self._open.pop(conn, None) is None:
            _close_soon(conn)  # of a pool closed meanwhile: out of the budget already
            return
        if conn.closed:
            self._wake_one(None)  # its place is free now
            return
        self._closing += 1

        async def close() -> None:
            try:
                await _close(conn)
            finally:
                self._closing -= 1
                self._wake_one(None)

        task = asyncio.ensure_future(close())
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _open_one(self) -> Connection:
        self._opening += 1
        try:
            conn = await _connect(self._url, self._application_name, autocommit=False)
        finally:
            self._opening -= 1
        self._open[conn] = self._generation
        return conn


# Closing tasks of dropped connections, referenced until they end.
_background: set[asyncio.Task[None]] = set()


def _close_soon(conn: Connection) -> None:
    if not conn.closed:
        task = asyncio.ensure_future(_close(conn))
        _background.add(task)
        task.add_done_callback(_background.discard)


async def _closed_in_background() -> None:
    """Until the connections dropped on the way have been closed (before the loop ends)."""
    await asyncio.gather(*_background, return_exceptions=True)


class Beating(Protocol):
    """A relay's membership, as the coordinator's rounds see it (relay/leases.py)."""

    beat_statement: str

    def beaten(self, row: tuple[Any, ...] | None) -> None: ...

    def beat_failed(self, error: BaseException) -> None: ...


class Coordinator:
    """One autocommit connection for the lease heartbeats of every relay of the database.

    A relay's membership is this connection's backend (relay/leases.py): when it is replaced,
    every relay finds itself removed and joins again, as after any lost connection.

    Heartbeats come in rounds: the beats of every relay waiting for the next round go in one
    round trip, one text of many statements (:meth:`beat`), so 200 tenants' relays cost the
    relay process a few statements' worth of work per round, not 200.
    """

    def __init__(self, url: str, application_name: str) -> None:
        self._url = url
        self._where = describe(url)
        self._application_name = application_name
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()
        # Relays beating on it, and the task running their rounds.
        self._enrolled: dict[Beating, None] = {}
        self._ticking: asyncio.Task[None] | None = None
        # Statements waiting for a round: (statement, run by then at the latest, its row).
        self._beats: list[tuple[str, float, asyncio.Future[tuple[Any, ...] | None]]] = []
        self._rounds: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.closed and not conn.broken

    async def open(self) -> None:
        async with self._lock:
            await self._open()

    async def _open(self) -> None:
        if not self.connected:
            if self._conn is not None:
                await _close(self._conn)
            self._conn = await _connect(self._url, self._application_name, autocommit=True)

    async def fetch(self, query: sql.SQL, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        async with self._lock:
            # After a reset (another relay found the link dead) the next statement reconnects;
            # this relay's membership then shows as gone and it joins again.
            await self._open()
            conn = self._conn
            assert conn is not None
            async with translate_errors_async(self._where), conn.cursor() as cur:
                await cur.execute(query, params)
                return await cur.fetchall() if cur.description else []

    @property
    def members(self) -> int:
        """Relays beating on it (each beats, and polls, less often when many share it)."""
        return len(self._enrolled)

    def enroll(self, member: Beating, every: Callable[[int], float]) -> None:
        """Beat for ``member`` in every round from now on, a round every ``every(members)``
        seconds."""
        self._enrolled[member] = None
        if self._ticking is None or self._ticking.done():
            self._ticking = asyncio.ensure_future(self._tick(every))

    def withdraw(self, member: Beating) -> None:
        self._enrolled.pop(member, None)

    async def _tick(self, every: Callable[[int], float]) -> None:
        while self._enrolled:
            await asyncio.sleep(every(len(self._enrolled)))
            members = list(self._enrolled)
            if not members:
                continue  # every relay withdrew during the sleep: the loop ends
            beats = [asyncio.ensure_future(self.beat(m.beat_statement, 0)) for m in members]
            # Not awaited under a timeout: a round that hangs on a dead link stops nobody's
            # watchdog, and ends when the link is reset.
            await asyncio.wait(beats)
            for member, beat in zip(members, beats, strict=True):
                if member not in self._enrolled:
                    continue
                error = beat.exception()
                try:
                    if error is None:
                        member.beaten(beat.result())
                    else:
                        member.beat_failed(error)
                except Exception:  # one relay's bug must not stop the others' heartbeats
                    log.exception("a lease heartbeat could not be processed")

    async def mogrify(self, query: sql.SQL, params: dict[str, Any]) -> str:
        """``query`` with ``params`` bound as literals, for :meth:`beat`."""
        async with self._lock:
            await self._open()
            assert self._conn is not None
            return psycopg.AsyncClientCursor(self._conn).mogrify(query, params)

    async def beat(self, statement: str, company: float) -> tuple[Any, ...] | None:
        """Run ``statement`` (bound by mogrify(); one row or none) in a round with the others
        waiting, after at most ``company`` seconds of waiting for them; its row."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Any, ...] | None] = loop.create_future()
        self._beats.append((statement, loop.time() + company, future))
        if self._rounds is None or self._rounds.done():
            self._rounds = asyncio.ensure_future(self._run_rounds())
        return await future

    async def _run_rounds(self) -> None:
        loop = asyncio.get_running_loop()
        while self._beats:
            due = min(due for _statement, due, _future in self._beats)
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            batch = [(stmt, fut) for stmt, _due, fut in self._beats if not fut.done()]
            self._beats = []
            if batch:
                await self._round(batch)

    async def _round(self, batch: list[tuple[str, asyncio.Future[tuple[Any, ...] | None]]]) -> None:
        try:
            rows = await self._run([statement for statement, _future in batch])
        except Exception as exc:
            if len(batch) == 1 or not self.connected:
                for _statement, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            # One statement failed (a tenant's schema dropped under its relay, say) and took
            # the round's transaction with it: each alone, so that only its relay hears of it.
            for item in batch:
                await self._round([item])
            return
        for (_statement, future), row in zip(batch, rows, strict=True):
            if not future.done():
                future.set_result(row)

    async def _run(self, statements: list[str]) -> list[tuple[Any, ...] | None]:
        async with self._lock:
            await self._open()
            conn = self._conn
            assert conn is not None
            async with translate_errors_async(self._where):
                # Statements without parameters go as one simple query: one round trip.
                cur = psycopg.AsyncClientCursor(conn)
                await cur.execute(";\n".join(statements))
                rows = []
                while True:
                    rows.append(await cur.fetchone() if cur.description else None)
                    if not cur.nextset():
                        return rows

    def reset(self) -> None:
        """The link was found dead: drop the connection (the next open() makes a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            _close_soon(conn)

    async def close(self) -> None:
        for task in (self._ticking, self._rounds):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn)


class Listener:
    """One LISTEN connection for the wake-up channels of every outbox of the database.

    A reader task waits on it and rings the subscribers of each notification's channel. When
    the connection fails, every subscriber's wait raises, so each relay reconnects (and is
    unready meanwhile) as it did with a connection of its own; open() makes a new connection
    and listens again on every channel.
    """

    def __init__(self, url: str, application_name: str) -> None:
        self._url = url
        self._application_name = application_name
        self._conn: Connection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._subscribers: dict[str, set[Subscription]] = {}
        self._listening: set[str] = set()
        self._awaiting: dict[str, list[asyncio.Future[None]]] = {}  # subscribe() until LISTEN
        self.error: DatabaseUnavailableError | None = None
        self._opening = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._reader is not None and not self._reader.done() and self.error is None

    async def subscribe(self, channel: str) -> Subscription:
        """Wake-ups on ``channel`` from now on: returns once the channel is listened on (at
        the reader's next tick), so no notification sent after it is missed."""
        subscription = Subscription(self, channel)
        self._subscribers.setdefault(channel, set()).add(subscription)
        if self.connected and channel not in self._listening:
            listened = asyncio.get_running_loop().create_future()
            self._awaiting.setdefault(channel, []).append(listened)
            await listened
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.channel)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.channel]

    async def open(self) -> None:
        """Listen on every subscribed channel (a no-op while the connection is healthy; the
        reader listens on channels subscribed later within LISTEN_TICK)."""
        async with self._opening:
            if self.connected:
                return
            await self._stop_reader()
            self._conn = await _connect(self._url, self._application_name, autocommit=True)
            self._listening = set()
            await self._listen_new()
            self.error = None
            self._reader = asyncio.ensure_future(self._read(self._conn))

    async def _listen_new(self) -> None:
        conn = self._conn
        assert conn is not None
        for channel in sorted(set(self._subscribers) - self._listening):
            async with translate_errors_async(describe(self._url)):
                listen = schemaless_query("listen").format(channel=sql.Identifier(channel))
                await conn.execute(listen)
            self._listening.add(channel)
            for listened in self._awaiting.pop(channel, []):
                if not listened.done():
                    listened.set_result(None)

    async def _read(self, conn: Connection) -> None:
        try:
            while True:
                async with translate_errors_async(describe(self._url)):
                    async for notify in conn.notifies(timeout=LISTEN_TICK):
                        for subscription in self._subscribers.get(notify.channel, ()):
                            subscription.ring()
                await self._listen_new()
        except DatabaseUnavailableError as exc:
            self.error = exc
            for subscription in self._all():
                subscription.ring()
            self._release_awaiting()

    def reset(self) -> None:
        """The link was found dead: drop the connection (subscribers' waits raise)."""
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        self.error = self.error or DatabaseUnavailableError("the LISTEN connection was dropped")
        for subscription in self._all():
            subscription.ring()
        self._release_awaiting()
        conn, self._conn = self._conn, None
        if conn is not None:
            _close_soon(conn)

    def _release_awaiting(self) -> None:
        """subscribe() calls waiting for a LISTEN that will not come on this connection: their
        subscriptions' waits raise, and the relays reconnect (open() listens again)."""
        for waiting in self._awaiting.values():
            for listened in waiting:
                if not listened.done():
                    listened.set_result(None)
        self._awaiting.clear()

    def _all(self) -> Iterator[Subscription]:
        for subscribers in self._subscribers.values():
            yield from subscribers

    async def _stop_reader(self) -> None:
        self._release_awaiting()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn)

    async def close(self) -> None:
        await self._stop_reader()


class Subscription:
    """One outbox's wake-ups from the shared :class:`Listener`."""

    def __init__(self, listener: Listener, channel: str) -> None:
        self.channel = channel
        self._listener = listener
        self._rung = asyncio.Event()

    def ring(self) -> None:
        self._rung.set()

    async def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a notification; True when one arrived. Raises when the
        LISTEN connection failed (the relay reconnects, which opens it again)."""
        self._raise_if_down()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._rung.wait(), seconds)
        rung = self._rung.is_set()
        self._rung.clear()
        self._raise_if_down()
        return rung

    def _raise_if_down(self) -> None:
        error = self._listener.error
        if error is not None:
            raise DatabaseUnavailableError(f"the LISTEN connection failed: {error}")
        if not self._listener.connected:
            raise DatabaseUnavailableError("the LISTEN connection is closed")

    def close(self) -> None:
        self._listener.unsubscribe(self)


class Activity:
    """Which relays of the process found work lately: a backlog in one outbox takes at most
    its share of the broker's attention while others have events (relay/loop.py)."""

    def __init__(self) -> None:
        self._seen: dict[object, float] = {}

    def busy(self, relay: object) -> None:
        self._seen[relay] = time.monotonic()

    def relays(self, within: float) -> int:
        """Relays that found work in the last ``within`` seconds (at least 1)."""
        since = time.monotonic() - within
        for relay in [r for r, at in self._seen.items() if at < since]:
            del self._seen[relay]
        return max(1, len(self._seen))


class DatabaseHub:
    """The connections of one process to one database: claiming pool, coordinator, listener."""

    def __init__(self, url: str, max_connections: int, label: str) -> None:
        self.url = url
        self.max_connections = max_connections
        self.lanes = ConnectionPool(
            url, max(1, max_connections - OVERHEAD), f"outbox-relay:{label}:lane"
        )
        self.coordinator = Coordinator(url, f"outbox-relay:{label}:leases")
        self.listener = Listener(url, f"outbox-relay:{label}:listen")
        self.activity = Activity()

    @property
    def connected(self) -> bool:
        return self.lanes.connected and self.coordinator.connected

    async def open(self, *, listen: bool) -> None:
        await self.coordinator.open()
        if listen:
            await self.listener.open()
        await self.lanes.open()

    def reset(self) -> None:
        """A link to the database was found dead: every connection is replaced."""
        self.lanes.reset()
        self.coordinator.reset()
        self.listener.reset()

    async def close(self) -> None:
        await self.listener.close()
        await self.coordinator.close()
        await self.lanes.close()
