"""Minimal logical-replication stream client (synchronous, psycopg 3).

psycopg 3 has no replication API, but since 3.3 ``Connection.execute()`` accepts a command that
answers with COPY_BOTH (psycopg PR #1219), so ``START_REPLICATION`` can be sent normally and the
stream then driven through the libpq wrapper (``conn.pgconn``): ``get_copy_data`` /
``put_copy_data`` / ``flush`` / ``consume_input``, waiting on the socket ourselves.

Replication connections only accept the simple query protocol: commands are sent without bind
parameters (psycopg then uses simple query); literals are quoted with ``psycopg.sql``.

Usage::

    with ReplicationStream(conninfo) as stream:
        stream.ensure_slot("outbox_slot")
        stream.start("outbox_slot", "outbox_pub", start_lsn=0)
        while True:
            frame = stream.read(timeout=1.0)
            if isinstance(frame, XLogData):
                message = decode_message(frame.payload)
                ...  # after handling a Commit durably: stream.send_status(commit.end_lsn)
            elif isinstance(frame, PrimaryKeepalive) and frame.reply_requested:
                stream.send_status(last_flushed_lsn)
"""

from __future__ import annotations

import selectors
import time
from dataclasses import dataclass
from types import TracebackType
from typing import NoReturn

import psycopg
from psycopg import pq, sql
from psycopg.rows import TupleRow

from outbox_relay.cdc.pgoutput import (
    PgOutputDecodeError,
    ReplicationFrame,
    decode_copy_data,
    encode_standby_status_update,
    format_lsn,
    parse_lsn,
)
from outbox_relay.db.connect import CLIENT_KEEPALIVES
from outbox_relay.errors import (
    ReplicationError,
    ReplicationPrivilegeError,
    SlotInUseError,
    SlotNotFoundError,
    WalLevelError,
)

__all__ = ["ReplicationStream", "SystemIdentity", "translate_error"]


@dataclass(frozen=True, slots=True)
class SystemIdentity:
    """Result of ``IDENTIFY_SYSTEM``."""

    system_id: str
    timeline: int
    xlog_pos: int
    dbname: str | None


# Server messages that only come as text (no SQLSTATE on connection failure): PostgreSQL <= 15
# says "must be superuser or replication role to start walsender", 16+ "permission denied to
# start WAL sender". They can be localized (lc_messages), hence the SQLSTATE checks first.
_PRIVILEGE_HINTS = ("replication role", "permission denied to start wal sender")


def translate_error(exc: psycopg.Error, action: str) -> ReplicationError:
    """Map a psycopg error onto the local exception tree; the caller chains the cause
    (``raise translate_error(exc, "doing x") from exc``)."""
    message = f"{action}: {exc}"
    text = str(exc).lower()
    sqlstate = exc.sqlstate
    if isinstance(exc, psycopg.errors.ObjectInUse):  # 55006: "slot ... is active for PID n"
        return SlotInUseError(message)
    if isinstance(exc, psycopg.errors.UndefinedObject):  # 42704: slot does not exist
        return SlotNotFoundError(message)
    if "wal_level" in text:  # 55000 "logical decoding requires wal_level >= logical"
        return WalLevelError(message)
    if sqlstate == "42501" or any(hint in text for hint in _PRIVILEGE_HINTS):
        return ReplicationPrivilegeError(message)
    return ReplicationError(message)


