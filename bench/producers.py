"""Writers of outbox rows: a bulk backlog, and paced producers that note each commit's time."""

from __future__ import annotations

import contextlib
import multiprocessing
import random
import threading
import time
import uuid
from multiprocessing.connection import Connection

import psycopg
from bench_setup import AGGREGATE_TYPE, EVENT_TYPE, PAD, PAYLOAD_SQL, payload_json

INSERT = (
    "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, payload)"
    " VALUES (%s, %s, %s, %s, %s::jsonb)"
)


def insert_backlog(database_url: str, count: int, aggregates: int) -> float:
    """Insert ``count`` events over ``aggregates`` aggregate ids (event g -> aggregate g mod A),
    in chunks of 10,000 rows per transaction; returns the seconds it took."""
    started = time.perf_counter()
    with psycopg.connect(database_url) as conn:
        for first in range(0, count, 10_000):
            last = min(count, first + 10_000) - 1
            conn.execute(
                "INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload)"
                f" SELECT %s, %s, mod(g, %s)::text, {PAYLOAD_SQL}"
                " FROM generate_series(%s::bigint, %s::bigint) AS g",
                (EVENT_TYPE, AGGREGATE_TYPE, aggregates, first, last),
            )
            conn.commit()
    return time.perf_counter() - started


def insert_backlog_at_once(database_url: str, count: int, aggregates: int) -> float:
    """Like ``insert_backlog``, but in one transaction that also ANALYZEs the outbox (ANALYZE
    counts the transaction's own rows), so running relays see the whole backlog at once, with
    fresh planner statistics, at the commit. Returns the seconds it took."""
    started = time.perf_counter()
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload)"
            f" SELECT %s, %s, mod(g, %s)::text, {PAYLOAD_SQL}"
            " FROM generate_series(0::bigint, %s::bigint) AS g",
            (EVENT_TYPE, AGGREGATE_TYPE, aggregates, count - 1),
        )
        conn.execute("ANALYZE outbox")
        conn.commit()
    return time.perf_counter() - started


def pending(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL AND dead_at IS NULL"
        ).fetchone()
        return int(row[0]) if row else 0


class ServiceRestarted(RuntimeError):
    """A shared service went away mid-measurement; the phase must be run again."""


class PublishedCounter:
    """Reads the relay's own per-second published counts: cheap enough to poll every 10 ms."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._conn = psycopg.connect(database_url, autocommit=True)

    def published(self) -> int:
        try:
            row = self._conn.execute(
                "SELECT coalesce(sum(published), 0) FROM outbox_relay_stats"
            ).fetchone()
        except psycopg.OperationalError as exc:
            # Another engineer's test restarted PostgreSQL: this phase's figures are void.
            raise ServiceRestarted(f"PostgreSQL connection lost: {exc}") from exc
        return int(row[0]) if row else 0

    def wait_for(self, target: int, timeout: float, interval: float = 0.01) -> float | None:
        """Poll until ``target`` events are published; the perf_counter time seen, or None."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.published() >= target:
                return time.perf_counter()
            time.sleep(interval)
        return None

    def close(self) -> None:
        self._conn.close()


def _paced_thread(
    database_url: str,
    rate: float,
    offset: float,
    start_at: float,
    stop_at: float,
    aggregates: int,
    out: list[tuple[str, float]],
) -> None:
    rng = random.Random()
    interval = 1.0 / rate
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT 1")
        due = start_at + offset
        n = 0
        while due < stop_at:
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            event_id = str(uuid.uuid4())
            conn.execute(
                INSERT,
                (
                    event_id,
                    EVENT_TYPE,
                    AGGREGATE_TYPE,
                    str(rng.randrange(aggregates)),
                    payload_json(n),
                ),
                prepare=True,
            )
            out.append((event_id, time.time()))  # committed: autocommit
            n += 1
            due += interval


