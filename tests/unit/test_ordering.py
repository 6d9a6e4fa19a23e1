"""plan_waves: the k-th event of every aggregate goes in wave k, batch order kept inside a wave."""

from __future__ import annotations

from datetime import UTC, datetime

from outbox_relay.messages import OutboxMessage
from outbox_relay.ordering import plan_waves


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


def ids(waves: list[list[OutboxMessage]]) -> list[list[int]]:
    return [[m.id for m in wave] for wave in waves]


def test_empty_batch_has_no_waves() -> None:
    assert plan_waves([]) == []


def test_distinct_aggregates_go_in_one_wave_in_batch_order() -> None:
    batch = [message(1, "a"), message(2, "b"), message(3, "c")]
    assert ids(plan_waves(batch)) == [[1, 2, 3]]


def test_kth_event_of_each_aggregate_goes_in_wave_k() -> None:
    batch = [
        message(1, "a"),
        message(2, "b"),
        message(3, "a"),
        message(4, "a"),
        message(5, "c"),
        message(6, "b"),
    ]
    assert ids(plan_waves(batch)) == [[1, 2, 5], [3, 6], [4]]


def test_events_without_aggregate_all_go_in_the_first_wave() -> None:
    batch = [message(1, None), message(2, "a"), message(3, None), message(4, "a"), message(5, None)]
    assert ids(plan_waves(batch)) == [[1, 2, 3, 5], [4]]


def test_one_aggregate_becomes_one_event_per_wave() -> None:
    batch = [message(i, "only") for i in range(1, 6)]
    assert ids(plan_waves(batch)) == [[1], [2], [3], [4], [5]]


def test_every_message_is_planned_once_and_each_aggregate_keeps_its_order() -> None:
    aggregates = ["a", "b", None, "c", "a", "a", None, "b", "d", "c", "a"]
    batch = [message(i, agg) for i, agg in enumerate(aggregates, start=1)]
    waves = plan_waves(batch)

    flat = [m.id for wave in waves for m in wave]
    assert sorted(flat) == [m.id for m in batch]
    for aggregate in {"a", "b", "c", "d"}:
        order = [m.id for wave in waves for m in wave if m.aggregate_id == aggregate]
        assert order == [m.id for m in batch if m.aggregate_id == aggregate]
        # No wave carries two events of one aggregate: they would race on the wire.
        assert all(sum(m.aggregate_id == aggregate for m in wave) <= 1 for wave in waves)
