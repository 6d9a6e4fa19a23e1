"""The consumer's inbox: ``processed_events`` in the consumer's own PostgreSQL.

An event is applied by one transaction that first inserts its inbox row and then runs the
handler's own database work::

    BEGIN;
    INSERT INTO processed_events (consumer, event_id, ...) VALUES (...) ON CONFLICT DO NOTHING;
    -- 0 rows: already applied (or being applied by a racer, see below) -> skip the handler
    -- 1 row:  run the handler on this same connection
    COMMIT;

A redelivered or duplicated event finds its row and is acknowledged without running the handler.
Two workers racing on the same event id: the second INSERT waits on the primary key until the
first transaction ends; if it committed the second sees the conflict and skips, if it rolled back
the second inserts and applies it. Either way the effect happens once.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg import sql

from outbox_relay.db.connect import connect
from outbox_relay.db.migrations import sql_dir
from outbox_relay.db.queries import check_schema_name, render
from outbox_relay.errors import DatabaseUnavailableError, SchemaError

log = logging.getLogger(__name__)

_MIGRATION_FILE = re.compile(r"(\d{4})_(\w+)\.sql")
_MIGRATION_LOCK = 1868724341  # one inbox migrator at a time per database

_CLAIM = (
    "INSERT INTO {{schema}}.processed_events (consumer, event_id, event_type, attempt, redelivered)"
    " VALUES (%(consumer)s, %(event_id)s, %(event_type)s, %(attempt)s, %(redelivered)s)"
    " ON CONFLICT DO NOTHING"
)
_LATENCY = (
    "UPDATE {{schema}}.processed_events SET handler_ms = %(ms)s"
    " WHERE consumer = %(consumer)s AND event_id = %(event_id)s"
)
# Batched so a large backlog of old rows never holds one long transaction.
_CLEANUP = (
    "DELETE FROM {{schema}}.processed_events WHERE ctid = ANY (ARRAY("
    " SELECT ctid FROM {{schema}}.processed_events"
    " WHERE consumer = %(consumer)s AND processed_at < now() - make_interval(secs => %(secs)s)"
    " LIMIT %(limit)s))"
)
_STATS = (
    "SELECT count(*),"
    " count(*) FILTER (WHERE redelivered OR attempt > 1),"
    " percentile_cont(0.5) WITHIN GROUP (ORDER BY handler_ms),"
    " percentile_cont(0.95) WITHIN GROUP (ORDER BY handler_ms),"
    " max(handler_ms)"
    " FROM {{schema}}.processed_events"
    " WHERE consumer = %(consumer)s AND processed_at > now() - make_interval(secs => %(secs)s)"
)


def migrate_inbox(conn: psycopg.Connection[Any], schema: str = "public") -> list[str]:
    """Create or upgrade the inbox table in ``schema``; return the migrations applied.

    Safe to re-run and to run from several workers at once (an advisory lock serializes them).
    ``conn`` must be in autocommit mode.
    """
    check_schema_name(schema)
    ident = sql.Identifier(schema)
    migrations = sorted(
        (int(m[1]), m[2], entry.read_text("utf-8"))
        for entry in sql_dir("inbox").iterdir()
        if (m := _MIGRATION_FILE.fullmatch(entry.name))
    )
    applied = []
    for version, name, text in migrations:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.inbox_schema_version ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(ident)
            )
            done = conn.execute(
                sql.SQL("SELECT 1 FROM {}.inbox_schema_version WHERE version = %s").format(ident),
                (version,),
            ).fetchone()
            if done:
                continue
            conn.execute(render(text, schema).encode())
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.inbox_schema_version (version, name) VALUES (%s, %s)"
                ).format(ident),
                (version, name),
            )
            log.info("applied inbox migration", extra={"version": version, "schema": schema})
            applied.append(f"{version:04d}_{name}")
    return applied


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the inbox records about one delivery of an event."""

    event_id: str
    event_type: str
    attempt: int
    redelivered: bool


@dataclass(frozen=True, slots=True)
class InboxStats:
    applied: int
    retried_or_redelivered: int
    handler_ms_p50: float | None
    handler_ms_p95: float | None
    handler_ms_max: float | None


