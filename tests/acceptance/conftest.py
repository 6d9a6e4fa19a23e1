"""Acceptance fixtures: the installed ``outbox-relay`` CLI run as a subprocess, a concurrent
producer workload writing plain SQL, and a queue consumer recording every delivery.

Nothing here imports the relay: the tests see only what a user sees (exit codes, stdout, logs,
messages on a queue).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pika
import pika.exceptions
import psycopg
import pytest
from psycopg import conninfo, sql
from psycopg.types.json import Jsonb

from tests.conftest import wait_until

SHUTDOWN_DEADLINE = 5.0  # SIGTERM must end the relay with exit code 0 within this many seconds


def relay_command() -> list[str]:
    """The console script installed next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).with_name("outbox-relay")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("outbox-relay")
    if found:
        return [found]
    return [sys.executable, "-m", "outbox_relay"]


def cli_env(**settings: str | float | int) -> dict[str, str]:
    """The current environment without any OUTBOX_RELAY_* leaking in, plus ``settings`` given
    as OUTBOX_RELAY_<NAME> variables (database_url -> OUTBOX_RELAY_DATABASE_URL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_")}
    env.update({f"OUTBOX_RELAY_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*relay_command(), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_status(env: dict[str, str]) -> dict[str, Any]:
    done = run_cli("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    status: dict[str, Any] = json.loads(done.stdout)
    return status


# -- the relay daemon ---------------------------------------------------------------------------


class RelayProcess:
    """``outbox-relay serve`` as a child process; every run appends its output to one log file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.env = env
        self.log_path = log_path
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> RelayProcess:
        assert not self.running, "relay already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"=== start {self.starts} ===\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [*relay_command(), "serve", *self.args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if not line.startswith("=== start ")]

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        def seen() -> bool:
            assert self.running, f"relay exited while waiting for {text!r}:\n{self.log()}"
            return self.log().count(text) >= count

        wait_until(seen, timeout=timeout)

    def terminate(self, deadline: float = SHUTDOWN_DEADLINE) -> int:
        """SIGTERM; the relay must finish or release its batch and exit 0 within ``deadline``."""
        assert self.process is not None, "relay never started"
        assert self.running, f"relay not running:\n{self.log()}"
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"relay did not exit within {deadline}s of SIGTERM:\n{self.log()[-4000:]}")
        return code

    def kill(self) -> None:
        assert self.process is not None, "relay never started"
        assert self.running, f"relay not running:\n{self.log()}"
        self.process.kill()
        self.process.wait()

    def restart(self) -> RelayProcess:
        return self.start()

    def ensure_stopped(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """relay_factory(env, *serve_args) -> a RelayProcess (not started); all are killed at the end."""
    made: list[RelayProcess] = []

    def make(env: dict[str, str], *args: str) -> RelayProcess:
        relay = RelayProcess(env, tmp_path / f"relay-{len(made)}.log", *args)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.ensure_stopped()


# -- consumer workers ------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
# The acceptance handler (tests/acceptance/consumer_app.py): records each application in effects.
HANDLER = "tests.acceptance.consumer_app:consumer"


class ConsumerLinks(Protocol):
    """Where a worker connects (tests.integration.consumer_harness.ConsumerEnv has these)."""

    database_url: str
    broker_url: str
    exchange: str


class WorkerProcess:
    """``outbox-relay consume`` as a child process, its output in a log file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*relay_command(), "consume", *args],
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.running():
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"worker did not exit within {timeout}s:\n{self.log()[-3000:]}")


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Worker processes a test starts; any still running are killed at the end."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        if worker.running():
            worker.process.kill()
            worker.process.wait()


def start_worker(
    workers: list[WorkerProcess], tmp_path: Path, env: ConsumerLinks, queue: str, **extra: str
) -> WorkerProcess:
    variables = cli_env(
        database_url=env.database_url,
        broker_url=env.broker_url,
        exchange=env.exchange,
        queue=queue,
        max_attempts=3,
        retry_delay=0.1,
        log_level="info",
    )
    variables.update(extra)
    worker = WorkerProcess(
        variables,
        tmp_path / f"worker-{len(workers)}.log",
        "--handler",
        HANDLER,
        "--binding",
        "order.*",
    )
    workers.append(worker)
    return worker


# -- consuming ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    message_id: str | None
    routing_key: str
    properties: Any  # pika.BasicProperties
    body: bytes
    redelivered: bool  # True when RabbitMQ re-sent it to us after our connection dropped


class QueueConsumer:
    """Consumes a queue on a background thread (manual acks), recording deliveries in order.

    Reconnects by itself, so it survives a broker restart; a message delivered but not acked
    before the connection dropped comes again with ``redelivered`` set, which tells those
    consumer-side repeats apart from duplicates the relay published.
    """

    def __init__(self, url: str, queue: str) -> None:
        self._params = pika.URLParameters(url)
        self._queue = queue
        self._lock = threading.Lock()
        self._deliveries: list[Delivery] = []
        self._ids: set[str] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"consume-{queue}", daemon=True)
        self.reconnects = 0

    def start(self) -> QueueConsumer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=15)

    @property
    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    def unique_count(self) -> int:
        with self._lock:
            return len(self._ids)

    def has_all(self, ids: set[str]) -> bool:
        with self._lock:
            return ids <= self._ids

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        delivery = Delivery(
            properties.message_id, method.routing_key, properties, body, bool(method.redelivered)
        )
        with self._lock:
            self._deliveries.append(delivery)
            if delivery.message_id is not None:
                self._ids.add(delivery.message_id)
        channel.basic_ack(method.delivery_tag)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                connection = pika.BlockingConnection(self._params)
                try:
                    channel = connection.channel()
                    channel.basic_qos(prefetch_count=1000)
                    channel.basic_consume(self._queue, self._on_message)
                    while not self._stopping.is_set():
                        connection.process_data_events(time_limit=0.1)
                finally:
                    if connection.is_open:
                        connection.close()
            except (pika.exceptions.AMQPError, OSError):
                # The broker is restarting (a disruptive test): back off, then consume again.
                self.reconnects += 1
                self._stopping.wait(0.3)


@pytest.fixture
def consume() -> Iterator[Callable[[str, str], QueueConsumer]]:
    """consume(broker_url, queue_name) -> a started QueueConsumer, stopped at the end."""
    started: list[QueueConsumer] = []

    def make(url: str, queue: str) -> QueueConsumer:
        consumer = QueueConsumer(url, queue).start()
        started.append(consumer)
        return consumer

    yield make
    for consumer in started:
        consumer.stop()


# -- producing ------------------------------------------------------------------------------------

EVENT_TYPES = ("order.created", "order.updated", "order.paid", "order.shipped")

PRODUCER_SCHEMA = """
CREATE TABLE IF NOT EXISTS aggregates (id text PRIMARY KEY, version int NOT NULL DEFAULT 0);
-- The application's own record of what it committed, so a producer whose COMMIT failed with a
-- lost connection can tell afterwards whether it took effect (outbox rows may be gone already).
CREATE TABLE IF NOT EXISTS producer_ledger (event_id uuid PRIMARY KEY);
"""


@dataclass(frozen=True, slots=True)
class ProducedEvent:
    event_id: str
    event_type: str
    aggregate_id: str
    producer: str


@dataclass
class Workload:
    """``total`` events from ``producers`` threads (one connection each) over ``aggregates``
    aggregates, every event written with plain SQL and stamped with its aggregate's sequence
    number in commit order.

    Each transaction picks one aggregate and writes 1-3 events for it. For each event it INSERTs
    the row, then bumps ``aggregates.version`` (a row lock held to commit) and writes the version
    it got into the event's payload as ``seq``. Even-numbered aggregates write the event before
    taking the row lock; odd-numbered ones take it first with SELECT ... FOR UPDATE. (Mixing both
    orders on one aggregate would only produce deadlocks.) Because ``seq`` is drawn under a row
    lock held until commit, per aggregate it is exactly 1, 2, 3, ... in commit order.
    """

    database_url: str
    total: int = 10_000
    producers: int = 8
    aggregates: int = 200
    seed: int = 20_240_601
    produced: dict[str, ProducedEvent] = field(default_factory=dict)
    retried_transactions: int = 0
    errors: list[BaseException] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)

    @staticmethod
    def aggregate_name(index: int) -> str:
        return f"order-{index:03d}"

    def prepare(self) -> Workload:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(PRODUCER_SCHEMA)
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO aggregates (id) VALUES (%s) ON CONFLICT DO NOTHING",
                    [(self.aggregate_name(i),) for i in range(self.aggregates)],
                )
        return self

    def start(self) -> Workload:
        share, extra = divmod(self.total, self.producers)
        for n in range(self.producers):
            quota = share + (1 if n < extra else 0)
            thread = threading.Thread(
                target=self._produce_guarded, args=(n, quota), name=f"producer-{n}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        return self

    def produced_count(self) -> int:
        with self._lock:
            return len(self.produced)

    def join(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        self._stopping.set()
        assert not alive, f"producers still running after {timeout}s: {alive}"
        assert not self.errors, f"producer failed: {self.errors[0]!r}"
        assert len(self.produced) == self.total

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def versions(self) -> dict[str, int]:
        with psycopg.connect(self.database_url) as conn:
            return dict(conn.execute("SELECT id, version FROM aggregates").fetchall())

    # -- one producer thread --------------------------------------------------------------

    def _produce_guarded(self, number: int, quota: int) -> None:
        try:
            self._produce(number, quota)
        except BaseException as exc:
            self.errors.append(exc)

    def _produce(self, number: int, quota: int) -> None:
        rng = random.Random(self.seed * 31 + number)
        producer = f"producer-{number}"
        conn: psycopg.Connection[Any] | None = None
        written = 0
        try:
            while written < quota and not self._stopping.is_set():
                index = rng.randrange(self.aggregates)
                events = [
                    ProducedEvent(
                        str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                        rng.choice(EVENT_TYPES),
                        self.aggregate_name(index),
                        producer,
                    )
                    for _ in range(min(rng.randint(1, 3), quota - written))
                ]
                conn = self._commit_once(conn, events, lock_first=index % 2 == 1)
                with self._lock:
                    self.produced.update((e.event_id, e) for e in events)
                written += len(events)
        finally:
            if conn is not None:
                conn.close()

    def _connect(self) -> psycopg.Connection[Any]:
        deadline = time.monotonic() + 60
        while True:
            try:
                return psycopg.connect(self.database_url, connect_timeout=5)
            except psycopg.OperationalError:
                # PostgreSQL is restarting (a disruptive test): keep trying for a while.
                if time.monotonic() > deadline or self._stopping.is_set():
                    raise
                self._stopping.wait(0.2)

    def _commit_once(
        self,
        conn: psycopg.Connection[Any] | None,
        events: list[ProducedEvent],
        *,
        lock_first: bool,
    ) -> psycopg.Connection[Any]:
        """Commit the transaction exactly once, across lost connections; returns the live
        connection. A COMMIT cut off by a lost connection may or may not have taken effect:
        the ledger row written in the same transaction says which."""
        deadline = time.monotonic() + 90
        lost = False
        while True:
            try:
                if conn is None or conn.closed or conn.broken:
                    if conn is not None:
                        conn.close()
                    conn = self._connect()
                    if lost and self._committed(conn, events[0].event_id):
                        return conn
                self._write(conn, events, lock_first=lock_first)
                return conn
            except (psycopg.OperationalError, psycopg.InterfaceError):
                if time.monotonic() > deadline or self._stopping.is_set():
                    raise
                if not lost:
                    lost = True
                    with self._lock:
                        self.retried_transactions += 1
                if conn is not None:
                    conn.close()

    @staticmethod
    def _committed(conn: psycopg.Connection[Any], event_id: str) -> bool:
        row = conn.execute(
            "SELECT EXISTS (SELECT FROM producer_ledger WHERE event_id = %s)", (event_id,)
        ).fetchone()
        conn.rollback()
        return bool(row and row[0])

    @staticmethod
    def _write(
        conn: psycopg.Connection[Any], events: list[ProducedEvent], *, lock_first: bool
    ) -> None:
        aggregate = events[0].aggregate_id
        with conn.transaction():  # the outermost block: COMMIT on exit
            if lock_first:
                conn.execute(
                    "SELECT version FROM aggregates WHERE id = %s FOR UPDATE", (aggregate,)
                )
            for event in events:
                row = conn.execute(
                    "INSERT INTO outbox"
                    " (event_id, event_type, aggregate_type, aggregate_id, payload, headers)"
                    " VALUES (%s, %s, 'order', %s, %s, %s) RETURNING id",
                    (
                        event.event_id,
                        event.event_type,
                        aggregate,
                        Jsonb({"agg": aggregate, "event": event.event_id}),
                        Jsonb({"producer": event.producer}),
                    ),
                ).fetchone()
                assert row is not None
                version = conn.execute(
                    "UPDATE aggregates SET version = version + 1 WHERE id = %s RETURNING version",
                    (aggregate,),
                ).fetchone()
                assert version is not None
                conn.execute(
                    "UPDATE outbox SET payload = jsonb_set(payload, '{seq}', to_jsonb(%s::int))"
                    " WHERE id = %s",
                    (version[0], row[0]),
                )
                conn.execute(
                    "INSERT INTO producer_ledger (event_id) VALUES (%s)", (event.event_id,)
                )


@pytest.fixture
def workload(database_url: str) -> Iterator[Callable[..., Workload]]:
    """workload(**overrides) -> a prepared (not started) Workload on this test's database."""
    made: list[Workload] = []

    def make(**overrides: Any) -> Workload:
        load = Workload(database_url, **overrides).prepare()
        made.append(load)
        return load

    yield make
    for load in made:
        load.stop()


# -- checking what arrived -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    relay_duplicates: int  # published more than once by the relay
    consumer_redeliveries: int  # re-sent by RabbitMQ to our consumer after it reconnected


def check_deliveries(
    deliveries: list[Delivery], produced: dict[str, ProducedEvent], versions: dict[str, int]
) -> DeliveryReport:
    """Every produced event arrived, nothing else did, each with the message contract, and per
    aggregate the first arrivals carry seq 1, 2, ..., n: commit order without gaps."""
    first: dict[str, Delivery] = {}  # insertion order = first-arrival order
    relay_duplicates = 0
    consumer_redeliveries = 0
    for delivery in deliveries:
        assert delivery.message_id in produced, f"unexpected message {delivery!r}"
        if delivery.message_id in first:
            if delivery.redelivered:
                consumer_redeliveries += 1
            else:
                relay_duplicates += 1
            assert delivery.body == first[delivery.message_id].body
            continue
        first[delivery.message_id] = delivery
    missing = set(produced) - set(first)
    assert not missing, f"{len(missing)} event(s) never arrived, e.g. {sorted(missing)[:3]}"

    now = time.time()
    sequences: dict[str, list[int]] = {}
    for message_id, delivery in first.items():
        expected = produced[message_id]
        props = delivery.properties
        assert delivery.routing_key == expected.event_type
        assert props.type == expected.event_type
        assert props.content_type == "application/json"
        assert props.delivery_mode == 2
        assert props.headers == {
            "producer": expected.producer,
            "aggregate_type": "order",
            "aggregate_id": expected.aggregate_id,
        }
        assert isinstance(props.timestamp, int)
        assert now - 600 < props.timestamp <= now + 1
        body = json.loads(delivery.body)
        assert body["agg"] == expected.aggregate_id
        assert body["event"] == message_id
        sequences.setdefault(body["agg"], []).append(body["seq"])
    for aggregate, seqs in sequences.items():
        expected_seqs = list(range(1, versions[aggregate] + 1))
        if seqs != expected_seqs:
            at = next(
                (i for i, (a, b) in enumerate(zip(seqs, expected_seqs, strict=False)) if a != b),
                min(len(seqs), len(expected_seqs)),
            )
            pytest.fail(
                f"aggregate {aggregate}: events arrived as seq ...{seqs[max(0, at - 3) : at + 4]}"
                f" at position {at} (of {len(seqs)}, {len(expected_seqs)} committed):"
                " not commit order"
            )
    assert sum(len(s) for s in sequences.values()) == len(produced)
    return DeliveryReport(relay_duplicates, consumer_redeliveries)


# -- disruptions ----------------------------------------------------------------------------------


def run_admin(*command: str, timeout: float = 120.0) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed: {done.stdout}{done.stderr}"


def rabbitmq_stop_app() -> None:
    run_admin("rabbitmqctl", "stop_app")


def rabbitmq_start_app() -> None:
    run_admin("rabbitmqctl", "start_app")
    run_admin("rabbitmqctl", "await_startup")


def postgres_restart() -> None:
    run_admin("pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "restart")


def postgres_ensure_running() -> None:
    status = subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "status"],
        capture_output=True,
        check=False,
    )
    if status.returncode != 0:
        run_admin("pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "start")


# -- least-privilege roles (outbox-relay migrate --grants) ------------------------------------


@dataclass(frozen=True)
class Roles:
    app: str
    relay: str
    login: str  # an application's login role, member of ``app``

    def url(self, database_url: str, role: str) -> str:
        return conninfo.make_conninfo(database_url, user=role)


def _drop_roles(database_url: str, names: list[str]) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        existing = [
            row[0]
            for row in conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (names,)
            ).fetchall()
        ]
        if existing:
            idents = sql.SQL(", ").join(sql.Identifier(name) for name in existing)
            conn.execute(sql.SQL("DROP OWNED BY {}").format(idents))
            conn.execute(sql.SQL("DROP ROLE {}").format(idents))


@pytest.fixture
def roles(database_url: str) -> Iterator[Roles]:
    """Unique role names (roles are cluster-wide); dropped with everything granted to them."""
    suffix = uuid.uuid4().hex[:8]
    made = Roles(app=f"t_app_{suffix}", relay=f"t_relay_{suffix}", login=f"t_login_{suffix}")
    yield made
    _drop_roles(database_url, [made.login, made.app, made.relay])
