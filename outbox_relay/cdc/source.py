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
from collections.abc import Awaitable, Callable, Sequence
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

# Publishes and settles a batch; False when some of it was not confirmed (failed or held back).
Publish = Callable[[Sequence[OutboxMessage]], Awaitable[bool]]
DrainTable = Callable[[], Awaitable[None]]


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
    """Streams one replication slot for the leading relay; see the module docstring.

    The synchronous, tested :class:`ReplicationStream` runs on one dedicated worker thread
    (rather than an asyncio variant driven by ``loop.add_reader``): libpq's copy calls are
    blocking-or-polling and not thread-safe, and a single-thread executor both keeps the event
    loop free and serialises every call on the connection (a read still running when a cancelled
    task closes the stream finishes first). Each hop reads every frame already buffered (up to
    MAX_FRAMES), so the thread switch costs little per event.
    """

    def __init__(self, settings: RelaySettings, store: OutboxStore) -> None:
        self._settings = settings
        self._store = store
        self._slot = settings.slot_name_or_default
        self._publication = settings.publication_or_default
        self._executor: ThreadPoolExecutor | None = None
        self._stream: ReplicationStream | None = None
        self._confirmed = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
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
            # The walsender renders timestamps in its own TimeZone; pin it (see replication.py).
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

    async def _start(self, stopping: asyncio.Event) -> bool:
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
            return True
        return False

    # -- the loop -----------------------------------------------------------------------------

    async def pump(
        self,
        publish: Publish,
        drain_table: DrainTable,
        stopping: asyncio.Event,
        tick: Callable[[], None],
    ) -> None:
        """Stream until ``stopping`` is set. ``publish`` is the relay's publish-and-settle path,
        ``drain_table`` its claim loop over pending rows, ``tick`` its liveness beat (raises
        when the broker connection is gone)."""
        if not await self._start(stopping):
            return
        # Rows committed while no slot streamed (or before it was created) and due retries.
        await drain_table()
        tracker = TransactionTracker(self._settings.schema_name, self._settings.wal_message_prefix)
        self._confirmed = 0
        now = time.monotonic()
        last_status = last_activity = last_heartbeat = now
        sent = 0
        next_sweep = now + SAFETY_SWEEP_EVERY
        next_retry_check = now + self._settings.poll_interval
        next_housekeeping = now + HOUSEKEEPING_EVERY
        while not stopping.is_set():
            tick()
            frames = await self._call(self._read_frames, READ_TIMEOUT)
            for frame, message in frames:
                tracker.feed(frame, message)
            if frames and tracker.ready_ids < self._settings.batch_size:
                # Events are flowing: a few more milliseconds usually bring more transactions,
                # and one bigger batch costs far fewer round trips than several small ones.
                frames = await self._call(self._read_frames, GATHER_TIMEOUT)
                for frame, message in frames:
                    tracker.feed(frame, message)
            buffer_drained = len(frames) < MAX_FRAMES
            if tracker.ready and (buffer_drained or tracker.ready_ids >= self._settings.batch_size):
                transactions = tracker.take_ready()
                if await self._deliver(transactions, publish):
                    next_sweep = time.monotonic()  # held-back rows: let the table path look
                self._confirm(transactions[-1].end_lsn)
                if any(txn.ids for txn in transactions):
                    last_activity = time.monotonic()
            if not tracker.ready and not tracker.in_transaction:
                self._confirm(tracker.idle_lsn)
            now = time.monotonic()
            reply = tracker.take_reply_requested()
            # Progress goes out at most once a second (each send is a hop to the worker thread);
            # the server's requests for a reply are answered at once.
            since = now - last_status
            unsent = self._confirmed > sent
            if reply or since >= STATUS_EVERY or (unsent and since >= STATUS_MIN_GAP):
                sent = self._confirmed
                await self._call(self._send_status, sent, False)
                last_status = now
            heartbeat_every = self._settings.heartbeat_interval
            if now - last_activity >= heartbeat_every and now - last_heartbeat >= heartbeat_every:
                await self._store.heartbeat(HEARTBEAT_PREFIX)
                last_heartbeat = now
            if now >= next_retry_check:
                retry_in = await self._store.next_retry_in()
                if retry_in is not None and retry_in <= 0:
                    next_sweep = now
                next_retry_check = now + self._settings.poll_interval
            if now >= next_sweep:
                await drain_table()
                next_sweep = time.monotonic() + SAFETY_SWEEP_EVERY
            if now >= next_housekeeping:
                await self._store.housekeeping()
                next_housekeeping = now + HOUSEKEEPING_EVERY
        if self._confirmed > sent:  # stopping: spare the next relay a redelivery
            with contextlib.suppress(DatabaseUnavailableError, ReplicationError):
                await self._call(self._send_status, self._confirmed, False)

    def _confirm(self, lsn: int) -> None:
        self._confirmed = max(self._confirmed, lsn)

    async def _deliver(self, transactions: Sequence[WalTransaction], publish: Publish) -> bool:
        """Publish and settle the outbox rows of these transactions; True if any were held back
        for the table path."""
        items = [item for txn in transactions for item in txn.ids]
        events = [item for item in items if isinstance(item, WalEvent)]
        row_of = await self._store.materialize(events) if events else {}
        ids = [row_of[i.event_id] if isinstance(i, WalEvent) else i for i in items]
        held = False
        size = self._settings.batch_size
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            claimed = await self._store.claim_ids(chunk)
            aggregates = sorted({m.aggregate_id for m in claimed if m.aggregate_id is not None})
            earliest = (
                await self._store.earliest_pending(aggregates, chunk, max(chunk))
                if aggregates
                else {}
            )
            batch = select_publishable(chunk, claimed, earliest)
            held = held or len(batch) < len(claimed)
            if batch:
                # Settles (deletes/marks, records failures) and commits. An event held back
                # behind a failed one of its aggregate stays pending with nothing to retry it
                # but the table path: let it look.
                if not await publish(batch):
                    held = True
            else:
                await self._store.commit()
        return held
