"""Producer-side insert rate, measured with pgbench: single-row insert transactions, 4 clients."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from bench_setup import AGGREGATE_TYPE, EVENT_TYPE, payload_json

PLAIN_TABLE = "bench_plain"

# One event per transaction, like an application writing one event with its business change.
# pgbench substitutes :aid textually (simple protocol), so the payload stays a constant literal.
_SCRIPT = (
    "\\set aid random(1, {aggregates})\n"
    "INSERT INTO {table} (event_type, aggregate_type, aggregate_id, payload)"
    " VALUES ('{event_type}', '{aggregate_type}', :aid, '{payload}');\n"
)

_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
_TPS_OLD = re.compile(r"^tps = ([0-9.]+) \(excluding connections establishing\)", re.MULTILINE)


# The baseline: the outbox's columns, defaults, constraints and indexes, but none of its triggers
# (LIKE never copies triggers), so the difference is exactly what the triggers cost.
PLAIN_TABLE_DDL = f"CREATE TABLE IF NOT EXISTS {PLAIN_TABLE} (LIKE outbox INCLUDING ALL)"


def script(table: str, aggregates: int) -> str:
    return _SCRIPT.format(
        table=table,
        aggregates=aggregates,
        event_type=EVENT_TYPE,
        aggregate_type=AGGREGATE_TYPE,
        payload=payload_json(0),
    )


def pgbench_binary() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True):
        return str(candidate)
    raise RuntimeError("pgbench not found: apt-get install postgresql-client")


def run_pgbench(
    database_url: str, table: str, *, clients: int, seconds: int, aggregates: int
) -> float:
    """Run pgbench against ``table``; returns transactions per second."""
    parts = urlsplit(database_url)
    env = dict(os.environ)
    if parts.password:
        env["PGPASSWORD"] = unquote(parts.password)
    with tempfile.TemporaryDirectory(prefix="bench_pgbench_") as tmp:
        path = Path(tmp) / "insert.sql"
        path.write_text(script(table, aggregates))
        command = [
            pgbench_binary(),
            "-n",
            "-c",
            str(clients),
            "-j",
            str(clients),
            "-T",
            str(seconds),
            "-f",
            str(path),
            "-h",
            parts.hostname or "127.0.0.1",
            "-p",
            str(parts.port or 5432),
            "-U",
            unquote(parts.username or "postgres"),
            parts.path.lstrip("/"),
        ]
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pgbench failed ({done.returncode}): {done.stderr.strip()}")
    match = _TPS.search(done.stdout) or _TPS_OLD.search(done.stdout)
    if not match:
        raise RuntimeError(f"cannot read tps from pgbench output:\n{done.stdout}")
    return float(match[1])
