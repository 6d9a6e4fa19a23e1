"""deploy/Dockerfile: a small non-root runtime image whose install step really works.

No Docker engine runs here. The structure is checked by parsing the Dockerfile, and the builder's
one install step (deploy/install.sh) is run for real on a copy of exactly the build context the
Dockerfile copies, honouring .dockerignore; the venv it makes must then migrate a real database.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

import outbox_relay
from tests.deploy.dockerfile import (
    Dockerfile,
    Stage,
    copy_into,
    is_ignored,
    key_values,
    parse_dockerfile,
    read_dockerignore,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BASE_IMAGE = "python:3.11-slim-bookworm"
VENV = "/opt/outbox-relay"
OCI_LABELS = (
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.source",
    "org.opencontainers.image.licenses",
    "org.opencontainers.image.version",
)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE)


def project() -> dict[str, Any]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    assert isinstance(data, dict)
    return data


def install_step(stage: Stage) -> list[str]:
    """The words of the builder's RUN that calls deploy/install.sh, from the script on."""
    runs = [run for run in stage.all("RUN") if "deploy/install.sh" in run.arguments]
    assert len(runs) == 1, "the builder installs with exactly one RUN of deploy/install.sh"
    _, words = runs[0].flags_and_words()
    assert words[0] == "sh", "run the script with sh (POSIX), as the tests do"
    return words[1:]


# -- structure -----------------------------------------------------------------------------------


