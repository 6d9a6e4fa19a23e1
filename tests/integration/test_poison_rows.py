"""Poison rows: every kind of row a hostile but legal producer can insert (plain SQL that the
table's constraints accept), on every broker, through a real ``outbox-relay serve``.

One scenario per broker: good events over a few aggregates with the rows of ``POISONS``
interleaved, the relay started as a subprocess (configured through OUTBOX_RELAY_* variables,
--log-level debug, --max-attempts 2, short backoffs). It runs until no row is pending and every
good event arrived, then a second wave of good events must flow too, then the relay is stopped
with SIGTERM. The tests read that one run:

* every good event arrived, in per-aggregate order, duplicates at most one batch;
* every poison row is dead-lettered with its reason (``dead_at`` set, ``last_error`` naming the
  problem) or delivered intact, whichever the broker can do (``Poison.dead``);
* the relay kept running, never lost its connections, stopped cleanly and logged no traceback.

Each (broker, poison) pair is a test of its own, so that a case failing for a reason outside the
publishers is marked ``xfail(strict=True)`` alone, with the reason. Rows the table refuses for
new rows but may hold from before (``LEGACY_POISONS``), and the cases that break the relay as a
whole, have scenarios of their own at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest
from psycopg import sql

from tests.brokers import Received
from tests.conftest import RabbitQueue, database_url_for, rabbit_cleanup, wait_until
from tests.contract.adapters import (
    UNROUTED,
    BrokerUnderTest,
    MqttUnderTest,
    NatsUnderTest,
    RabbitMQUnderTest,
    RedisUnderTest,
    WebhookUnderTest,
)
from tests.services import Services

pytestmark = pytest.mark.integration

BROKERS = ("rabbitmq", "nats", "redis", "mqtt", "webhook")

# Claims of 20 rows (--batch-size / 3): the scenario spans many claims, so rows held back behind
# a dead one meet later claims (see test_rows_behind_a_dead_row_are_not_claimed_over_and_over).
BATCH_SIZE = 60
MAX_ATTEMPTS = 2
# Above NATS's max_payload (1 MiB), so that the broker's own limit is exercised too.
MAX_MESSAGE_BYTES = 2_000_000
GOOD_AGGREGATES = ("A", "B", "C", "D")
GOOD_PER_AGGREGATE = 25
SECOND_WAVE = 5
PAYLOAD = '{"poison": true, "note": "grüße"}'

# -- the poison rows -------------------------------------------------------------------------


def nested(depth: int, kind: str) -> str:
    """A headers object whose value is nested ``depth`` levels deep in all (JSON text: too deep
    for json.dumps)."""
    if kind == "list":
        return '{"deep": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"
    return '{"deep": ' + '{"a": ' * (depth - 2) + "{}" + "}" * (depth - 2) + "}"


def headers(value: Mapping[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False)


def some(*brokers: str, reason: str) -> dict[str, str]:
    return dict.fromkeys(brokers, reason)


def every(reason: str) -> dict[str, str]:
    return dict.fromkeys(BROKERS, reason)


@dataclass(frozen=True)
class Poison:
    """One hostile row. ``dead``: broker -> a fragment of the reason it must be dead-lettered
    with; on the other brokers it must be delivered intact."""

    name: str
    headers: str = "{}"  # JSON text
    payload: str = PAYLOAD  # JSON text
    created_at: str | None = None  # SQL timestamptz literal; None: now()
    # The good aggregate it is interleaved with (its events wait behind it), unless given.
    aggregate_id: str | None = None
    own_aggregate: bool = False  # aggregate_id as given (None: no aggregate)
    aggregate_type: str = "order"
    event_type: str = "order.updated"
    dead: Mapping[str, str] = field(default_factory=dict)
    # Header names the relay owns on some broker (its values win there): not compared.
    relay_owned: frozenset[str] = frozenset()
    # broker -> why this case fails for a reason outside the publishers.
    xfail: Mapping[str, str] = field(default_factory=dict)


TIMESTAMP = "is outside what a message timestamp can hold"
DEPTH = "nested deeper than 32"
AMQP_ENCODING = "cannot be encoded as AMQP"
NATS_NAME = "cannot be a NATS header"
NATS_BLOCK = "JetStream's 65535-byte limit"
MQTT_STRING = "65535-byte string limit"
MQTT_CHARACTER = "a character MQTT strings must not carry"
FRAME_MAX = "frame_max"
OVER_LIMIT = "-byte limit"
UNROUTABLE = "<the broker's own refusal>"  # BrokerUnderTest.unroutable_reason


POISONS: tuple[Poison, ...] = (
    # The edges of what is read: AMQP timestamps are unsigned seconds since 1970.
    Poison(
        "created_at year 1",
        created_at="0001-01-02 00:00:00+00",
        dead=some("rabbitmq", reason="before 1970"),
    ),
    Poison(
        "created_at 1969", created_at="1969-12-31 23:59:59+00", dead=some("rabbitmq", reason="1970")
    ),
    Poison("created_at year 9999", created_at="9999-12-29 00:00:00+00"),
    # Nesting: beyond json.loads' recursion, beyond pika's, beyond the relay's limit, at it.
    Poison("headers nested 2000 deep (objects)", headers=nested(2000, "dict"), dead=every(DEPTH)),
    Poison("headers nested 2000 deep (lists)", headers=nested(2000, "list"), dead=every(DEPTH)),
    Poison("headers nested 600 deep", headers=nested(600, "dict"), dead=every(DEPTH)),
    Poison("headers nested 33 deep", headers=nested(33, "list"), dead=every(DEPTH)),
    Poison("headers nested 32 deep", headers=nested(32, "dict")),
    # Sizes.
    Poison(
        "header value of 200 KB",
        headers=headers({"big": "v" * 200_000}),
        dead={"rabbitmq": FRAME_MAX, "nats": NATS_BLOCK, "mqtt": MQTT_STRING},
    ),
    Poison(
        "header value of 70,000 bytes",
        headers=headers({"big": "v" * 70_000}),
        dead={"nats": NATS_BLOCK, "mqtt": MQTT_STRING},
    ),
    Poison(
        "header value of 40,000 four-byte characters",
        headers=headers({"big": "😀" * 40_000}),
        dead={"rabbitmq": FRAME_MAX, "nats": NATS_BLOCK, "mqtt": MQTT_STRING},
    ),
    Poison(
        "header value of 150 KB behind a payload of 100,000 four-byte characters",
        headers=headers({"big": "v" * 150_000}),
        payload=json.dumps("😀" * 100_000, ensure_ascii=False),
        dead={"rabbitmq": FRAME_MAX, "nats": NATS_BLOCK, "mqtt": MQTT_STRING},
    ),
    Poison(
        "header name of 300 bytes",
        headers=headers({"k" * 300: "v"}),
        dead={"rabbitmq": AMQP_ENCODING},
    ),
    Poison(
        "header name of 200 two-byte characters",
        headers=headers({"é" * 200: "v"}),
        dead={"rabbitmq": AMQP_ENCODING, "nats": NATS_NAME},
    ),
    Poison(
        "12,000 headers",
        headers=headers({f"h{n:05d}": "v" for n in range(12_000)}),
        dead={"rabbitmq": FRAME_MAX, "nats": NATS_BLOCK},
    ),
    Poison(
        "payload over --max-message-bytes",
        payload=json.dumps("x" * 2_500_000),
        dead=every(OVER_LIMIT),
    ),
    Poison(
        "payload over --max-message-bytes in bytes, not in characters",
        payload=json.dumps("😀" * 600_000, ensure_ascii=False),
        dead=every(OVER_LIMIT),
    ),
    Poison(
        "payload over NATS max_payload",
        payload=json.dumps("x" * 1_500_000),
        dead=some("nats", reason="1048576-byte limit"),
    ),
    # RabbitMQ's sender-selected distribution headers.
    Poison("CC a string", headers=headers({"CC": "order.cc"}), dead=some("rabbitmq", reason="CC")),
    Poison("BCC numbers", headers=headers({"BCC": [1, 2]}), dead=some("rabbitmq", reason="BCC")),
    Poison("CC an object", headers=headers({"CC": {"a": 1}}), dead=some("rabbitmq", reason="CC")),
    Poison("CC null", headers=headers({"CC": None}), dead=some("rabbitmq", reason="CC")),
    # RabbitMQ takes it (and routes by the long key like any other).
    Poison("CC a routing key over 255 bytes", headers=headers({"CC": ["order." + "k" * 300]})),
    # Characters in header values.
    Poison(
        "header value with CR LF",
        headers=headers({"v": "a\r\nInjected: 1"}),
        dead={"nats": "line break", "mqtt": MQTT_CHARACTER},
    ),
    Poison("header value with TAB", headers=headers({"v": "a\tb"}), dead={"mqtt": MQTT_CHARACTER}),
    Poison("header value with U+0001", headers=headers({"v": "a\u0001b"}), dead={"mqtt": "U+0001"}),
    Poison("header value with U+007F", headers=headers({"v": "a\u007fb"}), dead={"mqtt": "U+007F"}),
    Poison("header value with U+0085", headers=headers({"v": "a\u0085b"}), dead={"mqtt": "U+0085"}),
    Poison("header value with U+FFFE", headers=headers({"v": "a\ufffeb"}), dead={"mqtt": "U+FFFE"}),
    Poison("header value with U+FDD0", headers=headers({"v": "a\ufdd0b"}), dead={"mqtt": "U+FDD0"}),
    Poison(
        "header value with U+10FFFF",
        headers=headers({"v": "a\U0010ffffb"}),
        dead={"mqtt": "U+10FFFF"},
    ),
    Poison(
        "header value with blanks around it",
        headers=headers({"v": "  padded\t"}),
        dead={"nats": "blanks", "mqtt": MQTT_CHARACTER},
    ),
    Poison("header value empty", headers=headers({"v": ""})),
    # Header names.
    Poison(
        "header name with LF",
        headers=headers({"a\nb": "v"}),
        dead={"nats": NATS_NAME, "mqtt": MQTT_CHARACTER},
    ),
    Poison(
        "header name with U+0001",
        headers=headers({"a\u0001b": "v"}),
        dead={"nats": NATS_NAME, "mqtt": MQTT_CHARACTER},
    ),
    Poison("header name with ':'", headers=headers({"a:b": "v"}), dead={"nats": NATS_NAME}),
    Poison("header name with a space", headers=headers({"a b": "v"}), dead={"nats": NATS_NAME}),
    Poison("header name with '('", headers=headers({"a(b": "v"}), dead={"nats": NATS_NAME}),
    Poison("header name non-ASCII", headers=headers({"ключ": "v"}), dead={"nats": NATS_NAME}),
    Poison("header name empty", headers=headers({"": "v"}), dead={"nats": NATS_NAME}),
    # Names a broker gives a meaning to.
    Poison(
        "Nats-Expected-Stream",
        headers=headers({"Nats-Expected-Stream": "ELSEWHERE"}),
        dead=some("nats", reason="reserved by NATS"),
    ),
    Poison(
        "Nats-Rollup and Nats-Expected-Last-Sequence",
        headers=headers({"Nats-Rollup": "all", "Nats-Expected-Last-Sequence": "1"}),
        dead=some("nats", reason="reserved by NATS"),
    ),
    Poison(
        "nats-expected-last-msg-id in lower case",
        headers=headers({"nats-expected-last-msg-id": "x"}),
        dead=some("nats", reason="reserved by NATS"),
    ),
    Poison(
        "headers named like the relay's own",
        headers=headers(
            {
                "event_id": "spoofed",
                "event_type": "spoofed",
                "created_at": "spoofed",
                "aggregate_id": "spoofed",
                "aggregate_type": "spoofed",
                "Nats-Msg-Id": "spoofed",
                "Outbox-Event-Type": "spoofed",
                "Content-Type": "text/plain",
            }
        ),
        relay_owned=frozenset(
            {
                "event_id",
                "event_type",
                "created_at",
                "aggregate_id",
                "aggregate_type",
                "Nats-Msg-Id",
                "Outbox-Event-Type",
                "Content-Type",
            }
        ),
    ),
    # Numbers.
    Poison("integer 2**64", headers=headers({"n": 2**64}), dead={"rabbitmq": AMQP_ENCODING}),
    Poison("integer -2**64", headers=headers({"n": -(2**64)}), dead={"rabbitmq": AMQP_ENCODING}),
    Poison("integer 2**63", headers=headers({"n": 2**63}), dead={"rabbitmq": AMQP_ENCODING}),
    Poison(
        "integer of 5,001 digits",
        headers='{"n": 1e5000}',
        dead=every("digits"),
    ),
    Poison(
        "values of every JSON type",
        headers=headers(
            {"t": True, "f": False, "z": None, "x": 1.5, "l": [1, "a", None, {"k": []}]}
        ),
    ),
    Poison(
        "an object with control characters inside",
        headers=headers({"obj": {"k\n": "v\u0001\ufffe", "ü": ["\r"]}}),
    ),
    # Aggregates.
    Poison(
        "aggregate_id of 300 KB",
        aggregate_id="a" * 300_000,
        own_aggregate=True,
        dead={"rabbitmq": FRAME_MAX, "nats": NATS_BLOCK, "mqtt": MQTT_STRING},
    ),
    Poison(
        "aggregate_id with a newline",
        aggregate_id="agg\nX",
        own_aggregate=True,
        dead={"nats": "line break", "mqtt": MQTT_CHARACTER},
    ),
    Poison("aggregate_id empty", aggregate_id="", own_aggregate=True),
    Poison(
        "aggregate_id with blanks around it",
        aggregate_id=" padded ",
        own_aggregate=True,
        dead={"nats": "blanks"},
    ),
    Poison(
        "aggregate_type with CR",
        aggregate_type="order\r",
        dead={"nats": "line break", "mqtt": MQTT_CHARACTER},
    ),
    # Event types at the edge of what the table's constraint allows.
    Poison("event_type of 255 bytes", event_type="order." + "x" * 249),
    Poison("event_type of 128 words", event_type="order" + ".a" * 125),
    # Payloads are passed through as PostgreSQL renders them.
    Poison("payload null", payload="null"),
    Poison("payload a string", payload=json.dumps("just text")),
    Poison(
        "payload with control characters and non-characters",
        payload=headers({"s": "\u0001\u007f\u0085\ufffe\ufdd0\U0010ffff"}),
    ),
    Poison("payload nested 500 deep", payload="[" * 500 + "]" * 500),
    # Trace context (the webhook copies it into HTTP headers).
    Poison(
        "non-ASCII traceparent",
        headers=headers(
            {"traceparent": "00-ü4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
        ),
    ),
    Poison(
        "traceparent with CR LF",
        headers=headers({"traceparent": "00-abc-def-01\r\nX-Injected: 1"}),
        dead={"nats": "line break", "mqtt": MQTT_CHARACTER},
    ),
    Poison(
        "tracestate of 100 KB",
        headers=headers({"tracestate": "k=" + "v" * 100_000}),
        dead={"nats": NATS_BLOCK, "mqtt": MQTT_STRING},
    ),
    Poison("traceparent a number", headers=headers({"traceparent": 12, "tracestate": {"a": "b"}})),
    # Refused by the broker itself: retried, then dead.
    Poison("unroutable event type", event_type=UNROUTED, dead=every(UNROUTABLE)),
)

# Rows the table refuses for new rows since migration 0004 (created_at outside the years 1 to
# 9999), but holds when they were written before it: its constraint is NOT VALID.
LEGACY_POISONS: tuple[Poison, ...] = (
    Poison("created_at infinity", created_at="infinity", dead=every(TIMESTAMP)),
    Poison("created_at -infinity", created_at="-infinity", dead=every(TIMESTAMP)),
    Poison("created_at year 10000", created_at="10000-01-01", dead=every(TIMESTAMP)),
    Poison("created_at 4713 BC", created_at="4713-01-01 BC", dead=every(TIMESTAMP)),
    Poison(
        "created_at 4713 BC, no aggregate",
        created_at="4713-01-01 BC",
        own_aggregate=True,
        dead=every(TIMESTAMP),
    ),
)

# -- running one scenario --------------------------------------------------------------------


@dataclass
class Row:
    event_id: str
    aggregate_id: str | None
    seq: int | None = None  # good events
    poison: Poison | None = None


@dataclass
class Scenario:
    broker: BrokerUnderTest
    rows: list[Row]
    # event_id -> (dead, last_error, attempts) of every row still in the table.
    left: dict[str, tuple[bool, str | None, int]]
    received: list[Received]
    log: str
    running_at_end: bool
    exit_code: int | None

    def poison_row(self, name: str) -> Row:
        [row] = [r for r in self.rows if r.poison is not None and r.poison.name == name]
        return row

    def arrivals(self, event_id: str) -> list[Received]:
        return [r for r in self.received if r.event_id == event_id]


def insert(database_url: str, seqs: range, poisons: tuple[Poison, ...] = ()) -> list[Row]:
    """Good events ``seqs`` over GOOD_AGGREGATES with ``poisons`` interleaved, as a producer
    would insert them with plain SQL."""
    made: list[Row] = []
    query = (
        "INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload, headers, "
        "created_at) VALUES (%s, %s, %s, %s::jsonb, %s::jsonb, coalesce(%s::timestamptz, now())) "
        "RETURNING event_id::text"
    )

    def add(
        conn: psycopg.Connection[Any],
        event_type: str,
        aggregate_type: str | None,
        aggregate_id: str | None,
        payload: str,
        headers_text: str,
        created_at: str | None,
    ) -> str:
        values = (event_type, aggregate_type, aggregate_id, payload, headers_text, created_at)
        try:
            with conn.transaction():
                found = conn.execute(query, values).fetchone()
        except psycopg.errors.CheckViolation as refused:
            # The table refuses it for new rows now; written before that constraint existed.
            found = insert_before_constraint(conn, refused, query, values)
        assert found is not None
        return str(found[0])

    waiting = list(poisons)
    per_slot = -(-len(waiting) // len(seqs))  # spread over the whole range
    with psycopg.connect(database_url) as conn:
        for seq in seqs:
            for aggregate in GOOD_AGGREGATES:
                payload = json.dumps({"aggregate": aggregate, "seq": seq})
                event_id = add(
                    conn, "order.created", "order", aggregate, payload, '{"producer": "good"}', None
                )
                made.append(Row(event_id, aggregate, seq))
            # A few events without an aggregate (no order to keep).
            if seq % 5 == 0:
                payload = json.dumps({"aggregate": None, "seq": seq})
                event_id = add(conn, "order.created", None, None, payload, "{}", None)
                made.append(Row(event_id, None, seq))
            # Poison rows between them, taking turns among the aggregates.
            for _ in range(per_slot):
                if not waiting:
                    break
                poison = waiting.pop(0)
                aggregate_id = (
                    poison.aggregate_id
                    if poison.own_aggregate
                    else GOOD_AGGREGATES[len(made) % len(GOOD_AGGREGATES)]
                )
                event_id = add(
                    conn,
                    poison.event_type,
                    poison.aggregate_type,
                    aggregate_id,
                    poison.payload,
                    poison.headers,
                    poison.created_at,
                )
                made.append(Row(event_id, aggregate_id, poison=poison))
    return made


def insert_before_constraint(
    conn: psycopg.Connection[Any],
    refused: psycopg.errors.CheckViolation,
    query: str,
    values: tuple[Any, ...],
) -> tuple[Any, ...] | None:
    """Insert a row as it was written before the constraint it violates was added (a migration
    adds such constraints NOT VALID: existing rows stay)."""
    name = refused.diag.constraint_name
    assert name is not None
    [definition] = conn.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conname = %s AND conrelid = 'outbox'::regclass",
        (name,),
    ).fetchone() or (None,)
    assert definition is not None
    with conn.transaction():
        conn.execute(sql.SQL("ALTER TABLE outbox DROP CONSTRAINT {}").format(sql.Identifier(name)))
        found = conn.execute(query, values).fetchone()
        conn.execute(
            sql.SQL("ALTER TABLE outbox ADD CONSTRAINT {} {}").format(
                sql.Identifier(name),
                sql.SQL(definition if "NOT VALID" in definition else definition + " NOT VALID"),
            )
        )
    return found


def start_relay(
    database_url: str, broker: BrokerUnderTest, log_path: Path, **overrides: Any
) -> subprocess.Popen[bytes]:
    """``outbox-relay serve`` at --log-level debug, configured through OUTBOX_RELAY_* only."""
    options: dict[str, Any] = {
        **broker.relay_options(),
        "database_url": database_url,
        "log_level": "debug",
        "batch_size": BATCH_SIZE,
        "max_attempts": MAX_ATTEMPTS,
        "retry_backoff": 0.1,
        "retry_backoff_max": 0.5,
        "poll_interval": 0.2,
        "max_message_bytes": MAX_MESSAGE_BYTES,
        "confirm_timeout": 5.0,
        **overrides,
    }
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OUTBOX_RELAY_", "OTEL_"))
    }
    env.update({f"OUTBOX_RELAY_{key.upper()}": str(value) for key, value in options.items()})
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [str(Path(sys.executable).with_name("outbox-relay")), "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def pending(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        found = conn.execute(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL AND dead_at IS NULL"
        ).fetchone()
    assert found is not None
    return int(found[0])


def all_arrived(broker: BrokerUnderTest, rows: list[Row]) -> list[Received] | None:
    wanted = {row.event_id for row in rows if row.poison is None}
    got = broker.received()
    return got if wanted <= {r.event_id for r in got} else None


def within(condition: Callable[[], Any], relay: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait until ``condition`` holds; False if the relay exited or the deadline passed."""
    try:
        wait_until(lambda: relay.poll() is not None or condition(), timeout=timeout, interval=0.2)
    except AssertionError:
        return False
    return relay.poll() is None


