"""deploy/systemd: systemd accepts the unit, it is sandboxed, it waits for the relay's shutdown,
and the example environment file only sets variables `outbox-relay serve` reads."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.deploy.env_contract import unknown_variables
from tests.deploy.manifests import GRACE_MARGIN, invalid_values

DIRECTORY = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNIT = DIRECTORY / "outbox-relay.service"
ENV_FILE = DIRECTORY / "outbox-relay.env"
EXEC_START = "/opt/outbox-relay/bin/outbox-relay serve"
ENVIRONMENT_FILE = "/etc/outbox-relay/outbox-relay.env"
# Highest acceptable `systemd-analyze security` exposure, times ten (1.5 of 10: "OK").
EXPOSURE_THRESHOLD = 15

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "UMask": "0077",
}


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze") or shutil.which("systemd-analyze", path="/usr/bin:/bin")
    if found is None:
        pytest.fail("systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)")
    return found


def read(path: Path) -> str:
    assert path.is_file(), f"{path} is missing"
    return path.read_text(encoding="utf-8")


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value) in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{line!r} is outside any section"
        key, sep, value = line.partition("=")
        assert sep, f"{line!r} is not key=value"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for name, value in section if name == key]


def single(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"{key}= should be set once, found {found}"
    return found[0]


def parse_env_file(text: str) -> dict[str, str]:
    """VARIABLE=value lines, and the commented-out examples (``# VARIABLE=value``), which a user
    uncomments as they are."""
    variables = {}
    for line in text.splitlines():
        match = re.fullmatch(r"#?\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)", line.strip())
        if match:
            variables[match[1]] = match[2].strip().strip("'\"")
    return variables


def seconds(span: str) -> float:
    """A systemd time span (``30``, ``30s``, ``1min 30s``, ``2m``) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts, f"cannot read time span {span!r}"
    assert all(unit in units for _, unit in parts), f"cannot read time span {span!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def verifiable_copy(directory: Path, extra: str = "") -> Path:
    """The unit with ExecStart on an executable that exists here (verify checks that) and
    EnvironmentFile on the example file; everything else unchanged, plus ``extra`` lines."""
    executable = Path(sys.executable).parent / "outbox-relay"
    assert executable.is_file(), f"{executable} is missing: pip install -e . in the venv"
    text = read(UNIT)
    assert text.count(f"\nExecStart={EXEC_START}\n") == 1
    assert text.count(f"\nEnvironmentFile={ENVIRONMENT_FILE}\n") == 1
    text = text.replace(f"\nExecStart={EXEC_START}\n", f"\nExecStart={executable} serve\n")
    text = text.replace(
        f"\nEnvironmentFile={ENVIRONMENT_FILE}\n", f"\nEnvironmentFile={ENV_FILE}\n"
    )
    text = text.replace("\n[Install]\n", f"\n{extra}\n[Install]\n") if extra else text
    copy = directory / UNIT.name
    copy.write_text(text, encoding="utf-8")
    return copy


def verify(unit: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about ``unit``: its exit status and every message
    naming the unit. It exits 0 on unknown keys and unparsable values (they are only logged),
    so the messages count too. Offline: no man pages, no generators, no running systemd."""
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", "--generators=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice", "SYSTEMD_PAGER": "", "LC_ALL": "C"},
    )
    output = (result.stdout + result.stderr).splitlines()
    problems = [line for line in output if unit.name in line or str(unit) in line]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}: {output}")
    return problems


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    problems = verify(verifiable_copy(tmp_path))
    assert not problems, "\n".join(problems)


def test_verify_would_catch_a_misspelt_directive(tmp_path: Path) -> None:
    # Guards the test above: a typo must not pass silently in this environment.
    problems = verify(verifiable_copy(tmp_path, extra="[Service]\nProtectSistem=strict"))
    assert any("ProtectSistem" in line for line in problems), problems


def test_unit_runs_the_relay_with_its_env_file_and_restarts_it() -> None:
    unit = parse_unit(read(UNIT))
    service, start = unit["Service"], unit["Unit"]
    assert single(service, "ExecStart") == EXEC_START
    assert single(service, "EnvironmentFile") == ENVIRONMENT_FILE
    assert single(service, "Type") in ("exec", "simple")
    assert single(service, "Restart") == "on-failure"
    assert seconds(single(service, "RestartSec")) > 0
    assert single(service, "KillSignal") == "SIGTERM"
    assert single(service, "DynamicUser") == "yes" or values(service, "User")
    after = " ".join(values(start, "After")).split()
    assert {"network-online.target", "postgresql.service"} <= set(after)
    assert "network-online.target" in " ".join(values(start, "Wants")).split()
    assert "multi-user.target" in values(unit["Install"], "WantedBy")


def test_unit_is_sandboxed() -> None:
    service = parse_unit(read(UNIT))["Service"]
    wrong = {
        key: values(service, key)
        for key, expected in HARDENING.items()
        if values(service, key) != [expected]
    }
    assert not wrong, f"expected { ({key: HARDENING[key] for key in wrong}) }, found {wrong}"
    # The first filter allows the usual service calls; later ones may only take away.
    filters = values(service, "SystemCallFilter")
    assert filters[:1] == ["@system-service"], filters
    assert all(extra.startswith("~") for extra in filters[1:]), filters


def test_unit_exposure_is_low(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=yes",
            f"--threshold={EXPOSURE_THRESHOLD}",
            "--no-pager",
            str(verifiable_copy(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    summary = [line for line in result.stdout.splitlines() if "Overall exposure" in line]
    assert result.returncode == 0, f"{summary}\n{result.stdout}\n{result.stderr}"
    assert summary, result.stdout


def test_systemd_waits_for_the_relays_shutdown_before_killing_it() -> None:
    stop = seconds(single(parse_unit(read(UNIT))["Service"], "TimeoutStopSec"))
    env = parse_env_file(read(ENV_FILE))
    assert "OUTBOX_RELAY_SHUTDOWN_TIMEOUT" in env, "the env file should set the shutdown timeout"
    shutdown = float(env["OUTBOX_RELAY_SHUTDOWN_TIMEOUT"])
    assert stop >= shutdown + GRACE_MARGIN, (
        f"TimeoutStopSec={stop} does not outlast OUTBOX_RELAY_SHUTDOWN_TIMEOUT={shutdown}"
    )


def test_env_file_sets_only_variables_serve_reads_with_values_it_accepts() -> None:
    env = parse_env_file(read(ENV_FILE))
    assert env, "the env file sets nothing"
    foreign = [name for name in env if not name.startswith(("OUTBOX_RELAY_", "OTEL_"))]
    assert not foreign, f"only OUTBOX_RELAY_* and OTEL_* belong here: {foreign}"
    assert not unknown_variables(["serve"], set(env))
    assert not invalid_values(["serve"], dict(env))
    for required in ("OUTBOX_RELAY_DATABASE_URL", "OUTBOX_RELAY_BROKER_URL"):
        assert required in env
    # The least-privilege role `outbox-relay migrate --grants` creates.
    assert urlsplit(env["OUTBOX_RELAY_DATABASE_URL"]).username == "outbox_relay"
