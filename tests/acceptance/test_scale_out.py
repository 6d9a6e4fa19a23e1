"""Several ``outbox-relay serve`` processes on one outbox, all at work: each publishes its share
of the partitions (CDC: of the shards), per-aggregate commit order holds, and relays dying,
joining and restarting in turn lose nothing. A relay cut off from PostgreSQL (its link hangs)
stops publishing and settles nothing once the others may have taken its partitions."""

from __future__ import annotations

import re
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests.acceptance.conftest import (
    QueueConsumer,
    RelayProcess,
    Workload,
    check_deliveries,
    cli_env,
    read_status,
    run_cli,
)
from tests.conftest import RabbitQueue, wait_until
from tests.faults import HangingProxy, free_port

pytestmark = pytest.mark.acceptance

BATCH_SIZE = 200
EVENTS = 10_000


def metric(port: int, name: str, relay: str | None = None) -> float:
    """A relay's metric summed over its series (only those labelled ``relay`` when given)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(match[2])
        for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M)
        if relay is None or f'relay="{relay}"' in match[1]
    )


def published(port: int) -> float:
    """What one relay published: its outbox_relay_events_published_total."""
    return metric(port, "outbox_relay_events_published_total")


def shares(env: dict[str, str]) -> dict[str, int]:
    status = read_status(env)
    return {r["relay"]: len(r["partitions"]) + len(r["cdc_shards"]) for r in status["relays"]}


@pytest.fixture
def slot_base(database_url: str) -> Iterator[str]:
    """A unique slot name for --mode cdc; every shard's slot is dropped afterwards."""
    base = f"scale_{uuid.uuid4().hex[:10]}"
    yield base
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name LIKE %s AND NOT active",
            (base + "%",),
        )


def relay_env(
    database_url: str, broker_url: str, exchange: str, mode: str, slot: str
) -> dict[str, str]:
    env = cli_env(
        database_url=database_url,
        broker_url=broker_url,
        exchange=exchange,
        batch_size=BATCH_SIZE,
        poll_interval=0.2,
        mode=mode,
    )
    if mode == "cdc":
        env["OUTBOX_RELAY_SLOT_NAME"] = env["OUTBOX_RELAY_PUBLICATION"] = slot
        env["OUTBOX_RELAY_HEARTBEAT_INTERVAL"] = "1"
    return env


def start_relays(
    relay_factory: Callable[..., RelayProcess], env: dict[str, str], names: list[str]
) -> dict[str, tuple[RelayProcess, int]]:
    started = {}
    for name in names:
        port = free_port()
        relay = relay_factory(
            {**env, "OUTBOX_RELAY_RELAY_NAME": name, "OUTBOX_RELAY_METRICS_PORT": str(port)}
        ).start()
        started[name] = (relay, port)
    return started


@pytest.mark.parametrize("mode", ["notify", "poll", "cdc"])
def test_three_relays_each_publish_a_fair_share_in_commit_order(
    mode: str,
    database_url: str,
    broker_url: str,
    exchange: str,
    slot_base: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
    workload: Callable[..., Workload],
    consume: Callable[[str, str], QueueConsumer],
) -> None:
    queue = bind_queue("order.*")
    consumer = consume(broker_url, queue.name)
    env = relay_env(database_url, broker_url, exchange, mode, slot_base)
    if mode == "cdc":
        made = run_cli("migrate", "--cdc", "--cdc-shards", "3", env=env)
        assert made.returncode == 0, made.stderr
    relays = start_relays(relay_factory, env, ["relay-a", "relay-b", "relay-c"])
    total = 3 if mode == "cdc" else 64
    wait_until(lambda: sorted(shares(env).values()) == sorted(_split(total, 3)), timeout=30)
    # Each relay's metrics say how much it holds, under its name.
    held = shares(env)
    for name, (_relay, port) in relays.items():
        wait_until(
            lambda n=name, p=port: metric(p, "outbox_relay_partitions_owned", n) == held[n],
            timeout=10,
        )

    load = workload(total=EVENTS, producers=8, aggregates=300).start()
    load.join()
    wait_until(lambda: consumer.has_all(set(load.produced)), timeout=120)
    wait_until(lambda: read_status(env)["pending"] == 0, timeout=30)
    counts = {name: published(port) for name, (_relay, port) in relays.items()}
    for relay, _port in relays.values():
        assert relay.terminate() == 0
    consumer.stop()

    report = check_deliveries(consumer.deliveries, load.produced, load.versions())
    assert report.relay_duplicates == 0
    assert sum(counts.values()) >= EVENTS
    for name, count in counts.items():
        assert count >= 0.15 * EVENTS, f"{name} published only {count:.0f} of {EVENTS}: {counts}"
    for relay, _port in relays.values():
        assert "Traceback" not in relay.log()


