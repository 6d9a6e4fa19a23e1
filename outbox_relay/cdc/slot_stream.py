"""One replication slot streamed for the CDC source: reading frames into transactions, and the
position the slot may confirm once the batches made of them have settled.

The synchronous, tested :class:`ReplicationStream` runs on a worker thread of its own (rather
than an asyncio variant driven by ``loop.add_reader``): libpq's copy calls are
blocking-or-polling and not thread-safe, and a single-thread executor both keeps the event loop
free and serialises every call on the connection. Each hop reads every frame already buffered
(up to MAX_FRAMES), so the thread switch costs little per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg

from outbox_relay.cdc import slots
from outbox_relay.cdc.pgoutput import (
    PgOutputDecodeError,
    PgOutputMessage,
    ReplicationFrame,
    XLogData,
    decode_message,
)
from outbox_relay.cdc.stream import ReplicationStream
from outbox_relay.cdc.transactions import TransactionTracker, WalTransaction
from outbox_relay.cdc.wal_events import WalEvent
from outbox_relay.db.connect import connection
from outbox_relay.errors import DatabaseUnavailableError, ReplicationError, SlotNotFoundError
from outbox_relay.redact import redact_url
from outbox_relay.relay.settings import RelaySettings

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_TIMEOUT = 0.2  # also bounds how long closing waits for the worker thread
GATHER_TIMEOUT = 0.005
MAX_FRAMES = 20_000  # per hop to the worker thread
STATUS_EVERY = 10.0  # well inside the server's wal_sender_timeout (60 s by default)
STATUS_MIN_GAP = 1.0
# A replication connection silent this long is dead (the stream asks the server for a reply
# half-way, which a live walsender sends at once): reconnect rather than wait on a cut link
# for the kernel's timeouts. docs/deploy.md, "Dead links".
SILENCE_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class TransactionStart:
    """Marks a transaction's start among the WAL items waiting to be claimed."""

    xid: int


@dataclass(frozen=True, slots=True)
class TransactionEnd:
    """Marks a transaction's end (and its position) among the WAL items waiting to be claimed."""

    lsn: int


@dataclass(frozen=True, slots=True)
class Taken:
    """Items taken from the stream for one batch."""

    items: list[int | WalEvent]  # in WAL order
    end: int | None  # the end of the last transaction they complete (None: they end mid-way)
    xids: frozenset[int]  # the transactions they come from


@dataclass(frozen=True, slots=True)
class SlotNames:
    """A shard's slot and publication; with several shards, the publication's row filter."""

    slot: str
    publication: str
    shard: int
    shards: int


