"""``outbox-relay status``: backlog, lag, throughput, dead letters, relays and the CDC slot."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import psycopg
import typer
from pydantic import Field
from rich.console import Console
from rich.table import Table

from outbox_relay.cli import config_file
from outbox_relay.cli.common import setup_logging
from outbox_relay.cli.config_file import ConfigOption, RelayConfig
from outbox_relay.cli.options import Values, settings_command
from outbox_relay.db.connect import connection, translate
from outbox_relay.db.status import OutboxStatus, read_status
from outbox_relay.errors import ExitCode, OutboxRelayError
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


@settings_command(StatusOptions, ConfigOption)
def status(values: Values) -> None:
    """Show the backlog, the lag, throughput, dead letters, connected relays and the CDC slot.

    With --config: every outbox of the file in one table (--json: a list, each with its name).
    """
    path = values.get("config")
    options = StatusOptions.from_mapping({k: v for k, v in values.items() if k != "config"})
    if path is not None:
        given = {k: v for k, v in values.items() if k in config_file.PER_OUTBOX}
        config = config_file.load(path, given, os.environ, observability=False)
        setup_logging(secrets=config.secrets())
        _status_of_all(config, options)
        return
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
    behind = current.storage.behind_line if current.storage is not None else None
    if behind is not None:
        typer.echo(behind, err=True)
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


def _status_of_all(config: RelayConfig, options: StatusOptions) -> None:
    """One row per outbox; an outbox whose database cannot be read is shown as such, the others
    still are, and the command then fails with that error (naming the outbox)."""
    found: list[tuple[str, OutboxStatus | OutboxRelayError]] = []
    for outbox in config_file.expand_schemas(config):
        settings = outbox.settings
        name = outbox.name or ""
        try:
            with connection(settings.database_url, application_name="outbox-relay status") as conn:
                found.append((name, read_status(conn, settings.schema_name, settings.slot_name)))
        except (OutboxRelayError, psycopg.Error) as exc:
            error = exc if isinstance(exc, OutboxRelayError) else translate(exc, "the database")
            if not isinstance(error, OutboxRelayError):
                error = OutboxRelayError(str(exc))
            error.args = (f"outbox {name!r}: {error}", *error.args[1:])
            found.append((name, error))
    limit, wal_limit = options.fail_on_lag, options.fail_on_wal_bytes
    lagging: list[str] = []
    items: list[dict[str, Any]] = []
    for name, current in found:
        if isinstance(current, OutboxRelayError):
            items.append({"name": name, "error": str(current)})
            continue
        most = current.most_retained_wal
        retained = (most.retained_wal_bytes if most is not None else None) or 0
        line = None
        if limit is not None and current.oldest_pending_age_seconds > limit:
            line = (
                f"lagging: outbox {name!r}: oldest pending event is "
                f"{current.oldest_pending_age_seconds:.1f}s old (limit {limit:g}s)"
            )
        elif wal_limit is not None and retained > wal_limit:
            line = (
                f"lagging: outbox {name!r}: slot {most.slot if most else None!r} retains "
                f"{retained} bytes of WAL (limit {wal_limit})"
            )
        if line is not None:
            lagging.append(line)
        items.append({"name": name, **current.as_dict(), "lagging": line is not None})
    if options.as_json:
        typer.echo(json.dumps(items))
    else:
        Console().print(_outboxes_table(config.path, found))
    for line in lagging:
        typer.echo(line, err=True)
    for name, current in found:
        behind = (
            current.storage.behind_line
            if isinstance(current, OutboxStatus) and current.storage is not None
            else None
        )
        if behind is not None:
            typer.echo(f"outbox {name!r}: {behind}", err=True)
    errors = [current for _name, current in found if isinstance(current, OutboxRelayError)]
    if errors:
        raise errors[0]
    if lagging:
        raise typer.Exit(ExitCode.LAGGING)


def _outboxes_table(path: str, found: list[tuple[str, OutboxStatus | OutboxRelayError]]) -> Table:
    table = Table(title=f"outboxes of {path} ({len(found)})")
    for column in ("outbox", "schema", "pending", "lag", "retrying", "dead", "last minute"):
        table.add_column(column, justify="left" if column in ("outbox", "schema") else "right")
    table.add_column("owners (relay: partitions)")
    for name, current in found:
        if isinstance(current, OutboxRelayError):
            table.add_row(name, "-", "-", "-", "-", "-", "-", f"error: {current}")
            continue
        owners = ", ".join(
            f"{relay.relay}: {len(relay.partitions) or len(relay.cdc_shards)}"
            for relay in current.relays
        )
        table.add_row(
            name,
            current.schema,
            str(current.pending),
            f"{current.oldest_pending_age_seconds:.1f}s",
            str(current.retrying),
            str(current.dead),
            str(current.published_last_minute),
            owners or "none",
        )
    return table


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
    storage = current.storage
    if storage is not None:
        rows += [
            ("outbox size", _bytes(storage.outbox_bytes)),
            ("outbox dead rows (not vacuumed)", storage.outbox_dead_rows),
        ]
        if storage.kept_partitions or storage.legacy_kept:
            rows += [
                ("kept sent events (estimate)", storage.kept_events + storage.legacy_kept),
                ("kept since", storage.kept_since or "-"),
                (
                    "kept size",
                    f"{_bytes(storage.kept_bytes)} in {storage.kept_partitions} partitions",
                ),
                (
                    "retention",
                    "behind"
                    if storage.retention_behind_seconds is not None
                    else f"{storage.retention_seconds or 0:g}s, on time",
                ),
            ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def _bytes(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


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
