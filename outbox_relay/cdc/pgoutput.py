"""Decoder for PostgreSQL logical replication: the ``pgoutput`` plugin, protocol version 1.

Two layers are covered:

* the streaming-replication CopyData framing (``'w'`` XLogData, ``'k'`` primary keepalive, and
  the ``'r'`` standby status update we send back), see "Streaming Replication Protocol";
* the ``pgoutput`` messages carried in an XLogData payload, see "Logical Replication Message
  Formats" in the PostgreSQL docs.

Only what protocol version 1 can send is decoded (no streamed/two-phase transactions). Messages
the relay does not act on (Update, Delete, Truncate, Origin, Type) are still fully parsed into
their own dataclasses, so a malformed one is reported instead of silently skipped.

All integers on the wire are big-endian. LSNs are unsigned 64-bit, timestamps are signed 64-bit
microseconds since 2000-01-01 00:00:00 UTC.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

__all__ = [
    "PG_EPOCH",
    "Begin",
    "Commit",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Origin",
    "PgOutputDecodeError",
    "PgOutputMessage",
    "PrimaryKeepalive",
    "Relation",
    "RelationColumn",
    "ReplicationFrame",
    "Truncate",
    "TupleValue",
    "Type",
    "Update",
    "ValueKind",
    "XLogData",
    "decode_copy_data",
    "decode_message",
    "encode_standby_status_update",
    "format_lsn",
    "insert_to_dict",
    "parse_lsn",
    "pg_timestamp_to_datetime",
    "tuple_to_dict",
]

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

_MAX_LSN = 2**64 - 1
_LSN_RE = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")

_U8 = struct.Struct(">B")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")
_STATUS_UPDATE = struct.Struct(">cQQQqB")
_XLOG_HEADER = struct.Struct(">QQq")  # XLogData: WAL start, WAL end, send time


class PgOutputDecodeError(ValueError):
    """The bytes are not a well-formed replication / pgoutput v1 message."""


# --------------------------------------------------------------------------------------------
# LSN and timestamp helpers


def format_lsn(lsn: int) -> str:
    """Format an LSN the way PostgreSQL prints ``pg_lsn`` (``%X/%X``, e.g. ``0/16B3748``).

    No zero padding, so the result compares equal to ``pg_replication_slots.*_lsn::text``.
    """
    if not 0 <= lsn <= _MAX_LSN:
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """Parse ``'16/B374D848'`` into the 64-bit LSN; raises ValueError if malformed."""
    match = _LSN_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def pg_timestamp_to_datetime(micros: int) -> datetime:
    """Convert PostgreSQL epoch microseconds into an aware UTC datetime."""
    try:
        return PG_EPOCH + timedelta(microseconds=micros)
    except OverflowError as exc:
        raise PgOutputDecodeError(f"timestamp out of range: {micros}") from exc


def _datetime_to_pg_timestamp(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("send_time must be timezone-aware")
    # Integer arithmetic on the timedelta keeps microsecond precision (no float rounding).
    delta = moment - PG_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


# --------------------------------------------------------------------------------------------
# Byte reader


class _Reader:
    """Cursor over one message; every read is bounds-checked so truncation is always reported."""

    __slots__ = ("_data", "_kind", "_pos")

    def __init__(self, data: bytes, pos: int, kind: str) -> None:
        self._data = data
        self._pos = pos
        self._kind = kind

    def _take(self, size: int) -> int:
        start = self._pos
        if size < 0 or start + size > len(self._data):
            raise PgOutputDecodeError(
                f"truncated {self._kind} message: need {size} bytes at offset {start}, "
                f"have {len(self._data) - start}"
            )
        self._pos = start + size
        return start

    def _unpack(self, fmt: struct.Struct) -> int:
        value: int = fmt.unpack_from(self._data, self._take(fmt.size))[0]
        return value

    def u8(self) -> int:
        return self._unpack(_U8)

    def i16(self) -> int:
        return self._unpack(_I16)

    def i32(self) -> int:
        return self._unpack(_I32)

    def u32(self) -> int:
        return self._unpack(_U32)

    def i64(self) -> int:
        return self._unpack(_I64)

    def u64(self) -> int:
        return self._unpack(_U64)

    def char(self) -> str:
        return chr(self.u8())

    def raw(self, size: int) -> bytes:
        start = self._take(size)
        return self._data[start : start + size]

    def rest(self) -> bytes:
        return self.raw(len(self._data) - self._pos)

    def cstring(self) -> str:
        end = self._data.find(b"\x00", self._pos)
        if end < 0:
            raise PgOutputDecodeError(
                f"truncated {self._kind} message: unterminated string at offset {self._pos}"
            )
        raw = self._data[self._pos : end]
        self._pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PgOutputDecodeError(f"invalid UTF-8 string in {self._kind} message") from exc

    def timestamp(self) -> datetime:
        return pg_timestamp_to_datetime(self.i64())

    def end(self) -> None:
        # Protocol v1 messages have a fixed layout: leftovers mean we misparsed or got garbage.
        extra = len(self._data) - self._pos
        if extra:
            raise PgOutputDecodeError(f"{extra} unexpected trailing bytes in {self._kind} message")


# --------------------------------------------------------------------------------------------
# CopyData framing of the replication stream


@dataclass(frozen=True, slots=True)
class XLogData:
    """``'w'``: a chunk of WAL data; for logical replication, one pgoutput message."""

    wal_start: int
    wal_end: int
    send_time: datetime
    payload: bytes


@dataclass(frozen=True, slots=True)
class PrimaryKeepalive:
    """``'k'``: server heartbeat; if ``reply_requested`` answer soon or be disconnected."""

    wal_end: int
    send_time: datetime
    reply_requested: bool


ReplicationFrame = XLogData | PrimaryKeepalive


def decode_copy_data(data: bytes) -> ReplicationFrame:
    """Decode one CopyData payload received after ``START_REPLICATION``."""
    if not data:
        raise PgOutputDecodeError("empty CopyData message")
    tag = chr(data[0])
    if tag == "w":
        if len(data) >= _XLOG_HEADER.size + 1:  # one frame per streamed row: a single unpack
            wal_start, wal_end, micros = _XLOG_HEADER.unpack_from(data, 1)
            return XLogData(
                wal_start, wal_end, pg_timestamp_to_datetime(micros), data[_XLOG_HEADER.size + 1 :]
            )
        reader = _Reader(data, 1, "XLogData")
        return XLogData(
            wal_start=reader.u64(),
            wal_end=reader.u64(),
            send_time=reader.timestamp(),
            payload=reader.rest(),
        )
    if tag == "k":
        reader = _Reader(data, 1, "keepalive")
        keepalive = PrimaryKeepalive(
            wal_end=reader.u64(), send_time=reader.timestamp(), reply_requested=bool(reader.u8())
        )
        reader.end()
        return keepalive
    raise PgOutputDecodeError(f"unknown CopyData message type {tag!r}")


def encode_standby_status_update(
    written: int,
    flushed: int,
    applied: int,
    reply_requested: bool = False,
    *,
    send_time: datetime | None = None,
) -> bytes:
    """Build the ``'r'`` standby status update.

    For logical slots the server only uses ``flushed`` to advance ``confirmed_flush_lsn`` (WAL
    before it may be recycled), so only report what is durably handled downstream.
    """
    for name, lsn in (("written", written), ("flushed", flushed), ("applied", applied)):
        if not 0 <= lsn <= _MAX_LSN:
            raise ValueError(f"{name} LSN out of range: {lsn}")
    moment = datetime.now(UTC) if send_time is None else send_time
    return _STATUS_UPDATE.pack(
        b"r", written, flushed, applied, _datetime_to_pg_timestamp(moment), int(reply_requested)
    )


# --------------------------------------------------------------------------------------------
# pgoutput messages


class ValueKind(enum.StrEnum):
    """How one column is represented in TupleData."""

    NULL = "n"
    UNCHANGED_TOAST = "u"  # only in Update/Delete old/new tuples: value not sent
    TEXT = "t"  # type output function's text form
    BINARY = "b"  # only with the 'binary' START_REPLICATION option (PostgreSQL 14+)


class TupleValue(NamedTuple):
    # A named tuple rather than a frozen dataclass: made for every column of every streamed row,
    # and a frozen dataclass's __init__ costs several times more.
    kind: ValueKind
    data: bytes | None = None  # set for TEXT and BINARY only


@dataclass(frozen=True, slots=True)
class RelationColumn:
    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        """The column is part of the replica identity (flag bit 1)."""
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_ts: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Relation:
    """Schema of a table; sent before its first change in each session (and after DDL).

    ``namespace`` is ``""`` for pg_catalog, as the server sends it.
    ``replica_identity`` is one of ``d`` (default), ``n`` (nothing), ``f`` (full), ``i`` (index).
    """

    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[RelationColumn, ...]


@dataclass(frozen=True, slots=True)
class Type:
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation_oid: int
    new_tuple: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Update:
    relation_oid: int
    # 'K' (key columns only) or 'O' (whole old row) when the replica identity sends one.
    old_kind: str | None
    old_tuple: tuple[TupleValue, ...] | None
    new_tuple: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    relation_oid: int
    old_kind: str  # 'K' or 'O'
    old_tuple: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Truncate:
    options: int  # bit 1: CASCADE, bit 2: RESTART IDENTITY
    relation_oids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """``'M'``: from ``pg_logical_emit_message``; needs ``messages 'true'`` when starting."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgOutputMessage = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | LogicalMessage
)


