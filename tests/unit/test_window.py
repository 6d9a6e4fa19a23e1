"""The window: per-aggregate commit order with a confirm at a time, hold-back after a failure,
and the suspects a broker that closes the connection over one message leaves behind."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import pytest

from outbox_relay.errors import BrokerRejectedMessageError
from outbox_relay.messages import CONFIRMED, OutboxMessage, PublishResult, failed
from outbox_relay.publishers.base import OnResult
from outbox_relay.relay.window import Batch, Window


def message(id_: int, aggregate_id: str | None, *, problem: str | None = None) -> OutboxMessage:
    return OutboxMessage(
        id=id_,
        event_id=f"00000000-0000-0000-0000-{id_:012d}",
        event_type="order.created",
        aggregate_type="order",
        aggregate_id=aggregate_id,
        payload=b"{}",
        headers={},
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
        problem=problem,
    )


class ScriptedBroker:
    """A publisher whose confirms the test hands out one message at a time."""

    def __init__(self) -> None:
        self.waves: list[list[int]] = []
        self._callbacks: dict[int, OnResult] = {}
        self._index: dict[int, int] = {}
        self._wave_of: dict[int, int] = {}
        self._ends: list[asyncio.Future[None]] = []

    async def publish(
        self, messages: Sequence[OutboxMessage], on_result: OnResult
    ) -> Sequence[PublishResult]:
        self.waves.append([m.id for m in messages])
        end: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ends.append(end)
        for index, m in enumerate(messages):
            self._callbacks[m.id] = on_result
            self._index[m.id] = index
            self._wave_of[m.id] = len(self._ends) - 1
        await end
        return []  # every result was reported through on_result

    @property
    def unanswered(self) -> list[int]:
        return sorted(self._callbacks)

    @property
    def sent(self) -> list[int]:
        return [id_ for wave in self.waves for id_ in wave]

    async def answer(self, id_: int, result: PublishResult = CONFIRMED) -> None:
        self._callbacks.pop(id_)(self._index[id_], result)
        wave = self._wave_of[id_]
        if not any(self._wave_of[i] == wave for i in self._callbacks):
            self._ends[wave].set_result(None)  # the publish call returns with its last answer
        await turn()

    async def lose_connection(self, error: BaseException) -> None:
        for end in self._ends:
            if not end.done():
                end.set_exception(error)
        await turn()


async def turn() -> None:
    """Let every task run until it waits on something the test controls."""
    for _ in range(10):
        await asyncio.sleep(0)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def window(broker: ScriptedBroker, done: list[Batch], **kwargs: object) -> Window:
    return Window(broker.publish, done.append, **kwargs)  # type: ignore[arg-type]  # test kwargs


def test_an_event_goes_the_moment_its_predecessor_is_confirmed_not_its_wave() -> None:
    async def scenario() -> None:
        broker, done = ScriptedBroker(), []
        w = window(broker, done)
        w.add(Batch([message(1, "a"), message(2, "b"), message(3, "a"), message(4, "b")]))
        await turn()
        assert broker.waves == [[1, 2]]

        await broker.answer(1)
        # 3 follows 1 at once, although 2 (same wave as 1) is still unconfirmed.
        assert broker.waves == [[1, 2], [3]]
        await broker.answer(2)
        assert broker.waves == [[1, 2], [3], [4]]

    run(scenario)


def test_events_without_an_aggregate_and_other_aggregates_never_wait() -> None:
    async def scenario() -> None:
        broker, done = ScriptedBroker(), []
        w = window(broker, done)
        w.add(Batch([message(1, "a"), message(2, None), message(3, "a"), message(4, "c")]))
        await turn()
        assert broker.waves == [[1, 2, 4]]

    run(scenario)


def test_the_next_batch_chains_behind_the_one_in_flight() -> None:
    async def scenario() -> None:
        broker, done = ScriptedBroker(), []
        w = window(broker, done)
        first = Batch([message(1, "a"), message(2, "b")])
        second = Batch([message(3, "a"), message(4, "c")])
        w.add(first)
        w.add(second)
        await turn()
        assert broker.sent == [1, 2, 4]
        await broker.answer(1)
        assert broker.sent == [1, 2, 4, 3]
        for id_ in (2, 4, 3):
            await broker.answer(id_)
        assert done == [first, second]
        assert (first.sent, second.sent) == ([1, 2], [4, 3])

    run(scenario)


def test_a_failed_event_holds_back_its_aggregate_in_this_and_later_batches() -> None:
    async def scenario() -> None:
        broker, done = ScriptedBroker(), []
        w = window(broker, done)
        first = Batch([message(1, "a"), message(2, "a"), message(3, "b")])
        w.add(first)
        await turn()
        await broker.answer(1, failed("nacked"))
        await broker.answer(3)
        assert first in done
        assert first.held == 1
        assert [f.id for f in first.failures] == [1]

        # A claim that started before the failure was settled still brings a's next event:
        # it is held back too, never sent ahead of event 1.
        second = Batch([message(4, "a"), message(5, "b")])
        w.add(second)
        await turn()
        assert broker.sent == [1, 3, 5]
        assert second.held == 1

        # Once every batch holding a's events has settled, claims see the failure in the
        # table: the chain is forgotten before the next claim.
        w.settled(first)
        w.settled(second)
        w.before_claim()
        w.add(Batch([message(6, "a")]))
        await turn()
        assert broker.sent[-1] == 6

    run(scenario)


def test_a_chain_stays_blocked_while_a_batch_holding_its_events_is_unsettled() -> None:
    async def scenario() -> None:
        broker, done = ScriptedBroker(), []
        w = window(broker, done)
        first = Batch([message(1, "a")])
        second = Batch([message(2, "a"), message(3, "z")])
        w.add(first)
        w.add(second)
        await turn()
        await broker.answer(1, failed("refused", permanent=True))
        w.settled(first)  # event 1 is dead; event 2 is still locked by the unsettled second
        w.before_claim()
        w.add(Batch([message(4, "a")]))  # must not overtake event 2
        await turn()
        assert 4 not in broker.sent

    run(scenario)


def test_rows_held_back_by_their_claim_block_their_aggregate_until_it_settles() -> None:
    async def scenario() -> None:
        broker, done = ScriptedBroker(), []
        w = window(broker, done)
        # CDC left event 2 of "a" to the table path (held back, still locked by this batch)
        cdc = Batch([message(1, "a"), message(3, "b")], held_back=[message(2, "a")])
        w.add(cdc)
        await turn()
        assert 2 in w.in_flight_ids()
        # A claim meanwhile passes over event 2 and brings "a"'s later events: held, not sent
        sweep = Batch([message(4, "a"), message(5, "c")])
        w.add(sweep)
        await turn()
        await broker.answer(1)
        await broker.answer(3)
        await broker.answer(5)
        assert broker.sent == [1, 3, 5]
        assert sweep.held == 1
        assert cdc.held == 1
        # While the holders commit, no claim starts (it would take the held rows again)
        assert w.holders_settling()
        w.settled(cdc)
        assert w.holders_settling()
        w.settled(sweep)
        assert not w.holders_settling()
        # Then claims see the table: event 2 first, then 4
        w.before_claim()
        w.add(Batch([message(2, "a"), message(4, "a")]))
        await turn()
        await broker.answer(2)
        assert broker.sent == [1, 3, 5, 2, 4]

    run(scenario)


def test_a_change_between_looking_at_the_window_and_waiting_is_not_lost() -> None:
    # The relay looks at the window (watch), then waits (changed): a batch settling in between
    # must end the wait at once, not after the poll interval.
    async def scenario() -> None:
        broker, done = ScriptedBroker(), []
        w = window(broker, done)
        w.watch()
        waiting = asyncio.ensure_future(w.changed())  # created, not yet running
        w.notify()  # e.g. a settle finishing before the waiting task first runs
        await asyncio.wait_for(waiting, timeout=1)

    run(scenario)


def test_rows_that_cannot_be_messages_fail_at_once_without_being_sent() -> None:
    async def scenario() -> None:
        broker, done = ScriptedBroker(), []
        w = window(broker, done, check=lambda m: "too large" if m.id == 2 else None)
        batch = Batch([message(1, "a", problem="created_at out of range"), message(2, "b")])
        w.add(batch)
        await turn()
        assert broker.sent == []
        assert [(f.id, f.permanent) for f in batch.failures] == [(1, True), (2, True)]
        assert done == [batch]

    run(scenario)


def test_a_suspect_goes_alone_and_is_charged_when_it_breaks_the_connection_again() -> None:
    async def scenario() -> None:
        broker, done = ScriptedBroker(), []
        suspects = {message(3, "c").event_id}
        w = window(broker, done, suspects=suspects)
        w.add(Batch([message(1, "a"), message(2, "b")]))
        await turn()
        w.add(Batch([message(3, "c"), message(4, "d")]))
        await turn()
        # The suspect waits until nothing else is on the wire, then goes by itself, and
        # nothing else goes until it is answered.
        assert broker.waves == [[1, 2]]
        await broker.answer(1)
        await broker.answer(2)
        assert broker.waves == [[1, 2], [3]]
        await broker.lose_connection(BrokerRejectedMessageError("closed over a frame"))
        assert w.failed_solo is not None
        assert w.failed_solo.id == 3
        assert [m.id for m in w.unconfirmed()] == [3]

    run(scenario)


def test_a_confirmed_suspect_is_cleared_and_the_rest_flows() -> None:
    async def scenario() -> None:
        broker, done = ScriptedBroker(), []
        suspects = {message(1, "a").event_id}
        w = window(broker, done, suspects=suspects)
        w.add(Batch([message(1, "a"), message(2, "b")]))
        await turn()
        assert broker.waves == [[1]]
        await broker.answer(1)
        assert broker.waves == [[1], [2]]
        assert suspects == set()

    run(scenario)


def test_a_charged_event_fails_once_without_being_sent() -> None:
    async def scenario() -> None:
        broker, done = ScriptedBroker(), []
        charges = {message(2, "b").event_id: "closed the connection while alone"}
        w = window(broker, done, charges=charges)
        batch = Batch([message(2, "b"), message(3, "b")])
        w.add(batch)
        await turn()
        assert broker.sent == []
        assert [f.reason for f in batch.failures] == ["closed the connection while alone"]
        assert batch.held == 1
        assert charges == {}

    run(scenario)


def test_a_lost_connection_ends_the_window_with_its_error() -> None:
    async def scenario() -> None:
        broker, done = ScriptedBroker(), []
        w = window(broker, done)
        w.add(Batch([message(1, "a"), message(2, "b")]))
        await turn()
        await broker.answer(1)
        error = ConnectionError("gone")
        await broker.lose_connection(error)
        assert w.error is error
        assert [m.id for m in w.unconfirmed()] == [2]
        await w.close()

    run(scenario)


@pytest.mark.parametrize("aggregates", [1, 7, 200])
def test_every_aggregate_is_published_in_id_order_whatever_the_confirm_order(
    aggregates: int,
) -> None:
    async def scenario() -> None:
        broker, done = ScriptedBroker(), []
        w = window(broker, done)
        messages = [message(n, f"agg-{n % aggregates}") for n in range(1, 401)]
        for start in range(0, 400, 100):
            w.add(Batch(messages[start : start + 100]))
        await turn()
        while broker.unanswered:
            # Answer the newest message on the wire first: the most hostile order.
            await broker.answer(broker.unanswered[-1])
        per_aggregate: dict[str, list[int]] = {}
        for id_ in broker.sent:
            per_aggregate.setdefault(f"agg-{id_ % aggregates}", []).append(id_)
        assert all(ids == sorted(ids) for ids in per_aggregate.values())
        assert sorted(broker.sent) == list(range(1, 401))

    run(scenario)
