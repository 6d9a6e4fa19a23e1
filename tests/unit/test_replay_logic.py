"""Pure logic of `outbox-relay replay`: topic patterns as SQL regexes, the selection's times and
checks, the default name, and the sequencer's order under refusals (a publish function stands in
for the broker; the integration tests use RabbitMQ)."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from outbox_relay.errors import ConfigError
from outbox_relay.messages import (
    CONFIRMED,
    OutboxMessage,
    PublishResult,
    failed,
    topic_matches,
    topic_pattern_problem,
    topic_regex,
)
from outbox_relay.publishers.base import OnResult
from outbox_relay.relay.replay import (
    REPLAY_HEADER,
    ReplaySettings,
    Sequencer,
    parse_time,
    resolve,
    saved_selection,
    selection_from_saved,
    stamped,
)

PATTERNS = ["order.*", "order.#", "#", "#.v2", "*.created", "a.#.z", "*", "*.*", "a.*.#", "#.#"]
KEYS = ["order", "order.created", "order.created.v2", "v2", "created", "a.z", "a.b.c.z", "a.b.c"]


@pytest.mark.parametrize(("pattern", "key"), list(itertools.product(PATTERNS, KEYS)))
def test_the_sql_regex_of_a_pattern_matches_exactly_what_amqp_routes(
    pattern: str, key: str
) -> None:
    # The regex runs in PostgreSQL against '.' || event_type; Python's re reads it alike.
    assert bool(re.fullmatch(topic_regex(pattern), "." + key)) is topic_matches(pattern, key)


@pytest.mark.parametrize(
    "pattern", ["order..created", "", "order created", "order.*x", "a.b#", "."]
)
def test_a_pattern_that_is_not_dot_words_is_refused(pattern: str) -> None:
    assert topic_pattern_problem(pattern) is not None


def test_a_pattern_with_words_stars_and_hashes_is_accepted() -> None:
    assert topic_pattern_problem("order:v1.*.created-x.#") is None


NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2h", NOW - timedelta(hours=2)),
        ("90s", NOW - timedelta(seconds=90)),
        ("7d", NOW - timedelta(days=7)),
        ("2026-12-01T10:00:00Z", datetime(2026, 12, 1, 10, tzinfo=UTC)),
        ("2026-12-01T10:00:00+02:00", datetime(2026, 12, 1, 8, tzinfo=UTC)),
        ("2026-12-01 10:00", datetime(2026, 12, 1, 10, tzinfo=UTC)),  # no zone: UTC
        ("2026-12-01", datetime(2026, 12, 1, tzinfo=UTC)),
    ],
)
def test_a_time_is_a_timestamp_or_a_duration_before_now(text: str, expected: datetime) -> None:
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "-2h", "2 weeks", ""])
def test_a_time_that_is_neither_is_one_line_naming_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--since: .* is not a time"):
        ReplaySettings.from_mapping({"since": text})


def test_since_after_until_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--since 1h .* is not before --until 2h"):
        ReplaySettings.from_mapping({"since": "1h", "until": "2h"})
    with pytest.raises(ConfigError, match="is not before"):
        ReplaySettings.from_mapping({"since": "2026-12-01", "until": "2026-12-01"})


def test_a_bare_replay_of_everything_needs_all() -> None:
    with pytest.raises(ConfigError, match=r"give a selection .* or --all"):
        ReplaySettings.from_mapping({})
    with pytest.raises(ConfigError, match="or --all"):
        ReplaySettings.from_mapping({"include_dead": True})
    for enough in ({"all": True}, {"resume": True}, {"dry_run": True}, {"aggregate_id": ["1"]}):
        ReplaySettings.from_mapping(enough)


def test_bad_patterns_and_names_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^--event-type: 'order\.\.x' is not an event type"):
        ReplaySettings.from_mapping({"event_type": ["order.*", "order..x"]})
    with pytest.raises(ConfigError, match=r"^--name: "):
        ReplaySettings.from_mapping({"name": "-x"})


def test_the_default_name_follows_the_selection_as_typed_and_the_destination() -> None:
    a = ReplaySettings.from_mapping({"since": "2h", "event_type": ["order.*"]})
    assert (
        a.replay_name()
        == ReplaySettings.from_mapping({"since": "2h", "event_type": ["order.*"]}).replay_name()
    )
    assert a.replay_name().startswith("replay-")
    other_type = ReplaySettings.from_mapping({"since": "2h", "event_type": ["order.#"]})
    other_exchange = ReplaySettings.from_mapping(
        {"since": "2h", "event_type": ["order.*"], "exchange": "replayed"}
    )
    assert len({a.replay_name(), other_type.replay_name(), other_exchange.replay_name()}) == 3
    assert ReplaySettings.from_mapping({"name": "mine", "all": True}).replay_name() == "mine"


def test_the_destination_never_shows_the_password() -> None:
    settings = ReplaySettings.from_mapping(
        {"broker_url": "amqp://app:s3cret@rabbit:5672/%2F", "exchange": "again", "all": True}
    )
    assert "s3cret" not in settings.destination()
    assert settings.destination().endswith("exchange again")


def test_a_saved_selection_resolves_to_the_times_it_had_when_it_started() -> None:
    given = ReplaySettings.from_mapping(
        {"since": "2h", "aggregate_id": ["7"], "event_type": ["order.*"]}
    ).given_selection()
    first = resolve(given, NOW)
    again = selection_from_saved(saved_selection(given, first))
    assert again == first
    assert again.since == NOW - timedelta(hours=2)


def test_the_replay_header_is_added_to_the_rows_own_headers() -> None:
    message = stamped(_message(1, "a", headers={"traceparent": "00-x"}))
    assert message.headers == {"traceparent": "00-x", REPLAY_HEADER: "true"}


# -- the sequencer ----------------------------------------------------------------------------


def _message(
    id_: int, aggregate: str | None, headers: dict[str, str] | None = None
) -> OutboxMessage:
    return OutboxMessage(
        id=id_,
        event_id=f"e{id_}",
        event_type="order.created",
        aggregate_type="order",
        aggregate_id=aggregate,
        payload=b"{}",
        headers=headers or {},
        created_at=NOW,
    )


class Broker:
    """Answers each publish on the next loop turns, in order; ``verdict`` decides per message
    and attempt. Records what was sent and every publish call's size."""

    def __init__(self, verdict: Callable[[OutboxMessage, int], PublishResult]) -> None:
        self.verdict = verdict
        self.sent: list[int] = []
        self.calls: list[int] = []
        self.attempts: dict[int, int] = {}

    async def publish(
        self, messages: Sequence[OutboxMessage], on_result: OnResult
    ) -> list[PublishResult]:
        self.calls.append(len(messages))
        results = []
        for index, message in enumerate(messages):
            self.sent.append(message.id)
            attempt = self.attempts[message.id] = self.attempts.get(message.id, 0) + 1
            await asyncio.sleep(0)
            result = self.verdict(message, attempt)
            on_result(index, result)
            results.append(result)
        return results


