"""``outbox-relay status``: backlog, lag, throughput, dead letters, relays and the CDC slot."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from pydantic import Field
from rich.console import Console
from rich.table import Table

from outbox_relay.cli.common import setup_logging
from outbox_relay.cli.options import Values, settings_command
from outbox_relay.db.connect import connection
from outbox_relay.db.status import OutboxStatus, read_status
from outbox_relay.errors import ExitCode
from outbox_relay.relay.settings import SlotName
from outbox_relay.settings import DEFAULT_DATABASE_URL, DatabaseUrl, Flag, Schema, Settings

AsJson = Annotated[
    bool, Field(alias="json", description="Print one JSON object (stable keys)."), Flag(env=False)
]


class StatusOptions(Settings):
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL
    schema_name: Schema = "public"
    as_json: AsJson = False
    fail_on_lag: Annotated[
        float | None,
        Field(
            ge=0,
            # A lag limit of more than ten years is a typo, not a limit.
            le=10 * 366 * 86400,
            description="Exit with code 6 when the oldest pending event is older than this many "
            "seconds.",
        ),
        Flag(env=False, metavar="SECONDS"),
    ] = None
    fail_on_wal_bytes: Annotated[
        int | None,
        Field(
            ge=0,
            le=2**62,
            description="CDC: exit with code 6 when the replication slot retains more WAL than "
            "this.",
        ),
        Flag(env=False, metavar="BYTES"),
    ] = None
    slot_name: SlotName = None


@settings_command(StatusOptions)
def status(values: Values) -> None:
    """Show the backlog, the lag, throughput, dead letters, connected relays and the CDC slot."""
    options = StatusOptions.from_mapping(values)
    setup_logging(secrets=options.secrets())
    with connection(options.database_url, application_name="outbox-relay status") as conn:
        current = read_status(conn, options.schema_name, options.slot_name)
    limit = options.fail_on_lag
    lagging = limit is not None and current.oldest_pending_age_seconds > limit
    most = current.most_retained_wal
    retained = most.retained_wal_bytes if most is not None else None
    wal_limit = options.fail_on_wal_bytes
    wal_lagging = wal_limit is not None and (retained or 0) > wal_limit
    lagging = lagging or wal_lagging
    if options.as_json:
        typer.echo(json.dumps({**current.as_dict(), "lagging": lagging}))
    else:
        console = Console()
        console.print(_table(options.schema_name, current))
        if current.relays:
            console.print(_relays(current))
        if len(current.slots) > 1:
            console.print(_slots(current))
    if wal_lagging:
        typer.echo(
            f"lagging: slot {most.slot if most else None!r} retains {retained} bytes of WAL "
            f"(limit {wal_limit})",
            err=True,
        )
    elif lagging:
        typer.echo(
            f"lagging: oldest pending event is {current.oldest_pending_age_seconds:.1f}s old "
            f"(limit {limit:g}s)",
            err=True,
        )
    if lagging:
        raise typer.Exit(ExitCode.LAGGING)


def _table(schema: str, current: OutboxStatus) -> Table:
    table = Table(title=f"outbox {schema!r} (schema version {current.schema_version})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows: list[tuple[str, object]] = [
        ("pending", current.pending),
        ("oldest pending (lag)", f"{current.oldest_pending_age_seconds:.1f}s"),
        ("retrying", current.retrying),
        ("dead", current.dead),
        ("published, last minute", current.published_last_minute),
        ("published, last hour", current.published_last_hour),
        ("relays connected", current.relays_connected),
        ("leader pid", current.leader_pid if current.leader_pid is not None else "none"),
        ("CDC slot", current.slot_name or "none"),
    ]
    if current.slot_name is not None:
        rows += [
            ("slot active", current.slot_active),
            ("slot confirmed flush LSN", current.slot_confirmed_flush_lsn),
            ("slot retained WAL bytes", current.slot_retained_wal_bytes),
        ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def _relays(current: OutboxStatus) -> Table:
    table = Table(title=f"relays ({len(current.relays)}; {current.partitions} partitions)")
    for column in ("relay", "pid", "partitions", "CDC shards", "lag", "joined at"):
        table.add_column(column)
    for relay in current.relays:
        table.add_row(
            relay.relay,
            str(relay.pid),
            _ranges(relay.partitions),
            _ranges(relay.cdc_shards),
            f"{relay.lag_seconds:.1f}s",
            relay.joined_at[:19],
        )
    return table


def _slots(current: OutboxStatus) -> Table:
    table = Table(title=f"CDC shards ({len(current.slots)})")
    for column in ("shard", "slot", "relay", "active", "confirmed flush LSN", "retained WAL bytes"):
        table.add_column(column)
    for slot in current.slots:
        table.add_row(
            str(slot.shard),
            slot.slot,
            slot.relay or "-",
            str(slot.active),
            slot.confirmed_flush_lsn or "-",
            str(slot.retained_wal_bytes),
        )
    return table


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5" (how many too, when there are many)."""
    if not numbers:
        return "-"
    spans: list[str] = []
    start = previous = numbers[0]
    for number in [*numbers[1:], None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        spans.append(f"{start}-{previous}" if previous > start else str(start))
        if number is not None:
            start = previous = number
    return f"{len(numbers)}: " + ", ".join(spans)
