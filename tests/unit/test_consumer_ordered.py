"""Ordered mode without a broker: the switch in settings, CLI and environment, the ordered
topology's names, and how many partitions a worker aims to hold."""

from __future__ import annotations

import itertools

import pytest
import typer.main

from outbox_relay.cli import app
from outbox_relay.consumer import ConsumerSettings
from outbox_relay.consumer.partitions import share, shares
from outbox_relay.consumer.topology import QueueType, Topology
from outbox_relay.errors import ConfigError


def test_ordered_is_off_by_default_and_leaves_the_topology_as_it_was() -> None:
    settings = ConsumerSettings(queue="order.events", max_attempts=3, retry_delay=0.5)
    topology = settings.topology()
    assert (settings.ordered, topology.ordered) == (False, False)
    assert topology.retry_queues == ["order.events.retry.500ms", "order.events.retry.1000ms"]
    assert topology.consumed_queues == ["order.events"]
    assert topology.partition_queues == []
    assert "partition_queues" not in settings.describe()


def test_the_ordered_topology_is_partitions_behind_a_hash_exchange_without_retry_queues() -> None:
    settings = ConsumerSettings(queue="order.events", ordered=True, partition_queues=4)
    topology = settings.topology()
    assert topology.hash_exchange == "order.events.hash"
    assert topology.partition_queues == [f"order.events.p0{n}" for n in range(4)]
    assert topology.consumed_queues == topology.partition_queues
    assert topology.retry_queues == []  # retried in place
    assert topology.delays == (1.0, 2.0, 4.0, 8.0)  # still the backoff between attempts
    assert (topology.workers_queue, topology.hungry_queue) == (
        "order.events.workers",
        "order.events.workers.hungry",
    )
    assert settings.describe()["partition_queues"] == 4


def test_ordered_quorum_queues_and_bad_partition_counts_are_refused() -> None:
    with pytest.raises(ConfigError, match="--ordered needs classic partition queues"):
        ConsumerSettings(queue="q", ordered=True, queue_type="quorum").topology()
    with pytest.raises(ConfigError, match="--ordered needs classic"):
        Topology("q", ordered=True, queue_type=QueueType.QUORUM)
    for bad in ("0", "101", "many"):
        with pytest.raises(
            ConfigError, match=r"^--partition-queues \(OUTBOX_RELAY_PARTITION_QUEUES\): "
        ):
            ConsumerSettings.from_mapping({"queue": "q", "partition_queues": bad})
    # Quorum without --ordered works as before.
    assert Topology("q", queue_type=QueueType.QUORUM).queue_type is QueueType.QUORUM


def test_the_switch_is_a_flag_and_a_variable_of_consume_and_topology_apply() -> None:
    command = typer.main.get_command(app)
    for path in (("consume",), ("topology", "apply")):
        target = command
        for name in path:
            target = target.commands[name]  # type: ignore[attr-defined]
        options = {p.name: p for p in target.params}
        assert "--ordered" in options["ordered"].opts
        assert options["ordered"].envvar == "OUTBOX_RELAY_ORDERED"
        # Not OUTBOX_RELAY_PARTITIONS: that is `migrate --partitions`, the relay's own.
        assert options["partition_queues"].envvar == "OUTBOX_RELAY_PARTITION_QUEUES"
    assert ConsumerSettings.from_mapping({"queue": "q", "ordered": "true"}).ordered is True


@pytest.mark.parametrize(("partitions", "workers"), [(16, 1), (16, 3), (16, 5), (4, 6), (1, 2)])
def test_shares_cover_every_partition(partitions: int, workers: int) -> None:
    low, high = shares(partitions, workers)
    assert low * workers <= partitions <= high * workers
    assert high - low <= 1
    assert share(partitions, workers, others_hungry=False) == high
    assert share(partitions, workers, others_hungry=True) == low


def simulate(partitions: int, held: list[int], rounds: int = 20) -> list[int]:
    """The rebalance rule run round-robin over workers holding ``held`` partitions."""
    free = partitions - sum(held)
    for _, worker in itertools.product(range(rounds), range(len(held))):
        workers = len(held)
        low = shares(partitions, workers)[0]
        hungry = sum(1 for n, h in enumerate(held) if h < low and n != worker)
        want = share(partitions, workers, hungry > 0)
        if held[worker] > want:
            free += held[worker] - want
            held[worker] = want
        take = min(free, max(0, want - held[worker]))
        held[worker] += take
        free -= take
    return held


@pytest.mark.parametrize(
    ("partitions", "held", "expected"),
    [
        (16, [16, 0], [8, 8]),  # a second worker joins
        (16, [4, 4, 4, 4, 0], [3, 3, 3, 3, 4]),  # a fifth joins: nobody is left idle
        (16, [6, 5, 0], [5, 5, 6]),  # a worker died: its partitions are free again
        (4, [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]),  # more workers than partitions: standbys
    ],
)
def test_the_rebalance_rule_converges_to_an_even_spread(
    partitions: int, held: list[int], expected: list[int]
) -> None:
    result = simulate(partitions, list(held))
    assert sum(result) == partitions
    assert sorted(result) == sorted(expected)


@pytest.mark.parametrize("partitions", [1, 16, 100])
def test_partition_names_sort_in_the_order_they_are_bound(partitions: int) -> None:
    # After a restart RabbitMQ rebuilds the hash ring from the bindings sorted by queue name:
    # only if that is the binding order does every aggregate keep its partition.
    queues = Topology("order.events", ordered=True, partitions=partitions).partition_queues
    assert queues == sorted(queues)
    assert len(set(queues)) == partitions