def _read_tuple(reader: _Reader) -> tuple[TupleValue, ...]:
    # Every streamed outbox insert comes through here (its id alone with the relay's own
    # publication, every column with one of the whole table): the loop reads the buffer
    # directly rather than through _Reader's bounds-checked calls (a 13-column frame decodes in
    # half the time), and leaves a failed bound to _Reader._take, which words the error.
    count = reader.i16()
    if count < 0:
        raise PgOutputDecodeError(f"negative column count {count} in TupleData")
    data, pos = reader._data, reader._pos
    end = len(data)
    values: list[TupleValue] = []
    append = values.append
    for _ in range(count):
        if pos >= end:
            break
        kind = data[pos]
        value_kind = _VALUE_KINDS.get(kind)
        if value_kind is not None:
            if pos + 5 > end:
                break
            size = _I32.unpack_from(data, pos + 1)[0]
            if size < 0:
                raise PgOutputDecodeError(f"negative value length {size} in TupleData")
            start = pos + 5
            pos = start + size
            if pos > end:
                pos = start - 5
                break
            append(_new_tuple(TupleValue, (value_kind, data[start:pos])))
        elif kind == _NULL_MARK:
            append(_NULL)
            pos += 1
        elif kind == _UNCHANGED_MARK:
            append(_UNCHANGED)
            pos += 1
        else:
            raise PgOutputDecodeError(f"unknown TupleData column kind {chr(kind)!r}")
    else:
        reader._pos = pos
        return tuple(values)
    # Truncated at ``pos``: re-read the column with the checked calls to report it.
    reader._pos = pos
    reader.u8()  # raises when nothing is left
    reader._take(reader.i32())  # raises: the length or the value is cut short
    raise AssertionError("unreachable: the column above is truncated")