class Inbox(Protocol):
    """Runs a handler's work and the inbox insert in one transaction."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    def apply(self, delivery: Delivery, work: Callable[[Any], None]) -> bool:
        """Run ``work(tx)`` unless already applied; True when it ran and committed.

        Errors raised by ``work`` propagate after rollback; a lost database connection raises
        DatabaseUnavailableError.
        """
        ...

    def cleanup(self, retention_seconds: float) -> int:
        """Delete inbox rows older than the retention; return how many."""
        ...


class PsycopgInbox:
    """The inbox on a psycopg 3 connection; handlers receive that connection, in the transaction."""

    def __init__(
        self,
        database_url: str,
        consumer: str,
        schema: str = "public",
        *,
        migrate: bool = True,
        latency_sample: int = 10,
    ) -> None:
        self._url = database_url
        self._consumer = consumer
        self._schema = check_schema_name(schema)
        self._migrate = migrate
        # Handler latency costs an UPDATE (a round trip) per recorded event: record one event in
        # ``latency_sample`` (0: none), plenty for the status command's percentiles.
        self._latency_sample = latency_sample
        self._applied = 0
        self._conn: psycopg.Connection[Any] | None = None
        self._claim = render(_CLAIM, schema).encode()
        self._latency = render(_LATENCY, schema).encode()
        self._cleanup = render(_CLEANUP, schema).encode()

    def open(self) -> None:
        self.close()
        # The application name lets operators (and pg_stat_activity) tell consumers apart.
        conn = connect(self._url, application_name=f"outbox-relay-consumer:{self._consumer}")
        try:
            if self._migrate:
                migrate_inbox(conn, self._schema)
            found = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (f"{self._schema}.processed_events",)
            ).fetchone()
        except psycopg.OperationalError as exc:
            conn.close()
            raise DatabaseUnavailableError(f"preparing the inbox failed: {exc}") from exc
        if not found or not found[0]:
            conn.close()
            raise SchemaError(
                f"no inbox table {self._schema}.processed_events: run `outbox-relay consume` "
                "(it migrates) or outbox_relay.consumer.inbox.migrate_inbox()"
            )
        conn.autocommit = False
        self._conn = conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            conn.close()

    def apply(self, delivery: Delivery, work: Callable[[Any], None]) -> bool:
        conn = self._conn
        if conn is None:
            raise DatabaseUnavailableError("the inbox is not connected")
        params = {
            "consumer": self._consumer,
            "event_id": delivery.event_id,
            "event_type": delivery.event_type,
            "attempt": delivery.attempt,
            "redelivered": delivery.redelivered,
        }
        try:
            with conn.transaction():
                if conn.execute(self._claim, params).rowcount != 1:
                    return False
                started = time.perf_counter()
                work(conn)
                self._applied += 1
                if (
                    self._latency_sample
                    and self._applied % self._latency_sample == 1 % self._latency_sample
                ):
                    ms = (time.perf_counter() - started) * 1000
                    conn.execute(self._latency, {**params, "ms": ms})
            return True
        except Exception as exc:
            if conn.broken or conn.closed:
                raise DatabaseUnavailableError(f"lost the PostgreSQL connection: {exc}") from exc
            raise

    def cleanup(self, retention_seconds: float, batch: int = 10_000) -> int:
        conn = self._conn
        if conn is None:
            return 0
        deleted = 0
        try:
            while True:
                with conn.transaction():
                    count = conn.execute(
                        self._cleanup,
                        {"consumer": self._consumer, "secs": retention_seconds, "limit": batch},
                    ).rowcount
                deleted += count
                if count < batch:
                    return deleted
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(f"inbox cleanup failed: {exc}") from exc


class SQLAlchemyInbox:
    """The inbox through SQLAlchemy: handlers receive a ``Session`` inside its transaction.

    ``session_factory`` is a ``sessionmaker`` bound to the consumer's PostgreSQL engine. The inbox
    table must exist (``migrate_inbox`` with a psycopg connection, or ``outbox-relay consume``).
    """

    def __init__(
        self, session_factory: Callable[[], Any], consumer: str, schema: str = "public"
    ) -> None:
        self._factory = session_factory
        self._consumer = consumer
        self._schema = check_schema_name(schema)

    def open(self) -> None:
        from sqlalchemy import text

        try:
            with self._factory() as session:
                found = session.execute(
                    text("SELECT to_regclass(:name) IS NOT NULL"),
                    {"name": f"{self._schema}.processed_events"},
                ).scalar()
        except Exception as exc:
            raise DatabaseUnavailableError(f"cannot reach the inbox database: {exc}") from exc
        if not found:
            raise SchemaError(
                f"no inbox table {self._schema}.processed_events: run "
                "outbox_relay.consumer.inbox.migrate_inbox() first"
            )

    def close(self) -> None:
        return None

    def apply(self, delivery: Delivery, work: Callable[[Any], None]) -> bool:
        from sqlalchemy import exc as sa_exc
        from sqlalchemy import text

        claim = text(render(_CLAIM, self._schema).replace("%(", ":").replace(")s", ""))
        try:
            with self._factory() as session, session.begin():
                result = session.execute(
                    claim,
                    {
                        "consumer": self._consumer,
                        "event_id": delivery.event_id,
                        "event_type": delivery.event_type,
                        "attempt": delivery.attempt,
                        "redelivered": delivery.redelivered,
                    },
                )
                if result.rowcount != 1:
                    return False
                work(session)
            return True
        except sa_exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise DatabaseUnavailableError(f"lost the database connection: {exc}") from exc
            raise

    def cleanup(self, retention_seconds: float) -> int:
        from sqlalchemy import text

        statement = text(render(_CLEANUP, self._schema).replace("%(", ":").replace(")s", ""))
        with self._factory() as session, session.begin():
            result = session.execute(
                statement,
                {"consumer": self._consumer, "secs": retention_seconds, "limit": 1_000_000},
            )
            return int(result.rowcount)


def inbox_stats(
    conn: psycopg.Connection[Any], consumer: str, schema: str, window_seconds: float
) -> InboxStats | None:
    """Applied events, retried/redelivered share and handler latency over the last window."""
    found = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{check_schema_name(schema)}.processed_events",)
    ).fetchone()
    if not found or not found[0]:
        return None
    row = conn.execute(
        render(_STATS, schema).encode(), {"consumer": consumer, "secs": window_seconds}
    ).fetchone()
    assert row is not None
    return InboxStats(
        applied=int(row[0]),
        retried_or_redelivered=int(row[1]),
        handler_ms_p50=None if row[2] is None else float(row[2]),
        handler_ms_p95=None if row[3] is None else float(row[3]),
        handler_ms_max=None if row[4] is None else float(row[4]),
    )
