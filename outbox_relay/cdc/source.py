"""The CDC source (``serve --mode cdc``): outbox inserts streamed from the WAL with pgoutput.

The WAL says which outbox rows were committed and in which order; the rows themselves are then
claimed by id from the table (``OutboxStore.claim_ids``) and go through the relay's shared
publish-in-waves and settle path. Reading the row back costs one indexed query per batch, in the
transaction that deletes (or marks) those rows anyway, and buys three things:

* no double publishing with the table path, which still runs every ``--poll-interval`` for
  retries, held-back events and rows committed while no slot existed: a row either path has
  settled is simply no longer pending;
* the row as committed, including changes the producer made to it later in the same transaction
  (the publication streams inserts only);
* per-aggregate order through retries: an event whose aggregate has an earlier event still
  pending in the table is held back (left pending) for the table path, which publishes in id
  order (= per-aggregate commit order, thanks to the insert trigger).

Acknowledgement: the slot's flush position advances only past transactions whose rows are
settled (published and deleted/marked, or failed and recorded for the table path to retry).
When nothing is in flight it follows the server's keepalives and our own heartbeats
(``pg_logical_emit_message``), so an idle outbox never makes the server retain WAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg

from outbox_relay.cdc import slots
from outbox_relay.cdc.pgoutput import (
    Begin,
    Commit,
    Insert,
    LogicalMessage,
    PgOutputDecodeError,
    PgOutputMessage,
    PrimaryKeepalive,
    Relation,
    ReplicationFrame,
    XLogData,
    decode_message,
)
from outbox_relay.cdc.stream import ReplicationStream
from outbox_relay.cdc.wal_events import WalEvent, default_prefix, parse_wal_event
from outbox_relay.db.connect import connection
from outbox_relay.db.store import OutboxStore
from outbox_relay.errors import (
    DatabaseUnavailableError,
    InvalidEventError,
    ReplicationError,
    ReplicationPrivilegeError,
    SlotInUseError,
    SlotNotFoundError,
)
from outbox_relay.messages import OutboxMessage
from outbox_relay.redact import redact_url
from outbox_relay.relay.settings import RelaySettings
from outbox_relay.relay.window import Batch

log = logging.getLogger(__name__)

T = TypeVar("T")

HEARTBEAT_PREFIX = "outbox_relay_heartbeat"
READ_TIMEOUT = 0.2  # also bounds how long stop() waits for the worker thread
GATHER_TIMEOUT = 0.005
MAX_FRAMES = 20_000  # per hop to the worker thread
STATUS_EVERY = 10.0  # well inside the server's wal_sender_timeout (60 s by default)
STATUS_MIN_GAP = 1.0
HOUSEKEEPING_EVERY = 60.0
# The table path runs when the CDC path held rows back, when a retry is due (checked every
# --poll-interval, one cheap indexed query), and at least this often for rows made pending
# without an insert (`dead retry`). Sweeping every poll interval regardless would claim the rows
# the WAL is about to deliver and slow the stream down.
SAFETY_SWEEP_EVERY = 30.0


@dataclass(frozen=True, slots=True)
class _TransactionEnd:
    """Marks a transaction's end (and its position) among the WAL items waiting to be claimed."""

    lsn: int


@dataclass(frozen=True, slots=True)
class WalTransaction:
    """One committed transaction: the outbox ids it inserted and the events it wrote straight
    to the WAL, in WAL order."""

    end_lsn: int
    ids: tuple[int | WalEvent, ...]