_TEXT, _BINARY, _NULL_MARK, _UNCHANGED_MARK = b"tbnu"
# TupleValue's own __new__ is a Python function around this one: half the cost of a value.
_new_tuple = tuple.__new__
_NULL = TupleValue(ValueKind.NULL)
# A dict lookup: calling the enum costs more than the rest of reading a value.
_VALUE_KINDS = {_TEXT: ValueKind.TEXT, _BINARY: ValueKind.BINARY}
_UNCHANGED = TupleValue(ValueKind.UNCHANGED_TOAST)


def _decode_begin(r: _Reader) -> Begin:
    return Begin(final_lsn=r.u64(), commit_ts=r.timestamp(), xid=r.u32())


def _decode_commit(r: _Reader) -> Commit:
    return Commit(flags=r.u8(), commit_lsn=r.u64(), end_lsn=r.u64(), commit_ts=r.timestamp())


def _decode_origin(r: _Reader) -> Origin:
    return Origin(commit_lsn=r.u64(), name=r.cstring())


def _decode_relation(r: _Reader) -> Relation:
    oid, namespace, name, identity = r.u32(), r.cstring(), r.cstring(), r.char()
    count = r.i16()
    if count < 0:
        raise PgOutputDecodeError(f"negative column count {count} in Relation")
    columns = tuple(
        RelationColumn(flags=r.u8(), name=r.cstring(), type_oid=r.u32(), type_modifier=r.i32())
        for _ in range(count)
    )
    return Relation(oid, namespace, name, identity, columns)


def _decode_type(r: _Reader) -> Type:
    return Type(oid=r.u32(), namespace=r.cstring(), name=r.cstring())


