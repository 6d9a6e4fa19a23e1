"""The inbox table in a real PostgreSQL: migration, one-transaction dedupe, races, retention."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from outbox_relay.consumer import Consumer, Event, NoHooks
from outbox_relay.consumer.inbox import (
    ANSWER_GRACE,
    Delivery,
    PsycopgInbox,
    SQLAlchemyInbox,
    migrate_inbox,
)
from outbox_relay.errors import DatabaseUnavailableError, SchemaError
from tests.conftest import wait_until
from tests.faults import HangingProxy, cut_and_restore, via
from tests.integration.consumer_harness import ConsumerEnv, WorkerThread, consumer_env

pytestmark = pytest.mark.integration


@pytest.fixture
def env(broker_url: str, database_url: str, exchange: str) -> Iterator[ConsumerEnv]:
    yield from consumer_env(broker_url, database_url, exchange)


def _effects(database_url: str) -> list[str]:
    with psycopg.connect(database_url) as conn:
        return [r[0] for r in conn.execute("SELECT event_id FROM effects ORDER BY id")]


def _insert_effect(event_id: str) -> Any:
    def work(db: psycopg.Connection[Any]) -> None:
        db.execute("INSERT INTO effects (event_id, event_type) VALUES (%s, 't')", (event_id,))

    return work


def test_migrate_inbox_is_repeatable_and_creates_the_table(empty_database_url: str) -> None:
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        assert migrate_inbox(conn, "shop") == ["0001_inbox"]
        assert migrate_inbox(conn, "shop") == []
        row = conn.execute("SELECT to_regclass('shop.processed_events') IS NOT NULL").fetchone()
    assert row == (True,)


def test_inbox_refuses_to_start_without_its_table_when_not_migrating(
    empty_database_url: str,
) -> None:
    inbox = PsycopgInbox(empty_database_url, "c", migrate=False)
    with pytest.raises(SchemaError, match="processed_events"):
        inbox.open()


def test_handler_work_and_inbox_row_commit_or_roll_back_together(env: ConsumerEnv) -> None:
    inbox = PsycopgInbox(env.database_url, "billing")
    inbox.open()
    try:
        delivery = Delivery("e-1", "order.created", 1, False)

        def failing(db: psycopg.Connection[Any]) -> None:
            _insert_effect("e-1")(db)
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            inbox.apply(delivery, failing)
        # Neither the effect nor the inbox row survived: the retry will run the handler again.
        assert _effects(env.database_url) == []
        assert inbox.apply(delivery, _insert_effect("e-1")) is True
        assert inbox.apply(delivery, _insert_effect("e-1")) is False
        # Another consumer in the same database applies the same event for itself.
        other = PsycopgInbox(env.database_url, "shipping")
        other.open()
        try:
            assert other.apply(delivery, _insert_effect("e-1")) is True
        finally:
            other.close()
    finally:
        inbox.close()
    assert _effects(env.database_url) == ["e-1", "e-1"]


def test_when_the_first_racer_rolls_back_the_waiting_one_applies_the_event(
    env: ConsumerEnv,
) -> None:
    first, second = PsycopgInbox(env.database_url, "c"), PsycopgInbox(env.database_url, "c")
    first.open()
    second.open()
    delivery = Delivery("e-race", "order.created", 1, False)
    inside, release = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def slow_then_fail(db: psycopg.Connection[Any]) -> None:
        inside.set()
        release.wait(10)
        raise ConnectionError("downstream failed")

    def run_first() -> None:
        try:
            first.apply(delivery, slow_then_fail)
        except ConnectionError as exc:
            results["first"] = exc

    def run_second() -> None:
        results["second"] = second.apply(delivery, _insert_effect("e-race"))

    threads = [threading.Thread(target=run_first)]
    threads[0].start()
    wait_until(inside.is_set)
    threads.append(threading.Thread(target=run_second))
    threads[1].start()
    wait_until(lambda: _lock_waiters(env.database_url) >= 1, timeout=10)
    release.set()
    for thread in threads:
        thread.join(10)
    first.close()
    second.close()
    assert isinstance(results["first"], ConnectionError)
    assert results["second"] is True
    assert _effects(env.database_url) == ["e-race"]


def test_a_slow_query_fails_as_a_query_under_the_statement_timeout(env: ConsumerEnv) -> None:
    def slow(db: psycopg.Connection[Any]) -> None:
        db.execute("SELECT pg_sleep(3)")

    inbox = PsycopgInbox(env.database_url, "slow", statement_timeout=0.5)
    inbox.open()
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):
            inbox.apply(Delivery("e-slow", "order.created", 1, False), slow)
        # Not a dead link: the same connection goes on.
        assert inbox.apply(Delivery("e-next", "order.created", 1, False), _insert_effect("e-next"))
    finally:
        inbox.close()
    assert _effects(env.database_url) == ["e-next"]


def test_a_query_unanswered_past_the_statement_timeout_means_a_dead_link(
    env: ConsumerEnv,
) -> None:
    """Behind a link that hangs (a proxy that stops forwarding, keepalives answered), the
    inbox gives up ANSWER_GRACE seconds past the statement timeout instead of waiting forever."""
    parts = urlsplit(env.database_url)
    with HangingProxy(parts.port or 5432) as proxy:
        proxied = parts._replace(
            netloc=f"{parts.netloc.rpartition('@')[0]}@127.0.0.1:{proxy.port}".lstrip("@")
        ).geturl()
        inbox = PsycopgInbox(proxied, "cut", statement_timeout=1.0)
        inbox.open()
        try:
            proxy.freeze()
            frozen_at = time.monotonic()
            with pytest.raises(DatabaseUnavailableError, match="did not answer within 6s"):
                inbox.apply(Delivery("e-cut", "order.created", 1, False), _insert_effect("e-cut"))
            waited = time.monotonic() - frozen_at
            assert 1.0 + ANSWER_GRACE - 0.5 <= waited <= 1.0 + ANSWER_GRACE + 2.0, waited
        finally:
            inbox.close()


def test_a_sqlalchemy_inbox_behind_a_link_that_hangs_notices_in_bound_and_applies_every_event_once(
    env: ConsumerEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """With SQLAlchemyInbox.engine_options, a consumer's SQLAlchemy inbox gives a hung link up
    ANSWER_GRACE seconds past the statement timeout, goes unready, and resumes once it is back."""
    statement_timeout = 5.0
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        migrate_inbox(conn)
    consumer = Consumer()

    @consumer.handler("order.*")
    def handle(event: Event, session: Session) -> None:
        session.execute(
            text("INSERT INTO effects (event_id, event_type) VALUES (:id, :type)"),
            {"id": event.event_id, "type": event.event_type},
        )
        time.sleep(0.01)  # still applying when the link hangs

    settings = env.settings()
    env.declare(settings)
    ids = [str(uuid.uuid4()) for _ in range(1000)]
    env.publish_many([("order.created", {}, id_, None, None) for id_ in ids])
    with HangingProxy(urlsplit(env.database_url).port or 5432) as proxy:
        engine = create_engine(
            "postgresql+psycopg://",
            **SQLAlchemyInbox.engine_options(
                via(env.database_url, proxy.port), statement_timeout=statement_timeout
            ),
        )
        thread = WorkerThread(consumer, settings)
        thread.worker.inbox = SQLAlchemyInbox(sessionmaker(engine), settings.inbox_consumer)
        try:
            with caplog.at_level(logging.WARNING, logger="outbox_relay"), thread as worker:
                cut_and_restore(
                    proxy,
                    progress=lambda: len(env.effect_counts()),
                    log=lambda: caplog.text,
                    alive=lambda: thread.error is None,
                    ready=worker.ready.is_set,
                    bound=statement_timeout + ANSWER_GRACE,
                    link_line="lost the PostgreSQL connection",
                    in_flight=1,  # a commit held by the proxy
                )
                wait_until(lambda: len(env.effect_counts()) == len(ids), timeout=120)
        finally:
            engine.dispose()
    assert env.effect_counts() == dict.fromkeys(ids, 1)


def _lock_waiters(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def test_cleanup_removes_only_expired_rows_of_its_own_consumer(env: ConsumerEnv) -> None:
    inbox = PsycopgInbox(env.database_url, "c")
    inbox.open()
    try:
        for n in range(3):
            inbox.apply(Delivery(f"e-{n}", "t", 1, False), lambda db: None)
        with psycopg.connect(env.database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO processed_events (consumer, event_id, event_type, processed_at)"
                " VALUES ('other', 'old', 't', now() - interval '30 days')"
            )
            conn.execute(
                "UPDATE processed_events SET processed_at = now() - interval '8 days'"
                " WHERE event_id IN ('e-0', 'e-1')"
            )
        assert inbox.cleanup(7 * 24 * 3600) == 2
        with psycopg.connect(env.database_url) as conn:
            left = sorted(r[0] for r in conn.execute("SELECT event_id FROM processed_events"))
    finally:
        inbox.close()
    assert left == ["e-2", "old"]


def test_worker_cleans_up_the_inbox_periodically(env: ConsumerEnv) -> None:
    consumer = Consumer()
    consumer.add_handler("order.*", lambda event: None)
    settings = env.settings(inbox_retention=1.0, cleanup_interval=0.2)
    env.declare(settings)
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        migrate_inbox(conn)
        conn.execute(
            "INSERT INTO processed_events (consumer, event_id, event_type, processed_at)"
            " VALUES (%s, 'ancient', 't', now() - interval '1 hour')",
            (settings.queue,),
        )

    def remaining() -> int:
        with psycopg.connect(env.database_url) as conn:
            row = conn.execute("SELECT count(*) FROM processed_events").fetchone()
        return int(row[0]) if row else -1

    with WorkerThread(consumer, settings):
        wait_until(lambda: remaining() == 0, timeout=10)


def test_handlers_can_use_a_sqlalchemy_session_in_the_inbox_transaction(env: ConsumerEnv) -> None:
    engine = create_engine(env.database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        migrate_inbox(conn)
    consumer = Consumer()

    @consumer.handler("order.*")
    def handle(event: Event, session: Session) -> None:
        session.execute(
            text("INSERT INTO effects (event_id, event_type) VALUES (:id, :type)"),
            {"id": event.event_id, "type": event.event_type},
        )

    settings = env.settings()
    env.declare(settings)
    event_id = env.publish("order.created", {}, copies=3)
    outcomes: list[str] = []

    class Hooks(NoHooks):
        def on_handled(self, event: Event, seconds: float) -> None:
            outcomes.append("handled")

        def on_deduped(self, event: Event) -> None:
            outcomes.append("deduped")

    inbox = SQLAlchemyInbox(sessionmaker(engine), settings.inbox_consumer)
    thread = WorkerThread(consumer, settings, hooks=Hooks())
    thread.worker.inbox = inbox
    try:
        with thread:
            wait_until(lambda: len(outcomes) == 3)
    finally:
        engine.dispose()
    assert sorted(outcomes) == ["deduped", "deduped", "handled"]
    assert env.effect_counts() == {event_id: 1}