def run_scenario(
    database_url: str,
    broker: BrokerUnderTest,
    log_path: Path,
    poisons: tuple[Poison, ...] = POISONS,
    timeout: float = 60,
    **options: Any,
) -> Scenario:
    rows = insert(database_url, range(GOOD_PER_AGGREGATE), poisons)
    relay = start_relay(database_url, broker, log_path, **options)
    try:
        # Until nothing is pending and every good event arrived; then a second wave of good
        # events, which must flow too. A deadline missed is not an error here: the tests report
        # what did not happen, case by case.
        settled = within(lambda: pending(database_url) == 0, relay, timeout=timeout)
        settled = settled and within(lambda: all_arrived(broker, rows), relay, timeout=timeout)
        if settled:
            rows += insert(
                database_url, range(GOOD_PER_AGGREGATE, GOOD_PER_AGGREGATE + SECOND_WAVE)
            )
            within(lambda: all_arrived(broker, rows), relay, timeout=timeout)
        running = relay.poll() is None
    finally:
        if relay.poll() is None:
            relay.send_signal(signal.SIGTERM)
        try:
            relay.wait(30)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait(10)
    with psycopg.connect(database_url, autocommit=True) as conn:
        left = {
            str(event_id): (bool(dead), last_error, int(attempts))
            for event_id, dead, last_error, attempts in conn.execute(
                "SELECT event_id::text, dead_at IS NOT NULL, last_error, attempts FROM outbox"
            )
        }
    return Scenario(
        broker=broker,
        rows=rows,
        left=left,
        received=broker.received(),
        log=log_path.read_text(errors="replace"),
        running_at_end=running,
        exit_code=relay.returncode,
    )


