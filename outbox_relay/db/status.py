"""What an operator needs at a glance: backlog, lag, throughput, dead letters, relays."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from outbox_relay.cdc import slots
from outbox_relay.db import migrations
from outbox_relay.db.queries import Queries
from outbox_relay.errors import SchemaError
from outbox_relay.relay.settings import default_replication_name


@dataclass(frozen=True, slots=True)
class RelayStatus:
    """One relay at work on the outbox (``status --json``: an item of ``relays``)."""

    relay: str
    pid: int  # its lease connection's backend
    partitions: list[int]
    cdc_shards: list[int]
    lag_seconds: float  # age of the oldest pending event in its partitions (0: none)
    joined_at: str


@dataclass(frozen=True, slots=True)
class CdcSlotStatus:
    """One CDC shard's replication slot (``status --json``: an item of ``slots``)."""

    shard: int
    slot: str
    active: bool
    confirmed_flush_lsn: str | None
    retained_wal_bytes: int | None
    relay: str | None  # the relay holding the shard (None: none does)


@dataclass(frozen=True, slots=True)
class StorageStatus:
    """The outbox's storage (``status --json``: ``storage``; docs/retention.md)."""

    outbox_bytes: int  # the outbox table with its indexes and TOAST
    outbox_dead_rows: int  # dead row versions not vacuumed yet (the statistics' estimate)
    kept_events: int  # sent events kept by --on-sent keep (estimate: partitions whose time is over)
    kept_partitions: int
    kept_bytes: int
    kept_since: str | None  # start of the oldest partition
    retention_seconds: float | None  # as the relays enforcing it recorded it (None: none did)
    # How long the oldest partition has outlived --retention (None: retention is on time).
    retention_behind_seconds: float | None
    legacy_kept: int  # sent rows still kept in the outbox itself (relays before migration 0006)

    @property
    def behind_line(self) -> str | None:
        """One line for people when retention is behind."""
        if self.retention_behind_seconds is None:
            return None
        return (
            f"retention behind by {_span(self.retention_behind_seconds)}: partitions of sent "
            f"events older than the --retention of {_span(self.retention_seconds or 0)} are "
            "still kept; the relays with --on-sent keep drop them (is one running, and are its "
            "upkeep warnings in its log?)"
        )


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}".replace(".0" + unit, unit)
    return f"{seconds:.0f}s"


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    schema: str
    schema_version: int
    pending: int
    oldest_pending_age_seconds: float
    retrying: int
    dead: int
    published_last_minute: int
    published_last_hour: int
    # Relays at work on the outbox; leader_pid, from the days of one leader, is the lowest
    # backend pid among them (null when none runs).
    relays_connected: int
    leader_pid: int | None
    # CDC (--mode cdc): the replication slot (of shard 0, with several shards), all None when it
    # does not exist. Retained WAL is what the server keeps for the slot (current WAL position
    # minus its restart_lsn). ``slots`` lists every shard's slot that exists.
    slot_name: str | None = None
    slot_active: bool | None = None
    slot_confirmed_flush_lsn: str | None = None
    slot_retained_wal_bytes: int | None = None
    # Each relay with the partitions (or CDC shards) it holds and its lag.
    relays: list[RelayStatus] = field(default_factory=list)
    partitions: int = 0
    slots: list[CdcSlotStatus] = field(default_factory=list)
    storage: StorageStatus | None = None

    @property
    def most_retained_wal(self) -> CdcSlotStatus | None:
        """The slot retaining the most WAL (what --fail-on-wal-bytes watches)."""
        held = [slot for slot in self.slots if slot.retained_wal_bytes is not None]
        return max(held, key=lambda slot: slot.retained_wal_bytes or 0, default=None)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_status(
    conn: psycopg.Connection[Any], schema: str, slot_name: str | None = None
) -> OutboxStatus:
    """``slot_name`` defaults to the CDC mode's default slot name for the schema."""
    problem = migrations.version_problem(schema, migrations.schema_state(conn, schema))
    if problem:
        raise SchemaError(problem)
    queries = Queries(schema)
    row = conn.execute(queries["status"]).fetchone()
    assert row is not None
    pending, oldest, retrying, dead, last_minute, last_hour, relays, leader, version = row
    members = [
        RelayStatus(
            relay=name,
            pid=int(pid),
            partitions=list(partitions),
            cdc_shards=list(shards),
            lag_seconds=round(float(lag or 0.0), 3),
            joined_at=joined.isoformat(),
        )
        for name, pid, joined, partitions, shards, lag in conn.execute(queries["status_relays"])
    ]
    counted = conn.execute(queries["lease_count"], {"scope": "partition"}).fetchone()
    storage = _storage(conn, queries)
    base = slot_name or default_replication_name(schema)
    slot = slots.slot_status(conn, schema, base)
    holders = {shard: member.relay for member in members for shard in member.cdc_shards}
    shard_slots = []
    for shard in range(slots.shard_count(conn, schema)):
        found = (
            slot if shard == 0 else slots.slot_status(conn, schema, slots.shard_name(base, shard))
        )
        if found is not None:
            shard_slots.append(
                CdcSlotStatus(
                    shard=shard,
                    slot=found.name,
                    active=found.active,
                    confirmed_flush_lsn=found.confirmed_flush_lsn,
                    retained_wal_bytes=found.retained_wal_bytes,
                    relay=holders.get(shard),
                )
            )
    return OutboxStatus(
        schema=schema,
        schema_version=int(version),
        pending=int(pending),
        oldest_pending_age_seconds=round(float(oldest or 0.0), 3),
        retrying=int(retrying),
        dead=int(dead),
        published_last_minute=int(last_minute),
        published_last_hour=int(last_hour),
        relays_connected=int(relays),
        leader_pid=leader,
        slot_name=slot.name if slot else None,
        slot_active=slot.active if slot else None,
        slot_confirmed_flush_lsn=slot.confirmed_flush_lsn if slot else None,
        slot_retained_wal_bytes=slot.retained_wal_bytes if slot else None,
        relays=members,
        partitions=int(counted[0]) if counted else 0,
        slots=shard_slots,
        storage=storage,
    )


def _storage(conn: psycopg.Connection[Any], queries: Queries) -> StorageStatus:
    row = conn.execute(queries["status_kept"]).fetchone()
    assert row is not None
    partitions, kept, kept_bytes, since, retention, behind, legacy, dead_rows, outbox_bytes = row
    return StorageStatus(
        outbox_bytes=int(outbox_bytes),
        outbox_dead_rows=int(dead_rows or 0),
        kept_events=int(kept),
        kept_partitions=int(partitions),
        kept_bytes=int(kept_bytes),
        kept_since=since.isoformat() if since is not None else None,
        retention_seconds=float(retention) if retention is not None else None,
        retention_behind_seconds=round(float(behind), 1) if behind is not None else None,
        legacy_kept=int(legacy),
    )
