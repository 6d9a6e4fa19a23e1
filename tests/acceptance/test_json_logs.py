"""``--log-format json``: one JSON object a line, never a payload or a password."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.acceptance.conftest import RelayProcess, cli_env, run_admin, run_cli
from tests.conftest import RabbitQueue, wait_until

pytestmark = pytest.mark.acceptance


@pytest.fixture
def rabbit_user() -> Iterator[tuple[str, str]]:
    """A RabbitMQ user of its own with a password nobody would log by accident."""
    user = f"relay-{uuid.uuid4().hex[:8]}"
    password = f"pw-{uuid.uuid4().hex}"
    run_admin("rabbitmqctl", "add_user", user, password)
    try:
        run_admin("rabbitmqctl", "set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield user, password
    finally:
        # Another test may have the broker stopped at this moment: retry until it is back.
        wait_until(lambda: _rabbitmqctl_succeeds("delete_user", user), timeout=120, interval=1)


def _rabbitmqctl_succeeds(*args: str) -> bool:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=60, check=False)
    return done.returncode == 0


def with_credentials(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def test_json_logs_parse_and_never_carry_payloads_or_passwords(
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
    rabbit_user: tuple[str, str],
) -> None:
    user, password = rabbit_user
    # PostgreSQL trusts local connections, so this password is carried but never checked.
    db_password = f"dbpw-{uuid.uuid4().hex}"
    db_url = with_credentials(database_url, "postgres", db_password)
    marker = f"payload-marker-{uuid.uuid4().hex}"
    queue = bind_queue("audit.#")
    relay = relay_factory(
        cli_env(
            database_url=db_url,
            broker_url=with_credentials(broker_url, user, password),
            exchange=exchange,
            poll_interval=0.2,
            log_format="json",
            log_level="debug",
        )
    ).start()
    relay.wait_for_log('"holding 64 of 64 partitions')

    emitted = [
        run_cli(
            "emit",
            "audit.recorded",
            "--aggregate-id",
            "acct-1",
            "--payload",
            json.dumps({"secret_note": marker, "n": n}),
            env=cli_env(database_url=db_url),
        )
        for n in range(3)
    ]
    # One more the broker cannot route: its failure is logged, still without the payload.
    unroutable = run_cli(
        "emit",
        "nobody.listens",
        "--payload",
        json.dumps({"secret_note": marker}),
        env=cli_env(database_url=db_url),
    )
    assert all(done.returncode == 0 for done in [*emitted, unroutable])
    wait_until(lambda: queue.count() == 3, timeout=30)
    relay.wait_for_log("publish failed")
    assert relay.terminate() == 0

    lines = relay.log_lines()
    assert len(lines) >= 4
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(e, dict) and {"ts", "level", "message"} <= e.keys() for e in entries)
    messages = [e["message"] for e in entries]
    assert "starting relay" in messages
    assert "stopped" in messages
    log = relay.log()
    assert marker not in log
    assert password not in log
    assert db_password not in log
    starting = next(e for e in entries if e["message"] == "starting relay")
    assert starting["broker_url"].startswith(f"amqp://{user}:***@")