@dataclass
class TransactionTracker:
    """Turns decoded frames into committed transactions and the position that is safe to confirm
    when nothing is in flight. Pure logic, no I/O."""

    schema: str
    wal_message_prefix: str | None = None
    ready: list[WalTransaction] = field(default_factory=list)
    in_transaction: bool = False
    # Highest position seen between transactions (keepalive or heartbeat): everything before it
    # has been received, so once all ready transactions are settled it can be confirmed.
    idle_lsn: int = 0
    reply_requested: bool = False
    _current: list[int | WalEvent] = field(default_factory=list)
    _committed_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    _id_column: dict[int, int] = field(default_factory=dict)  # outbox relation oid -> index

    def feed(self, frame: ReplicationFrame, message: PgOutputMessage | None) -> None:
        if isinstance(frame, PrimaryKeepalive):
            if not self.in_transaction:
                self.idle_lsn = max(self.idle_lsn, frame.wal_end)
            self.reply_requested = self.reply_requested or frame.reply_requested
            return
        if isinstance(message, Begin):
            self.in_transaction = True
            self._current = []
            self._committed_at = message.commit_ts
        elif isinstance(message, Relation):
            self._relation(message)
        elif isinstance(message, Insert):
            index = self._id_column.get(message.relation_oid)
            if index is not None:
                value = message.new_tuple[index].data
                if value is not None:
                    self._current.append(int(value))
        elif isinstance(message, Commit):
            self.ready.append(WalTransaction(message.end_lsn, tuple(self._current)))
            self._current = []
            self.in_transaction = False
        elif isinstance(message, LogicalMessage):
            self._logical_message(message)

    def _logical_message(self, message: LogicalMessage) -> None:
        if not message.transactional:
            if not self.in_transaction:
                self.idle_lsn = max(self.idle_lsn, message.lsn)
            return
        prefix = self.wal_message_prefix or default_prefix(self.schema)
        if message.prefix != prefix:
            return
        try:
            event = parse_wal_event(message.content, prefix, message.lsn, self._committed_at)
        except InvalidEventError as exc:
            # Cannot be published nor stored (the outbox's constraints would refuse it).
            log.error(
                "skipped an invalid event written to the WAL: %s",
                exc,
                extra={"lsn": f"{message.lsn >> 32:X}/{message.lsn & 0xFFFFFFFF:X}"},
            )
            return
        self._current.append(event)

    def _relation(self, relation: Relation) -> None:
        self._id_column.pop(relation.oid, None)
        if relation.namespace == self.schema and relation.name == "outbox":
            names = [column.name for column in relation.columns]
            if "id" in names:
                self._id_column[relation.oid] = names.index("id")

    @property
    def ready_ids(self) -> int:
        return sum(len(txn.ids) for txn in self.ready)

    def take_ready(self) -> list[WalTransaction]:
        ready, self.ready = self.ready, []
        return ready

    def take_reply_requested(self) -> bool:
        requested, self.reply_requested = self.reply_requested, False
        return requested


def select_publishable(
    ids: Sequence[int],
    claimed: Sequence[OutboxMessage],
    earliest_pending: dict[str, int],
) -> list[OutboxMessage]:
    """The claimed rows CDC may publish now, in WAL order.

    A row is left to the table path (held back, stays pending) when it was already tried
    (attempts > 0), or when its aggregate has an earlier pending event outside this batch or an
    earlier row of this batch was held back: later events never overtake earlier ones.
    """
    by_id = {message.id: message for message in claimed}
    held: set[str] = set()
    publishable: list[OutboxMessage] = []
    for id_ in ids:
        message = by_id.pop(id_, None)
        if message is None:  # published by the table path already, or dead
            continue
        aggregate = message.aggregate_id
        if aggregate is not None:
            first = earliest_pending.get(aggregate)
            if aggregate in held or message.attempts > 0 or (first is not None and first < id_):
                held.add(aggregate)
                continue
        elif message.attempts > 0:
            continue
        publishable.append(message)
    return publishable


