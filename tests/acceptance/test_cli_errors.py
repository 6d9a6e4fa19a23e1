"""What a user sees when something is wrong: one clear line, the right exit code, no traceback."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.acceptance.conftest import RelayProcess, cli_env, run_cli

pytestmark = pytest.mark.acceptance

EXIT_CONFIG = 3
EXIT_SCHEMA = 4
MIGRATE_HINT = "run `outbox-relay migrate`"


def assert_one_clear_error(output: str, needle: str) -> None:
    assert "Traceback" not in output
    matching = [line for line in output.splitlines() if needle in line]
    assert len(matching) == 1, f"expected one line naming {needle!r}, got:\n{output}"
    assert matching[0].startswith("error: ")


@pytest.mark.parametrize("command", ["serve", "status"])
def test_a_database_without_the_outbox_schema_says_to_run_migrate(
    command: str, empty_database_url: str, broker_url: str
) -> None:
    env = cli_env(database_url=empty_database_url, broker_url=broker_url)

    done = run_cli(command, env=env)

    assert done.returncode == EXIT_SCHEMA
    assert_one_clear_error(done.stdout + done.stderr, MIGRATE_HINT)


def test_migrate_then_status_works_on_that_database(empty_database_url: str) -> None:
    env = cli_env(database_url=empty_database_url)

    migrated = run_cli("migrate", env=env)
    again = run_cli("migrate", env=env)
    status = run_cli("status", "--json", env=env)

    assert migrated.returncode == 0, migrated.stderr
    assert "applied" in migrated.stdout
    assert again.returncode == 0
    assert "nothing to do" in again.stdout
    assert status.returncode == 0, status.stderr


@pytest.mark.parametrize("command", ["serve", "status", "migrate"])
def test_a_malformed_database_url_names_the_option(command: str) -> None:
    done = run_cli(command, "--database-url", "not-a-url", env=cli_env())

    assert done.returncode == EXIT_CONFIG
    assert_one_clear_error(done.stderr, "--database-url")


@pytest.mark.parametrize("command", ["serve", "status"])
def test_an_unparseable_database_url_names_the_option_without_its_password(command: str) -> None:
    secret = f"pw{uuid.uuid4().hex}"

    done = run_cli(command, "--database-url", f"postgresql://app:{secret}@[db/app", env=cli_env())

    assert done.returncode == EXIT_CONFIG
    assert_one_clear_error(done.stderr, "--database-url")
    assert secret not in done.stdout + done.stderr


def test_an_unparseable_broker_url_names_the_option(database_url: str) -> None:
    done = run_cli(
        "serve",
        "--broker-url",
        "amqp://guest:guest@[rabbit/%2F",
        env=cli_env(database_url=database_url),
    )

    assert done.returncode == EXIT_CONFIG
    assert_one_clear_error(done.stderr, "--broker-url")


def test_the_database_url_is_also_read_from_the_environment() -> None:
    done = run_cli("status", env=cli_env(database_url="not-a-url"))

    assert done.returncode == EXIT_CONFIG
    assert_one_clear_error(done.stderr, "--database-url")


def test_emit_with_invalid_json_names_the_payload_option(database_url: str) -> None:
    done = run_cli(
        "emit", "order.created", "--payload", "{not json", env=cli_env(database_url=database_url)
    )

    assert done.returncode == EXIT_CONFIG
    assert_one_clear_error(done.stderr, "--payload")


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("?sslmode=bogus", 'invalid sslmode value: "bogus"'),
        ("?sslmode=require", "server does not support SSL"),
    ],
)
def test_serve_exits_when_the_database_refuses_the_connection_settings(
    query: str, needle: str, database_url: str
) -> None:
    # Retrying cannot fix these: the relay must say so and exit, not retry forever.
    done = run_cli("serve", env=cli_env(database_url=database_url + query))

    assert done.returncode == EXIT_CONFIG
    assert_one_clear_error(done.stderr, "--database-url")
    assert needle in done.stderr


def test_serve_exits_when_the_database_role_does_not_exist(database_url: str) -> None:
    role = f"nobody_{uuid.uuid4().hex[:8]}"
    parts = urlsplit(database_url)
    url = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))

    done = run_cli("serve", env=cli_env(database_url=url))

    assert done.returncode == EXIT_CONFIG
    assert_one_clear_error(done.stderr, "--database-url")
    assert f'role "{role}" does not exist' in done.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("unreachable", ["broker", "database"])
def test_an_unreachable_service_is_retried_without_crashing(
    unreachable: str,
    database_url: str,
    broker_url: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    nowhere = f"relay:{secret}@127.0.0.1:{_closed_port()}"
    if unreachable == "broker":
        urls = {"database_url": database_url, "broker_url": f"amqp://{nowhere}/%2F"}
    else:
        urls = {"database_url": f"postgresql://{nowhere}/app", "broker_url": broker_url}
    relay = relay_factory(cli_env(**urls, poll_interval=0.2)).start()

    relay.wait_for_log("cannot connect, retrying", count=3, timeout=30)

    assert relay.running
    assert relay.terminate() == 0  # and SIGTERM still stops it at once
    log = relay.log()
    assert "Traceback" not in log
    assert secret not in log
    assert "relay:***@127.0.0.1" in log


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A server that accepts connections and never says a word (a hung broker)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    server.close()


@pytest.mark.parametrize("scheme", ["amqp", "nats"])
def test_sigterm_during_a_handshake_with_a_silent_broker_stops_at_once(
    scheme: str, silent_port: int, database_url: str, relay_factory: Callable[..., RelayProcess]
) -> None:
    # Given a relay waiting for a broker's greeting that never comes (nothing is in flight)
    url = f"{scheme}://guest:guest@127.0.0.1:{silent_port}" + ("/%2F" if scheme == "amqp" else "")
    relay = relay_factory(
        cli_env(database_url=database_url, broker_url=url, shutdown_timeout=20)
    ).start()
    relay.wait_for_log("connected to PostgreSQL", count=3)
    time.sleep(1)
    # When it is told to stop, it stops at once, not when the handshake or shutdown times out
    started = time.monotonic()
    assert relay.terminate(deadline=15) == 0
    assert time.monotonic() - started < 3
    log = relay.log()
    assert "shutdown timed out" not in log
    assert "ignored an error" not in log
    assert "Traceback" not in log
