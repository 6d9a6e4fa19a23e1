"""Routing rules (``--route``) on RabbitMQ: events go to the exchange their first matching rule
names, the rest to ``--exchange``, each aggregate's events in commit order, in notify and cdc
mode."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pika
import psycopg
import pytest

import outbox_relay
from outbox_relay.relay.settings import Mode
from tests.cdc_support import drop_slot_eventually, slot_row, unique_slot_name
from tests.conftest import RabbitQueue, rabbit_cleanup, wait_until
from tests.integration.relay_harness import (
    Delivery,
    RelayThread,
    collect,
    drain,
    per_aggregate,
    relay_settings,
)

pytestmark = pytest.mark.integration

EVENTS_PER_AGGREGATE = 6


class Exchanges:
    """Unique durable topic exchanges, each with one queue bound with '#'."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.queues: dict[str, RabbitQueue] = {}

    def make(self, role: str) -> str:
        name = f"routed.{role}.{uuid.uuid4().hex[:8]}"
        self.bind(name)
        return name

    def bind(self, exchange: str) -> RabbitQueue:
        queue = f"q.routed.{uuid.uuid4().hex[:10]}"
        conn = pika.BlockingConnection(pika.URLParameters(self.broker_url))
        channel = conn.channel()
        channel.exchange_declare(exchange, "topic", durable=True)
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, exchange, "#")
        conn.close()
        self.queues[exchange] = RabbitQueue(self.broker_url, exchange, queue, ["#"])
        return self.queues[exchange]

    def close(self, keep: str) -> None:
        for exchange, queue in self.queues.items():
            rabbit_cleanup(self.broker_url, lambda ch, q=queue.name: ch.queue_delete(q))
            if exchange != keep:
                rabbit_cleanup(self.broker_url, lambda ch, e=exchange: ch.exchange_delete(e))


@pytest.fixture
def exchanges(broker_url: str, exchange: str) -> Iterator[Exchanges]:
    made = Exchanges(broker_url)
    yield made
    made.close(keep=exchange)  # the test's own exchange is the exchange fixture's to delete


def emit_all(database_url: str, plan: list[dict[str, Any]]) -> None:
    """One transaction per event, round-robin over aggregates (their events interleave)."""
    with psycopg.connect(database_url) as conn:
        for event in plan:
            outbox_relay.emit(conn, **event)
            conn.commit()


@pytest.mark.parametrize("mode", [Mode.NOTIFY, Mode.CDC])
def test_events_go_where_the_first_matching_rule_says_in_per_aggregate_order(
    database_url: str, broker_url: str, exchange: str, exchanges: Exchanges, mode: Mode
) -> None:
    # Given an exchange per aggregate type, one for a tenant's events, one for refunds by type
    orders, customers, invoices = (exchanges.make(k) for k in ("order", "customer", "invoice"))
    acme, refunds = exchanges.make("acme"), exchanges.make("refund")
    default = exchanges.bind(exchange)
    routes = [
        f"header.tenant:acme={acme}",  # first: acme's orders go to acme, not to orders
        f"refund.#={refunds}",
        f"aggregate:order={orders}",
        f"aggregate:customer={customers}",
        f"aggregate:invoice={invoices}",
    ]
    plan: list[dict[str, Any]] = []
    expected: dict[str, dict[str, list[int]]] = {name: {} for name in exchanges.queues}
    aggregates = [
        ("order", "o-1", orders, None),
        ("order", "o-2", orders, None),
        ("customer", "c-1", customers, None),
        ("invoice", "i-1", invoices, None),
        ("order", "o-acme", acme, {"tenant": "acme"}),
        ("shipment", "s-1", exchange, None),  # no rule: the default exchange
    ]
    for seq in range(1, EVENTS_PER_AGGREGATE + 1):
        for aggregate_type, aggregate_id, destination, headers in aggregates:
            plan.append(
                {
                    "event_type": f"{aggregate_type}.changed",
                    "payload": {"seq": seq},
                    "aggregate_type": aggregate_type,
                    "aggregate_id": aggregate_id,
                    "headers": headers,
                }
            )
            expected[destination].setdefault(aggregate_id, []).append(seq)
    # A refund event of an order goes by its type rule, which comes before the aggregate rule
    plan.append(
        {
            "event_type": "refund.issued",
            "payload": {"seq": 1},
            "aggregate_type": "order",
            "aggregate_id": "o-r",
        }
    )
    expected[refunds]["o-r"] = [1]

    slot = unique_slot_name()
    overrides: dict[str, Any] = {"mode": mode, "route": routes}
    if mode is Mode.CDC:
        overrides.update(slot_name=slot, publication=slot, heartbeat_interval=0.5)
    settings = relay_settings(database_url, broker_url, exchange, **overrides)
    received: dict[str, list[Delivery]] = {}
    try:
        with RelayThread(settings) as relay:
            wait_until(lambda: relay.leading, timeout=30)
            if mode is Mode.CDC:
                wait_until(lambda: slot_streaming(database_url, slot), timeout=60)
            # When the events are committed
            emit_all(database_url, plan)
            for name, queue in exchanges.queues.items():
                wanted = sum(len(seqs) for seqs in expected[name].values())
                received[name] = collect(queue, wanted, timeout=60)
            wait_until(lambda: outbox_empty(database_url), timeout=30)
            for queue in exchanges.queues.values():
                received[queue.exchange] += drain(queue)  # nothing more may arrive
    finally:
        if mode is Mode.CDC:
            drop_slot_eventually(database_url, slot)

    # Then each exchange got exactly its events, each aggregate's in commit order
    for name in exchanges.queues:
        assert per_aggregate(received[name]) == expected[name], name
        assert {d.exchange for d in received[name]} == {name}
    assert default.exchange == exchange


def slot_streaming(database_url: str, slot: str) -> bool:
    row = slot_row(database_url, slot)
    return bool(row and row["active"] and row["confirmed"] is not None)


def outbox_empty(database_url: str) -> bool:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM outbox").fetchone()
    return row is not None and row[0] == 0
