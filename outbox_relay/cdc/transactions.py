"""Decoded WAL frames into committed transactions, and which of their rows CDC may publish now.

Pure logic, no I/O: fed by outbox_relay.cdc.stream, used by outbox_relay.cdc.source.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from outbox_relay.cdc.pgoutput import (
    Begin,
    Commit,
    Insert,
    LogicalMessage,
    PgOutputMessage,
    PrimaryKeepalive,
    Relation,
    ReplicationFrame,
)
from outbox_relay.cdc.wal_events import WalEvent, default_prefix, parse_wal_event, sweep_prefix
from outbox_relay.errors import InvalidEventError
from outbox_relay.messages import OutboxMessage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WalTransaction:
    """One committed transaction: the outbox ids it inserted and the events it wrote straight
    to the WAL, in WAL order."""

    end_lsn: int
    ids: tuple[int | WalEvent, ...]
    xid: int  # the transaction's (32-bit) id: when its rows are visible (slot_stream.py)


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
    # Rows were made pending without an insert (dead retry): the table path should run now.
    sweep_requested: bool = False
    _current: list[int | WalEvent] = field(default_factory=list)
    _committed_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    _xid: int = 0
    _id_column: dict[int, int] = field(default_factory=dict)  # outbox relation oid -> index

    def feed(self, frame: ReplicationFrame, message: PgOutputMessage | None) -> None:
        if isinstance(message, Insert):  # first: nearly every frame of a busy stream
            index = self._id_column.get(message.relation_oid)
            if index is not None:
                value = message.new_tuple[index].data
                if value is not None:
                    self._current.append(int(value))
            return
        if isinstance(frame, PrimaryKeepalive):
            if not self.in_transaction:
                self.idle_lsn = max(self.idle_lsn, frame.wal_end)
            self.reply_requested = self.reply_requested or frame.reply_requested
            return
        if isinstance(message, Begin):
            self.in_transaction = True
            self._current = []
            self._committed_at = message.commit_ts
            self._xid = message.xid
        elif isinstance(message, Relation):
            self._relation(message)
        elif isinstance(message, Commit):
            self.ready.append(WalTransaction(message.end_lsn, tuple(self._current), self._xid))
            self._current = []
            self.in_transaction = False
        elif isinstance(message, LogicalMessage):
            self._logical_message(message)

    def _logical_message(self, message: LogicalMessage) -> None:
        if not message.transactional:
            if not self.in_transaction:
                self.idle_lsn = max(self.idle_lsn, message.lsn)
            return
        if message.prefix == sweep_prefix(self.schema):
            self.sweep_requested = True
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

    def take_sweep_requested(self) -> bool:
        requested, self.sweep_requested = self.sweep_requested, False
        return requested

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
