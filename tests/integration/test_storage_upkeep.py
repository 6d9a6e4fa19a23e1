"""The outbox's storage kept bounded by the relay (migration 0006, db/archive.py,
relay/upkeep.py): retention drops whole partitions of outbox_sent, sent rows kept in the outbox
by earlier relays move over, the relay vacuums the outbox, a settle survives missing partitions,
and the upgrade to this layout runs online under producers and a relay of the previous version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest

import outbox_relay
from outbox_relay.db.migrations import OUTBOX_MIGRATIONS, available_migrations, migrate, run
from outbox_relay.db.status import StorageStatus, read_status
from outbox_relay.relay.settings import OnSent
from outbox_relay.relay.upkeep import VACUUM_DEAD_ROWS
from tests.background import BackgroundLoop
from tests.conftest import RabbitQueue, wait_until
from tests.integration.relay_harness import (
    RelayThread,
    collect,
    drain,
    first_deliveries,
    per_aggregate,
    relay_settings,
    rows,
    scalar,
)

pytestmark = pytest.mark.integration


def storage_of(database_url: str) -> StorageStatus:
    with psycopg.connect(database_url, autocommit=True) as conn:
        storage = read_status(conn, "public").storage
    assert storage is not None
    return storage


def uncovered_gaps(database_url: str) -> list[tuple[Any, ...]]:
    """Partitions from the one holding now() on that do not start where the previous ended."""
    return rows(
        database_url,
        "SELECT name FROM (SELECT name, from_time,"
        " lag(to_time) OVER (ORDER BY from_time) AS previous_end"
        " FROM outbox_sent_partitions WHERE to_time > now()) AS p"
        " WHERE previous_end IS NOT NULL AND from_time <> previous_end",
    )


def test_retention_drops_expired_partitions_whole_and_status_tells_when_it_is_behind(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    # Given partitions of two and three hours ago holding kept events, and a policy of ten
    # minutes recorded by a relay that stopped enforcing it.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "SELECT outbox_sent_cover(now() - interval '3 hours', now() - interval '2 hours',"
            " interval '1 hour')"
        )
        conn.execute(
            "INSERT INTO outbox_sent (id, event_id, event_type, aggregate_id, payload, headers,"
            " created_at, published_at, attempts)"
            " SELECT n, gen_random_uuid(), 'order.created', 'old', jsonb_build_object('n', n),"
            " '{}', now() - interval '151 minutes', now() - interval '150 minutes', 0"
            " FROM generate_series(1, 50) AS n"
        )
        conn.execute(
            "INSERT INTO outbox_sent_policy (retention, width)"
            " VALUES (interval '10 minutes', interval '1 minute')"
        )
        expired = [name for (name,) in conn.execute("SELECT name FROM outbox_sent_partitions")]
        fresh = outbox_relay.emit(conn, "order.created", payload={"n": "fresh"}, aggregate_id="f")
    assert len(expired) >= 1
    assert scalar(database_url, "SELECT count(*) FROM outbox_sent") == 50

    behind = storage_of(database_url)
    # The oldest partition ended two hours ago or more: over 100 minutes past the retention.
    assert behind.retention_behind_seconds is not None
    assert behind.retention_behind_seconds >= 100 * 60
    assert behind.behind_line is not None
    assert "retention behind" in behind.behind_line

    # When a keep-mode relay with --retention 10m runs.
    settings = relay_settings(
        database_url, broker_url, exchange, on_sent=OnSent.KEEP, retention="10m"
    )
    with RelayThread(settings):
        collect(queue, 1)
        wait_until(
            lambda: (
                scalar(
                    database_url,
                    "SELECT count(*) FROM outbox_sent_partitions"
                    " WHERE to_time <= now() - interval '10 minutes'",
                )
                == 0
            ),
            timeout=15,
        )
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0, timeout=15)

    # Then the expired partitions are gone, tables and rows, and the fresh event is kept.
    assert rows(database_url, "SELECT to_regclass(n) FROM unnest(%s::text[]) AS n", (expired,)) == [
        (None,)
    ] * len(expired)
    assert rows(database_url, "SELECT event_id, payload FROM outbox_sent") == [
        (fresh, {"n": "fresh"})
    ]
    # Partitions of a minute (a tenth of the retention) exist from now to 15 minutes ahead.
    with psycopg.connect(database_url, autocommit=True) as conn:
        span = conn.execute(
            "SELECT bool_and(to_time - from_time = interval '1 minute'),"
            " min(from_time) <= now(), max(to_time) - now()"
            " FROM outbox_sent_partitions"
        ).fetchone()
        policy = conn.execute("SELECT retention, width FROM outbox_sent_policy").fetchone()
    assert span is not None
    assert span[:2] == (True, True)
    assert span[2] >= timedelta(minutes=14)
    assert uncovered_gaps(database_url) == []
    assert policy == (timedelta(minutes=10), timedelta(minutes=1))

    on_time = storage_of(database_url)
    assert on_time.retention_seconds == 600
    assert on_time.retention_behind_seconds is None
    assert on_time.behind_line is None


def test_sent_rows_kept_in_the_outbox_by_earlier_relays_move_to_outbox_sent(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    queue = bind_queue("order.*")
    # Given rows a relay before migration 0006 kept in the outbox (published_at set), some
    # within the retention of an hour and some past it, and pending rows beside them.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload, headers,"
            " created_at, published_at, attempts)"
            " SELECT 'order.created', 'order', 'legacy-' || n, jsonb_build_object('n', n),"
            " jsonb_build_object('h', n), now() - make_interval(mins => n + 1),"
            " now() - make_interval(mins => n), n % 2"
            " FROM unnest(ARRAY[5, 20, 50, 70, 120, 600]) AS n"
        )
        legacy = conn.execute(
            "SELECT id, event_id, event_type, aggregate_type, aggregate_id, payload, headers,"
            " created_at, published_at, attempts, published_at >= now() - interval '1 hour'"
            " FROM outbox ORDER BY id"
        ).fetchall()
        pending = [
            outbox_relay.emit(conn, "order.created", payload={"seq": n}, aggregate_id="new")
            for n in range(3)
        ]
    within = [row[:10] for row in legacy if row[10]]
    assert len(within) == 3

    # When a keep-mode relay with --retention 1h runs.
    settings = relay_settings(
        database_url, broker_url, exchange, on_sent=OnSent.KEEP, retention="1h"
    )
    with RelayThread(settings):
        deliveries = collect(queue, 3)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0, timeout=15)

    # Then the legacy rows within retention are in outbox_sent as they were, those past it are
    # deleted, and the pending rows were published (only they) and kept.
    assert [d.event_id for d in deliveries] == [str(e) for e in pending]
    assert drain(queue) == []
    moved = rows(
        database_url,
        "SELECT id, event_id, event_type, aggregate_type, aggregate_id, payload, headers,"
        " created_at, published_at, attempts FROM outbox_sent"
        " WHERE aggregate_id LIKE 'legacy-%%' ORDER BY id",
    )
    assert moved == within
    assert rows(
        database_url, "SELECT event_id FROM outbox_sent WHERE aggregate_id = 'new' ORDER BY id"
    ) == [(e,) for e in pending]
    assert scalar(database_url, "SELECT count(*) FROM outbox_sent") == 6
    assert storage_of(database_url).legacy_kept == 0


def test_the_relay_vacuums_the_outbox_when_dead_rows_pile_up(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    bind_queue("load.*")
    events = 25_000
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Only the relay may vacuum it here, whatever the server's autovacuum setting.
        conn.execute("ALTER TABLE outbox SET (autovacuum_enabled = false)")
        conn.execute(
            "INSERT INTO outbox (event_type, aggregate_id, payload)"
            " SELECT 'load.tick', 'a' || (n %% 20), jsonb_build_object('n', n)"
            " FROM generate_series(1, %s) AS n",
            (events,),
        )
    assert (
        scalar(
            database_url, "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'outbox'"
        )
        == 0
    )

    with RelayThread(relay_settings(database_url, broker_url, exchange, batch_size=2000)):
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0, timeout=60)
        # Statistics reach the relay's check (every 5 s) a moment after the deletes.
        wait_until(
            lambda: scalar(
                database_url,
                "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'outbox'",
            ),
            timeout=30,
            interval=0.5,
        )

    with psycopg.connect(database_url, autocommit=True) as conn:
        vacuumed, autovacuumed, dead = conn.execute(
            "SELECT vacuum_count, autovacuum_count, n_dead_tup FROM pg_stat_user_tables"
            " WHERE relname = 'outbox'"
        ).fetchone() or (None, None, None)
    assert vacuumed is not None
    assert vacuumed >= 1
    assert autovacuumed == 0
    assert dead < VACUUM_DEAD_ROWS


def test_a_settle_survives_partitions_dropped_under_a_running_relay(
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="outbox_relay")
    queue = bind_queue("order.*")
    with psycopg.connect(database_url, autocommit=True) as conn:
        first = outbox_relay.emit(conn, "order.created", payload={"seq": -1}, aggregate_id="z")
    settings = relay_settings(database_url, broker_url, exchange, on_sent=OnSent.KEEP)
    with RelayThread(settings):
        collect(queue, 1)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox_sent") == 1)

        # Given every partition dropped under the relay (by hand, a restored database).
        dropped = scalar(database_url, "SELECT outbox_sent_drop_before('infinity')")
        assert dropped > 0
        assert scalar(database_url, "SELECT count(*) FROM outbox_sent_partitions") == 0

        # When more events are written.
        with psycopg.connect(database_url, autocommit=True) as conn:
            ids = [
                outbox_relay.emit(
                    conn, "order.created", payload={"seq": n // 2}, aggregate_id=f"a{n % 2}"
                )
                for n in range(20)
            ]
        deliveries = collect(queue, 20, timeout=20)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM outbox") == 0, timeout=20)

    # Then the first settle failed for want of a partition, and the retry covered.
    assert any("no partition" in record.getMessage() for record in caplog.records)
    first_copies = first_deliveries(deliveries)
    assert {d.event_id for d in first_copies} == {str(e) for e in ids}
    assert per_aggregate(first_copies) == {"a0": list(range(10)), "a1": list(range(10))}
    kept = rows(database_url, "SELECT event_id FROM outbox_sent ORDER BY id")
    assert kept == [(e,) for e in ids], "the first event's partition went; the others kept once"
    assert first not in {e for (e,) in kept}
    assert uncovered_gaps(database_url) == []
    assert scalar(database_url, "SELECT min(from_time) <= now() FROM outbox_sent_partitions")


# -- online upgrade ---------------------------------------------------------------------------

PRODUCERS = 3
AGGREGATES_PER_PRODUCER = 4
OLD_RELAY_BATCH = 200
HOLD_SECONDS = 2.0  # the old relay's transaction stays open this long across the migration
INSERT_WAIT_LIMIT = 0.5


class Producer(BackgroundLoop):
    """Inserts events one transaction each until stopped, with a per-aggregate sequence number,
    timing every INSERT."""

    def __init__(self, database_url: str, number: int) -> None:
        super().__init__(f"producer-{number}")
        self._url = database_url
        self._aggregates = [f"p{number}-{n}" for n in range(AGGREGATES_PER_PRODUCER)]
        self.inserted: list[str] = []
        self.timings: list[tuple[float, float]] = []  # (started, seconds), monotonic

    def work(self) -> None:
        seq = dict.fromkeys(self._aggregates, 0)
        with psycopg.connect(self._url, autocommit=True) as conn:
            n = 0
            while not self.stopping.is_set():
                aggregate = self._aggregates[n % len(self._aggregates)]
                n += 1
                started = time.monotonic()
                row = conn.execute(
                    "INSERT INTO outbox (event_type, aggregate_id, payload)"
                    " VALUES ('order.created', %s, %s) RETURNING event_id",
                    (aggregate, json.dumps({"seq": seq[aggregate]})),
                ).fetchone()
                self.timings.append((started, time.monotonic() - started))
                assert row is not None
                self.inserted.append(str(row[0]))
                seq[aggregate] += 1
                time.sleep(0.005)


class VersionFiveRelay(BackgroundLoop):
    """What a keep-mode relay of schema version 5 does to the outbox: claim pending rows in id
    order, publish them (not here: storage is what matters) and mark them sent in the same
    transaction. On request it keeps one transaction open, as a slow broker would."""

    def __init__(self, database_url: str) -> None:
        super().__init__("relay-v5")
        self._url = database_url
        self.sent: list[str] = []
        self.hold = threading.Event()  # set: hold the next transaction open
        self.holding = threading.Event()  # set by the relay: rows claimed, transaction open
        self.held_until: float | None = None  # monotonic time that transaction committed

    def work(self) -> None:
        with psycopg.connect(self._url) as conn:
            while not self.stopping.is_set():
                ids = [
                    row[0]
                    for row in conn.execute(
                        "SELECT id FROM outbox WHERE published_at IS NULL AND dead_at IS NULL"
                        " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                        (OLD_RELAY_BATCH,),
                    )
                ]
                held = bool(ids) and self.hold.is_set()
                if held:
                    self.hold.clear()
                    self.holding.set()
                    time.sleep(HOLD_SECONDS)
                sent = conn.execute(
                    "UPDATE outbox SET published_at = now(), next_attempt_at = NULL,"
                    " last_error = NULL WHERE id = ANY(%s) RETURNING event_id",
                    (ids,),
                ).fetchall()
                conn.commit()
                if held:
                    self.held_until = time.monotonic()
                self.sent.extend(str(row[0]) for row in sent)
                time.sleep(0.05)


def test_upgrading_a_populated_outbox_online_loses_nothing(
    empty_database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
) -> None:
    url = empty_database_url
    queue = bind_queue("order.*")
    # Given an outbox at schema version 5 with 5,000 sent rows kept in it and 2,000 pending.
    with psycopg.connect(url, autocommit=True) as conn:
        run(conn, "public", OUTBOX_MIGRATIONS, available_migrations()[:5])
        conn.execute(
            "INSERT INTO outbox (event_type, aggregate_id, payload, created_at, published_at)"
            " SELECT 'order.created', 'kept-' || (n % 10), jsonb_build_object('seq', n / 10),"
            " now() - interval '2 hours', now() - interval '1 hour' - make_interval(secs => n / 10)"
            " FROM generate_series(0, 4999) AS n"
        )
        conn.execute(
            "INSERT INTO outbox (event_type, aggregate_id, payload)"
            " SELECT 'order.created', 'pending-' || (n % 10), jsonb_build_object('seq', n / 10)"
            " FROM generate_series(0, 1999) AS n ORDER BY n"
        )
        kept_before = {
            str(e)
            for (e,) in conn.execute("SELECT event_id FROM outbox WHERE published_at IS NOT NULL")
        }
        pending_before = {
            str(e)
            for (e,) in conn.execute("SELECT event_id FROM outbox WHERE published_at IS NULL")
        }
    assert scalar(url, "SELECT max(version) FROM outbox_schema_version") == 5

    # When producers write and a version 5 relay marks rows sent, the migration runs while that
    # relay holds a batch open.
    producers = [Producer(url, n).start() for n in range(PRODUCERS)]
    old_relay = VersionFiveRelay(url).start()
    new_relay: RelayThread | None = None
    try:
        wait_until(lambda: len(old_relay.sent) >= len(pending_before), timeout=20)
        old_relay.hold.set()
        assert old_relay.holding.wait(10)
        with psycopg.connect(url, autocommit=True) as conn:
            migration_started = time.monotonic()
            applied = migrate(conn, "public")
            migration_ended = time.monotonic()
        assert [m.version for m in applied] == [6]
        # The old relay goes on beside the new schema for a moment, then gives way.
        time.sleep(1.0)
        old_relay.stop()
        new_relay = RelayThread(relay_settings(url, broker_url, exchange, on_sent=OnSent.KEEP))
        new_relay.start()
        time.sleep(2.0)
        for producer in producers:
            producer.stop()
        wait_until(lambda: scalar(url, "SELECT count(*) FROM outbox") == 0, timeout=30)
        inserted = kept_before | pending_before
        for producer in producers:
            inserted.update(producer.inserted)
        published_expected = inserted - kept_before - set(old_relay.sent)
        deliveries = collect(queue, len(published_expected), timeout=30)
        new_relay.stop()
    finally:
        # Already stopped unless the test failed: then its own error is the one reported.
        with contextlib.suppress(AssertionError):
            for producer in producers:
                producer.stop()
            old_relay.stop()
            if new_relay is not None:
                new_relay.stop()

    # Then the migration waited for no transaction on the outbox, and no producer waited on it.
    assert old_relay.held_until is not None
    assert migration_ended < old_relay.held_until, "the migration waited for the relay's batch"
    during = [
        seconds
        for producer in producers
        for started, seconds in producer.timings
        if started <= migration_ended and started + seconds >= migration_started
    ]
    assert during, "no producer wrote during the migration"
    assert max(during) < INSERT_WAIT_LIMIT

    # And every event is kept exactly once; those the old relay did not send were published
    # by the new one, once each, in each aggregate's order.
    history = [str(e) for (e,) in rows(url, "SELECT event_id FROM outbox_history")]
    assert len(history) == len(set(history))
    assert set(history) == inserted
    sent = [str(e) for (e,) in rows(url, "SELECT event_id FROM outbox_sent")]
    assert len(sent) == len(set(sent)) == len(inserted)
    assert len(old_relay.sent) == len(set(old_relay.sent))
    published = [d.event_id for d in deliveries + drain(queue)]
    assert len(published) == len(set(published)), "published twice"
    assert set(published) == published_expected
    for aggregate, seqs in per_aggregate(deliveries).items():
        assert seqs == sorted(seqs), aggregate
    # The kept rows moved with their sending times.
    assert scalar(
        url,
        "SELECT count(*) FROM outbox_sent WHERE aggregate_id LIKE 'kept-%%'"
        " AND published_at < now() - interval '55 minutes'",
    ) == len(kept_before)
