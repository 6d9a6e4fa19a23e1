"""The relay claims batch k+1 while batch k is in flight; a failure in k must not let k+1 overtake."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import pytest

from outbox_relay.db.store import OutboxStore, Share
from tests.conftest import RabbitQueue, wait_until
from tests.integration.relay_harness import RelayThread, relay_settings

pytestmark = pytest.mark.integration


def _backlog(database_url: str, aggregates: int, per_aggregate: int) -> None:
    """Events seq 0..per_aggregate-1 for each aggregate, interleaved in id order."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO outbox (event_type, aggregate_id, payload)"
            " SELECT 'order.updated', 'agg-' || a, jsonb_build_object('agg', a, 'seq', s)"
            " FROM generate_series(0, %s - 1) s, generate_series(0, %s - 1) a ORDER BY s, a",
            (per_aggregate, aggregates),
        )


def test_overlapping_batches_deliver_everything_once_in_order(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    # Given a backlog many times the batch size, so batches overlap all the time
    queue = bind_queue("order.*")
    _backlog(database_url, aggregates=50, per_aggregate=60)

    # When the relay drains it with small batches
    with RelayThread(relay_settings(database_url, broker_url, exchange, batch_size=70)):
        wait_until(lambda: queue.count() == 3000, timeout=60)

    # Then every event arrived exactly once, each aggregate in order
    seen: dict[int, list[int]] = defaultdict(list)
    ids = set()
    for _method, props, body in queue.drain():
        ids.add(props.message_id)
        event = json.loads(body)
        seen[event["agg"]].append(event["seq"])
    assert len(ids) == 3000
    assert all(seqs == list(range(60)) for seqs in seen.values()), "per-aggregate order broken"


def test_a_failure_in_one_batch_holds_back_its_aggregate_in_the_batch_claimed_next_to_it(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    # Given a backlog where aggregate agg-7's 5th event is unroutable (no binding for its type)
    queue = bind_queue("order.*")
    _backlog(database_url, aggregates=20, per_aggregate=40)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE outbox SET event_type = 'nobody.listens'"
            " WHERE aggregate_id = 'agg-7' AND payload->>'seq' = '4'"
        )

    # When the relay drains it with small, overlapping batches and gives up after 2 attempts
    settings = relay_settings(
        database_url,
        broker_url,
        exchange,
        batch_size=25,
        max_attempts=2,
        retry_backoff=4.0,
        retry_backoff_max=4.0,
    )
    with RelayThread(settings):
        # While the poison event is retrying, nothing after it of agg-7 may be published
        wait_until(lambda: queue.count() >= 19 * 40 + 4, timeout=60)
        early = queue.drain()
        assert len(early) == 19 * 40 + 4
        assert [json.loads(b)["seq"] for _m, _p, b in early if json.loads(b)["agg"] == 7] == [
            0,
            1,
            2,
            3,
        ]
        # Once it is dead, the rest of agg-7 follows in order
        wait_until(lambda: queue.count() == 35, timeout=30)
        late = queue.drain()

    seqs_7 = [json.loads(b)["seq"] for _m, _p, b in late if json.loads(b)["agg"] == 7]
    assert seqs_7 == list(range(5, 40))
    others: dict[int, list[int]] = defaultdict(list)
    for _m, _p, body in early + late:
        event = json.loads(body)
        if event["agg"] != 7:
            others[event["agg"]].append(event["seq"])
    assert all(seqs == list(range(40)) for seqs in others.values())
    with psycopg.connect(database_url) as conn:
        dead = conn.execute("SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL").fetchone()
    assert dead == (1,)


def test_an_event_dead_at_once_lets_its_aggregate_go_on_in_order_across_overlapping_batches(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    # Given a backlog where agg-3's 7th event is too large for the broker: a permanent failure,
    # dead-lettered at once, while later events of agg-3 are already claimed in the next batch
    queue = bind_queue("order.*")
    _backlog(database_url, aggregates=10, per_aggregate=30)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE outbox SET payload = payload || jsonb_build_object('pad', repeat('x', 2000))"
            " WHERE aggregate_id = 'agg-3' AND payload->>'seq' = '6'"
        )

    # When the relay drains it with small, overlapping batches
    settings = relay_settings(
        database_url, broker_url, exchange, batch_size=16, max_message_bytes=1000
    )
    with RelayThread(settings):
        wait_until(lambda: queue.count() == 299, timeout=60)
        got = queue.drain()

    # Then nothing overtook: every aggregate in order, agg-3 without its dead event, once each
    seen: dict[int, list[int]] = defaultdict(list)
    for _m, _p, body in got:
        event = json.loads(body)
        seen[event["agg"]].append(event["seq"])
    assert seen.pop(3) == [s for s in range(30) if s != 6]
    assert all(seqs == list(range(30)) for seqs in seen.values())
    with psycopg.connect(database_url) as conn:
        dead = conn.execute(
            "SELECT payload->>'seq', last_error FROM outbox WHERE dead_at IS NOT NULL"
        ).fetchall()
    assert len(dead) == 1
    assert dead[0][0] == "6"
    assert "exceeds" in dead[0][1]


def test_a_claim_that_overlaps_a_failed_batchs_settle_still_holds_its_aggregate_back(
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given A0 (unroutable: it will back off), B0, then A1 and B1, claimed two per lane
    queue = bind_queue("order.*")
    with psycopg.connect(database_url) as conn:
        for event_type, aggregate, seq in [
            ("nobody.listens", "A", 0),
            ("order.updated", "B", 0),
            ("order.updated", "A", 1),
            ("order.updated", "B", 1),
        ]:
            conn.execute(
                "INSERT INTO outbox (event_type, aggregate_id, payload)"
                " VALUES (%s, %s, jsonb_build_object('agg', %s::text, 'seq', %s::int))",
                (event_type, aggregate, aggregate, seq),
            )
    # and a second lane whose claim reads its rows before the first batch settles but returns
    # only after that (a slow claim query): the table it read did not show A0 failing yet
    real_claim = OutboxStore.claim

    async def slow_claim(
        self: OutboxStore, limit: int, share: Share, *, in_flight: Sequence[int] = ()
    ) -> Any:
        rows = await real_claim(self, limit, share, in_flight=in_flight)
        if rows and self.application_name.endswith(":lane2"):
            await asyncio.sleep(0.5)
        return rows

    monkeypatch.setattr(OutboxStore, "claim", slow_claim)
    settings = relay_settings(
        database_url, broker_url, exchange, batch_size=4, retry_backoff=30.0, retry_backoff_max=30.0
    )

    # When the relay publishes them
    with RelayThread(settings):
        wait_until(lambda: queue.count() >= 2, timeout=30)
        time.sleep(1.0)  # A1 would have followed by now if it were not held back
        got = [(json.loads(b)["agg"], json.loads(b)["seq"]) for _m, _p, b in queue.drain()]

    # Then B flowed and A1 waits behind A0, which is backing off
    assert sorted(got) == [("B", 0), ("B", 1)]
    with psycopg.connect(database_url) as conn:
        pending = conn.execute(
            "SELECT aggregate_id, payload->>'seq', attempts FROM outbox ORDER BY id"
        ).fetchall()
    assert pending == [("A", "0", 1), ("A", "1", 0)]