def test_stages_build_on_the_pinned_slim_base(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 2, "multi-stage: a builder and a runtime"
    assert {"builder", "runtime", "demo"} <= dockerfile.stage_names
    for stage in dockerfile.stages:
        root = dockerfile.lineage(stage)[-1]
        assert root.base == BASE_IMAGE, f"stage {stage.name or stage.index} builds on {root.base}"


def test_final_stage_is_the_runtime_image(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    lineage = [stage.name for stage in dockerfile.lineage(final)]
    problem = f"a plain `docker build` must give the runtime image, not {lineage}"
    assert "runtime" in lineage, problem
    assert "demo" not in lineage, problem
    assert not final.instructions or final.name == "runtime", "the final stage adds nothing"


def test_runtime_copies_only_the_venv_from_the_builder(dockerfile: Dockerfile) -> None:
    runtime = dockerfile.stage("runtime")
    copies = dockerfile.copies(runtime)
    assert copies, "the runtime stage copies the venv"
    for copy in copies:
        problem = f"line {copy.line}: the runtime image gets only the builder's venv"
        assert copy.from_stage == "builder", problem
        assert copy.sources == [VENV], problem
        assert copy.destination == VENV
    for run in runtime.all("RUN"):
        for tool in ("apt-get", "pip ", "gcc", "build-essential"):
            assert tool not in run.arguments, f"line {run.line}: no build tools in the runtime"


def test_runtime_runs_as_a_numeric_non_root_user(dockerfile: Dockerfile) -> None:
    for stage in (dockerfile.final, dockerfile.stage("demo")):
        user = dockerfile.effective(stage, "USER")
        assert user is not None, "no USER: the container would run as root"
        uid = user.arguments.partition(":")[0]
        assert uid.isdigit(), f"USER {user.arguments}: numeric, so runAsNonRoot can check it"
        assert int(uid) != 0, f"USER {user.arguments}: not root"
        assert uid == "10001"
    created = " ".join(run.arguments for run in dockerfile.stage("runtime").all("RUN"))
    for option in ("--uid 10001", "--gid 10001", "--shell /usr/sbin/nologin", "--no-create-home"):
        assert option in created, f"the user is created with {option}"


def test_entrypoint_and_cmd_use_the_exec_form(dockerfile: Dockerfile) -> None:
    """No shell in PID 1: SIGTERM reaches the relay, which finishes its batch and exits 0."""
    final = dockerfile.final
    entrypoint = dockerfile.effective(final, "ENTRYPOINT")
    cmd = dockerfile.effective(final, "CMD")
    assert entrypoint is not None, "no ENTRYPOINT"
    assert entrypoint.exec_form() == ["outbox-relay"], 'ENTRYPOINT ["outbox-relay"] (JSON array)'
    assert cmd is not None, "no CMD"
    assert cmd.exec_form() == ["serve"], 'CMD ["serve"] (JSON array)'
    for stage in dockerfile.stages:
        for healthcheck in stage.all("HEALTHCHECK"):
            assert healthcheck.arguments == "NONE" or '["' in healthcheck.arguments, (
                f"line {healthcheck.line}: a HEALTHCHECK must not need a shell"
            )


def test_environment_puts_the_venv_first_on_the_path(dockerfile: Dockerfile) -> None:
    env: dict[str, str] = {}
    for instruction in dockerfile.stage("runtime").all("ENV"):
        env.update(key_values(instruction.arguments))
    assert env["PATH"].startswith(f"{VENV}/bin:")
    assert env["PYTHONUNBUFFERED"] == "1"


def test_oci_labels_describe_the_image(dockerfile: Dockerfile) -> None:
    labels = dockerfile.labels(dockerfile.final)
    missing = [name for name in OCI_LABELS if name not in labels]
    assert not missing, f"missing labels: {missing}"
    assert labels["org.opencontainers.image.title"] == project()["name"]
    assert labels["org.opencontainers.image.licenses"] == project()["license"]
    # Version and source come from ARGs whose defaults must follow the package.
    args = dockerfile.args(dockerfile.stage("runtime"))
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert args["VERSION"] == outbox_relay.__version__
    assert labels["org.opencontainers.image.source"] == "${SOURCE_URL}"
    assert args["SOURCE_URL"] == project()["urls"]["Source"]


def test_exposes_the_health_and_metrics_ports(dockerfile: Dockerfile) -> None:
    exposed = {
        word
        for expose in dockerfile.stage("runtime").all("EXPOSE")
        for word in expose.arguments.split()
    }
    assert exposed == {"8080", "9464"}


def test_builder_installs_runtime_extras_with_the_install_script(dockerfile: Dockerfile) -> None:
    builder = dockerfile.stage("builder")
    script, venv, source, *extras = install_step(builder)
    assert script == "deploy/install.sh"
    assert venv == VENV, "the runtime stage copies this venv"
    workdirs = builder.all("WORKDIR")
    assert workdirs, "the builder has a WORKDIR"
    assert source == workdirs[-1].arguments, "install from the copied sources"
    extras_arg = dockerfile.args(builder).get("EXTRAS")
    assert extras == ['"$EXTRAS"'] or extras == ["$EXTRAS"], extras
    assert extras_arg is not None
    declared = set(project()["optional-dependencies"])
    chosen = set(extras_arg.split(","))
    assert chosen <= declared, f"unknown extras {chosen - declared}"
    assert "otel" in chosen
    assert "dev" not in chosen


def test_demo_stage_adds_the_examples(dockerfile: Dockerfile) -> None:
    demo = dockerfile.stage("demo")
    assert demo.base == "runtime"
    sources = [source for copy in dockerfile.copies(demo) for source in copy.sources]
    assert sources == ["examples"]


def test_every_copy_source_is_in_the_build_context(dockerfile: Dockerfile) -> None:
    rules = read_dockerignore(DOCKERIGNORE)
    assert rules, ".dockerignore is missing or empty"
    for stage in dockerfile.stages:
        for copy in dockerfile.copies(stage):
            if copy.from_stage is not None:
                assert copy.from_stage in dockerfile.stage_names, f"line {copy.line}"
                continue
            for source in copy.sources:
                assert (ROOT / source).exists(), f"line {copy.line}: {source} does not exist"
                assert not is_ignored(source, rules), (
                    f"line {copy.line}: {source} is excluded by .dockerignore"
                )
                if (ROOT / source).is_dir():
                    files = [p for p in (ROOT / source).rglob("*") if p.is_file()]
                    kept = [
                        p for p in files if not is_ignored(p.relative_to(ROOT).as_posix(), rules)
                    ]
                    assert kept, f"line {copy.line}: everything in {source} is excluded"


def test_dockerignore_keeps_secrets_and_clutter_out_of_the_context() -> None:
    rules = read_dockerignore(DOCKERIGNORE)
    for path in (
        ".git/config",
        ".venv/bin/python",
        "tests/conftest.py",
        "bench/relay_bench.py",
        "docs/consumers.md",
        "outbox_relay/__pycache__/cli.cpython-311.pyc",
        "dist/outbox_relay-0.1.0-py3-none-any.whl",
        "build/lib/outbox_relay/cli/app.py",
        "outbox_relay.egg-info/PKG-INFO",
        ".pytest_cache/README.md",
        ".mypy_cache/3.11/cache.db",
        ".ruff_cache/CACHEDIR.TAG",
    ):
        assert is_ignored(path, rules), f"{path} would be sent to the builder"
    for path in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "outbox_relay/cli/app.py",
        "outbox_relay/db/sql/outbox/0001_outbox.sql",
        "deploy/install.sh",
        "examples/order_service.py",
    ):
        assert not is_ignored(path, rules), f"{path} is needed by the build"


# -- the install step, for real ----------------------------------------------------------------


def build_context_copy(dockerfile: Dockerfile, destination: Path) -> None:
    """What the builder stage has in its WORKDIR before the install RUN: its COPYs, applied to
    the repository minus .dockerignore."""
    rules = read_dockerignore(DOCKERIGNORE)
    builder = dockerfile.stage("builder")
    workdir = Path(builder.all("WORKDIR")[-1].arguments)
    for copy in dockerfile.copies(builder):
        assert copy.from_stage is None
        target = Path(copy.destination)
        target = target if target.is_absolute() else workdir / target
        local = destination / target.relative_to(workdir)
        into_directory = copy.destination.endswith("/") or len(copy.sources) > 1
        for source in copy.sources:
            assert not is_ignored(source, rules)
            if (ROOT / source).is_file() and into_directory:
                copied = copy_into(ROOT, rules, source, local / Path(source).name)
            else:
                copied = copy_into(ROOT, rules, source, local)
            assert copied, f"COPY {source} copied nothing"


@pytest.mark.integration
def test_install_script_builds_a_venv_that_migrates_a_database(
    dockerfile: Dockerfile, tmp_path: Path, empty_database_url: str
) -> None:
    # Given exactly the files the builder stage gets
    source = tmp_path / "src"
    build_context_copy(dockerfile, source)
    assert not (source / "tests").exists()
    assert not (source / ".git").exists()
    script = install_step(dockerfile.stage("builder"))[0]
    assert (source / script).is_file()
    venv = tmp_path / "venv"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"} and not key.startswith("OTEL_")
    }
    python = shutil.which("python3", path=env.get("PATH"))
    assert python is not None, "python3 is not on PATH: deploy/install.sh needs it"

    # When the install step runs (as the builder's RUN does, minus the image)
    done = subprocess.run(
        ["sh", str(source / script), str(venv), str(source)],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"install.sh failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    version = f"outbox-relay {outbox_relay.__version__}"
    assert done.stdout.strip().splitlines()[-1] == version, "the smoke check runs last"

    # Then the venv's console script works on its own...
    binary = venv / "bin" / "outbox-relay"
    shown = subprocess.run(
        [str(binary), "--version"], env=env, capture_output=True, text=True, check=True
    )
    assert shown.stdout.strip() == version

    # ...with the runtime extras and none of the development tools
    probe = (
        "import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None"
        " for m in ['opentelemetry.sdk', 'nats', 'redis', 'paho.mqtt', 'httpx', 'prometheus_client',"
        " 'pytest', 'mypy', 'ruff', 'testcontainers', 'sqlalchemy']}))"
    )
    found = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    modules = json.loads(found.stdout)
    present = {name for name, ok in modules.items() if ok}
    assert present == {
        "opentelemetry.sdk",
        "nats",
        "redis",
        "paho.mqtt",
        "httpx",
        "prometheus_client",
    }, modules
    # The installed package, not the source tree (the wheel carries the schema files).
    location = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import outbox_relay; print(outbox_relay.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert location.startswith(str(venv)), location

    # ...and migrates a fresh database from the schema files inside the wheel, twice.
    def migrate() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(binary), "migrate", "--database-url", empty_database_url],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    migrated = migrate()
    assert migrated.returncode == 0, migrated.stderr
    assert "now at version" in migrated.stdout, migrated.stdout
    again = migrate()
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout


def test_install_script_is_posix_sh_and_strict() -> None:
    script = (ROOT / "deploy" / "install.sh").read_text("utf-8")
    assert script.startswith("#!/bin/sh\n")
    assert "\nset -eu\n" in script
    for bashism in ("[[", "function ", "pipefail", "$'"):
        assert bashism not in script, f"not POSIX sh: {bashism!r}"
    # dash is Debian's /bin/sh, the shell the builder's RUN uses; -n parses without running.
    shell = shutil.which("dash") or shutil.which("sh")
    assert shell is not None
    subprocess.run([shell, "-n", str(ROOT / "deploy" / "install.sh")], check=True)
    usage = subprocess.run(
        ["sh", str(ROOT / "deploy" / "install.sh")], capture_output=True, text=True, check=False
    )
    assert usage.returncode == 2
    assert "usage:" in usage.stderr