class ReplicationStream:
    """One replication connection streaming one logical slot with pgoutput protocol v1.

    Not thread-safe. ``read()`` hands back raw frames; the caller decodes payloads with
    ``pgoutput.decode_message`` and must answer keepalives that request a reply (else the
    server drops the connection after ``wal_sender_timeout``, 60 s by default).
    """

    def __init__(
        self,
        conninfo: str,
        *,
        connect_timeout: float = 10.0,
        silence_timeout: float | None = None,
    ) -> None:
        """``silence_timeout``: while streaming, ``read()`` raises ReplicationError once the
        server has sent nothing for that many seconds (None: wait as long as it takes)."""
        self._conninfo = conninfo
        self._connect_timeout = connect_timeout
        self._silence_timeout = silence_timeout
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._selector: selectors.BaseSelector | None = None
        self._streaming = False
        self._heard_at = time.monotonic()  # the last frame from the server
        self._asked_at: float | None = None  # when a reply was requested since then
        self._flushed = 0  # the last position reported (0: none yet)

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> ReplicationStream:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> SystemIdentity:
        """Connect in ``replication=database`` mode and run ``IDENTIFY_SYSTEM``."""
        if self._conn is not None:
            raise ReplicationError("replication stream is already open")
        try:
            self._conn = psycopg.Connection.connect(
                self._conninfo,
                replication="database",
                autocommit=True,
                connect_timeout=max(1, round(self._connect_timeout)),
                # A vanished server is noticed like on every other connection (db.connect).
                **CLIENT_KEEPALIVES,
            )
        except psycopg.Error as exc:
            raise translate_error(exc, "cannot open replication connection") from exc
        return self.identify_system()

    def close(self) -> None:
        """Close the connection; the server releases the slot when its walsender exits.

        That happens shortly *after* close returns, so a new consumer may briefly still see
        SlotInUseError.
        """
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            self._streaming = False
            conn.close()

    @property
    def closed(self) -> bool:
        return self._conn is None or self._conn.closed

    # ---------------------------------------------------------------- commands

    def identify_system(self) -> SystemIdentity:
        row = self._command(sql.SQL("IDENTIFY_SYSTEM"), "IDENTIFY_SYSTEM failed")
        if row is None:
            raise ReplicationError("IDENTIFY_SYSTEM returned no row")
        system_id, timeline, xlog_pos, dbname = row
        return SystemIdentity(str(system_id), int(timeline), parse_lsn(xlog_pos), dbname)

    def ensure_slot(self, slot: str) -> bool:
        """Create the logical pgoutput slot unless it exists; True if it was created.

        An existing slot must be logical, use pgoutput and belong to the connected database,
        else SlotNotFoundError: streaming it would fail later or yield another format.
        """
        check = sql.SQL(
            "SELECT slot_type, plugin, database = current_database()"
            " FROM pg_replication_slots WHERE slot_name = {}"
        ).format(sql.Literal(slot))
        existing = self._command(check, f"cannot look up replication slot {slot!r}")
        if existing is None:
            create = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput").format(
                sql.Identifier(slot)
            )
            try:
                self._command(create, f"cannot create replication slot {slot!r}")
                return True
            except ReplicationError as exc:
                # Lost a race with another creator: fine, re-check what now exists.
                if not isinstance(exc.__cause__, psycopg.errors.DuplicateObject):
                    raise
            existing = self._command(check, f"cannot look up replication slot {slot!r}")
            if existing is None:
                raise SlotNotFoundError(f"replication slot {slot!r} vanished during creation")
        slot_type, plugin, same_db = existing
        if slot_type != "logical" or plugin != "pgoutput" or same_db is not True:
            raise SlotNotFoundError(
                f"replication slot {slot!r} exists but is not a logical pgoutput slot of this "
                f"database (type={slot_type}, plugin={plugin})"
            )
        return False

    def start(self, slot: str, publication: str, start_lsn: int = 0) -> None:
        """``START_REPLICATION`` with pgoutput v1 and logical messages enabled.

        ``start_lsn=0`` means "from the slot's confirmed_flush_lsn"; the server never goes back
        before it anyway.
        """
        conn = self._require_conn()
        if self._streaming:
            raise ReplicationError("replication already started on this connection")
        # publication_names is a comma-separated list of (double-quotable) identifiers inside
        # a string literal: quote the name as an identifier, then the whole as a literal.
        names = '"' + publication.replace('"', '""') + '"'
        command = sql.SQL(
            "START_REPLICATION SLOT {slot} LOGICAL {lsn}"
            " (proto_version '1', publication_names {pubs}, messages 'true')"
        ).format(
            slot=sql.Identifier(slot),
            lsn=sql.SQL(format_lsn(start_lsn)),
            pubs=sql.Literal(names),
        )
        try:
            conn.execute(command)
        except psycopg.Error as exc:
            raise translate_error(exc, f"cannot start replication from slot {slot!r}") from exc
        self._streaming = True
        self._heard_at, self._asked_at = time.monotonic(), None
        self._selector = selectors.DefaultSelector()
        self._selector.register(conn.pgconn.socket, selectors.EVENT_READ)

    # ---------------------------------------------------------------- streaming

    def read(self, timeout: float) -> ReplicationFrame | None:
        """Next XLogData/PrimaryKeepalive, or None if nothing arrived within ``timeout`` s.

        With a ``silence_timeout``: ReplicationError once the server has been silent that long.
        """
        pgconn = self._require_streaming()
        deadline = time.monotonic() + timeout
        polled = False
        try:
            while True:
                # Drain what libpq already buffered before sleeping on the socket: one
                # recv() often brings several CopyData messages.
                size, data = pgconn.get_copy_data(1)
                if size > 0:
                    self._heard_at, self._asked_at = time.monotonic(), None
                    try:
                        return decode_copy_data(bytes(data))
                    except PgOutputDecodeError as exc:
                        raise ReplicationError(f"malformed replication frame: {exc}") from exc
                if size == -1:
                    self._raise_stream_end(pgconn)
                now = time.monotonic()
                if not polled and self._overdue(now):
                    # Frames may wait in the socket since the last read: not silence.
                    polled = True
                    pgconn.consume_input()
                    continue
                remaining = min(deadline, self._check_silence(now)) - now
                if remaining <= 0:
                    if now >= deadline:
                        return None
                    continue  # a reply was just requested: wait for it
                if not self._wait(selectors.EVENT_READ, remaining):
                    continue  # the deadline or the next silence check
                pgconn.consume_input()
        except psycopg.Error as exc:
            self._streaming = False
            raise translate_error(exc, "replication stream failed") from exc

    def send_status(self, flush_lsn: int, reply: bool = False, timeout: float = 10.0) -> None:
        """Report ``flush_lsn`` as written, flushed and applied.

        The server then advances the slot's ``confirmed_flush_lsn``: everything before it is
        acknowledged for good and will not be streamed again after a reconnect.
        """
        pgconn = self._require_streaming()
        self._flushed = max(self._flushed, flush_lsn)
        message = encode_standby_status_update(flush_lsn, flush_lsn, flush_lsn, reply)
        deadline = time.monotonic() + timeout
        try:
            # The connection is non-blocking (psycopg sets it): put/flush may need several
            # rounds while the socket send buffer is full.
            while pgconn.put_copy_data(message) == 0:
                self._wait_for_write(deadline)
            while pgconn.flush() == 1:
                self._wait_for_write(deadline)
        except psycopg.Error as exc:
            self._streaming = False
            raise translate_error(exc, "cannot send standby status update") from exc

    # ---------------------------------------------------------------- internals

    def _overdue(self, now: float) -> bool:
        limit = self._silence_timeout
        return limit is not None and now - self._heard_at >= limit / 2

    def _check_silence(self, now: float) -> float:
        """A dead link or a frozen server leaves the socket open and silent: TCP keepalives
        and tcp_user_timeout cannot tell when something between still acknowledges (a proxy,
        a load balancer). A live walsender answers a status update that requests a reply at
        once: after half the silence timeout without a frame we ask, and a request unanswered
        for the other half means the stream is dead (ReplicationError: the caller reconnects).
        Returns when to check again."""
        limit = self._silence_timeout
        if limit is None:
            return float("inf")
        asked_at = self._asked_at
        if asked_at is None:
            if now - self._heard_at < limit / 2:
                return self._heard_at + limit / 2
            self._asked_at = now
            # The position already reported: a keepalive must never move the slot back.
            self.send_status(self._flushed, reply=True, timeout=max(1.0, limit / 2))
            return now
        if now - asked_at >= limit / 2:
            self._streaming = False
            raise ReplicationError(
                f"the replication stream heard nothing from PostgreSQL for "
                f"{now - self._heard_at:.1f}s (a status update requesting a reply went "
                f"unanswered for {now - asked_at:.1f}s)"
            )
        return asked_at + limit / 2

    def _require_conn(self) -> psycopg.Connection[TupleRow]:
        if self._conn is None or self._conn.closed:
            raise ReplicationError("replication stream is not open")
        return self._conn

    def _require_streaming(self) -> pq.abc.PGconn:
        conn = self._require_conn()
        if not self._streaming:
            raise ReplicationError("replication is not started (or the stream has ended)")
        return conn.pgconn

    def _command(self, command: sql.SQL | sql.Composed, action: str) -> TupleRow | None:
        conn = self._require_conn()
        if self._streaming:
            raise ReplicationError("cannot run commands while streaming")
        try:
            return conn.execute(command).fetchone()
        except psycopg.Error as exc:
            raise translate_error(exc, action) from exc

    def _wait(self, events: int, timeout: float) -> bool:
        selector = self._selector
        if selector is None:
            raise ReplicationError("replication stream is closed")
        # One selector registered at start(); only the interest (read or write) changes.
        selector.modify(self._require_conn().pgconn.socket, events)
        return bool(selector.select(timeout))

    def _wait_for_write(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._wait(selectors.EVENT_WRITE, remaining):
            raise ReplicationError("timed out sending standby status update")

    def _raise_stream_end(self, pgconn: pq.abc.PGconn) -> NoReturn:
        """The server ended COPY (error or shutdown): surface its error, never end silently."""
        self._streaming = False
        result = pgconn.get_result()
        while result is not None and result.status != pq.ExecStatus.FATAL_ERROR:
            result = pgconn.get_result()
        if result is None:
            raise ReplicationError("replication stream ended by the server")
        error = psycopg.errors.error_from_result(result)
        raise translate_error(error, "replication stream ended by the server") from error
