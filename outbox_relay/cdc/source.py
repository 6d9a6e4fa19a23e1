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
import logging
import time
from collections.abc import Coroutine
from typing import Any

from outbox_relay.cdc import slots
from outbox_relay.cdc.slot_stream import READ_TIMEOUT, SlotNames, SlotStream
from outbox_relay.cdc.transactions import select_publishable
from outbox_relay.cdc.wal_events import WalEvent
from outbox_relay.db.store import OutboxStore, Share
from outbox_relay.errors import ReplicationPrivilegeError, SlotInUseError
from outbox_relay.relay.settings import RelaySettings
from outbox_relay.relay.window import Batch

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "outbox_relay_heartbeat"
# The table path runs when the CDC path held rows back, when a retry is due (checked every
# --poll-interval, one cheap indexed query), and at least this often for rows made pending
# without an insert (`dead retry`). Sweeping every poll interval regardless would claim the rows
# the WAL is about to deliver and slow the stream down.
SAFETY_SWEEP_EVERY = 30.0


def slot_names(settings: RelaySettings, shard: int, shards: int) -> SlotNames:
    """The slot and publication of one shard (cdc/slots.py: shard_name)."""
    return SlotNames(
        slot=slots.shard_name(settings.slot_name_or_default, shard),
        publication=slots.shard_name(settings.publication_or_default, shard),
        shard=shard,
        shards=shards,
    )


