"""``outbox-relay slot status|drop``: the --mode cdc replication slot (one per CDC shard)."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any

import typer
from pydantic import Field

from outbox_relay.cdc import slots
from outbox_relay.cli.common import setup_logging
from outbox_relay.cli.config_file import OutboxOption, one_outbox
from outbox_relay.cli.options import Values, settings_command
from outbox_relay.db.connect import connection
from outbox_relay.relay.settings import Publication, SlotName, default_replication_name
from outbox_relay.settings import DEFAULT_DATABASE_URL, DatabaseUrl, Flag, Schema, Settings

app = typer.Typer(
    help="Manage the --mode cdc replication slot (docs/cdc.md).", no_args_is_help=True
)


class SlotOptions(Settings):
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL
    schema_name: Schema = "public"
    slot_name: SlotName = None

    @property
    def slot(self) -> str:
        return self.slot_name or default_replication_name(self.schema_name)


class SlotStatusOptions(SlotOptions):
    as_json: Annotated[
        bool, Field(alias="json", description="One JSON object (null: no slot)."), Flag(env=False)
    ] = False


class SlotDropOptions(SlotOptions):
    publication: Publication = None
    with_publication: Annotated[
        bool, Field(description="Drop the publication too."), Flag(env=False)
    ] = False


@app.command("status")
@settings_command(SlotStatusOptions, OutboxOption)
def slot_status(values: Values) -> None:
    """Show whether the slot exists and streams, its confirmed position and retained WAL (with
    several CDC shards, each shard's slot: the JSON object is shard 0's, plus ``shards``)."""
    options = SlotStatusOptions.from_mapping(one_outbox(values, SlotStatusOptions))
    setup_logging(secrets=options.secrets())
    schema = options.schema_name
    with connection(options.database_url, application_name="outbox-relay slot") as conn:
        names = [slots.shard_name(options.slot, s) for s in range(slots.shard_count(conn, schema))]
        found = [slots.slot_status(conn, schema, name) for name in names]
    if options.as_json:
        first = found[0]
        report: dict[str, Any] | None = None if first is None else dataclasses.asdict(first)
        if len(names) > 1:
            report = {
                **(report or {}),
                "shards": [
                    {"shard": shard, "slot": name, **(dataclasses.asdict(f) if f else {})}
                    for shard, (name, f) in enumerate(zip(names, found, strict=True))
                ],
            }
        typer.echo(json.dumps(report))
        return
    for name, slot in zip(names, found, strict=True):
        typer.echo(_describe(name, slot))


def _describe(name: str, found: slots.SlotStatus | None) -> str:
    if found is None:
        return f"replication slot {name!r}: none"
    state = f"active (pid {found.active_pid})" if found.active else "inactive"
    return (
        f"replication slot {name!r}: {state}, confirmed flush LSN "
        f"{found.confirmed_flush_lsn}, retains {found.retained_wal_bytes} bytes of WAL"
    )


@app.command("drop")
@settings_command(SlotDropOptions, OutboxOption)
def slot_drop(values: Values) -> None:
    """Drop the replication slot so the server stops retaining WAL for it (stop the relays
    first). Pending rows stay in the table: a relay started later recreates the slot and
    publishes them from there."""
    options = SlotDropOptions.from_mapping(one_outbox(values, SlotDropOptions))
    setup_logging(secrets=options.secrets())
    schema = options.schema_name
    publication = options.publication or default_replication_name(schema)
    with connection(options.database_url, application_name="outbox-relay slot") as conn:
        for shard in range(slots.shard_count(conn, schema)):
            slot = slots.shard_name(options.slot, shard)
            dropped = slots.drop_slot(conn, schema, slot)
            typer.echo(f"replication slot {slot!r}: {'dropped' if dropped else 'none'}")
            if options.with_publication:
                pub = slots.shard_name(publication, shard)
                slots.drop_publication(conn, schema, pub)
                typer.echo(f"publication {pub!r}: dropped")
