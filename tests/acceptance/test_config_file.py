"""``serve --config relay.toml``: one process relays many outboxes (several databases, several
schemas of one database), each to its own exchange, in per-aggregate commit order; two
processes with the same file share every outbox and survive one being SIGKILLed; ``status
--config`` shows them all; a bad file is one line naming the place, exit 3, before anything
connects."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import pika
import psycopg
import pytest

from outbox_relay.db.migrations import migrate
from tests.acceptance.cli_batch import run_all
from tests.acceptance.conftest import (
    QueueConsumer,
    RelayProcess,
    Workload,
    check_deliveries,
    cli_env,
    run_cli,
)
from tests.conftest import rabbit_cleanup, wait_until
from tests.faults import Trap, free_port

pytestmark = pytest.mark.acceptance

EXIT_CONFIG = 3
BATCH_SIZE = 100


# -- a bad file --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trap() -> Iterator[Trap]:
    made = Trap()
    yield made
    made.close()


def test_a_bad_file_is_one_line_naming_the_place_exit_3_before_anything_connects(
    tmp_path: Path, trap: Trap
) -> None:
    db = f"postgresql://app@127.0.0.1:{trap.port}/orders"
    broker = f"amqp://guest:guest@127.0.0.1:{trap.port}/%2F"
    good = f'[[outbox]]\nname = "orders"\ndatabase_url = "{db}"\nbroker_url = "{broker}"\n'
    cases = {
        "unknown key": (good + "bach_size = 5\n", 'outbox[1] "orders": bach_size: is not a'),
        "wrong type": (good + 'batch_size = "many"\n', 'outbox[1] "orders": batch_size: '),
        "wrong value": (good + "poll_interval = -1\n", 'outbox[1] "orders": poll_interval: '),
        "missing database_url": (
            '[[outbox]]\nname = "orders"\n',
            'outbox[1] "orders": database_url: is required',
        ),
        "duplicate name": (
            good + good.replace("/orders", "/other"),
            "outbox[2] \"orders\": name: 'orders' is taken",
        ),
        "unset variable": (
            good.replace(db, "${NO_SUCH_VARIABLE_HERE}"),
            'outbox[1] "orders": database_url: ${NO_SUCH_VARIABLE_HERE} is not set',
        ),
        "TOML syntax": (good + "batch_size =\n", "is not valid TOML: Invalid value (at line 5"),
        "schema and schemas": (
            good + 'schema = "a"\nschemas = "tenant_*"\n',
            'outbox[1] "orders": schemas: give schema (one) or schemas (a glob), not both',
        ),
    }
    runs = []
    for number, (text, _expected) in enumerate(cases.values()):
        path = tmp_path / f"relay-{number}.toml"
        path.write_text(text)
        for command in (["serve"], ["status", "--json"]):
            runs.append(([*command, "--config", str(path)], cli_env()))
    runs.append((["serve", "--config", str(tmp_path / "absent.toml")], cli_env()))
    runs.append((["serve"], cli_env(config=tmp_path / "absent.toml")))
    before = trap.connections

    done = run_all(runs)

    expected = [e for _text, e in cases.values() for _command in (0, 1)]
    expected += ["--config (OUTBOX_RELAY_CONFIG): ", "--config (OUTBOX_RELAY_CONFIG): "]
    for (args, _env), outcome, names in zip(runs, done, expected, strict=True):
        lines = outcome.stderr.splitlines()
        assert outcome.returncode == EXIT_CONFIG, (args, outcome.stderr)
        assert len(lines) == 1, (args, outcome.stderr)
        assert lines[0].startswith("error: "), lines[0]
        assert names in lines[0], (args, lines[0])
        assert "relay-" in lines[0] or "absent.toml" in lines[0], lines[0]  # the file
        assert "Traceback" not in outcome.stderr
    assert trap.connections == before


def test_an_option_naming_one_outbox_cannot_be_combined_with_a_config_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[[outbox]]\nname = "a"\ndatabase_url = "postgresql://db/a"\n')

    done = run_cli("serve", "--config", str(path), env=cli_env(database_url="postgresql://x/y"))

    assert done.returncode == EXIT_CONFIG
    assert done.stderr.startswith(
        "error: --database-url (OUTBOX_RELAY_DATABASE_URL): names one outbox and cannot be "
        "combined with --config"
    ), done.stderr


# -- many outboxes, one process ------------------------------------------------------------------


@dataclass
class Target:
    """One configured outbox: where its events are written and where they must arrive."""

    name: str
    database_url: str  # the database, search_path set to the outbox's schema (for the producer)
    schema: str
    exchange: str
    queue: str


def with_search_path(url: str, schema: str) -> str:
    """``url`` whose sessions write to ``schema`` first (the producer's plain INSERT INTO outbox)."""
    parts = urlsplit(url)
    options = urlencode({"options": f"-csearch_path={schema},public"})
    return urlunsplit(parts._replace(query=options))


@pytest.fixture
def targets(database_url: str, empty_database_url: str, broker_url: str) -> Iterator[list[Target]]:
    """Three outboxes: ``orders`` (schema public) and ``billing`` (schema billing) in this test's
    database, ``shipping`` in a second database made (and dropped) for the test; each with its
    own exchange and a queue bound to it."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrate(conn, "billing")
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        migrate(conn, "public")
    made = [
        ("orders", database_url, "public"),
        ("billing", database_url, "billing"),
        ("shipping", empty_database_url, "public"),
    ]
    found = []
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    for name, url, schema in made:
        tag = uuid.uuid4().hex[:8]
        exchange, queue = f"events.test.{name}.{tag}", f"q.test.{name}.{tag}"
        channel.exchange_declare(exchange, "topic", durable=True)
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, exchange, "order.*")
        found.append(Target(name, url, schema, exchange, queue))
    connection.close()
    yield found
    for target in found:
        rabbit_cleanup(broker_url, lambda ch, t=target: ch.queue_delete(t.queue))
        rabbit_cleanup(broker_url, lambda ch, t=target: ch.exchange_delete(t.exchange))


def write_config(path: Path, targets: list[Target]) -> dict[str, str]:
    """The config file (URLs through ${VAR}s, as a deployment keeps its secrets) and the
    variables it needs."""
    env = cli_env()
    lines = [
        "[defaults]",
        'broker_url = "${TEST_BROKER_URL}"',
        f"batch_size = {BATCH_SIZE}",
        "poll_interval = 0.2",
        "",
    ]
    for target in targets:
        variable = f"TEST_DB_{target.name.upper()}"
        env[variable] = target.database_url
        lines += [
            "[[outbox]]",
            f'name = "{target.name}"',
            f'database_url = "${{{variable}}}"',
            f'schema = "{target.schema}"',
            f'exchange = "{target.exchange}"',
        ]
        if target.name == "billing":
            lines.append('mode = "poll"')  # a per-outbox override of the defaults
        lines.append("")
    path.write_text("\n".join(lines))
    return env


def start_workloads(targets: list[Target], total: int) -> dict[str, Workload]:
    loads = {}
    for target in targets:
        url = with_search_path(target.database_url, target.schema)
        loads[target.name] = Workload(url, total=total, producers=3, aggregates=60).prepare()
    for load in loads.values():
        load.start()
    return loads


def status_of_all(path: Path, env: dict[str, str]) -> list[dict[str, object]]:
    done = run_cli("status", "--config", str(path), "--json", env=env)
    assert done.returncode == 0, done.stderr
    items: list[dict[str, object]] = json.loads(done.stdout)
    return items


def owners(path: Path, env: dict[str, str]) -> dict[str, set[str]]:
    """outbox name -> the relays holding a partition of it."""
    found: dict[str, set[str]] = {}
    for item in status_of_all(path, env):
        relays = item["relays"]
        assert isinstance(relays, list)
        found[str(item["name"])] = {r["relay"] for r in relays if r["partitions"]}
    return found


def published_by_outbox(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for labels, value in re.findall(
        r"^outbox_relay_events_published_total\{([^}]*)\} (\S+)$", text, re.M
    ):
        outbox = re.search(r'outbox="([^"]*)"', labels)
        assert outbox is not None, f"a series without the outbox label: {labels}"
        found[outbox[1]] = found.get(outbox[1], 0.0) + float(value)
    return found


def test_one_process_relays_three_outboxes_in_two_databases_each_to_its_exchange(
    tmp_path: Path,
    broker_url: str,
    targets: list[Target],
    relay_factory: Callable[..., RelayProcess],
    consume: Callable[[str, str], QueueConsumer],
) -> None:
    # Given a config file with three outboxes, and one relay process serving it
    path = tmp_path / "relay.toml"
    env = write_config(path, targets)
    env["TEST_BROKER_URL"] = broker_url
    metrics_port, health_port = free_port(), free_port()
    relay = relay_factory(
        env,
        "--config",
        str(path),
        "--metrics-port",
        str(metrics_port),
        "--health-port",
        str(health_port),
    ).start()
    consumers = {t.name: consume(broker_url, t.queue) for t in targets}
    wait_until(lambda: all(owners(path, env).values()), timeout=30)
    with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=5) as ready:
        assert ready.status == 200

    # When each outbox gets events from concurrent producers
    loads = start_workloads(targets, total=1500)
    for load in loads.values():
        load.join()

    # Then every event of each arrives on its own exchange, in per-aggregate commit order
    for name, load in loads.items():
        wait_until(lambda c=consumers[name], w=load: c.has_all(set(w.produced)), timeout=60)
    wait_until(lambda: all(i["pending"] == 0 for i in status_of_all(path, env)), timeout=30)
    assert published_by_outbox(metrics_port) == {t.name: 1500.0 for t in targets}
    assert relay.terminate() == 0
    for name, load in loads.items():
        consumers[name].stop()
        # Only this outbox's events are in its queue: check_deliveries refuses any other.
        report = check_deliveries(consumers[name].deliveries, load.produced, load.versions())
        assert report.relay_duplicates == 0
    log = relay.log()
    assert "starting relay" in log
    for target in targets:
        assert f"outbox={target.name}" in log
    assert "stopped" in log


def test_two_processes_share_every_outbox_and_survive_one_being_killed(
    tmp_path: Path,
    broker_url: str,
    targets: list[Target],
    relay_factory: Callable[..., RelayProcess],
    consume: Callable[[str, str], QueueConsumer],
) -> None:
    # Given two relay processes started with the same config file
    path = tmp_path / "relay.toml"
    env = write_config(path, targets)
    env["TEST_BROKER_URL"] = broker_url
    first = relay_factory({**env, "OUTBOX_RELAY_RELAY_NAME": "first"}, "--config", str(path))
    second = relay_factory({**env, "OUTBOX_RELAY_RELAY_NAME": "second"}, "--config", str(path))
    first.start()
    second.start()
    consumers = {t.name: consume(broker_url, t.queue) for t in targets}
    both = {"first", "second"}
    wait_until(lambda: all(o == both for o in owners(path, env).values()), timeout=30)

    # When one of them is SIGKILLed mid-stream
    loads = start_workloads(targets, total=3000)
    wait_until(lambda: all(c.unique_count() >= 600 for c in consumers.values()), timeout=60)
    # (mid-stream: not everything has arrived yet)
    assert sum(c.unique_count() for c in consumers.values()) < 3 * 3000
    second.kill()
    wait_until(lambda: all(o == {"first"} for o in owners(path, env).values()), timeout=30)
    for load in loads.values():
        load.join()

    # Then the survivor relays the rest: nothing lost, per-aggregate order holds per outbox
    for name, load in loads.items():
        wait_until(lambda c=consumers[name], w=load: c.has_all(set(w.produced)), timeout=120)
    assert first.terminate() == 0
    for name, load in loads.items():
        consumers[name].stop()
        report = check_deliveries(consumers[name].deliveries, load.produced, load.versions())
        # Only what the killed process had in flight for this outbox may arrive twice.
        assert report.relay_duplicates <= BATCH_SIZE


def test_status_shows_every_outbox_and_fails_on_the_lag_of_any(
    tmp_path: Path, broker_url: str, targets: list[Target]
) -> None:
    path = tmp_path / "relay.toml"
    env = write_config(path, targets)
    env["TEST_BROKER_URL"] = broker_url
    billing = next(t for t in targets if t.name == "billing")
    with psycopg.connect(billing.database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO billing.outbox (event_type, aggregate_type, aggregate_id, payload,"
            " created_at) VALUES ('order.created', 'order', 'o-1', '{}', now() - interval '1h')"
        )

    items = status_of_all(path, env)
    table = run_cli("status", "--config", str(path), env=env)
    lagging = run_cli("status", "--config", str(path), "--fail-on-lag", "60", env=env)

    assert [(i["name"], i["schema"], i["pending"]) for i in items] == [
        ("orders", "public", 0),
        ("billing", "billing", 1),
        ("shipping", "public", 0),
    ]
    assert {"relays_connected", "oldest_pending_age_seconds", "dead", "lagging"} <= set(items[0])
    assert table.returncode == 0, table.stderr
    for target in targets:
        assert target.name in table.stdout
    assert lagging.returncode == 6, lagging.stderr
    assert lagging.stderr.startswith("lagging: outbox 'billing': oldest pending event is")


def test_one_outbox_commands_take_the_outbox_from_the_file(
    tmp_path: Path, broker_url: str, targets: list[Target]
) -> None:
    path = tmp_path / "relay.toml"
    env = write_config(path, targets)
    env["TEST_BROKER_URL"] = broker_url
    config = ["--config", str(path)]

    emitted = run_cli("emit", "order.created", *config, "--outbox", "billing", env=env)
    dead = run_cli("dead", "list", "--json", *config, "--outbox", "shipping", env=env)
    unknown = run_cli("dead", "list", *config, "--outbox", "nope", env=env)
    ambiguous = run_cli("dead", "list", *config, env=env)

    assert emitted.returncode == 0, emitted.stderr
    pending = {str(i["name"]): i["pending"] for i in status_of_all(path, env)}
    assert pending == {"orders": 0, "billing": 1, "shipping": 0}
    assert dead.returncode == 0, dead.stderr
    assert json.loads(dead.stdout) == []
    assert unknown.returncode == EXIT_CONFIG
    assert unknown.stderr.startswith(
        "error: --outbox (OUTBOX_RELAY_OUTBOX): 'nope' is not an outbox of"
    ), unknown.stderr
    assert ambiguous.returncode == EXIT_CONFIG
    assert "--outbox (OUTBOX_RELAY_OUTBOX): is required" in ambiguous.stderr


def test_migrate_migrates_every_outbox_of_the_file(tmp_path: Path, database_url: str) -> None:
    # Given a file with an outbox already migrated and one whose schema does not exist yet
    path = tmp_path / "relay.toml"
    path.write_text(
        "[defaults]\n"
        'database_url = "${TEST_DB}"\n'
        '[[outbox]]\nname = "orders"\nschema = "public"\n'
        '[[outbox]]\nname = "tenant"\nschema = "tenant_new"\nmode = "poll"\n'
    )
    env = {**cli_env(), "TEST_DB": database_url}

    first = run_cli("migrate", "--config", str(path), "--partitions", "16", env=env)
    again = run_cli("migrate", "--config", str(path), env=env)
    cdc = run_cli("migrate", "--config", str(path), "--cdc", env=env)

    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0] == "outbox 'orders':"
    assert "schema 'public': already at version" in lines[1]
    assert "outbox 'tenant':" in lines
    assert any(line.startswith("schema 'tenant_new': applied 0001_") for line in lines)
    assert first.stdout.count("partitions: 16") == 2
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("nothing to do") == 2
    items = status_of_all(path, env)
    assert [(i["name"], i["partitions"]) for i in items] == [("orders", 16), ("tenant", 16)]
    assert cdc.returncode == EXIT_CONFIG
    assert cdc.stderr.startswith("error: --cdc: not with --config"), cdc.stderr


def test_a_schemas_glob_relays_every_migrated_schema_as_they_come_and_go(
    tmp_path: Path,
    database_url: str,
    broker_url: str,
    exchange: str,
    relay_factory: Callable[..., RelayProcess],
    consume: Callable[[str, str], QueueConsumer],
) -> None:
    # Given two migrated tenant schemas and a file relaying every schema of the glob
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    with psycopg.connect(database_url, autocommit=True) as conn:
        for tenant in ("a", "b"):
            migrate(conn, prefix + tenant)
        conn.execute(f"CREATE SCHEMA {prefix}unmigrated")  # matches, holds no outbox: skipped
    path = tmp_path / "relay.toml"
    path.write_text(
        "[[outbox]]\n"
        'name = "tenants"\n'
        'database_url = "${TEST_DB}"\n'
        f'schemas = "{prefix}*"\n'
        f'exchange = "{exchange}"\n'
        "poll_interval = 0.2\n"
    )
    env = {**cli_env(), "TEST_DB": database_url, "OUTBOX_RELAY_BROKER_URL": broker_url}
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    queue = f"q.test.{prefix}"
    connection.channel().queue_declare(queue, durable=True)
    connection.channel().queue_bind(queue, exchange, "order.*")
    connection.close()
    consumer = consume(broker_url, queue)
    relay = relay_factory(env, "--config", str(path)).start()
    relay.wait_for_log(f"found schema '{prefix}a'")
    relay.wait_for_log(f"found schema '{prefix}b'")

    def emit(tenant: str) -> str:
        with psycopg.connect(database_url, autocommit=True) as conn:
            row = conn.execute(
                f"INSERT INTO {prefix}{tenant}.outbox (event_type, aggregate_type, aggregate_id,"
                " payload) VALUES ('order.created', 'order', %s, '{}') RETURNING event_id",
                (tenant,),
            ).fetchone()
        assert row is not None
        return str(row[0])

    try:
        # Then events of both arrive
        sent = {emit("a"), emit("b")}
        wait_until(lambda: consumer.has_all(sent), timeout=30)

        # When a third tenant's schema is created and migrated mid-run, it is relayed within 30 s
        with psycopg.connect(database_url, autocommit=True) as conn:
            migrate(conn, prefix + "c")
        late = emit("c")
        wait_until(lambda: consumer.has_all({late}), timeout=30)
        assert f"found schema '{prefix}c'" in relay.log()
        names = [str(i["name"]) for i in status_of_all(path, env)]
        assert sorted(names) == [f"tenants:{prefix}{t}" for t in "abc"]

        # When one is dropped, it is let go and the others go on
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '20s'")
            conn.execute(f"DROP SCHEMA {prefix}a CASCADE")
        relay.wait_for_log(f"schema '{prefix}a' is gone", timeout=30)
        after = {emit("b"), emit("c")}
        wait_until(lambda: consumer.has_all(after), timeout=30)
        assert relay.running
    finally:
        rabbit_cleanup(broker_url, lambda ch: ch.queue_delete(queue))
    assert relay.terminate() == 0
    log = relay.log()
    assert f"outbox=tenants:{prefix}b" in log
    assert "Traceback" not in log


def test_an_outbox_whose_database_is_down_leaves_the_others_relaying_and_the_process_unready(
    tmp_path: Path,
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., Any],
    relay_factory: Callable[..., RelayProcess],
    consume: Callable[[str, str], QueueConsumer],
) -> None:
    # Given one outbox whose database is reachable and one whose database is not
    path = tmp_path / "relay.toml"
    path.write_text(
        "[defaults]\n"
        f'exchange = "{exchange}"\n'
        "poll_interval = 0.2\n"
        '[[outbox]]\nname = "up"\ndatabase_url = "${TEST_DB}"\n'
        f'[[outbox]]\nname = "down"\ndatabase_url = "postgresql://postgres@127.0.0.1:{free_port()}/x"\n'
    )
    env = {**cli_env(broker_url=broker_url), "TEST_DB": database_url}
    health_port = free_port()
    queue = bind_queue("order.*")
    consumer = consume(broker_url, queue.name)
    relay = relay_factory(env, "--config", str(path), "--health-port", str(health_port)).start()

    # When events are written to the reachable one
    relay.wait_for_log("cannot connect, retrying")
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload)"
            " VALUES ('order.created', 'order', 'o-1', '{}') RETURNING event_id"
        ).fetchone()
    assert row is not None

    # Then they arrive, while the process reports itself unready and keeps retrying the other
    wait_until(lambda: consumer.has_all({str(row[0])}), timeout=30)
    with pytest.raises(urllib.error.HTTPError) as unready:
        urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=5)
    unready.value.close()
    assert unready.value.code == 503
    assert relay.running
    assert relay.terminate() == 0
    assert "outbox=down" in relay.log()
