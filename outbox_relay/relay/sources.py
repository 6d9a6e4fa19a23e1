"""Where the relay's next batch comes from: the :class:`Source` protocol, and the table source
of ``--mode notify`` and ``--mode poll`` (the CDC source is ``outbox_relay.cdc.source``).

A source claims rows on the connection the relay hands it (the rows stay locked in that
connection's open transaction until the batch settles), waits when there is nothing to claim,
and hears when a batch it produced has settled. The relay loop does the rest the same way for
every source: the window of events on the wire, per-aggregate order, settling, reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Protocol

from outbox_relay.db.pool import Coordinator, Listener, Subscription
from outbox_relay.db.store import OutboxStore, Share
from outbox_relay.errors import DatabaseUnavailableError
from outbox_relay.relay.settings import Mode, RelaySettings
from outbox_relay.relay.window import Batch

# Seconds to withdraw the request for NOTIFY when the relay stops or reconnects.
WITHDRAW_TIMEOUT = 1.0
# Seconds a request for NOTIFY outlasts the idle wait it covers (see _listening_ttl).
LISTENING_MARGIN = 5.0
# Seconds a poll's question may wait for others to share its round trip.
QUESTION_DELAY = 0.05


class Source(Protocol):
    async def open(self, store: OutboxStore, stopping: asyncio.Event) -> None:
        """Connect whatever the source reads besides the table (``store`` is free to use);
        give up waiting (e.g. for a replication slot in use) once ``stopping`` is set."""
        ...

    async def close(self) -> None: ...

    async def claim(
        self, store: OutboxStore, limit: int, exclude: list[int], share: Share
    ) -> Batch | None:
        """Lock the next rows of ``share`` (this relay's leases) to publish on ``store``'s
        connection, in id order, passing over ``exclude`` (rows of batches in flight). None
        when there is nothing to publish now."""
        ...

    async def wait(self, store: OutboxStore, seconds: float) -> None:
        """Nothing to claim and nothing in flight: wait for new rows, up to ``seconds``, on the
        free connection ``store``."""
        ...

    def readable(self) -> Awaitable[None] | None:
        """Done when the source may have rows to claim although the relay is busy (the WAL
        brought a transaction); None for a source that learns of rows only by claiming."""
        ...

    def settled(self, batch: Batch) -> None:
        """``batch`` is published and its outcome committed."""
        ...

    def nudge(self) -> None:
        """End a wait at once: the relay's share grew, and its new partitions may hold rows
        whose wake-ups went to their previous owner."""
        ...

    async def housekeeping(self, store: OutboxStore) -> None:
        """Called at every turn of the loop with a free connection: periodic duties that are
        due (CDC: progress to the server, heartbeats); cheap when nothing is."""
        ...


class TableSource:
    """Pending rows in id order, straight from the table: ``--mode notify`` and ``--mode poll``.

    In notify mode the relay asks producers to ring (NOTIFY) only while it is idle: a relay
    busy draining costs producers one read of a one-row table, never a NOTIFY (the global lock
    at commit). Going idle, it asks first, then looks once more, then waits for the writers that
    were in progress when it asked; a wake-up or the poll interval ends any wait.
    """

    def __init__(
        self,
        settings: RelaySettings,
        listener: Listener,
        channel: str,
        coordinator: Coordinator,
    ) -> None:
        self._settings = settings
        self._listener = listener
        self._coordinator = coordinator
        # After a wait that ended by its timeout (a poll), a claim first asks whether anything
        # is due, in the shared round of statements (db/pool.py, Coordinator.beat): an idle
        # relay's poll costs a share of one round trip, not a claim of its own.
        self._quiet = False
        self._anything_due = ""  # the question, bound (open())
        self._channel = channel
        self._waker: Subscription | None = None
        self._listening = False
        self._nudged = asyncio.Event()
        # Writers in progress when producers were asked to ring; see _await_unringing_writers.
        self._unringing: list[int] = []
        self._asked_on: OutboxStore | None = None  # the connection that asked them
        self._asked_at = 0.0  # time.monotonic() of the last request or renewal
        self._ttl = 0.0  # what it asked for

    async def open(self, store: OutboxStore, stopping: asyncio.Event) -> None:
        self._listening = False
        self._quiet = False
        self._anything_due = await self._coordinator.mogrify(store.queries["anything_due"], {})
        if self._settings.mode is Mode.NOTIFY:
            # The shared LISTEN connection (db/pool.py) is open: the relay opened its hub.
            self._waker = await self._listener.subscribe(self._channel)

    async def close(self) -> None:
        store, self._asked_on = self._asked_on, None
        if self._listening and store is not None:
            # Withdraw the request at once, so commits stay NOTIFY-free while no relay listens
            # (bounded: on a dead link the request simply lapses). On a connection of its own:
            # the store's may have been left mid-statement by the stop.
            await store.rollback()
            with contextlib.suppress(DatabaseUnavailableError, TimeoutError):
                await asyncio.wait_for(store.stop_listening(), WITHDRAW_TIMEOUT)
            await store.rollback()
        self._listening = False
        waker, self._waker = self._waker, None
        if waker is not None:
            waker.close()

    async def claim(
        self, store: OutboxStore, limit: int, exclude: list[int], share: Share
    ) -> Batch | None:
        if self._quiet:
            self._quiet = False
            row = await self._coordinator.beat(self._anything_due, QUESTION_DELAY)
            if not (row and row[0]):
                return None
        messages = await store.claim(limit, share, in_flight=exclude)
        if not messages:
            return None
        if self._listening:
            # Busy again: producers stop ringing when this claim commits with its batch.
            await store.stop_listening(commit=False)
            self._listening = False
        return Batch(messages)

    def nudge(self) -> None:
        self._nudged.set()
        if self._waker is not None:
            self._waker.ring()

    async def wait(self, store: OutboxStore, seconds: float) -> None:
        if self._nudged.is_set():
            self._nudged.clear()
            return
        waker = self._waker
        if waker is None:
            self._quiet = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudged.wait(), seconds)
                self._quiet = False
            self._nudged.clear()
            return
        if not self._listening:
            # Ask producers to ring, then let the relay look once more: a row committed before
            # they could see the request would otherwise wait for the polling fallback.
            self._ttl = self._listening_ttl(seconds)
            # Marked before asking: a relay stopped while the request commits withdraws it.
            self._listening = True
            self._asked_on = store
            self._unringing = await store.start_listening(self._ttl)
            self._asked_at = time.monotonic()
            return
        if self._unringing:
            await self._await_unringing_writers(store, waker, seconds)
            return
        if self._asked_at + self._ttl < time.monotonic() + seconds + LISTENING_MARGIN:
            # Still listening: renew the request before it could lapse during this wait.
            self._ttl = self._listening_ttl(seconds)
            renew = await self._coordinator.mogrify(
                store.queries["start_listening"],
                {"seconds": self._ttl, "relay": self._settings.relay_name_or_default},
            )
            await self._coordinator.beat(renew, QUESTION_DELAY)
            self._asked_at = time.monotonic()
        self._quiet = True
        self._quiet = not await self._woken(waker, seconds)

    def _listening_ttl(self, seconds: float) -> float:
        """A request lasts a few idle waits (renewed every few), and lapses soon after a relay
        that died without withdrawing it, so producers stop ringing."""
        return 3 * max(seconds, self._settings.poll_interval) + LISTENING_MARGIN

    async def _woken(self, waker: Subscription, seconds: float) -> bool:
        """A notification or a nudge (which rings the subscription too) within ``seconds``."""
        rung = await waker.wait(seconds)
        self._nudged.clear()
        return rung

    async def _await_unringing_writers(
        self, store: OutboxStore, waker: Subscription, seconds: float
    ) -> None:
        """A writer whose trigger ran just before the relay asked for NOTIFY, and that committed
        just after the relay's last look, would otherwise wait for the polling fallback. Wait for
        the writers that were in progress then to end (usually a millisecond), then look again.
        A notification or ``seconds`` end the wait too."""
        deadline = time.monotonic() + seconds
        delay = 0.001
        while time.monotonic() < deadline:
            if await store.all_ended(self._unringing):
                break
            if await waker.wait(delay):
                break
            delay = min(delay * 2, 0.05)
        self._unringing = []

    def readable(self) -> None:
        return None  # the table says nothing until it is asked

    def settled(self, batch: Batch) -> None:
        pass

    async def housekeeping(self, store: OutboxStore) -> None:
        pass
