"""`outbox-relay replay` as a user runs it: kept events published again to a second exchange,
complete and in per-aggregate order, by time window and by aggregate; interrupted (SIGINT,
SIGKILL) and resumed without sending anything twice beyond the batch in flight; --dry-run; dead
rows skipped and reported; a refused event stopping its aggregate; one-line errors.

The outbox is filled with SQL as the relay leaves it with --on-sent keep: kept rows carry
published_at, dead rows dead_at, pending rows neither (never replayed: the relay owns them).
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import psycopg
import pytest

from tests.acceptance.conftest import Roles, cli_env, relay_command, run_cli
from tests.conftest import RabbitQueue, wait_until

pytestmark = pytest.mark.acceptance

EXIT_CONFIG = 3
EXIT_UNAVAILABLE = 5
TYPES = ("order.created", "order.paid", "invoice.sent")
START = datetime(2026, 11, 1, tzinfo=UTC)  # event g is created at START + g ms


SEED = (
    "INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload, created_at,"
    " published_at, dead_at, attempts)"
    " SELECT CASE WHEN %(kind)s = 'kept' THEN (%(types)s::text[])[1 + g %% 3]"
    "             ELSE 'order.created' END,"
    "        'order', (g %% %(aggregates)s)::text, jsonb_build_object('n', g),"
    "        %(start)s + g * interval '1 millisecond',"
    "        CASE WHEN %(kind)s = 'kept' THEN now() END,"
    "        CASE WHEN %(kind)s = 'dead' THEN now() END,"
    "        CASE WHEN %(kind)s = 'dead' THEN 10 ELSE 0 END"
    " FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g ORDER BY g"
)


# Kept rows as the relay leaves them since migration 0006: moved to outbox_sent, in a
# partition of their sending time (made by the owner's function, as the relay makes them).
ARCHIVE_KEPT = (
    "SELECT outbox_sent_cover(now(), now(), interval '1 hour');"
    " WITH moved AS (DELETE FROM outbox WHERE published_at IS NOT NULL RETURNING *)"
    " INSERT INTO outbox_sent (id, event_id, event_type, aggregate_type, aggregate_id, payload,"
    "  headers, created_at, published_at, attempts)"
    " SELECT id, event_id, event_type, aggregate_type, aggregate_id, payload, headers,"
    "  created_at, published_at, attempts FROM moved"
)


def seed(
    database_url: str,
    events: int,
    aggregates: int,
    *,
    dead: int = 0,
    pending: int = 0,
    legacy: bool = False,
) -> None:
    """Rows numbered g from 1, in id order: ``events`` kept ones (type TYPES[g % 3]), then
    ``dead`` dead and ``pending`` pending ones (order.created); row g belongs to aggregate
    g mod ``aggregates``, is created at START + g ms and carries {"n": g}. Kept rows are in
    outbox_sent, or with ``legacy`` in the outbox itself as relays before migration 0006 kept
    them."""
    first = 1
    with psycopg.connect(database_url) as conn:
        for kind, count in (("kept", events), ("dead", dead), ("pending", pending)):
            if count:
                conn.execute(
                    SEED,
                    {
                        "kind": kind,
                        "types": list(TYPES),
                        "aggregates": aggregates,
                        "start": START,
                        "first": first,
                        "last": first + count - 1,
                    },
                )
            first += count
        if not legacy:
            conn.execute(ARCHIVE_KEPT)
        conn.execute("ANALYZE outbox")
        conn.execute("ANALYZE outbox_sent")


def expected_ids(database_url: str, where: str, params: dict[str, Any] | None = None) -> set[str]:
    """Event ids of the kept rows matching ``where`` (SQL over the outbox's columns)."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT event_id::text FROM outbox_history WHERE published_at IS NOT NULL AND {where}",
            params or {},
        ).fetchall()
    return {row[0] for row in rows}


@dataclass(frozen=True)
class Received:
    event_id: str
    aggregate_id: str
    n: int
    headers: dict[str, Any]


