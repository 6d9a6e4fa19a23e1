"""The package as PyPI would ship it: ``python -m build`` makes an sdist and, from it, a wheel;
the wheel installs into a clean virtual environment and, from there, ``outbox-relay migrate
--grants`` sets up a schema and ``outbox-relay serve`` relays events as the least-privilege
relay role against the local PostgreSQL and RabbitMQ.
"""

from __future__ import annotations

import email
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from outbox_relay import __version__
from tests.acceptance.conftest import Roles
from tests.conftest import RabbitQueue, wait_until

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]
SQL_DIR = ROOT / "outbox_relay" / "db" / "sql"
SQL_FILES = sorted(str(path.relative_to(ROOT)) for path in SQL_DIR.rglob("*.sql"))


def _run(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> str:
    done = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build``: the sdist first, then the wheel built from that sdist."""
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean virtual environment (no access to this checkout) with only the wheel installed."""
    home = tmp_path_factory.mktemp("venv")
    _run(sys.executable, "-m", "venv", home / "venv", cwd=home)
    python = home / "venv" / "bin" / "python"
    (wheel,) = dist.glob("*.whl")
    _run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel, cwd=home)
    return home / "venv"


def clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH or OUTBOX_RELAY_* from the test run: only what a user would set."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OUTBOX_RELAY_", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(extra)
    return env


def test_the_wheel_carries_the_sql_license_and_metadata(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    assert wheel.name == f"outbox_relay-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = email.message_from_bytes(
            archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        )
    assert set(SQL_FILES) <= names
    assert "outbox_relay/db/sql/queries.sql" in names
    assert "outbox_relay/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert not any(name.startswith(("tests/", "bench/", "examples/")) for name in names)
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Requires-Python"] == ">=3.11"
    extras = set(metadata.get_all("Provides-Extra") or [])
    assert {"rabbitmq", "nats", "redis", "mqtt", "webhook", "otel", "all"} <= extras
    classifiers = metadata.get_all("Classifier") or []
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert "Typing :: Typed" in classifiers
    entry_points = archive_text(wheel, ".dist-info/entry_points.txt")
    assert "outbox-relay = outbox_relay.cli:main" in entry_points


def test_the_sdist_carries_what_a_rebuild_needs(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"} <= names
    assert set(SQL_FILES) <= names
    assert not any(name.startswith((".venv/", ".git/")) or "__pycache__" in name for name in names)


def test_the_installed_cli_reports_its_version(venv: Path, tmp_path: Path) -> None:
    out = _run(venv / "bin" / "outbox-relay", "--version", cwd=tmp_path, env=clean_env())
    assert out.strip() == f"outbox-relay {__version__}"
    located = _run(
        venv / "bin" / "python",
        "-c",
        "import outbox_relay; print(outbox_relay.__file__)",
        cwd=tmp_path,
        env=clean_env(),
    )
    assert Path(located.strip()).is_relative_to(venv), "imported from the checkout, not the wheel"


def test_the_installed_relay_migrates_and_relays_as_the_least_privilege_role(
    venv: Path,
    tmp_path: Path,
    database_url: str,
    roles: Roles,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
) -> None:
    cli = venv / "bin" / "outbox-relay"
    schema = "from_wheel"
    owner = clean_env(OUTBOX_RELAY_DATABASE_URL=database_url, OUTBOX_RELAY_SCHEMA=schema)
    out = _run(
        cli,
        "migrate",
        "--grants",
        "--app-role",
        roles.app,
        "--relay-role",
        roles.relay,
        cwd=tmp_path,
        env=owner,
    )
    assert "applied 0001_outbox" in out
    assert f"role {roles.relay!r}: created (LOGIN)" in out

    queue = bind_queue("order.*")
    relay_env = clean_env(
        OUTBOX_RELAY_DATABASE_URL=roles.url(database_url, roles.relay),
        OUTBOX_RELAY_SCHEMA=schema,
        OUTBOX_RELAY_BROKER_URL=broker_url,
        OUTBOX_RELAY_EXCHANGE=exchange,
        OUTBOX_RELAY_POLL_INTERVAL="0.2",
    )
    log = (tmp_path / "relay.log").open("wb")
    relay = subprocess.Popen(
        [str(cli), "serve"], cwd=tmp_path, env=relay_env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                    sql.Identifier(roles.login), sql.Identifier(roles.app)
                )
            )
        with psycopg.connect(roles.url(database_url, roles.login)) as app:
            for number in range(5):
                app.execute(
                    sql.SQL("SELECT {}.outbox_emit('order.created', 'w', %s)").format(
                        sql.Identifier(schema)
                    ),
                    (json.dumps({"n": number}),),
                )
                app.commit()
        got: list[bytes] = []
        wait_until(lambda: got.extend(body for *_, body in queue.drain()) or len(got) >= 5)
        assert [json.loads(body)["n"] for body in got] == list(range(5))
        status = json.loads(_run(cli, "status", "--json", cwd=tmp_path, env=relay_env))
        assert status["schema_version"] == len(list((SQL_DIR / "outbox").glob("*.sql")))
    finally:
        relay.terminate()
        code = relay.wait(timeout=30)
        log.close()
    assert code == 0, (tmp_path / "relay.log").read_text()


def archive_text(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith(suffix))).decode()
