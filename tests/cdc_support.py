"""Helpers shared by the CDC tests: unique slot names, slot inspection and a clean-up that always
drops the slot (a database with a replication slot cannot be dropped)."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from tests.conftest import wait_until


def unique_slot_name() -> str:
    return f"outbox_test_{uuid.uuid4().hex[:12]}"


def slot_row(database_url: str, slot: str) -> dict[str, Any] | None:
    """The slot as pg_replication_slots shows it, plus its retained WAL in bytes."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        cur = conn.execute(
            "SELECT active, active_pid, confirmed_flush_lsn,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained,"
            " pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint AS confirmed"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        assert cur.description is not None
        return dict(zip([c.name for c in cur.description], row, strict=True))


def current_wal_lsn(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint").fetchone()
    assert row is not None
    return int(row[0])


def drop_slot_eventually(database_url: str, slot: str, timeout: float = 30.0) -> None:
    """Drop the slot, ending whatever walsender still streams it (a killed relay's lingers for a
    moment). Tolerates a database that is already gone."""

    def dropped() -> bool:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                    " WHERE slot_name = %s AND active_pid IS NOT NULL",
                    (slot,),
                )
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE slot_name = %s AND NOT active",
                    (slot,),
                )
                row = conn.execute(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,)
                ).fetchone()
                return row is not None and row[0] == 0
        except psycopg.errors.ObjectInUse:
            return False
        except psycopg.OperationalError as exc:
            return "does not exist" in str(exc)

    wait_until(dropped, timeout=timeout, interval=0.2)