def receive_all(queue: RabbitQueue, idle: float = 1.5) -> list[Received]:
    """Everything in the queue, in queue order, until it stays empty for ``idle`` seconds."""
    conn = pika.BlockingConnection(pika.URLParameters(queue.url))
    got: list[Received] = []
    try:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=2000)
        for method, props, body in channel.consume(
            queue.name, auto_ack=True, inactivity_timeout=idle
        ):
            if method is None:
                break
            headers = dict(props.headers or {})
            got.append(
                Received(
                    props.message_id,
                    str(headers.get("aggregate_id")),
                    json.loads(body)["n"],
                    headers,
                )
            )
        channel.cancel()
    finally:
        conn.close()
    return got


def assert_in_aggregate_order(received: list[Received]) -> None:
    last: dict[str, int] = {}
    for message in received:
        previous = last.get(message.aggregate_id, -1)
        assert message.n > previous, (
            f"aggregate {message.aggregate_id}: event {message.n} arrived after {previous}"
        )
        last[message.aggregate_id] = message.n


def replay_env(database_url: str, broker_url: str, exchange: str) -> dict[str, str]:
    return cli_env(database_url=database_url, broker_url=broker_url, exchange=exchange)


@pytest.fixture
def second(broker_url: str, bind_queue: Callable[..., RabbitQueue]) -> RabbitQueue:
    """A queue bound with '#' to the test's exchange, which plays the second destination (the
    relay's own exchange, events, is never used here)."""
    return bind_queue("#")


@pytest.mark.parametrize("legacy", [False, True], ids=["outbox_sent", "kept-in-outbox"])
def test_a_time_window_arrives_complete_in_order_with_the_header(
    database_url: str, broker_url: str, exchange: str, second: RabbitQueue, legacy: bool
) -> None:
    # Given 10,000 kept events of 300 aggregates, 40 dead and 60 pending ones after them (kept
    # in outbox_sent, or in the outbox by a relay from before migration 0006)
    seed(database_url, 10_000, 300, dead=40, pending=60, legacy=legacy)
    since, until = START + timedelta(seconds=2), START + timedelta(seconds=8)
    window = expected_ids(
        database_url,
        "created_at >= %(since)s AND created_at < %(until)s",
        {"since": since, "until": until},
    )
    assert len(window) == 6000

    # When the window is replayed to the second exchange
    done = run_cli(
        "replay",
        "--since",
        since.isoformat(),
        "--until",
        until.isoformat().replace("+00:00", "Z"),
        env=replay_env(database_url, broker_url, exchange),
        timeout=120,
    )

    # Then exactly its kept events arrive, once each, in per-aggregate order, marked as a replay
    assert done.returncode == 0, done.stderr
    received = receive_all(second)
    assert Counter(m.event_id for m in received).most_common(1)[0][1] == 1
    assert {m.event_id for m in received} == window
    assert_in_aggregate_order(received)
    assert all(m.headers.get("outbox-replay") == "true" for m in received)
    assert all(m.headers.get("aggregate_type") == "order" for m in received)
    assert "replayed 6000 events (0 dead skipped) in " in done.stdout
    assert "Traceback" not in done.stderr


