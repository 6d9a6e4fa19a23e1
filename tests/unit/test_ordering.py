"""Per-aggregate ordering across batches in flight: an event goes once the previous event of its
aggregate is confirmed, is held back when that one failed, and never waits for anything else."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest

from outbox_relay.messages import CONFIRMED, OutboxMessage, PublishResult, failed
from outbox_relay.relay.ordering import AggregateChains, publish_in_order


def message(id_: int, aggregate_id: str | None) -> OutboxMessage:
    return OutboxMessage(
        id=id_,
        event_id=f"00000000-0000-0000-0000-{id_:012d}",
        event_type="order.created",
        aggregate_type="order",
        aggregate_id=aggregate_id,
        payload=b"{}",
        headers={},
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
    )


class ScriptedBroker:
    """A publish function whose confirms the test hands out, call by call."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self._pending: list[asyncio.Future[list[PublishResult]]] = []

    async def publish(self, messages: list[OutboxMessage]) -> list[PublishResult]:
        self.calls.append([m.id for m in messages])
        future: asyncio.Future[list[PublishResult]] = asyncio.get_running_loop().create_future()
        self._pending.append(future)
        return await future

    async def confirm(self, ids: list[int], *, refuse: frozenset[int] = frozenset()) -> None:
        """Settle the call that sent exactly ``ids``."""
        self._pending[self.calls.index(ids)].set_result(
            [failed("refused") if i in refuse else CONFIRMED for i in ids]
        )
        await settle()

    async def break_link(self, ids: list[int]) -> None:
        self._pending[self.calls.index(ids)].set_exception(ConnectionError("broker gone"))
        await settle()


async def settle() -> None:
    """Let every task run until it waits on something the test controls."""
    for _ in range(10):
        await asyncio.sleep(0)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def sent_ids(results: list[tuple[OutboxMessage, PublishResult]]) -> list[int]:
    return sorted(m.id for m, r in results if r.confirmed)


def test_the_next_batch_goes_on_the_wire_before_the_previous_one_is_confirmed() -> None:
    async def scenario() -> None:
        broker, chains = ScriptedBroker(), AggregateChains()
        first = chains.link([message(1, "a"), message(2, "b"), message(3, None)])
        second = chains.link([message(4, "c"), message(5, None)])

        one = asyncio.ensure_future(publish_in_order(first.links, broker.publish))
        two = asyncio.ensure_future(publish_in_order(second.links, broker.publish))
        await settle()

        # Nothing of the second batch waits: no aggregate of it is in flight.
        assert broker.calls == [[1, 2, 3], [4, 5]]
        await broker.confirm([4, 5])
        assert two.done()
        assert not one.done()
        await broker.confirm([1, 2, 3])
        assert sent_ids(await one) == [1, 2, 3]
        assert sent_ids(await two) == [4, 5]

    run(scenario)


def test_an_event_waits_only_for_the_previous_event_of_its_aggregate() -> None:
    async def scenario() -> None:
        broker, chains = ScriptedBroker(), AggregateChains()
        first = chains.link([message(1, "a"), message(2, "b"), message(3, "a")])
        second = chains.link([message(4, "a"), message(5, "c"), message(6, "b")])

        one = asyncio.ensure_future(publish_in_order(first.links, broker.publish))
        two = asyncio.ensure_future(publish_in_order(second.links, broker.publish))
        await settle()
        assert broker.calls == [[1, 2], [5]]

        await broker.confirm([1, 2])  # a3 and b6 may go now; a4 still waits for a3
        assert sorted(broker.calls[2:]) == [[3], [6]]
        await broker.confirm([3])
        assert broker.calls[4:] == [[4]]
        for ids in ([5], [6], [4]):
            await broker.confirm(ids)
        assert sent_ids(await one) == [1, 2, 3]
        assert sent_ids(await two) == [4, 5, 6]

    run(scenario)


def test_a_refused_event_holds_back_the_later_events_of_its_aggregate_only() -> None:
    async def scenario() -> None:
        broker, chains = ScriptedBroker(), AggregateChains()
        first = chains.link([message(1, "a"), message(2, "b"), message(3, "a")])
        second = chains.link([message(4, "a"), message(5, "b"), message(6, "c")])

        one = asyncio.ensure_future(publish_in_order(first.links, broker.publish))
        two = asyncio.ensure_future(publish_in_order(second.links, broker.publish))
        await settle()
        await broker.confirm([1, 2], refuse=frozenset({1}))

        # a3 and a4 are never sent; b5 follows b2; c6 went at once.
        assert broker.calls == [[1, 2], [6], [5]]
        await broker.confirm([6])
        await broker.confirm([5])
        first_results, second_results = await one, await two
        assert [(m.id, r.confirmed) for m, r in first_results] == [(1, False), (2, True)]
        assert sent_ids(second_results) == [5, 6]
        assert 4 not in [m.id for m, _r in second_results]  # held back: not an attempt

    run(scenario)


def test_events_of_one_aggregate_in_one_batch_go_one_at_a_time() -> None:
    async def scenario() -> None:
        broker, chains = ScriptedBroker(), AggregateChains()
        batch = chains.link([message(i, "only") for i in range(1, 4)])

        task = asyncio.ensure_future(publish_in_order(batch.links, broker.publish))
        for n in range(1, 4):
            await settle()
            assert broker.calls[-1] == [n]
            await broker.confirm([n])
        assert sent_ids(await task) == [1, 2, 3]

    run(scenario)


def test_a_lost_broker_ends_the_batch_and_what_waited_on_it_is_held_back() -> None:
    async def scenario() -> None:
        broker, chains = ScriptedBroker(), AggregateChains()
        first = chains.link([message(1, "a")])
        second = chains.link([message(2, "a"), message(3, "b")])

        one = asyncio.ensure_future(publish_in_order(first.links, broker.publish))
        two = asyncio.ensure_future(publish_in_order(second.links, broker.publish))
        await settle()
        await broker.break_link([1])

        with pytest.raises(ConnectionError):
            await one
        await broker.confirm([3])
        assert broker.calls == [[1], [3]]
        assert sent_ids(await two) == [3]

    run(scenario)


def test_a_settled_batch_holds_its_aggregates_until_it_is_forgotten() -> None:
    async def scenario() -> None:
        chains = AggregateChains()
        first = chains.link([message(1, "a"), message(2, "b")])
        first.links[1].resolve(True)
        first.close()  # settled: a1 was not confirmed

        # A claim that started before that settle committed is linked only now: a2 must still
        # find a1's outcome, as the table did not show it the failure yet.
        second = chains.link([message(3, "a"), message(4, "b")])
        assert second.links[0].may_go() is False
        assert second.links[1].may_go() is True

        chains.forget(first)
        chains.forget(second)
        assert len(chains) == 0
        third = chains.link([message(5, "a")])  # later claims see the table: nothing to wait for
        assert third.links[0].after is None

    run(scenario)


def test_forgetting_a_batch_keeps_the_links_of_later_batches() -> None:
    async def scenario() -> None:
        chains = AggregateChains()
        first = chains.link([message(1, "a"), message(2, "b")])
        second = chains.link([message(3, "b")])
        chains.forget(first)

        # b is still chained behind the second batch; a is free.
        assert len(chains) == 1
        third = chains.link([message(4, "a"), message(5, "b")])
        assert third.links[0].after is None
        assert third.links[1].after is second.links[0].outcome
        # A forgotten batch's unsent events count as failed for whatever follows them.
        assert first.links[0].outcome.result() is False

    run(scenario)