def _split(total: int, relays: int) -> list[int]:
    return [total // relays + (1 if n < total % relays else 0) for n in range(relays)]


@pytest.mark.parametrize("mode", ["notify", "cdc"])
def test_a_relay_killed_and_a_fourth_joining_mid_stream_lose_nothing(
    mode: str,
    database_url: str,
    broker_url: str,
    exchange: str,
    slot_base: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
    workload: Callable[..., Workload],
    consume: Callable[[str, str], QueueConsumer],
) -> None:
    queue = bind_queue("order.*")
    consumer = consume(broker_url, queue.name)
    env = relay_env(database_url, broker_url, exchange, mode, slot_base)
    if mode == "cdc":
        made = run_cli("migrate", "--cdc", "--cdc-shards", "3", env=env)
        assert made.returncode == 0, made.stderr
    relays = start_relays(relay_factory, env, ["relay-a", "relay-b", "relay-c"])
    wait_until(lambda: len(shares(env)) == 3 and all(shares(env).values()), timeout=30)

    load = workload(total=EVENTS, producers=8, aggregates=300).start()
    wait_until(lambda: consumer.unique_count() >= EVENTS // 5, timeout=60)
    relays["relay-b"][0].kill()
    wait_until(lambda: set(shares(env)) == {"relay-a", "relay-c"}, timeout=15)
    wait_until(lambda: consumer.unique_count() >= EVENTS // 2, timeout=60)
    relays.update(start_relays(relay_factory, env, ["relay-d"]))
    wait_until(lambda: shares(env).get("relay-d", 0) > 0 or mode == "cdc", timeout=15)
    load.join()
    wait_until(lambda: consumer.has_all(set(load.produced)), timeout=120)
    wait_until(lambda: read_status(env)["pending"] == 0, timeout=30)
    for name, (relay, _port) in relays.items():
        if name != "relay-b":
            assert relay.terminate() == 0
    consumer.stop()

    report = check_deliveries(consumer.deliveries, load.produced, load.versions())
    # Only what the killed relay had in flight may arrive twice.
    assert report.relay_duplicates <= BATCH_SIZE


def test_a_rolling_restart_loses_nothing(
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
    workload: Callable[..., Workload],
    consume: Callable[[str, str], QueueConsumer],
) -> None:
    queue = bind_queue("order.*")
    consumer = consume(broker_url, queue.name)
    env = relay_env(database_url, broker_url, exchange, "poll", "")
    relays = start_relays(relay_factory, env, ["relay-a", "relay-b", "relay-c"])
    wait_until(lambda: len(shares(env)) == 3, timeout=30)

    load = workload(total=EVENTS, producers=8, aggregates=300).start()
    for name, (relay, _port) in relays.items():
        # Each relay in turn: SIGTERM (it finishes its batches and hands its share over), then
        # the same relay again, as a rollout does.
        wait_until(lambda: len(shares(env)) == 3, timeout=30)
        assert relay.terminate() == 0
        wait_until(lambda n=name: n not in shares(env), timeout=15)
        relay.restart()
    load.join()
    wait_until(lambda: consumer.has_all(set(load.produced)), timeout=120)
    wait_until(lambda: read_status(env)["pending"] == 0, timeout=30)
    for relay, _port in relays.values():
        assert relay.terminate() == 0
    consumer.stop()

    report = check_deliveries(consumer.deliveries, load.produced, load.versions())
    assert report.relay_duplicates == 0, "a graceful hand-over publishes nothing twice"


def test_a_relay_cut_off_from_postgresql_stops_and_its_partitions_are_taken_over(
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
    workload: Callable[..., Workload],
    consume: Callable[[str, str], QueueConsumer],
) -> None:
    queue = bind_queue("order.*")
    consumer = consume(broker_url, queue.name)
    env = relay_env(database_url, broker_url, exchange, "notify", "")
    with HangingProxy(urlsplit(database_url).port or 5432) as proxy:
        parts = urlsplit(database_url)
        through_proxy = urlunsplit(
            parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}")
        )
        cut = relay_factory(
            {**env, "OUTBOX_RELAY_DATABASE_URL": through_proxy, "OUTBOX_RELAY_RELAY_NAME": "cut"}
        ).start()
        wait_until(lambda: shares(env).get("cut") == 64, timeout=30)
        other = relay_factory({**env, "OUTBOX_RELAY_RELAY_NAME": "other"}).start()
        wait_until(lambda: shares(env) == {"cut": 32, "other": 32}, timeout=15)

        load = workload(total=EVENTS // 2, producers=4, aggregates=200).start()
        wait_until(lambda: consumer.unique_count() >= 1000, timeout=60)
        # When its link to PostgreSQL hangs (its link to the broker is fine)
        proxy.freeze()
        # Then it stops publishing before its leases could lapse, and the other relay removes
        # it (ending its sessions, which releases its claims' locks) and takes its partitions.
        cut.wait_for_log("could not renew the outbox leases", timeout=30)
        wait_until(lambda: shares(env) == {"other": 64}, timeout=30)
        load.join()
        wait_until(lambda: consumer.has_all(set(load.produced)), timeout=120)
        # Once the link is back, it joins again and takes a share.
        proxy.thaw()
        wait_until(lambda: shares(env) == {"cut": 32, "other": 32}, timeout=60)
        wait_until(lambda: read_status(env)["pending"] == 0, timeout=30)
        assert cut.terminate() == 0
        assert other.terminate() == 0
    consumer.stop()

    report = check_deliveries(consumer.deliveries, load.produced, load.versions())
    # What the cut relay had on the wire may come twice; order of first deliveries holds.
    assert report.relay_duplicates <= BATCH_SIZE