def _expect(r: _Reader, allowed: str) -> str:
    marker = r.char()
    if marker not in allowed:
        raise PgOutputDecodeError(f"expected one of {allowed!r} in tuple marker, got {marker!r}")
    return marker


def _decode_insert(r: _Reader) -> Insert:
    oid = r.u32()
    _expect(r, "N")
    return Insert(relation_oid=oid, new_tuple=_read_tuple(r))


def _decode_update(r: _Reader) -> Update:
    oid = r.u32()
    marker = _expect(r, "KON")
    old_kind: str | None = None
    old_tuple: tuple[TupleValue, ...] | None = None
    if marker != "N":
        old_kind, old_tuple = marker, _read_tuple(r)
        _expect(r, "N")
    return Update(oid, old_kind, old_tuple, _read_tuple(r))


def _decode_delete(r: _Reader) -> Delete:
    oid = r.u32()
    kind = _expect(r, "KO")
    return Delete(relation_oid=oid, old_kind=kind, old_tuple=_read_tuple(r))


def _decode_truncate(r: _Reader) -> Truncate:
    count = r.i32()
    if count < 0:
        raise PgOutputDecodeError(f"negative relation count {count} in Truncate")
    options = r.u8()
    return Truncate(options=options, relation_oids=tuple(r.u32() for _ in range(count)))


def _decode_logical_message(r: _Reader) -> LogicalMessage:
    flags, lsn, prefix = r.u8(), r.u64(), r.cstring()
    size = r.i32()
    if size < 0:
        raise PgOutputDecodeError(f"negative content length {size} in Message")
    return LogicalMessage(
        transactional=bool(flags & 1), lsn=lsn, prefix=prefix, content=r.raw(size)
    )


_DECODERS: dict[str, tuple[str, Callable[[_Reader], PgOutputMessage]]] = {
    "B": ("Begin", _decode_begin),
    "C": ("Commit", _decode_commit),
    "O": ("Origin", _decode_origin),
    "R": ("Relation", _decode_relation),
    "Y": ("Type", _decode_type),
    "I": ("Insert", _decode_insert),
    "U": ("Update", _decode_update),
    "D": ("Delete", _decode_delete),
    "T": ("Truncate", _decode_truncate),
    "M": ("Message", _decode_logical_message),
}


def decode_message(data: bytes) -> PgOutputMessage:
    """Decode one pgoutput v1 message (an XLogData payload)."""
    if not data:
        raise PgOutputDecodeError("empty pgoutput message")
    entry = _DECODERS.get(chr(data[0]))
    if entry is None:
        raise PgOutputDecodeError(f"unknown pgoutput message type {chr(data[0])!r}")
    kind, decoder = entry
    reader = _Reader(data, 1, kind)
    message: PgOutputMessage = decoder(reader)
    reader.end()
    return message


# --------------------------------------------------------------------------------------------
# Row helpers


def tuple_to_dict(relation: Relation, values: tuple[TupleValue, ...]) -> dict[str, str | None]:
    """Map a text-format tuple onto the relation's column names (NULL -> None).

    Unchanged-TOAST and binary values are rejected: the caller cannot get a usable text value
    from them, and neither occurs for inserts streamed in text mode.
    """
    if len(values) != len(relation.columns):
        raise PgOutputDecodeError(
            f"tuple has {len(values)} columns, relation {relation.name!r} has "
            f"{len(relation.columns)}"
        )
    row: dict[str, str | None] = {}
    for column, value in zip(relation.columns, values, strict=True):
        if value.kind is ValueKind.NULL:
            row[column.name] = None
        elif value.kind is ValueKind.TEXT and value.data is not None:
            try:
                row[column.name] = value.data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PgOutputDecodeError(f"column {column.name!r} is not valid UTF-8") from exc
        else:
            raise PgOutputDecodeError(
                f"column {column.name!r} has no text value (kind {value.kind.name})"
            )
    return row


def insert_to_dict(relation: Relation, insert: Insert) -> dict[str, str | None]:
    """The inserted row as ``{column: text or None}``; the relation must be the insert's."""
    if insert.relation_oid != relation.oid:
        raise PgOutputDecodeError(
            f"insert is for relation oid {insert.relation_oid}, got relation {relation.oid}"
        )
    return tuple_to_dict(relation, insert.new_tuple)
