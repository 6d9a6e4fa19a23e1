"""pgoutput / replication framing decoder, on bytes captured from a real PostgreSQL 15.

The samples (tests/unit/pgoutput_samples.py) come from capture_pgoutput_samples() in
tests/integration/test_replication_stream.py; the rows written there are spelled out here.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest

from outbox_relay.cdc.pgoutput import (
    PG_EPOCH,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    PgOutputDecodeError,
    PgOutputMessage,
    PrimaryKeepalive,
    Relation,
    RelationColumn,
    Truncate,
    TupleValue,
    Type,
    Update,
    ValueKind,
    XLogData,
    decode_copy_data,
    decode_message,
    encode_standby_status_update,
    format_lsn,
    insert_to_dict,
    parse_lsn,
    pg_timestamp_to_datetime,
    tuple_to_dict,
)
from tests.unit.pgoutput_samples import (
    KEEPALIVE,
    MESSAGE_LSN,
    MOOD_OID,
    NONTX_MESSAGE_LSN,
    OUTBOX_FRAMES,
    OUTBOX_OID,
    OUTBOX_XIDS,
    SIDE_FRAMES,
    SIDE_OID,
    SIDE_XIDS,
)

INT8, TEXT, UUID, JSONB, TIMESTAMPTZ, INT4 = 20, 25, 2950, 3802, 1184, 23

OUTBOX_COLUMNS = (
    RelationColumn(1, "id", INT8, -1),
    RelationColumn(0, "event_id", UUID, -1),
    RelationColumn(0, "event_type", TEXT, -1),
    RelationColumn(0, "aggregate_type", TEXT, -1),
    RelationColumn(0, "aggregate_id", TEXT, -1),
    RelationColumn(0, "payload", JSONB, -1),
    RelationColumn(0, "headers", JSONB, -1),
    RelationColumn(0, "created_at", TIMESTAMPTZ, -1),
    RelationColumn(0, "note", TEXT, -1),
)

# What the server's output functions made of the rows inserted by the capture (jsonb is
# normalized: keys reordered, spacing fixed; timestamptz rendered in UTC).
EXPECTED_ROWS = [
    {
        "id": "1",
        "event_id": "0b6c3f4e-2f59-4a8e-9a57-1d3f0c6e5a01",
        "event_type": "order.created",
        "aggregate_type": "order",
        "aggregate_id": "A-1",
        "payload": '{"ok": true, "items": [1, 2], "amount": 12.50}',
        "headers": '{"trace": "abc"}',
        "created_at": "2024-05-06 07:08:09.123456+00",
        "note": None,
    },
    {
        "id": "2",
        "event_id": "7d1e9c2a-5b4f-4c3d-8e2f-6a0b9c8d7e02",
        "event_type": "greeting.sent",
        "aggregate_type": None,
        "aggregate_id": None,
        "payload": '{"text": "Grüße, 日本語 🎉", "quote": "a\\"b"}',
        "headers": None,
        "created_at": "2024-12-31 21:59:59+00",
        "note": None,
    },
    {
        "id": "3",
        "event_id": "c3a2b1d0-9e8f-4a7b-b6c5-d4e3f2a1b003",
        "event_type": "blob.stored",
        "aggregate_type": "blob",
        "aggregate_id": "B-3",
        "payload": '{"blob": "' + "outbox-é-" * 400 + '"}',
        "headers": "{}",
        "created_at": "2025-01-02 03:04:05.000001+00",
        "note": None,
    },
]


def decode_frames(frames: tuple[bytes, ...]) -> list[PgOutputMessage]:
    messages = []
    for raw in frames:
        frame = decode_copy_data(raw)
        assert isinstance(frame, XLogData)
        messages.append(decode_message(frame.payload))
    return messages


T = TypeVar("T")

OUTBOX = decode_frames(OUTBOX_FRAMES)
SIDE = decode_frames(SIDE_FRAMES)


def of_type(messages: list[PgOutputMessage], kind: type[T]) -> list[T]:
    return [m for m in messages if isinstance(m, kind)]


# ------------------------------------------------------------------------------ real samples


def test_outbox_stream_message_order() -> None:
    assert [type(m) for m in OUTBOX] == [
        *(Begin, Relation, Insert, Insert, Commit),  # two rows, one transaction
        *(Begin, Insert, Commit),  # TOASTed row: Relation is sent once per session
        *(Begin, LogicalMessage, Commit),  # pg_logical_emit_message(true, ...)
        LogicalMessage,  # pg_logical_emit_message(false, ...): outside any transaction
    ]


def test_relation_describes_the_outbox_table() -> None:
    (relation,) = of_type(OUTBOX, Relation)
    assert relation == Relation(OUTBOX_OID, "public", "outbox", "d", OUTBOX_COLUMNS)
    assert [c.name for c in relation.columns if c.is_key] == ["id"]


def test_inserts_decode_to_exact_text_values() -> None:
    (relation,) = of_type(OUTBOX, Relation)
    inserts = of_type(OUTBOX, Insert)
    assert {i.relation_oid for i in inserts} == {OUTBOX_OID}
    assert [insert_to_dict(relation, i) for i in inserts] == EXPECTED_ROWS


def test_toasted_payload_arrives_whole_in_the_insert() -> None:
    (relation,) = of_type(OUTBOX, Relation)
    big = of_type(OUTBOX, Insert)[2]
    payload = big.new_tuple[[c.name for c in relation.columns].index("payload")]
    assert payload.kind is ValueKind.TEXT
    assert payload.data is not None
    assert len(payload.data) > 2048
    assert payload.data.decode() == EXPECTED_ROWS[2]["payload"]


def test_null_columns_are_null_values() -> None:
    second = of_type(OUTBOX, Insert)[1]
    kinds = [v.kind for v in second.new_tuple]
    assert kinds.count(ValueKind.NULL) == 4  # aggregate_type, aggregate_id, headers, note
    assert TupleValue(ValueKind.NULL) in second.new_tuple


def test_begin_and_commit_frame_each_transaction() -> None:
    begins, commits = of_type(OUTBOX, Begin), of_type(OUTBOX, Commit)
    assert [b.xid for b in begins] == [*OUTBOX_XIDS, begins[2].xid]
    for begin, commit in zip(begins, commits, strict=True):
        # Begin announces the LSN of the commit record, and the commit time.
        assert begin.final_lsn == commit.commit_lsn
        assert commit.end_lsn > commit.commit_lsn
        assert begin.commit_ts == commit.commit_ts
        assert commit.commit_ts.tzinfo is UTC
        assert commit.flags == 0
    assert commits[0].end_lsn < commits[1].end_lsn < commits[2].end_lsn
    assert commits[0].commit_ts <= commits[1].commit_ts <= commits[2].commit_ts


def test_logical_messages() -> None:
    tx, nontx = of_type(OUTBOX, LogicalMessage)
    assert tx == LogicalMessage(True, parse_lsn(MESSAGE_LSN), "outbox", b'{"wakeup": 1}')
    assert nontx == LogicalMessage(False, parse_lsn(NONTX_MESSAGE_LSN), "outbox", b"ping")


def test_xlogdata_header() -> None:
    frames = [decode_copy_data(raw) for raw in OUTBOX_FRAMES]
    assert all(isinstance(f, XLogData) for f in frames)
    begin_frame, relation_frame = frames[0], frames[1]
    assert isinstance(begin_frame, XLogData)
    assert isinstance(relation_frame, XLogData)
    assert begin_frame.wal_start == begin_frame.wal_end > 0
    assert begin_frame.send_time.tzinfo is UTC
    assert begin_frame.send_time > datetime(2024, 1, 1, tzinfo=UTC)
    # pgoutput writes Relation (and Type) messages with no WAL position: never use an
    # XLogData's wal_start as progress, use Commit.end_lsn.
    assert relation_frame.wal_start == relation_frame.wal_end == 0


def test_keepalive() -> None:
    keepalive = decode_copy_data(KEEPALIVE)
    assert isinstance(keepalive, PrimaryKeepalive)
    assert keepalive.wal_end > 0
    assert keepalive.reply_requested is False
    assert keepalive.send_time.tzinfo is UTC


def test_skippable_messages_from_full_publication() -> None:
    types = of_type(SIDE, Type)
    assert set(types) == {Type(MOOD_OID, "public", "mood")}
    relation = of_type(SIDE, Relation)[0]
    assert relation == Relation(
        SIDE_OID,
        "public",
        "side",
        "f",  # REPLICA IDENTITY FULL: every column is part of the key
        (
            RelationColumn(1, "id", INT4, -1),
            RelationColumn(1, "label", TEXT, -1),
            RelationColumn(1, "feeling", MOOD_OID, -1),
        ),
    )
    assert [b.xid for b in of_type(SIDE, Begin)][-4:] == SIDE_XIDS

    def text(*values: str) -> tuple[TupleValue, ...]:
        return tuple(TupleValue(ValueKind.TEXT, v.encode()) for v in values)

    assert of_type(SIDE, Insert) == [Insert(SIDE_OID, text("1", "one", "happy"))]
    assert of_type(SIDE, Update) == [
        Update(SIDE_OID, "O", text("1", "one", "happy"), text("1", "uno", "happy"))
    ]
    assert of_type(SIDE, Delete) == [Delete(SIDE_OID, "O", text("1", "uno", "happy"))]
    assert of_type(SIDE, Truncate) == [Truncate(0, (SIDE_OID,))]


# ------------------------------------------------------------------------------ row helpers


def test_tuple_to_dict_rejects_values_without_text() -> None:
    relation = Relation(1, "public", "t", "d", (RelationColumn(0, "a", TEXT, -1),))
    for value in (TupleValue(ValueKind.UNCHANGED_TOAST), TupleValue(ValueKind.BINARY, b"\x01")):
        with pytest.raises(PgOutputDecodeError, match="no text value"):
            tuple_to_dict(relation, (value,))
    with pytest.raises(PgOutputDecodeError, match="not valid UTF-8"):
        tuple_to_dict(relation, (TupleValue(ValueKind.TEXT, b"\xff"),))
    with pytest.raises(PgOutputDecodeError, match="tuple has 2 columns"):
        tuple_to_dict(relation, (TupleValue(ValueKind.NULL), TupleValue(ValueKind.NULL)))


def test_insert_to_dict_checks_the_relation() -> None:
    (relation,) = of_type(OUTBOX, Relation)
    insert = of_type(OUTBOX, Insert)[0]
    other = Relation(relation.oid + 1, "public", "x", "d", relation.columns)
    with pytest.raises(PgOutputDecodeError, match="relation oid"):
        insert_to_dict(other, insert)


# ------------------------------------------------------------------------------ malformed input


@pytest.mark.parametrize("raw", OUTBOX_FRAMES + SIDE_FRAMES)
def test_every_truncation_of_a_real_message_is_rejected(raw: bytes) -> None:
    frame = decode_copy_data(raw)
    assert isinstance(frame, XLogData)
    payload = frame.payload
    for size in range(len(payload)):
        with pytest.raises(PgOutputDecodeError):
            decode_message(payload[:size])
    with pytest.raises(PgOutputDecodeError, match="trailing"):
        decode_message(payload + b"\x00")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"Z\x00\x00", "unknown pgoutput message type 'Z'"),
        (b"S" + b"\x00" * 8, "unknown pgoutput message type 'S'"),  # stream start: proto >= 2
        (b"I\x00\x00\x00\x01X\x00\x00", "tuple marker"),
        (b"I\x00\x00\x00\x01N\x00\x01x", "unknown TupleData column kind 'x'"),
        (b"I\x00\x00\x00\x01N\x00\x01t\xff\xff\xff\xff", "negative value length"),
        (b"I\x00\x00\x00\x01N\xff\xff", "negative column count"),
        (b"D\x00\x00\x00\x01N\x00\x00", "tuple marker"),
        (b"T\xff\xff\xff\xff\x00", "negative relation count"),
        (b"M\x01" + b"\x00" * 8 + b"p\x00\xff\xff\xff\xff", "negative content length"),
        (b"Y\x00\x00\x00\x01\xff\x00x\x00", "invalid UTF-8"),
        (b"B" + b"\x00" * 8 + b"\x7f" + b"\xff" * 7 + b"\x00" * 4, "timestamp out of range"),
    ],
)
def test_malformed_messages(data: bytes, match: str) -> None:
    with pytest.raises(PgOutputDecodeError, match=match):
        decode_message(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty CopyData"),
        (b"x\x00", "unknown CopyData message type 'x'"),
        (OUTBOX_FRAMES[0][:24], "truncated XLogData"),
        (KEEPALIVE[:-1], "truncated keepalive"),
        (KEEPALIVE + b"\x00", "trailing"),
    ],
)
def test_malformed_copy_data(data: bytes, match: str) -> None:
    with pytest.raises(PgOutputDecodeError, match=match):
        decode_copy_data(data)


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(PgOutputDecodeError, ValueError)


# ------------------------------------------------------------------------------ framing helpers


def test_standby_status_update_layout() -> None:
    sent = datetime(2000, 1, 1, 0, 0, 1, 500, tzinfo=UTC)
    data = encode_standby_status_update(1, 2, 3, reply_requested=True, send_time=sent)
    assert data == b"r" + struct.pack(">QQQqB", 1, 2, 3, 1_000_500, 1)
    assert len(encode_standby_status_update(0, 0, 0)) == 34
    assert encode_standby_status_update(5, 5, 5)[-1] == 0  # no reply by default


def test_standby_status_update_uses_current_time() -> None:
    before = datetime.now(UTC)
    data = encode_standby_status_update(0, 0, 0)
    (micros,) = struct.unpack(">q", data[25:33])
    assert before <= pg_timestamp_to_datetime(micros) <= datetime.now(UTC)


@pytest.mark.parametrize(("written", "flushed"), [(-1, 0), (0, 2**64)])
def test_standby_status_update_rejects_bad_lsn(written: int, flushed: int) -> None:
    with pytest.raises(ValueError, match="LSN out of range"):
        encode_standby_status_update(written, flushed, 0)


def test_standby_status_update_rejects_naive_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        encode_standby_status_update(0, 0, 0, send_time=datetime(2024, 1, 1))


def test_timestamps() -> None:
    assert pg_timestamp_to_datetime(0) == PG_EPOCH == datetime(2000, 1, 1, tzinfo=UTC)
    assert pg_timestamp_to_datetime(-1) == PG_EPOCH - timedelta(microseconds=1)
    assert pg_timestamp_to_datetime(86_400_000_001) == datetime(2000, 1, 2, 0, 0, 0, 1, tzinfo=UTC)
    with pytest.raises(PgOutputDecodeError, match="out of range"):
        pg_timestamp_to_datetime(2**63 - 1)


@pytest.mark.parametrize(
    ("text", "lsn"),
    [
        ("0/0", 0),
        ("0/16B3748", 0x16B3748),
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
    ],
)
def test_lsn_round_trip(text: str, lsn: int) -> None:
    assert parse_lsn(text) == lsn
    assert format_lsn(lsn) == text  # same spelling as PostgreSQL's pg_lsn output


def test_parse_lsn_is_case_insensitive() -> None:
    assert parse_lsn("16/b374d848") == parse_lsn("16/B374D848")


@pytest.mark.parametrize("text", ["", "0", "1/2/3", "G/0", "123456789/0", "0/-1", "0x1/0"])
def test_parse_lsn_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not an LSN"):
        parse_lsn(text)


@pytest.mark.parametrize("lsn", [-1, 2**64])
def test_format_lsn_rejects_out_of_range(lsn: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        format_lsn(lsn)