class CdcSource:
    """The WAL as a :class:`~outbox_relay.relay.sources.Source` (``--mode cdc``).

    The outbox's CDC shards (``migrate --cdc --cdc-shards S``, 1 by default) each have a slot
    and a publication filtered to the shard's rows; shards are leased like partitions, and this
    relay streams the slots of the shards it holds. Transactions read from a slot become batches
    claimed by id (``claim_ids``) that the relay's window publishes with every other batch,
    confirm by confirm; a slot's flush position advances only past transactions whose batches
    have all settled, in WAL order. The table path (retries, held-back events, rows committed
    while no slot streamed) claims the shards' rows from the table on the same window when a
    retry is due, when the WAL path held rows back, and every SAFETY_SWEEP_EVERY seconds.
    """

    def __init__(self, settings: RelaySettings) -> None:
        self._settings = settings
        self._streams: dict[int, SlotStream] = {}
        self._said_in_use: set[int] = set()
        self._stopping = asyncio.Event()
        self._nudged = asyncio.Event()
        self._draining_table = False  # a slot was created: sweep until the table is empty
        now = time.monotonic()
        self._next_sweep = now
        self._next_retry_check = now
        self._last_heartbeat = now
        self._turn = 0  # the shard whose transactions are claimed next

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self, store: OutboxStore, stopping: asyncio.Event) -> None:
        self._stopping = stopping
        self._next_sweep = time.monotonic()

    async def close(self) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            await stream.close()

    async def _follow(self, share: Share) -> None:
        """Stream exactly the slots of the shards this relay holds: a shard lost is closed at
        once (its next owner can open it only then), a shard gained is opened."""
        owned = set(share.partitions)
        for shard in [s for s in self._streams if s not in owned]:
            log.info("handing over replication slot %r", self._streams[shard].names.slot)
            await self._streams.pop(shard).close()
        for shard in sorted(owned - set(self._streams)):
            stream = SlotStream(self._settings, slot_names(self._settings, shard, share.count))
            try:
                created = await stream.open()
            except ReplicationPrivilegeError as exc:
                await stream.close()
                raise ReplicationPrivilegeError(
                    f"{exc}; --mode cdc needs a role with the REPLICATION attribute: "
                    "ALTER ROLE <role> REPLICATION"
                ) from exc
            except SlotInUseError as exc:
                # Its previous owner still streams it: it hands over once its batches settle.
                await stream.close()
                if shard not in self._said_in_use:
                    self._said_in_use.add(shard)
                    log.info(
                        "replication slot %r is in use by another process; waiting for it to be free "
                        "(%s)",
                        stream.names.slot,
                        exc,
                    )
                continue
            self._said_in_use.discard(shard)
            if created:
                log.warning(
                    "created replication slot %r: publishing rows committed before it from the "
                    "table first",
                    stream.names.slot,
                )
                self._next_sweep = time.monotonic()
                self._draining_table = True
            log.info(
                "streaming replication slot %r (publication %r)",
                stream.names.slot,
                stream.names.publication,
            )
            self._streams[shard] = stream

    # -- waiting --------------------------------------------------------------------------------

    def readable(self) -> Coroutine[Any, Any, None]:
        return self._read_until_ready()

    async def _read_until_ready(self) -> None:
        """Read the WAL until a transaction is ready (while batches are in flight)."""
        while not any(stream.pending for stream in self._streams.values()):
            readers = [stream.reader() for stream in self._streams.values()]
            if not readers:
                await asyncio.Event().wait()  # nothing streamed: only claiming tells
            await asyncio.wait(
                [asyncio.shield(r) for r in readers], return_when=asyncio.FIRST_COMPLETED
            )
            for stream in self._streams.values():
                stream.collect()

    async def wait(self, store: OutboxStore, seconds: float) -> None:
        """Idle: read the WAL for up to ``seconds``; keep the slots moving with the server's
        keepalives and our own heartbeats."""
        if self._nudged.is_set():  # a shard gained: its slot is opened by the next claim
            self._nudged.clear()
            return
        readers = [stream.reader(min(seconds, READ_TIMEOUT)) for stream in self._streams.values()]
        nudged = asyncio.ensure_future(self._nudged.wait())
        ended = asyncio.ensure_future(self._stopping.wait())
        try:
            waits: list[asyncio.Future[Any]] = [asyncio.shield(r) for r in readers]
            await asyncio.wait(
                [*waits, nudged, ended],
                timeout=seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            nudged.cancel()
            ended.cancel()
            await asyncio.gather(nudged, ended, return_exceptions=True)
        self._nudged.clear()
        for stream in self._streams.values():
            stream.collect()
            stream.confirm_idle()
        await self.housekeeping(store)

    # -- claiming -----------------------------------------------------------------------------

    async def claim(
        self, store: OutboxStore, limit: int, exclude: list[int], share: Share
    ) -> Batch | None:
        await self._follow(share)
        for stream in self._streams.values():
            stream.collect()
        now = time.monotonic()
        if any([stream.tracker.take_sweep_requested() for stream in self._streams.values()]):
            self._next_sweep = now  # dead retry made rows pending: the table holds them
        if now >= self._next_retry_check:
            self._next_retry_check = now + self._settings.poll_interval
            retry_in = await store.next_retry_in()
            if retry_in is not None and retry_in <= 0:
                self._next_sweep = now
        if now >= self._next_sweep and share.partitions:
            # The table path: retries, held-back rows, rows made pending without an insert.
            messages = await store.claim(limit, share, in_flight=exclude)
            if messages:
                # One claim per occasion: the rows after these are mostly the WAL's to bring
                # (reading them twice halves a backlog's speed), unless a new slot means the
                # table alone holds what came before it.
                if not self._draining_table:
                    self._next_sweep = now + SAFETY_SWEEP_EVERY
                return Batch(messages)
            self._draining_table = False
            self._next_sweep = now + SAFETY_SWEEP_EVERY
        shards = [s for s in sorted(self._streams) if self._streams[s].pending]
        if not shards:
            return None
        # Shards take turns, so one busy shard does not starve the others.
        shard = shards[self._turn % len(shards)]
        self._turn += 1
        return await self._claim_wal(store, self._streams[shard], limit, exclude, share)

    async def _claim_wal(
        self, store: OutboxStore, stream: SlotStream, limit: int, exclude: list[int], share: Share
    ) -> Batch | None:
        """The next transactions of one slot, claimed by id (at most ``limit`` rows; a bigger
        transaction spans batches, and only its last one carries its end position)."""
        taken = stream.take(limit)
        events = [item for item in taken.items if isinstance(item, WalEvent)]
        row_of = await store.materialize(events) if events else {}
        ids = [row_of[i.event_id] if isinstance(i, WalEvent) else i for i in taken.items]
        # A row the table path has in flight is already on its way.
        busy = set(exclude)
        ids = [id_ for id_ in ids if id_ not in busy]
        claimed = await store.claim_ids(ids, share) if ids else []
        if len(claimed) < len(ids):
            # A row not read is settled already, or not visible yet: the WAL can tell of a
            # commit a moment before the committing session makes it visible. Left out, it
            # would be published later, by the table path, after its aggregate's next events.
            await store.wait_visible(taken.xids)
            read = {message.id for message in claimed}
            claimed += await store.claim_ids([id_ for id_ in ids if id_ not in read], share)
        aggregates = sorted({m.aggregate_id for m in claimed if m.aggregate_id is not None})
        earliest = (
            await store.earliest_pending(aggregates, [*ids, *exclude], max(ids))
            if aggregates
            else {}
        )
        publishable = select_publishable(ids, claimed, earliest)
        if len(publishable) < len(claimed):
            self._next_sweep = time.monotonic()  # held-back rows: the table path goes next
        chosen = {message.id for message in publishable}
        held_back = [message for message in claimed if message.id not in chosen]
        batch = Batch(publishable, token=stream, held_back=held_back)
        stream.claimed(batch, taken.end)
        if not publishable:
            # Nothing to publish, but the transactions' position still settles in order.
            await store.commit()
            self.settled(batch)
            return None
        return batch

    def nudge(self) -> None:
        # Shards gained: rows their previous owner left to the table path are swept once.
        self._next_sweep = time.monotonic()
        self._nudged.set()

    def settled(self, batch: Batch) -> None:
        if batch.failures or batch.held:
            # Failed or held-back events stay pending: only the table path publishes them.
            self._next_sweep = time.monotonic()
        stream = batch.token
        if isinstance(stream, SlotStream):
            stream.settled(batch)

    async def housekeeping(self, store: OutboxStore) -> None:
        """Report progress to the server and, after --heartbeat-interval of outbox silence,
        send a heartbeat through the WAL so idle slots still get a position to confirm."""
        for stream in self._streams.values():
            await stream.report()
        if not self._streams:
            return
        now = time.monotonic()
        every = self._settings.heartbeat_interval
        quiet = min(now - stream.last_activity for stream in self._streams.values())
        if quiet >= every and now - self._last_heartbeat >= every:
            await store.heartbeat(HEARTBEAT_PREFIX)
            self._last_heartbeat = now