# -- fixtures ----------------------------------------------------------------------------------


@contextlib.contextmanager
def broker_for(name: str, services: Services) -> Iterator[BrokerUnderTest]:
    """A fresh destination on the named broker (RabbitMQ: an exchange and a queue bound to
    ``order.#``; the others: their contract adapter)."""
    if name != "rabbitmq":
        adapters: dict[str, Callable[[], BrokerUnderTest]] = {
            "nats": NatsUnderTest,
            "redis": RedisUnderTest,
            "mqtt": MqttUnderTest,
            "webhook": WebhookUnderTest,
        }
        broker = adapters[name]()
        try:
            yield broker
        finally:
            broker.cleanup()
        return
    url = services.rabbitmq_url
    exchange = f"events.test.{uuid.uuid4().hex[:10]}"
    queue = RabbitQueue(url, exchange, f"q.test.{uuid.uuid4().hex[:10]}", ["order.#"])
    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    channel.exchange_declare(exchange, "topic", durable=True)
    channel.queue_declare(queue.name, durable=True)
    channel.queue_bind(queue.name, exchange, "order.#")
    conn.close()
    try:
        yield RabbitMQUnderTest(url, exchange, queue)
    finally:
        rabbit_cleanup(url, lambda ch: ch.queue_delete(queue.name))
        rabbit_cleanup(url, lambda ch: ch.exchange_delete(exchange))