class SlotStream:
    """Streams one slot; see the module docstring."""

    def __init__(self, settings: RelaySettings, names: SlotNames) -> None:
        self._settings = settings
        self.names = names
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"outbox-relay-cdc-{names.shard}")
        self._stream: ReplicationStream | None = None
        self.tracker = TransactionTracker(settings.schema_name, settings.wal_message_prefix)
        self._reading: asyncio.Future[None] | None = None
        # WAL items read and not yet claimed: row ids, events, each transaction's start and end.
        self.pending: deque[int | WalEvent | TransactionStart | TransactionEnd] = deque()
        self._taking: int | None = None  # the transaction the last take() ended inside
        # Batches of this slot in claim (= WAL) order, with the position each lets it confirm.
        self._unsettled: deque[tuple[object, int | None]] = deque()
        self._settled: set[int] = set()
        self._confirmed = 0
        self._reported = 0
        self._last_status = time.monotonic()
        self.last_activity = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> bool:
        """Create what is missing and start streaming; True if the slot was (re)created, so
        rows committed before it exist only in the table. SlotInUseError: another relay still
        streams it (it hands over once its batches have settled)."""
        return await self._call(self._open_stream)

    async def close(self) -> None:
        reading, self._reading = self._reading, None
        if reading is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await reading
        if self._confirmed > self._reported:  # spare the next reader a redelivery
            with contextlib.suppress(Exception):
                await self._call(self._send_status, self._confirmed, False)
        with contextlib.suppress(Exception):
            await self._call(self._close_stream)
        self._executor.shutdown(wait=False)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            # In the caller's context: its log lines name the outbox (serve --config).
            context = contextvars.copy_context()
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, context.run, fn, *args
            )
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(
                f"PostgreSQL at {redact_url(self._settings.database_url)}: {exc}"
            ) from exc
        except ReplicationError as exc:
            if type(exc) is ReplicationError:  # a lost or broken stream: reconnect and resume
                raise DatabaseUnavailableError(str(exc)) from exc
            raise

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def _open_stream(self) -> bool:
        settings, names = self._settings, self.names
        with connection(settings.database_url, application_name="outbox-relay-cdc setup") as conn:
            slots.check_wal_level(conn, settings.schema_name)
            slots.ensure_publication(
                conn,
                settings.schema_name,
                names.publication,
                shard=names.shard,
                shards=names.shards,
            )
        conninfo = psycopg.conninfo.make_conninfo(
            settings.database_url,
            # The walsender renders timestamps in its own TimeZone; pin it (see stream.py).
            options="-c TimeZone=UTC",
            application_name=f"outbox-relay-cdc:{settings.schema_name}:{names.shard}",
        )
        self._close_stream()
        stream = self._stream = ReplicationStream(conninfo, silence_timeout=SILENCE_TIMEOUT)
        stream.open()
        created = stream.ensure_slot(names.slot)
        try:
            stream.start(names.slot, names.publication, 0)
        except SlotNotFoundError:  # dropped between the check and the start: make it again
            stream.close()
            stream.open()
            created = stream.ensure_slot(names.slot) or created
            stream.start(names.slot, names.publication, 0)
        except BaseException:
            self._close_stream()
            raise
        return created

    # -- reading ---------------------------------------------------------------------------

    def _read_frames(self, seconds: float) -> list[tuple[ReplicationFrame, PgOutputMessage | None]]:
        stream = self._stream
        if stream is None:
            raise ReplicationError("replication stream is closed")
        frames: list[tuple[ReplicationFrame, PgOutputMessage | None]] = []
        frame = stream.read(seconds)
        while frame is not None:
            try:
                message = decode_message(frame.payload) if isinstance(frame, XLogData) else None
            except PgOutputDecodeError as exc:
                raise ReplicationError(f"malformed pgoutput message: {exc}") from exc
            frames.append((frame, message))
            if len(frames) >= MAX_FRAMES:
                break
            frame = stream.read(0)  # only what libpq already buffered
        return frames

    async def _read(self, seconds: float) -> None:
        frames = await self._call(self._read_frames, seconds)
        tracker = self.tracker
        for frame, message in frames:
            tracker.feed(frame, message)
        if frames and tracker.ready_ids < self._settings.batch_size and len(frames) < MAX_FRAMES:
            # Events are flowing: a few more milliseconds usually bring more transactions,
            # and one bigger batch costs far fewer round trips than several small ones.
            for frame, message in await self._call(self._read_frames, GATHER_TIMEOUT):
                tracker.feed(frame, message)
        self.enqueue(tracker.take_ready())

    def enqueue(self, transactions: list[WalTransaction]) -> None:
        """Committed transactions join the items waiting to be claimed."""
        for transaction in transactions:
            self.pending.append(TransactionStart(transaction.xid))
            self.pending.extend(transaction.ids)
            self.pending.append(TransactionEnd(transaction.end_lsn))

    def reader(self, seconds: float = READ_TIMEOUT) -> asyncio.Future[None]:
        """The read in progress (at most one: the stream is not shared), or a new one."""
        reading = self._reading
        if reading is None or reading.done():
            reading = self._reading = asyncio.ensure_future(self._read(seconds))
        return reading

    def collect(self) -> None:
        """Take a finished read's outcome: a failed read ends the loop (reconnect)."""
        reading = self._reading
        if reading is not None and reading.done():
            self._reading = None
            reading.result()

    # -- taking items and confirming -------------------------------------------------------

    def take(self, limit: int) -> Taken:
        """Up to ``limit`` items in WAL order (a bigger transaction spans batches)."""
        pending = self.pending
        items: list[int | WalEvent] = []
        end: int | None = None
        xids: set[int] = set() if self._taking is None else {self._taking}
        while pending and (len(items) < limit or isinstance(pending[0], TransactionEnd)):
            item = pending.popleft()
            if isinstance(item, TransactionStart):
                self._taking = item.xid
                xids.add(item.xid)
            elif isinstance(item, TransactionEnd):
                self._taking = None
                end = item.lsn
            else:
                items.append(item)
        if items:
            self.last_activity = time.monotonic()
        return Taken(items, end, frozenset(xids))

    def claimed(self, batch: object, end: int | None) -> None:
        self._unsettled.append((batch, end))

    def settled(self, batch: object) -> bool:
        """Move the confirmable position past every batch settled in WAL order; False if
        ``batch`` is not one of this slot's."""
        if not any(b is batch for b, _end in self._unsettled):
            return False
        self._settled.add(id(batch))
        while self._unsettled and id(self._unsettled[0][0]) in self._settled:
            done, end = self._unsettled.popleft()
            self._settled.discard(id(done))
            if end is not None:
                self._confirmed = max(self._confirmed, end)
        return True

    @property
    def idle(self) -> bool:
        return not self.pending and not self._unsettled and not self.tracker.in_transaction

    def confirm_idle(self) -> None:
        """Nothing pending: keepalives and heartbeats move the position on (an idle outbox
        must not make the server retain WAL)."""
        if self.idle and not self.tracker.ready:
            self._confirmed = max(self._confirmed, self.tracker.idle_lsn)

    async def report(self) -> None:
        """Progress to the server: at most once a second; at once when it asks."""
        now = time.monotonic()
        reply = self.tracker.take_reply_requested()
        since = now - self._last_status
        unsent = self._confirmed > self._reported
        if reply or since >= STATUS_EVERY or (unsent and since >= STATUS_MIN_GAP):
            self._reported = self._confirmed
            await self._call(self._send_status, self._reported, False)
            self._last_status = now

    def _send_status(self, lsn: int, reply: bool) -> None:
        if self._stream is not None:
            self._stream.send_status(lsn, reply)
