"""Pure logic of the consumer library: topic matching, handler registration, retry policy."""

from __future__ import annotations

from typing import Any

import pytest

from outbox_relay.cli.consumer import load_consumer
from outbox_relay.consumer import (
    Consumer,
    ConsumerSettings,
    Event,
    PermanentError,
    Reject,
    topic_matches,
)
from outbox_relay.consumer import topology as topo
from outbox_relay.errors import ConfigError


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("order.*", "order.created", True),
        ("order.*", "order", False),
        ("order.*", "order.created.v2", False),
        ("order.#", "order", True),
        ("order.#", "order.created.v2", True),
        ("#", "anything.at.all", True),
        ("#.v2", "order.created.v2", True),
        ("#.v2", "v2", True),
        ("*.created", "order.created", True),
        ("*.created", "created", False),
        ("order.created", "order.created", True),
        ("order.created", "order.paid", False),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
    ],
)
def test_topic_matching_follows_amqp_rules(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


def test_first_registered_matching_handler_wins() -> None:
    consumer = Consumer()
    calls: list[str] = []

    @consumer.handler("order.created")
    def created(event: Event, db: Any) -> None:
        calls.append("created")

    @consumer.handler("order.*")
    def other(event: Event) -> None:
        calls.append("other")

    event = Event("id", "order.paid", None, None, {}, {})
    route = consumer.route("order.paid")
    assert route is not None
    route.call(event, object())
    route = consumer.route("order.created")
    assert route is not None
    route.call(event, object())
    assert calls == ["other", "created"]
    assert consumer.route("user.created") is None
    assert consumer.patterns == ["order.created", "order.*"]


def test_handlers_may_take_the_transaction_or_not() -> None:
    consumer = Consumer()
    consumer.add_handler("a", lambda event: None)
    consumer.add_handler("b", lambda event, db: None)
    a, b = consumer.route("a"), consumer.route("b")
    assert a is not None
    assert b is not None
    assert (a.takes_transaction, b.takes_transaction) == (False, True)


def test_bad_patterns_are_refused() -> None:
    with pytest.raises(ConfigError):
        Consumer().add_handler("order..created", lambda event: None)


def test_permanent_errors_are_never_transient() -> None:
    consumer = Consumer()
    assert consumer.is_transient(ValueError())
    assert not consumer.is_transient(PermanentError())
    assert not consumer.is_transient(Reject())
    only_io = Consumer(transient=(OSError,))
    assert only_io.is_transient(ConnectionError())
    assert not only_io.is_transient(KeyError())


def test_retry_delays_double_and_are_capped() -> None:
    assert topo.retry_delays(1, 1.0) == ()
    assert topo.retry_delays(5, 0.2) == (0.2, 0.4, 0.8, 1.6)
    assert topo.retry_delays(6, 1.0, max_delay=5.0) == (1.0, 2.0, 4.0, 5.0, 5.0)
    with pytest.raises(ConfigError):
        topo.retry_delays(0, 1.0)


def test_topology_names_and_arguments() -> None:
    topology = topo.Topology(
        "order.events", ("order.*",), queue_type=topo.QueueType.QUORUM, delays=(1.0, 2.0, 2.0)
    )
    assert topology.dead_letter_queue == "order.events.dlq"
    assert topology.dead_letter_exchange == "order.events.dlx"
    assert topology.retry_queues == ["order.events.retry.1000ms", "order.events.retry.2000ms"]
    assert topology.main_queue_arguments() == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "order.events.dlx",
    }
    assert topology.retry_queue_arguments(2.0) == {
        "x-queue-type": "quorum",
        "x-message-ttl": 2000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "order.events",
    }
    classic = topo.Topology("q")
    assert "x-queue-type" not in classic.main_queue_arguments()


def test_settings_validate_their_numbers() -> None:
    base: dict[str, Any] = {
        "broker_url": "amqp://x",
        "database_url": "postgresql://x",
        "queue": "q",
    }
    with pytest.raises(ConfigError, match="--prefetch"):
        ConsumerSettings(**base, prefetch=0)
    with pytest.raises(ConfigError, match="--max-attempts"):
        ConsumerSettings(**base, max_attempts=0)
    settings = ConsumerSettings(**base, max_attempts=3, retry_delay=0.5)
    assert settings.topology().delays == (0.5, 1.0)
    assert settings.inbox_consumer == "q"
    assert "secret" not in repr(settings)
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.describe())


def test_load_consumer_accepts_a_consumer_or_a_function() -> None:
    consumer = load_consumer("examples.order_consumer:consumer")
    assert consumer.patterns == ["order.created", "order.cancelled", "order.*"]
    single = load_consumer("json:dumps")
    assert single.patterns == ["#"]
    with pytest.raises(ConfigError, match="module:object"):
        load_consumer("examples.order_consumer")
    with pytest.raises(ConfigError, match="cannot import"):
        load_consumer("no_such_module_here:x")
    with pytest.raises(ConfigError, match="no attribute"):
        load_consumer("examples.order_consumer:nope")
