"""CDC mode: an idle outbox must not make the slot retain WAL while the database is busy.

The issue's criterion: the outbox stays idle for 5 minutes while another table takes 50,000
writes; the slot's retained WAL must stay under 64 MB. This runs exactly that against the local
server (a relay `outbox-relay serve --mode cdc` as a subprocess, paced writes to another table)
and samples `pg_replication_slots` every few seconds.

    .venv/bin/python bench/cdc_idle_wal.py [--minutes 5] [--writes 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg

ADMIN_URL = os.environ.get(
    "OUTBOX_RELAY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1/postgres"
)
BROKER_URL = os.environ.get("OUTBOX_RELAY_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
LIMIT = 64 * 1024 * 1024
CLI = str(Path(sys.executable).parent / "outbox-relay")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--writes", type=int, default=50_000)
    args = parser.parse_args()

    name = f"bench_wal_{uuid.uuid4().hex[:8]}"
    database_url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    slot = f"outbox_relay_{name}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    env = {
        **os.environ,
        "OUTBOX_RELAY_DATABASE_URL": database_url,
        "OUTBOX_RELAY_BROKER_URL": BROKER_URL,
        "OUTBOX_RELAY_EXCHANGE": f"bench.{name}",
        "OUTBOX_RELAY_SLOT_NAME": slot,
        "OUTBOX_RELAY_PUBLICATION": slot,
    }
    subprocess.run([CLI, "migrate", "--cdc"], env=env, check=True, capture_output=True)
    relay = subprocess.Popen([CLI, "serve", "--mode", "cdc"], env=env, stderr=subprocess.DEVNULL)
    samples: list[int] = []
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE busy (id bigint, filler text)")
            retained_sql = (
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
                " FROM pg_replication_slots WHERE slot_name = %s"
            )
            started = time.monotonic()
            duration = args.minutes * 60
            chunk = 100
            for done in range(0, args.writes, chunk):
                conn.execute(
                    "INSERT INTO busy SELECT g, repeat('x', 500) FROM generate_series(%s::bigint, %s::bigint) g",
                    (done, done + chunk - 1),
                )
                # Pace the writes evenly over the whole idle period.
                target = started + duration * (done + chunk) / args.writes
                while time.monotonic() < target:
                    row = conn.execute(retained_sql, (slot,)).fetchone()
                    if row and row[0] is not None:
                        samples.append(int(row[0]))
                    time.sleep(min(5.0, max(0.0, target - time.monotonic())))
            wal_written = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=30)
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_drop_replication_slot(%s) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (slot, slot),
            )
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    result = {
        "minutes": args.minutes,
        "writes": args.writes,
        "samples": len(samples),
        "max_retained_wal_bytes": max(samples, default=0),
        "last_retained_wal_bytes": samples[-1] if samples else None,
        "limit_bytes": LIMIT,
        "ok": bool(samples) and max(samples) < LIMIT,
        "wal_end": wal_written[0] if wal_written else None,
    }
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
