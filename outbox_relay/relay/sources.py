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

from outbox_relay.db.store import OutboxStore, Share
from outbox_relay.errors import DatabaseUnavailableError
from outbox_relay.relay.settings import Mode, RelaySettings
from outbox_relay.relay.wakeup import Waker
from outbox_relay.relay.window import Batch


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

    def __init__(self, settings: RelaySettings, application_name: str, channel: str) -> None:
        self._settings = settings
        self._waker = (
            Waker(settings.database_url, channel, application_name)
            if settings.mode is Mode.NOTIFY
            else None
        )
        self._listening = False
        self._nudged = asyncio.Event()
        # Writers in progress when producers were asked to ring; see _await_unringing_writers.
        self._unringing: list[int] = []
        self._asked_on: OutboxStore | None = None  # the connection that asked them

    async def open(self, store: OutboxStore, stopping: asyncio.Event) -> None:
        self._listening = False
        if self._waker is not None:
            await self._waker.connect()

    async def close(self) -> None:
        store, self._asked_on = self._asked_on, None
        if self._listening and store is not None and store.connected:
            # Withdraw the request at once, so commits stay NOTIFY-free while no relay listens.
            with contextlib.suppress(DatabaseUnavailableError):
                await store.stop_listening()
        self._listening = False
        if self._waker is not None:
            await self._waker.close()

    async def claim(
        self, store: OutboxStore, limit: int, exclude: list[int], share: Share
    ) -> Batch | None:
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

    async def wait(self, store: OutboxStore, seconds: float) -> None:
        if self._nudged.is_set():
            self._nudged.clear()
            return
        waker = self._waker
        if waker is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudged.wait(), seconds)
            self._nudged.clear()
            return
        if not self._listening:
            # Ask producers to ring, then let the relay look once more: a row committed before
            # they could see the request would otherwise wait for the polling fallback.
            self._unringing = await store.start_listening(self._listening_ttl)
            self._listening = True
            self._asked_on = store
            return
        if self._unringing:
            await self._await_unringing_writers(store, waker, seconds)
            return
        if not await self._woken(waker, seconds):
            # Still listening: renew the request so it does not lapse while nothing happens.
            await store.start_listening(self._listening_ttl)

    async def _woken(self, waker: Waker, seconds: float) -> bool:
        """A notification or a nudge within ``seconds``."""
        notified = asyncio.ensure_future(waker.wait(seconds))
        nudged = asyncio.ensure_future(self._nudged.wait())
        try:
            await asyncio.wait((notified, nudged), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (notified, nudged):
                task.cancel()
            await asyncio.gather(notified, nudged, return_exceptions=True)
        if self._nudged.is_set():
            self._nudged.clear()
            return True
        return not notified.cancelled() and notified.result()

    @property
    def _listening_ttl(self) -> float:
        # Refreshed every poll interval; lapses soon after a relay dies so producers stop ringing.
        return self._settings.poll_interval * 3 + 5

    async def _await_unringing_writers(
        self, store: OutboxStore, waker: Waker, seconds: float
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
