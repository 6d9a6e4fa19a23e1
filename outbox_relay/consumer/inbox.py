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

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg

from outbox_relay.consumer.settings import ConsumerSettings
from outbox_relay.db import migrations
from outbox_relay.db.connect import connect
from outbox_relay.db.queries import Queries
from outbox_relay.errors import DatabaseUnavailableError, SchemaError

# Seconds past the statement timeout after which a query without an answer means a dead link
# (docs/deploy.md, "Dead links"): a live server has cancelled the query by then.
ANSWER_GRACE = 5.0
# The worker's own default (--statement-timeout), for inboxes built outside the CLI.
STATEMENT_TIMEOUT: float = ConsumerSettings.model_fields["statement_timeout"].default

INBOX_MIGRATIONS = migrations.MigrationSet(
    folder="inbox",
    version_table="inbox_schema_version",
    lock_key=1868724341,
    label="inbox migration",
)


def migrate_inbox(conn: psycopg.Connection[Any], schema: str = "public") -> list[str]:
    """Create or upgrade the inbox table in ``schema``; return the migrations applied.

    Safe to re-run and to run from several workers at once (an advisory lock serializes them).
    ``conn`` must be in autocommit mode.
    """
    applied = migrations.run(
        conn, schema, INBOX_MIGRATIONS, migrations.migration_files(INBOX_MIGRATIONS)
    )
    return [f"{migration.version:04d}_{migration.name}" for migration in applied]


def _set_statement_timeout(conn: psycopg.Connection[Any], queries: Queries, seconds: float) -> None:
    milliseconds = str(max(1, round(seconds * 1000)))
    conn.execute(queries["inbox_statement_timeout"], {"ms": milliseconds})


def _inbox_exists(conn: psycopg.Connection[Any], queries: Queries) -> bool:
    relation = f"{queries.schema}.processed_events"
    found = conn.execute(queries["relation_exists"], {"relation": relation}).fetchone()
    return bool(found and found[0])


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
        statement_timeout: float | None = None,
    ) -> None:
        """``statement_timeout`` (seconds): the longest query on the connection, the handler's
        included; a query unanswered ANSWER_GRACE seconds after it counts as a dead link."""
        self._url = database_url
        self._statement_timeout = statement_timeout
        self._consumer = consumer
        self._queries = Queries(schema)
        self._schema = self._queries.schema
        self._migrate = migrate
        # Handler latency costs an UPDATE (a round trip) per recorded event: record one event in
        # ``latency_sample`` (0: none), plenty for the status command's percentiles.
        self._latency_sample = latency_sample
        self._applied = 0
        self._conn: psycopg.Connection[Any] | None = None

    def open(self) -> None:
        self.close()
        # The application name lets operators (and pg_stat_activity) tell consumers apart.
        timeout = self._statement_timeout
        conn = connect(
            self._url,
            application_name=f"outbox-relay-consumer:{self._consumer}",
            # Keepalives cannot see a link that something between still acknowledges: a
            # query would wait forever for its answer, and the worker with it.
            answer_timeout=None if timeout is None else timeout + ANSWER_GRACE,
        )
        try:
            if self._migrate:
                migrate_inbox(conn, self._schema)
            found = _inbox_exists(conn, self._queries)
            if timeout is not None:
                _set_statement_timeout(conn, self._queries, timeout)
        except psycopg.OperationalError as exc:
            conn.close()
            raise DatabaseUnavailableError(f"preparing the inbox failed: {exc}") from exc
        if not found:
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
                if conn.execute(self._queries["inbox_claim"], params).rowcount != 1:
                    return False
                started = time.perf_counter()
                work(conn)
                self._applied += 1
                if (
                    self._latency_sample
                    and self._applied % self._latency_sample == 1 % self._latency_sample
                ):
                    ms = (time.perf_counter() - started) * 1000
                    conn.execute(self._queries["inbox_record_latency"], {**params, "ms": ms})
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
                        self._queries["inbox_cleanup"],
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
    Build the engine with :meth:`engine_options` so that a dead link is noticed::

        engine = create_engine("postgresql+psycopg://", **SQLAlchemyInbox.engine_options(url))
    """

    @staticmethod
    def engine_options(
        database_url: str,
        *,
        statement_timeout: float = STATEMENT_TIMEOUT,
        application_name: str = "outbox-relay-consumer",
    ) -> dict[str, Any]:
        """Keyword arguments for ``sqlalchemy.create_engine`` bounding every wait on PostgreSQL.

        Connections come from this package's connector: a 10 s connect timeout, TCP keepalives
        and ``tcp_user_timeout`` (a peer gone), ``statement_timeout`` for the session (a query
        merely slow fails as a query), and an answer timeout ``statement_timeout`` + 5 s (a link
        that hangs behind something still acknowledging TCP, which keepalives cannot see). SQLAlchemy
        then sees a closed connection, invalidates it, and the worker reconnects, as with the
        default inbox (docs/deploy.md, "Dead links").
        """
        url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        queries = Queries("public")  # the statement timeout names no table

        def creator() -> psycopg.Connection[Any]:
            conn = connect(
                url,
                application_name=application_name,
                answer_timeout=statement_timeout + ANSWER_GRACE,
            )
            try:
                _set_statement_timeout(conn, queries, statement_timeout)
            except psycopg.OperationalError as exc:
                conn.close()
                raise DatabaseUnavailableError(f"preparing the inbox failed: {exc}") from exc
            conn.autocommit = False  # SQLAlchemy runs its own transactions
            return conn

        return {"creator": creator}

    def __init__(
        self, session_factory: Callable[[], Any], consumer: str, schema: str = "public"
    ) -> None:
        self._factory = session_factory
        self._consumer = consumer
        self._queries = Queries(schema)
        self._schema = self._queries.schema

    def open(self) -> None:
        from sqlalchemy import text

        try:
            with self._factory() as session:
                found = session.execute(
                    text(self._queries.sqlalchemy("relation_exists")),
                    {"relation": f"{self._schema}.processed_events"},
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

        claim = text(self._queries.sqlalchemy("inbox_claim"))
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
                raise DatabaseUnavailableError(f"lost the PostgreSQL connection: {exc}") from exc
            raise

    def cleanup(self, retention_seconds: float) -> int:
        from sqlalchemy import exc as sa_exc
        from sqlalchemy import text

        statement = text(self._queries.sqlalchemy("inbox_cleanup"))
        try:
            with self._factory() as session, session.begin():
                result = session.execute(
                    statement,
                    {"consumer": self._consumer, "secs": retention_seconds, "limit": 1_000_000},
                )
                return int(result.rowcount)
        except sa_exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise DatabaseUnavailableError(f"inbox cleanup failed: {exc}") from exc
            raise


def inbox_stats(
    conn: psycopg.Connection[Any], consumer: str, schema: str, window_seconds: float
) -> InboxStats | None:
    """Applied events, retried/redelivered share and handler latency over the last window."""
    queries = Queries(schema)
    if not _inbox_exists(conn, queries):
        return None
    row = conn.execute(
        queries["inbox_stats"], {"consumer": consumer, "secs": window_seconds}
    ).fetchone()
    assert row is not None
    return InboxStats(
        applied=int(row[0]),
        retried_or_redelivered=int(row[1]),
        handler_ms_p50=None if row[2] is None else float(row[2]),
        handler_ms_p95=None if row[3] is None else float(row[3]),
        handler_ms_max=None if row[4] is None else float(row[4]),
    )