@pytest.fixture(scope="module")
def scenario_of(
    services: Services, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Scenario]]:
    """``scenario_of(broker)``: that broker's run, made the first time a test asks for it and
    shared by every test of the module (each in a database of its own)."""
    runs: dict[str, Scenario] = {}
    databases: list[str] = []
    with contextlib.ExitStack() as brokers:

        def scenario_of(name: str) -> Scenario:
            if name not in runs:
                database = f"outbox_t_{uuid.uuid4().hex[:12]}"
                databases.append(database)
                create_database(services.postgres_admin_url, database, template_database)
                broker = brokers.enter_context(broker_for(name, services))
                log_path = tmp_path_factory.mktemp(f"poison-{name}") / "relay.log"
                runs[name] = run_scenario(
                    database_url_for(services.postgres_admin_url, database), broker, log_path
                )
            return runs[name]

        yield scenario_of
    for database in databases:
        drop_database(services.postgres_admin_url, database)


def create_database(admin_url: str, name: str, template: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def poison_cases() -> list[Any]:
    cases = []
    for broker in BROKERS:
        for poison in POISONS:
            marks = []
            if broker in poison.xfail:
                marks.append(pytest.mark.xfail(strict=True, reason=poison.xfail[broker]))
            cases.append(pytest.param(broker, poison, marks=marks, id=f"{broker}-{poison.name}"))
    return cases


# -- what a poison row must end as ------------------------------------------------------------


def text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


@pytest.mark.parametrize(("broker", "poison"), poison_cases())
def test_a_poison_row_is_dead_with_its_reason_or_delivered_intact(
    scenario_of: Callable[[str], Scenario], broker: str, poison: Poison
) -> None:
    scenario = scenario_of(broker)
    row = scenario.poison_row(poison.name)
    arrivals = scenario.arrivals(row.event_id)
    reason = poison.dead.get(broker)
    if reason == UNROUTABLE:
        reason = scenario.broker.unroutable_reason
    left = scenario.left.get(row.event_id)
    if reason is not None:
        # Dead-lettered, with a reason naming the problem (and, unless the broker refused it
        # itself, never sent).
        assert left is not None, "delivered"
        dead, last_error, attempts = left
        assert dead, f"not dead: attempts={attempts}, last_error={last_error!r}"
        assert reason in (last_error or ""), last_error
        if poison.event_type != UNROUTED:
            assert not arrivals, "sent"
        return
    # Delivered intact: the row is gone, the message carries what the row held.
    assert left is None, f"not delivered: {left}"
    assert arrivals, "the row is gone but its message never arrived"
    got = arrivals[0]
    assert got.event_type == poison.event_type
    assert got.aggregate_id == row.aggregate_id
    assert json.loads(got.payload) == json.loads(poison.payload)
    for key, value in json.loads(poison.headers).items():
        if key in poison.relay_owned:
            continue
        assert key in got.headers, f"header {key[:40]!r} missing"
        assert got.headers[key] == text(value), f"header {key[:40]!r} changed"


# -- what every scenario must show -------------------------------------------------------------


@pytest.mark.parametrize("broker", BROKERS)
def test_every_good_event_arrives_in_aggregate_order_with_few_duplicates(
    scenario_of: Callable[[str], Scenario], broker: str
) -> None:
    scenario = scenario_of(broker)
    good = {row.event_id: row for row in scenario.rows if row.poison is None}
    firsts: dict[str | None, list[int]] = {}
    seen: set[str] = set()
    duplicates = 0
    for got in scenario.received:
        row = good.get(got.event_id)
        if row is None:
            continue
        if got.event_id in seen:
            duplicates += 1
            continue
        seen.add(got.event_id)
        assert row.seq is not None
        firsts.setdefault(row.aggregate_id, []).append(row.seq)
    assert set(good) <= seen, f"{len(set(good) - seen)} of {len(good)} good events never arrived"
    assert duplicates <= BATCH_SIZE
    for aggregate in GOOD_AGGREGATES:
        assert firsts[aggregate] == sorted(firsts[aggregate]), f"aggregate {aggregate} reordered"
        assert len(firsts[aggregate]) == GOOD_PER_AGGREGATE + SECOND_WAVE


@pytest.mark.parametrize("broker", BROKERS)
def test_the_relay_keeps_running_without_reconnecting_and_stops_cleanly(
    scenario_of: Callable[[str], Scenario], broker: str
) -> None:
    scenario = scenario_of(broker)
    assert scenario.running_at_end, f"the relay exited ({scenario.exit_code})"
    assert scenario.exit_code == 0, "SIGTERM did not stop it cleanly"
    # Every poison row of the scenario is refused before it is sent: no broker has a reason to
    # drop the connection, so the relay never has one to reconnect.
    assert lost_connections(scenario.log) == []


@pytest.mark.parametrize("broker", BROKERS)
def test_the_log_holds_no_traceback(scenario_of: Callable[[str], Scenario], broker: str) -> None:
    log = scenario_of(broker).log
    assert "Traceback" not in log
    assert "ignored an error" not in log  # an exception in a client library's callback


def lost_connections(log: str) -> list[str]:
    return re.findall(r"^.*(?:disconnected|cannot connect).*$", log, re.MULTILINE)


# -- rows written before a constraint that now refuses them ------------------------------------


@pytest.mark.parametrize("broker", BROKERS)
def test_rows_written_before_the_created_at_constraint_are_dead_lettered(
    database_url: str, services: Services, tmp_path: Path, broker: str
) -> None:
    with broker_for(broker, services) as destination:
        scenario = run_scenario(
            database_url, destination, tmp_path / "relay.log", LEGACY_POISONS, timeout=20
        )
    for poison in LEGACY_POISONS:
        row = scenario.poison_row(poison.name)
        dead, last_error, _attempts = scenario.left.get(row.event_id, (False, "delivered", 0))
        assert dead, f"{poison.name}: {last_error}"
        assert TIMESTAMP in (last_error or "")
        assert not scenario.arrivals(row.event_id)
    good = {row.event_id for row in scenario.rows if row.poison is None}
    assert good <= {got.event_id for got in scenario.received}
    assert scenario.running_at_end, f"the relay exited ({scenario.exit_code})"
    assert lost_connections(scenario.log) == []
    assert "Traceback" not in scenario.log


# -- a long aggregate id on an event that is retried -------------------------------------------


def test_an_event_with_a_long_aggregate_id_is_retried_then_dead(
    database_url: str, services: Services, tmp_path: Path
) -> None:
    # Given an event the broker refuses (retried, then dead) whose aggregate id is 8 KB of
    # random text, which no compression brings under a btree's 2704-byte limit
    poison = Poison(
        "unroutable, aggregate_id of 8 KB",
        event_type=UNROUTED,
        aggregate_id=secrets.token_urlsafe(6000),
        own_aggregate=True,
    )
    with broker_for("rabbitmq", services) as destination:
        scenario = run_scenario(
            database_url, destination, tmp_path / "relay.log", (poison,), timeout=8
        )
    # Then it is dead after --max-attempts like any refused event, and the relay runs on
    row = scenario.poison_row(poison.name)
    dead, last_error, attempts = scenario.left.get(row.event_id, (False, "delivered", 0))
    assert dead, last_error
    assert attempts == MAX_ATTEMPTS
    assert destination.unroutable_reason in (last_error or "")
    assert scenario.running_at_end, f"the relay exited ({scenario.exit_code})"
    good = {row.event_id for row in scenario.rows if row.poison is None}
    assert good <= {got.event_id for got in scenario.received}


# -- rows held back behind a dead one ------------------------------------------------------------

EPISODES = 4


def test_rows_behind_a_dead_row_are_not_claimed_over_and_over(
    database_url: str, services: Services, tmp_path: Path
) -> None:
    # Given dead-on-arrival rows in every aggregate, every 15 events, each with a backlog behind
    # it that takes several claims (--batch-size 60: claims of 20)
    poison = next(p for p in POISONS if p.name == "headers nested 600 deep")
    rows: list[Row] = []
    for episode in range(EPISODES):
        heads = tuple(
            Poison(
                f"{poison.name} ({aggregate}, {episode})",
                headers=poison.headers,
                aggregate_id=aggregate,
                own_aggregate=True,
            )
            for aggregate in GOOD_AGGREGATES
        )
        first = episode * 15
        rows += insert(database_url, range(first, first + 1), heads)
        rows += insert(database_url, range(first + 1, first + 15))
    with broker_for("redis", services) as destination:
        relay = start_relay(database_url, destination, tmp_path / "relay.log", batch_size=60)
        try:
            # When the relay drains it
            started = time.monotonic()
            drained = within(lambda: pending(database_url) == 0, relay, timeout=30)
            seconds = time.monotonic() - started
            arrived = within(lambda: all_arrived(destination, rows), relay, timeout=10)
        finally:
            relay.send_signal(signal.SIGTERM)
            relay.wait(30)
    # Then it takes a few claims per dead row, not hundreds: batches that neither sent nor failed
    # anything (all held back) are the same rows claimed again. (When the livelock breaks is a
    # matter of timing, hence several dead rows one after the other: each is a fresh chance.)
    log = (tmp_path / "relay.log").read_text()
    idle = re.findall(r"batch settled .*sent=0 failed=0", log)
    assert drained
    assert arrived
    assert len(idle) <= 10 * EPISODES, (
        f"{len(idle)} batches held everything back; drained in {seconds:.1f}s"
    )