async def _run(sequencer: Sequencer, pages: list[list[OutboxMessage]]) -> None:
    for page in pages:
        sequencer.add(page)
    deadline = asyncio.get_running_loop().time() + 5
    while sequencer.outstanding and sequencer.refused is None and sequencer.error is None:
        sequencer.watch()
        await asyncio.wait_for(sequencer.changed(), deadline - asyncio.get_running_loop().time())
    await sequencer.close()


def _per_aggregate(sent: list[int], aggregate_of: dict[int, str | None]) -> dict[str, list[int]]:
    chains: dict[str, list[int]] = {}
    for id_ in sent:
        key = aggregate_of[id_]
        if key is not None:
            chains.setdefault(key, []).append(id_)
    return chains


def test_every_event_goes_once_in_per_aggregate_order_many_per_publish_call() -> None:
    messages = [_message(i, str(i % 10)) for i in range(1, 201)]
    broker = Broker(lambda _m, _a: CONFIRMED)

    async def main() -> Sequencer:
        sequencer = Sequencer(broker.publish)
        await _run(sequencer, [messages[:100], messages[100:]])
        return sequencer

    sequencer = asyncio.run(main())
    assert sorted(broker.sent) == list(range(1, 201))
    for chain in _per_aggregate(broker.sent, {m.id: m.aggregate_id for m in messages}).values():
        assert chain == sorted(chain)
    assert max(broker.calls) >= 10  # the heads of all ten aggregates went in one call
    assert (sequencer.position, sequencer.passed, sequencer.confirmed) == (200, 200, 200)


def test_a_refused_event_is_sent_again_before_any_later_event_of_its_aggregate() -> None:
    messages = [_message(i, "a" if i % 2 else "b") for i in range(1, 21)]

    def verdict(message: OutboxMessage, attempt: int) -> PublishResult:
        return failed("nacked") if message.id == 5 and attempt < 3 else CONFIRMED

    broker = Broker(verdict)

    async def main() -> Sequencer:
        sequencer = Sequencer(broker.publish, max_attempts=3, retry_backoff=0.01)
        await _run(sequencer, [messages])
        return sequencer

    sequencer = asyncio.run(main())
    chain_a = [i for i in broker.sent if i % 2]
    # Event 5 went three times, and nothing of aggregate "a" after it went before its third.
    assert chain_a == [1, 3, 5, 5, 5, *range(7, 21, 2)]
    assert sequencer.refused is None
    assert sequencer.position == 20


def test_an_event_refused_for_good_stops_its_aggregate_and_the_position_before_it() -> None:
    messages = [_message(i, "a" if i % 2 else "b") for i in range(1, 21)]
    broker = Broker(lambda m, _a: failed("too large", permanent=True) if m.id == 7 else CONFIRMED)

    async def main() -> Sequencer:
        sequencer = Sequencer(broker.publish, max_attempts=5, retry_backoff=0.01)
        await _run(sequencer, [messages])
        return sequencer

    sequencer = asyncio.run(main())
    assert sequencer.refused is not None
    assert sequencer.refused.message.id == 7
    assert sequencer.refused.reason == "too large"
    assert [i for i in broker.sent if i % 2] == [1, 3, 5, 7]  # nothing of "a" after 7
    assert sequencer.position == 6  # everything up to 6 confirmed; resume starts at 7
    assert broker.sent.count(7) == 1


def test_events_without_an_aggregate_have_no_order_to_wait_for() -> None:
    messages = [_message(i, None) for i in range(1, 51)]
    broker = Broker(lambda _m, _a: CONFIRMED)

    async def main() -> None:
        await _run(Sequencer(broker.publish), [messages])

    asyncio.run(main())
    assert broker.calls == [50]


def test_a_lost_connection_ends_the_sequencer_with_the_error() -> None:
    async def publish(
        messages: Sequence[OutboxMessage], on_result: OnResult
    ) -> list[PublishResult]:
        on_result(0, CONFIRMED)
        raise ConnectionError("gone")

    async def main() -> Sequencer:
        sequencer = Sequencer(publish)
        await _run(sequencer, [[_message(1, None), _message(2, None)]])
        return sequencer

    sequencer = asyncio.run(main())
    assert isinstance(sequencer.error, ConnectionError)
    assert sequencer.position == 1
    assert sequencer.on_wire == 0