def test_all_kept_events_of_some_aggregates_and_types_and_dead_ones_reported(
    database_url: str, broker_url: str, exchange: str, second: RabbitQueue
) -> None:
    seed(database_url, 6000, 50, dead=30, pending=20)
    env = replay_env(database_url, broker_url, exchange)
    selection = ["--aggregate-id", "7", "--aggregate-id", "9", "--event-type", "order.*"]
    wanted = expected_ids(database_url, "aggregate_id IN ('7', '9') AND event_type LIKE 'order.%%'")
    dead_matching = sum(1 for g in range(6001, 6031) if g % 50 in (7, 9))

    # --dry-run counts per type, sends nothing
    dry = run_cli("replay", *selection, "--dry-run", env=env, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert f"would replay {len(wanted)} events ({dead_matching} dead skipped)" in dry.stdout
    assert "order.created" in dry.stdout
    assert "order.paid" in dry.stdout
    assert "invoice.sent" not in dry.stdout
    assert second.count() == 0

    done = run_cli("replay", *selection, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"replayed {len(wanted)} events ({dead_matching} dead skipped)" in done.stdout
    received = receive_all(second)
    assert sorted(m.event_id for m in received) == sorted(wanted)
    assert_in_aggregate_order(received)

    # With --include-dead (another selection: another default name) the dead rows go too.
    again = run_cli("replay", *selection, "--include-dead", env=env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"({dead_matching} dead included)" in again.stdout
    received = receive_all(second)
    assert len(received) == len(wanted) + dead_matching
    assert_in_aggregate_order(received)

    listed = run_cli("replay", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    states = [(r["state"], r["replayed"]) for r in json.loads(listed.stdout)]
    assert sorted(states) == sorted([("done", len(wanted)), ("done", len(wanted) + dead_matching)])


def _start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*relay_command(), "replay", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _position(database_url: str, name: str) -> int:
    """The replay's saved position (an outbox id: ids have gaps, see the README)."""
    return _progress(database_url, name)[0]


def _progress(database_url: str, name: str) -> tuple[int, int]:
    """(position, upper_id) of a saved replay; (0, 0) when there is none."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT position, upper_id FROM outbox_replays WHERE name = %s", (name,)
        ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


BATCH = 400


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_an_interrupted_replay_resumes_sending_nothing_twice_beyond_the_batch_in_flight(
    how: str, database_url: str, broker_url: str, exchange: str, second: RabbitQueue
) -> None:
    # Given 20,000 kept events and a replay under way
    seed(database_url, 20_000, 500)
    env = replay_env(database_url, broker_url, exchange)
    args = ("--all", "--name", "interrupted", "--batch-size", str(BATCH))
    process = _start(env, *args)
    try:
        wait_until(lambda: _position(database_url, "interrupted") > 0, timeout=60, interval=0.01)
        # When it is interrupted mid-way
        process.send_signal(signal.SIGINT if how == "SIGINT" else signal.SIGKILL)
        _out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if how == "SIGINT":
        assert process.returncode == 130, err
        assert "--resume --name interrupted" in err
        assert "Traceback" not in err
    position, upper_id = _progress(database_url, "interrupted")
    assert 0 < position < upper_id, "finished before the interruption"

    # And resumed
    resumed = run_cli("replay", "--resume", *args, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr

    # Then every event arrived, in per-aggregate order, and duplicates are at most the batch
    # in flight (none after a SIGINT: the events already read were confirmed first)
    received = receive_all(second)
    counts = Counter(m.event_id for m in received)
    assert len(counts) == 20_000
    duplicates = len(received) - len(counts)
    if how == "SIGINT":
        assert duplicates == 0
    else:
        # In flight (--batch-size) plus at most one page confirmed since the last save.
        assert duplicates <= BATCH + BATCH // 2, duplicates
    # Order, by each event's first arrival (a duplicate repeats what came before it).
    first_seen: dict[str, int] = {}
    for index, message in enumerate(received):
        first_seen.setdefault(message.event_id, index)
    assert_in_aggregate_order([received[i] for i in sorted(first_seen.values())])

    # And a finished replay cannot be resumed again
    again = run_cli("replay", "--resume", *args, env=env)
    assert again.returncode == EXIT_CONFIG
    assert "is done" in again.stderr


def test_a_refused_event_stops_its_aggregate_and_the_replay_resumes_there(
    database_url: str, broker_url: str, exchange: str, bind_queue: Callable[..., RabbitQueue]
) -> None:
    # Given kept events of which the invoice.* ones have no binding on the destination
    # (published mandatory: RabbitMQ returns them)
    seed(database_url, 300, 10)
    orders = bind_queue("order.#")
    env = replay_env(database_url, broker_url, exchange)
    args = ("--all", "--name", "refused", "--max-attempts", "2", "--retry-backoff", "0.05")

    done = run_cli("replay", *args, env=env, timeout=60)

    # Then the replay stops with exit 5 naming the event, and no aggregate's events after its
    # first invoice went out (row g is an invoice when g % 3 == 2, of aggregate g % 10)
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "refused event" in lines[0]
    assert "--resume" in lines[0]
    first_invoice = {
        a: min(g for g in range(1, 301) if g % 10 == a and g % 3 == 2) for a in range(10)
    }
    received = receive_all(orders)
    assert received, "nothing went out before the refusal"
    assert_in_aggregate_order(received)
    assert all(m.n < first_invoice[int(m.aggregate_id)] for m in received)
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT min(id) FROM outbox_history WHERE event_type = 'invoice.sent'"
        ).fetchone()
    assert row is not None
    assert _position(database_url, "refused") < row[0]

    # Once the destination routes them, --resume carries on from there
    bind_queue("invoice.#")
    resumed = run_cli("replay", "--resume", *args, env=env, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    received += receive_all(orders)
    assert len({m.event_id for m in received}) == 200  # the order.* ones; invoices elsewhere


def test_nothing_kept_because_the_relay_deletes_is_explained(
    database_url: str, broker_url: str, exchange: str
) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT outbox_emit('order.created', '1', '{}')")
    done = run_cli("replay", "--all", env=replay_env(database_url, broker_url, exchange))
    assert done.returncode == EXIT_CONFIG
    assert done.stderr.count("\n") == 1
    assert "keeps no sent events" in done.stderr
    assert "--on-sent keep" in done.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--since", "yesterday"], "--since: 'yesterday' is not a time"),
        (["--since", "1h", "--until", "2h"], "is not before --until"),
        (["--event-type", "order..x"], "--event-type: 'order..x' is not an event type pattern"),
        (["--resume", "--name", "never-ran"], "no replay 'never-ran' to resume"),
        ([], "give a selection (--since, --until, --event-type, --aggregate-type"),
    ],
)
def test_bad_input_is_one_line_and_exit_3(
    args: list[str], says: str, database_url: str, broker_url: str, exchange: str
) -> None:
    seed(database_url, 10, 2)
    done = run_cli("replay", *args, env=replay_env(database_url, broker_url, exchange))
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: ")
    assert says in done.stderr
    assert "guest:guest" not in done.stderr


def test_a_replay_under_way_elsewhere_or_unfinished_is_not_started_again(
    database_url: str, broker_url: str, exchange: str, second: RabbitQueue
) -> None:
    seed(database_url, 20_000, 100)
    env = replay_env(database_url, broker_url, exchange)
    process = _start(env, "--all", "--name", "busy", "--batch-size", "200")
    try:
        wait_until(lambda: _position(database_url, "busy") > 0, timeout=60, interval=0.01)
        twice = run_cli("replay", "--resume", "--name", "busy", env=env)
        assert twice.returncode == EXIT_CONFIG
        assert "running in another process" in twice.stderr
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    fresh = run_cli("replay", "--all", "--name", "busy", env=env)
    assert fresh.returncode == EXIT_CONFIG
    assert "add --resume" in fresh.stderr


def test_the_relay_role_may_run_a_replay(
    database_url: str, broker_url: str, exchange: str, second: RabbitQueue, roles: Roles
) -> None:
    granted = run_cli(
        "migrate", "--grants", "--app-role", roles.app, "--relay-role", roles.relay,
        env=cli_env(database_url=database_url),
    )  # fmt: skip
    assert granted.returncode == 0, granted.stderr
    seed(database_url, 500, 20)
    env = replay_env(roles.url(database_url, roles.relay), broker_url, exchange)
    done = run_cli("replay", "--all", "--name", "as-relay", env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(receive_all(second)) == 500
    listed = run_cli("replay", "list", "--json", env=env)
    assert [r["state"] for r in json.loads(listed.stdout)] == ["done"]