class CdcSource:
    """The WAL as a :class:`~outbox_relay.relay.sources.Source` (``--mode cdc``).

    Transactions read from the slot become batches claimed by id (``claim_ids``); the relay's
    window publishes them with every other batch, confirm by confirm. The slot's flush position
    advances only past transactions whose batches have all settled, in WAL order. The table path
    (retries, held-back events, rows committed while no slot streamed) claims from the table on
    the same window when a retry is due, when the WAL path held rows back, and every
    SAFETY_SWEEP_EVERY seconds.

    The synchronous, tested :class:`ReplicationStream` runs on one dedicated worker thread
    (rather than an asyncio variant driven by ``loop.add_reader``): libpq's copy calls are
    blocking-or-polling and not thread-safe, and a single-thread executor both keeps the event
    loop free and serialises every call on the connection. Each hop reads every frame already
    buffered (up to MAX_FRAMES), so the thread switch costs little per event.
    """

    def __init__(self, settings: RelaySettings) -> None:
        self._settings = settings
        self._slot = settings.slot_name_or_default
        self._publication = settings.publication_or_default
        self._executor: ThreadPoolExecutor | None = None
        self._stream: ReplicationStream | None = None
        self._tracker = TransactionTracker(settings.schema_name, settings.wal_message_prefix)
        self._reading: asyncio.Future[None] | None = None
        # WAL batches in claim (= WAL) order with the position each lets the slot confirm.
        self._unsettled: deque[tuple[Batch, int | None]] = deque()
        self._settled: set[int] = set()  # id() of settled WAL batches not yet popped
        self._confirmed = 0  # what may be reported to the server as flushed
        self._reported = 0
        # WAL items read and not yet claimed: row ids, events, and each transaction's end.
        self._pending: deque[int | WalEvent | _TransactionEnd] = deque()
        now = time.monotonic()
        self._next_sweep = now  # rows committed while no slot streamed: look at once
        self._next_retry_check = now
        self._last_status = self._last_activity = self._last_heartbeat = now

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self, store: OutboxStore, stopping: asyncio.Event) -> None:
        await self._start(stopping)
        self._tracker = TransactionTracker(
            self._settings.schema_name, self._settings.wal_message_prefix
        )
        self._unsettled.clear()
        self._settled.clear()
        self._pending.clear()
        self._confirmed = self._reported = 0
        self._next_sweep = time.monotonic()

    async def close(self) -> None:
        reading, self._reading = self._reading, None
        if reading is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await reading
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if self._confirmed > self._reported:  # stopping: spare the next relay a redelivery
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(
                    executor, self._send_status, self._confirmed, False
                )
        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(executor, self._close_stream)
        executor.shutdown(wait=False)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="outbox-relay-cdc")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
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
        """Check the server, create what is missing and start streaming; True if the slot was
        (re)created, meaning rows committed before it exist only in the table."""
        settings = self._settings
        with connection(settings.database_url, application_name="outbox-relay-cdc setup") as conn:
            slots.check_wal_level(conn, settings.schema_name)
            slots.ensure_publication(conn, settings.schema_name, self._publication)
        conninfo = psycopg.conninfo.make_conninfo(
            settings.database_url,
            # The walsender renders timestamps in its own TimeZone; pin it (see stream.py).
            options="-c TimeZone=UTC",
            application_name=f"outbox-relay-cdc:{settings.schema_name}",
        )
        self._close_stream()
        stream = self._stream = ReplicationStream(conninfo)
        stream.open()
        created = stream.ensure_slot(self._slot)
        try:
            stream.start(self._slot, self._publication, 0)
        except SlotNotFoundError:  # dropped between the check and the start: make it again
            stream.close()
            stream.open()
            created = stream.ensure_slot(self._slot) or created
            stream.start(self._slot, self._publication, 0)
        return created

    def _read_frames(self, timeout: float) -> list[tuple[ReplicationFrame, PgOutputMessage | None]]:
        stream = self._stream
        if stream is None:
            raise ReplicationError("replication stream is closed")
        frames: list[tuple[ReplicationFrame, PgOutputMessage | None]] = []
        frame = stream.read(timeout)
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

    def _send_status(self, lsn: int, reply: bool) -> None:
        if self._stream is not None:
            self._stream.send_status(lsn, reply)

    async def _start(self, stopping: asyncio.Event) -> None:
        """Open the slot, waiting as a standby while another process streams it."""
        said_standby = False
        while not stopping.is_set():
            try:
                created = await self._call(self._open_stream)
            except ReplicationPrivilegeError as exc:
                raise ReplicationPrivilegeError(
                    f"{exc}; --mode cdc needs a role with the REPLICATION attribute: "
                    "ALTER ROLE <role> REPLICATION"
                ) from exc
            except SlotInUseError as exc:
                await self._call(self._close_stream)
                if not said_standby:
                    log.info(
                        "standby: replication slot %r is in use by another process; "
                        "waiting to take over (%s)",
                        self._slot,
                        exc,
                    )
                    said_standby = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), self._settings.poll_interval)
                continue
            if created:
                log.warning(
                    "created replication slot %r: publishing rows committed before it from the "
                    "table first",
                    self._slot,
                )
            log.info(
                "streaming replication slot %r (publication %r)", self._slot, self._publication
            )
            return

    # -- reading the WAL ----------------------------------------------------------------------

    async def _read(self, seconds: float) -> None:
        frames = await self._call(self._read_frames, seconds)
        tracker = self._tracker
        for frame, message in frames:
            tracker.feed(frame, message)
        if frames and tracker.ready_ids < self._settings.batch_size and len(frames) < MAX_FRAMES:
            # Events are flowing: a few more milliseconds usually bring more transactions,
            # and one bigger batch costs far fewer round trips than several small ones.
            for frame, message in await self._call(self._read_frames, GATHER_TIMEOUT):
                tracker.feed(frame, message)

    def _reader(self, seconds: float) -> asyncio.Future[None]:
        """The read in progress (at most one: the stream is not shared), or a new one."""
        reading = self._reading
        if reading is None or reading.done():
            reading = self._reading = asyncio.ensure_future(self._read(seconds))
        return reading

    async def readable(self) -> None:
        """Read the WAL until a transaction is ready (while batches are in flight)."""
        while not self._tracker.ready and not self._pending:
            reader = self._reader(READ_TIMEOUT)
            await asyncio.shield(reader)
            self._collect(reader)

    def _collect(self, reader: asyncio.Future[None]) -> None:
        if reader is self._reading and reader.done():
            self._reading = None
            reader.result()  # a failed read ends the loop (reconnect)

    async def wait(self, store: OutboxStore, seconds: float) -> None:
        """Idle: read the WAL for up to ``seconds``; keep the slot moving with the server's
        keepalives and our own heartbeats."""
        reader = self._reader(min(seconds, READ_TIMEOUT))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), timeout=seconds)
        self._collect(reader)
        tracker = self._tracker
        if not tracker.ready and not tracker.in_transaction and not self._unsettled:
            self._confirm(tracker.idle_lsn)
        await self.housekeeping(store)

    # -- claiming -----------------------------------------------------------------------------

    async def claim(self, store: OutboxStore, limit: int, exclude: list[int]) -> Batch | None:
        now = time.monotonic()
        if self._reading is not None and self._reading.done():
            self._collect(self._reading)
        if now >= self._next_retry_check:
            self._next_retry_check = now + self._settings.poll_interval
            retry_in = await store.next_retry_in()
            if retry_in is not None and retry_in <= 0:
                self._next_sweep = now
        if now >= self._next_sweep:
            # The table path: retries, held-back rows, rows made pending without an insert.
            messages = await store.claim(limit, in_flight=exclude)
            if messages:
                return Batch(messages)
            self._next_sweep = now + SAFETY_SWEEP_EVERY
        return await self._claim_wal(store, limit, exclude)

    async def _claim_wal(self, store: OutboxStore, limit: int, exclude: list[int]) -> Batch | None:
        """The next transactions read from the WAL, claimed by id (at most ``limit`` rows; a
        bigger transaction spans batches, and only its last one carries its end position)."""
        pending = self._pending
        for txn in self._tracker.take_ready():
            pending.extend(txn.ids)
            pending.append(_TransactionEnd(txn.end_lsn))
        if not pending:
            return None
        items: list[int | WalEvent] = []
        end: int | None = None  # the last transaction this batch completes
        while pending and (len(items) < limit or isinstance(pending[0], _TransactionEnd)):
            item = pending.popleft()
            if isinstance(item, _TransactionEnd):
                end = item.lsn
            else:
                items.append(item)
        events = [item for item in items if isinstance(item, WalEvent)]
        row_of = await store.materialize(events) if events else {}
        ids = [row_of[i.event_id] if isinstance(i, WalEvent) else i for i in items]
        # A row the table path has in flight is already on its way.
        busy = set(exclude)
        ids = [id_ for id_ in ids if id_ not in busy]
        claimed = await store.claim_ids(ids) if ids else []
        aggregates = sorted({m.aggregate_id for m in claimed if m.aggregate_id is not None})
        earliest = (
            await store.earliest_pending(aggregates, [*ids, *exclude], max(ids))
            if aggregates
            else {}
        )
        publishable = select_publishable(ids, claimed, earliest)
        if len(publishable) < len(claimed):
            self._next_sweep = time.monotonic()  # held-back rows: the table path goes next
        batch = Batch(publishable, token=end, locked=[m.id for m in claimed])
        if items:
            self._last_activity = time.monotonic()
        self._unsettled.append((batch, end))
        if not publishable:
            # Nothing to publish, but the transactions' position still needs settling in order.
            await store.commit()
            self.settled(batch)
            return None
        return batch

    def settled(self, batch: Batch) -> None:
        if batch.failures or batch.held:
            # Failed or held-back events stay pending: only the table path publishes them.
            self._next_sweep = time.monotonic()
        if batch.token is None and not any(b is batch for b, _end in self._unsettled):
            return  # a table-path batch: no WAL position to move
        self._settled.add(id(batch))
        while self._unsettled and id(self._unsettled[0][0]) in self._settled:
            done, end = self._unsettled.popleft()
            self._settled.discard(id(done))
            if end is not None:
                self._confirm(end)

    def _confirm(self, lsn: int) -> None:
        self._confirmed = max(self._confirmed, lsn)

    async def housekeeping(self, store: OutboxStore) -> None:
        """Report progress to the server (at most once a second; at once when it asks) and
        send a heartbeat through the WAL after --heartbeat-interval of outbox silence."""
        now = time.monotonic()
        reply = self._tracker.take_reply_requested()
        since = now - self._last_status
        unsent = self._confirmed > self._reported
        if reply or since >= STATUS_EVERY or (unsent and since >= STATUS_MIN_GAP):
            self._reported = self._confirmed
            await self._call(self._send_status, self._reported, False)
            self._last_status = now
        every = self._settings.heartbeat_interval
        if now - self._last_activity >= every and now - self._last_heartbeat >= every:
            await store.heartbeat(HEARTBEAT_PREFIX)
            self._last_heartbeat = now
