"""The pure parts of the CDC source: frames -> committed transactions and the safe position to
confirm; which claimed rows may be published now and which wait for the table path."""

from __future__ import annotations

from datetime import UTC, datetime

from outbox_relay.cdc.pgoutput import (
    Begin,
    Commit,
    Insert,
    LogicalMessage,
    PrimaryKeepalive,
    Relation,
    RelationColumn,
    TupleValue,
    ValueKind,
    XLogData,
)
from outbox_relay.cdc.slot_stream import SlotNames, SlotStream, Taken
from outbox_relay.cdc.transactions import TransactionTracker, WalTransaction, select_publishable
from outbox_relay.cdc.wal_events import WalEvent
from outbox_relay.messages import OutboxMessage
from outbox_relay.relay.settings import RelaySettings

NOW = datetime(2025, 1, 1, tzinfo=UTC)
OUTBOX, OTHER = 16384, 16400


def relation(oid: int, namespace: str, name: str) -> Relation:
    columns = tuple(RelationColumn(0, c, 25, -1) for c in ("event_id", "id", "payload"))
    return Relation(oid, namespace, name, "d", columns)


def insert(oid: int, id_: int) -> Insert:
    text = TupleValue(ValueKind.TEXT, b"x")
    return Insert(oid, (text, TupleValue(ValueKind.TEXT, str(id_).encode()), text))


def feed(tracker: TransactionTracker, *messages: object) -> None:
    for message in messages:
        if isinstance(message, PrimaryKeepalive):
            tracker.feed(message, None)
        else:
            tracker.feed(XLogData(0, 0, NOW, b""), message)  # type: ignore[arg-type]  # decoded messages of any kind


def txn(final: int, *body: object, end: int | None = None) -> list[object]:
    return [Begin(final, NOW, 7), *body, Commit(0, final, end or final + 8, NOW)]


def test_commits_become_transactions_with_the_outbox_ids_of_the_schema_only() -> None:
    tracker = TransactionTracker("public")
    feed(
        tracker,
        relation(OUTBOX, "public", "outbox"),
        relation(OTHER, "billing", "outbox"),
        *txn(100, insert(OUTBOX, 5), insert(OTHER, 99), insert(OUTBOX, 3)),
        *txn(200, insert(OTHER, 1)),
    )

    assert tracker.take_ready() == [WalTransaction(108, (5, 3), 7), WalTransaction(208, (), 7)]
    assert tracker.ready == []
    assert tracker.ready_ids == 0


def test_positions_seen_inside_a_transaction_are_never_confirmable() -> None:
    tracker = TransactionTracker("public")
    feed(tracker, relation(OUTBOX, "public", "outbox"), Begin(500, NOW, 1), insert(OUTBOX, 1))
    feed(tracker, PrimaryKeepalive(900, NOW, reply_requested=True))
    feed(tracker, LogicalMessage(False, 950, "outbox_relay_heartbeat", b""))

    assert tracker.idle_lsn == 0
    assert tracker.take_reply_requested() is True
    assert tracker.take_reply_requested() is False

    feed(tracker, Commit(0, 500, 508, NOW), PrimaryKeepalive(600, NOW, reply_requested=False))
    feed(tracker, LogicalMessage(False, 700, "outbox_relay_heartbeat", b""))
    assert tracker.idle_lsn == 700
    assert tracker.ready_ids == 1


def test_a_relation_redefined_without_outbox_stops_matching() -> None:
    tracker = TransactionTracker("public")
    feed(tracker, relation(OUTBOX, "public", "outbox"), relation(OUTBOX, "public", "renamed"))
    feed(tracker, *txn(10, insert(OUTBOX, 1)))
    assert tracker.take_ready() == [WalTransaction(18, (), 7)]


def message(id_: int, aggregate: str | None, attempts: int = 0) -> OutboxMessage:
    return OutboxMessage(
        id=id_,
        event_id=f"e{id_}",
        event_type="order.created",
        aggregate_type=None,
        aggregate_id=aggregate,
        payload=b"{}",
        headers={},
        created_at=NOW,
        attempts=attempts,
    )


def ids_of(messages: list[OutboxMessage]) -> list[int]:
    return [m.id for m in messages]


def test_publishable_rows_keep_wal_order_and_skip_rows_no_longer_pending() -> None:
    claimed = [message(1, "a"), message(2, "b"), message(4, None)]
    # WAL (commit) order differs from id order; 3 was already published by the table path.
    assert ids_of(select_publishable([2, 3, 1, 4], claimed, {})) == [2, 1, 4]


def test_an_earlier_pending_event_outside_the_batch_holds_back_its_aggregate() -> None:
    claimed = [message(5, "a"), message(6, "b"), message(7, "a")]
    assert ids_of(select_publishable([5, 6, 7], claimed, {"a": 2})) == [6]


def test_a_retried_row_belongs_to_the_table_path_and_holds_later_ones() -> None:
    claimed = [message(5, "a", attempts=1), message(6, "a"), message(7, None, attempts=2)]
    assert select_publishable([5, 6, 7], claimed, {}) == []


def test_a_pending_event_with_a_larger_id_does_not_hold_back() -> None:
    assert ids_of(select_publishable([5], [message(5, "a")], {"a": 9})) == [5]


def test_events_written_to_the_wal_join_their_transaction_in_order() -> None:
    tracker = TransactionTracker("public")
    event = b'{"event_type": "order.paid", "payload": {"n": 2}}'
    feed(
        tracker,
        relation(OUTBOX, "public", "outbox"),
        *txn(
            300,
            insert(OUTBOX, 1),
            LogicalMessage(True, 310, "outbox_relay.public", event),
            LogicalMessage(True, 320, "outbox_relay.billing", event),  # another schema's
            LogicalMessage(True, 330, "outbox_relay.public", b"broken"),  # logged, skipped
        ),
    )

    (done,) = tracker.take_ready()
    first, second = done.ids
    assert first == 1
    assert isinstance(second, WalEvent)
    assert (second.event_type, second.payload, second.created_at) == ("order.paid", '{"n": 2}', NOW)


def test_batches_taken_from_a_slot_name_the_transactions_their_rows_come_from() -> None:
    # The relay waits for exactly these transactions to be visible before reading their rows.
    settings = RelaySettings(database_url="postgresql://localhost/app", mode="cdc")
    stream = SlotStream(settings, SlotNames("slot", "publication", 0, 1))
    stream.enqueue([WalTransaction(108, (1, 2, 3), 70), WalTransaction(208, (4,), 71)])
    stream.enqueue([WalTransaction(308, (5,), 72)])

    assert stream.take(2) == Taken([1, 2], None, frozenset({70}))
    assert stream.take(2) == Taken([3, 4], 208, frozenset({70, 71}))
    assert stream.take(2) == Taken([5], 308, frozenset({72}))
    assert not stream.pending