def _paced_child(
    database_url: str,
    rate: float,
    seconds: float,
    connections: int,
    aggregates: int,
    pipe: Connection,
) -> None:
    per_thread = rate / connections
    start_at = time.time() + 0.5  # every thread connected before the first tick
    stop_at = start_at + seconds
    outs: list[list[tuple[str, float]]] = [[] for _ in range(connections)]
    threads = [
        threading.Thread(
            target=_paced_thread,
            args=(
                database_url,
                per_thread,
                i / rate,
                start_at,
                stop_at,
                aggregates,
                outs[i],
            ),
        )
        for i in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    committed = {event_id: at for out in outs for event_id, at in out}
    pipe.send((committed, start_at, time.time()))
    pipe.close()


class PacedProducers:
    """``connections`` producers inserting ``rate`` single-row transactions per second in total,
    each committed event's id and commit time recorded (a process of its own)."""

    def __init__(
        self, database_url: str, rate: float, seconds: float, connections: int, aggregates: int
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(
            target=_paced_child,
            args=(database_url, rate, seconds, connections, aggregates, child_end),
            name="bench-producers",
        )
        self._process.start()
        child_end.close()
        self._seconds = seconds

    def result(self) -> tuple[dict[str, float], float]:
        """event_id -> commit time, and the achieved rate (events/s)."""
        if not self._pipe.poll(self._seconds + 60):
            raise RuntimeError("paced producers did not finish")
        committed, started, finished = self._pipe.recv()
        self._process.join(10)
        return committed, len(committed) / max(finished - started, 1e-9)

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)


def _streaming_child(
    database_url: str,
    rate: float,
    seconds: float,
    connections: int,
    aggregates: int,
    pipe: Connection,
) -> None:
    """Paced threads as in ``_paced_child``; on each "take" the commits since the last one."""
    per_thread = rate / connections
    start_at = time.time() + 0.5
    stop_at = start_at + seconds
    outs: list[list[tuple[str, float]]] = [[] for _ in range(connections)]
    threads = [
        threading.Thread(
            target=_paced_thread,
            args=(database_url, per_thread, i / rate, start_at, stop_at, aggregates, outs[i]),
            daemon=True,
        )
        for i in range(connections)
    ]
    for thread in threads:
        thread.start()
    while True:
        command = pipe.recv()
        if command != "take":
            break
        taken: dict[str, float] = {}
        for out in outs:
            # The threads only append: the first n entries are safe to copy and drop.
            count = len(out)
            taken.update(out[:count])
            del out[:count]
        running = any(thread.is_alive() for thread in threads)
        pipe.send((taken, time.time(), running))
    pipe.close()


class StreamingProducers:
    """Like ``PacedProducers``, for long runs: ``take()`` returns the commits since the last
    call (event_id -> commit time), so nothing piles up in memory."""

    def __init__(
        self, database_url: str, rate: float, seconds: float, connections: int, aggregates: int
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(
            target=_streaming_child,
            args=(database_url, rate, seconds, connections, aggregates, child_end),
            name="bench-producers",
        )
        self._process.start()
        child_end.close()

    def take(self, timeout: float = 60) -> tuple[dict[str, float], float, bool]:
        """(event_id -> commit time since the last take, the time now, still producing)."""
        self._pipe.send("take")
        if not self._pipe.poll(timeout):
            raise RuntimeError("streaming producers did not answer")
        taken: tuple[dict[str, float], float, bool] = self._pipe.recv()
        return taken

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._pipe.send("stop")
            self._process.join(10)
        self.kill()

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)


# The fault soak's application table: one row per event, written in the same transaction as its
# outbox row (as an application writes its own state and the event together). What committed is
# read from here at the end, whatever the producers saw of a commit cut by a restart.
SEQUENCED_TABLE = """
CREATE TABLE IF NOT EXISTS soak_steps (
    aggregate_id text NOT NULL,
    seq integer NOT NULL,
    event_id uuid NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (aggregate_id, seq)
)
"""
SEQUENCED_EVENT_TYPE = "soak.step"
SEQUENCED_INSERT = (
    "WITH step AS (INSERT INTO soak_steps (aggregate_id, seq, event_id)"
    " VALUES (%(aggregate)s, %(seq)s, %(event_id)s))"
    " INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, payload)"
    " VALUES (%(event_id)s, %(event_type)s, %(aggregate_type)s, %(aggregate)s,"
    " jsonb_build_object('aggregate', %(aggregate)s::text, 'seq', %(seq)s::int, 'pad', %(pad)s::text))"
)
SEQUENCED_COMMITTED = "SELECT 1 FROM soak_steps WHERE aggregate_id = %s AND seq = %s"


def _sequenced_thread(
    database_url: str,
    rate: float,
    offset: float,
    aggregates: list[str],
    stop: threading.Event,
    errors: list[str],
) -> None:
    """Insert at ``rate``, each event the next step (1, 2, ...) of one of this thread's own
    aggregates, so each aggregate's steps commit in order. Survives a restarting server: a
    statement that fails is retried on a new connection, unless its commit went through (an
    error on the commit itself is ambiguous: the application table says)."""
    rng = random.Random()
    steps = dict.fromkeys(aggregates, 0)
    interval = 1.0 / rate
    due = time.time() + offset
    conn: psycopg.Connection[tuple[object, ...]] | None = None
    pending: tuple[str, int, str] | None = None  # written, outcome unknown
    while not stop.is_set():
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(database_url, autocommit=True, connect_timeout=5)
            if pending is not None:
                aggregate, seq, event_id = pending
                if conn.execute(SEQUENCED_COMMITTED, (aggregate, seq)).fetchone() is None:
                    conn.execute(SEQUENCED_INSERT, _step(aggregate, seq, event_id))
                steps[aggregate] = seq
                pending = None
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:
                due = time.time()  # a steady rate after an outage, not a burst to catch up
            aggregate = rng.choice(aggregates)
            pending = (aggregate, steps[aggregate] + 1, str(uuid.uuid4()))
            conn.execute(SEQUENCED_INSERT, _step(*pending), prepare=True)
            steps[aggregate] = pending[1]
            pending = None
            due += interval
        except psycopg.Error as exc:
            errors.append(type(exc).__name__)
            if conn is not None:
                conn.close()
            conn = None
            stop.wait(0.2)
    if conn is not None:
        conn.close()


def _step(aggregate: str, seq: int, event_id: str) -> dict[str, object]:
    return {
        "aggregate": aggregate,
        "seq": seq,
        "event_id": event_id,
        "event_type": SEQUENCED_EVENT_TYPE,
        "aggregate_type": AGGREGATE_TYPE,
        "pad": PAD[:200],
    }


def _sequenced_child(
    database_url: str, rate: float, connections: int, aggregates: int, pipe: Connection
) -> None:
    names = [f"agg-{n}" for n in range(aggregates)]
    stop = threading.Event()
    errors: list[str] = []
    threads = [
        threading.Thread(
            target=_sequenced_thread,
            args=(database_url, rate / connections, i / rate, names[i::connections], stop, errors),
            daemon=True,
        )
        for i in range(connections)
    ]
    for thread in threads:
        thread.start()
    pipe.recv()  # "stop"
    stop.set()
    for thread in threads:
        thread.join(30)
    pipe.send(errors)
    pipe.close()


class SequencedProducers:
    """``connections`` producer threads (a process of their own) inserting ``rate`` events/s in
    total over ``aggregates`` aggregates, each event carrying its aggregate's next step number
    (``{"aggregate": ..., "seq": n}``) and recorded in ``soak_steps`` in the same transaction
    (create it with ``SEQUENCED_TABLE``). They run until ``stop()``, riding out restarts."""

    def __init__(self, database_url: str, rate: float, connections: int, aggregates: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(
            target=_sequenced_child,
            args=(database_url, rate, connections, aggregates, child_end),
            name="bench-sequenced-producers",
        )
        self._process.start()
        child_end.close()

    def stop(self, timeout: float = 60) -> list[str]:
        """Stop producing; the names of the errors the producers rode out."""
        self._pipe.send("stop")
        if not self._pipe.poll(timeout):
            raise RuntimeError("sequenced producers did not stop")
        errors: list[str] = self._pipe.recv()
        self._process.join(10)
        return errors

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)
