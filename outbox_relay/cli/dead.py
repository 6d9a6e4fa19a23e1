"""``outbox-relay dead list|retry``: events the relay gave up on."""

from __future__ import annotations

import json
import uuid
from typing import Annotated

import typer
from pydantic import Field, field_validator, model_validator
from rich.console import Console
from rich.table import Table

from outbox_relay.cli.common import setup_logging
from outbox_relay.cli.config_file import OutboxOption, one_outbox
from outbox_relay.cli.options import Values, settings_command
from outbox_relay.db import dead_events, migrations
from outbox_relay.db.connect import connection
from outbox_relay.errors import ExitCode
from outbox_relay.settings import DEFAULT_DATABASE_URL, DatabaseUrl, Flag, Schema, Settings

app = typer.Typer(help="Inspect and requeue events the relay gave up on.", no_args_is_help=True)


class DeadListOptions(Settings):
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL
    schema_name: Schema = "public"
    limit: Annotated[
        int,
        Field(gt=0, le=1_000_000, description="At most this many, oldest first."),
        Flag(env=False),
    ] = 100
    as_json: Annotated[
        bool, Field(alias="json", description="One JSON array."), Flag(env=False)
    ] = False


class DeadRetryOptions(Settings):
    event_ids: Annotated[
        list[str],
        Field(description="Event ids to requeue."),
        Flag(argument=True, metavar="[EVENT_ID]..."),
    ] = Field(default_factory=list)
    all_events: Annotated[
        bool, Field(alias="all", description="Requeue every dead event."), Flag(env=False)
    ] = False
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL
    schema_name: Schema = "public"

    @field_validator("event_ids")
    @classmethod
    def _uuids(cls, value: list[str]) -> list[str]:
        for event_id in value:
            try:
                uuid.UUID(event_id)
            except ValueError:
                raise ValueError(f"{event_id!r} is not an event id (a UUID)") from None
        return value

    @model_validator(mode="after")
    def _something_to_retry(self) -> DeadRetryOptions:
        if not self.event_ids and not self.all_events:
            raise ValueError("dead retry: give EVENT_ID... or --all")
        if self.event_ids and self.all_events:
            raise ValueError(
                "--all: requeues every dead event; give EVENT_ID... or --all, not both"
            )
        return self


@app.command("list")
@settings_command(DeadListOptions, OutboxOption)
def dead_list(values: Values) -> None:
    """List dead-lettered events with their last error."""
    options = DeadListOptions.from_mapping(one_outbox(values, DeadListOptions))
    setup_logging(secrets=options.secrets())
    with connection(options.database_url, application_name="outbox-relay dead") as conn:
        migrations.check_schema(conn, options.schema_name)
        dead = dead_events.list_dead(conn, options.schema_name, options.limit)
    if options.as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "event_id": d.event_id,
                        "event_type": d.event_type,
                        "aggregate_id": d.aggregate_id,
                        "attempts": d.attempts,
                        "last_error": d.last_error,
                        "dead_at": d.dead_at.isoformat(),
                        "created_at": d.created_at.isoformat(),
                    }
                    for d in dead
                ]
            )
        )
        return
    table = Table(title=f"dead events ({len(dead)})")
    for column in ("event id", "type", "aggregate", "attempts", "dead at", "last error"):
        table.add_column(column)
    for d in dead:
        table.add_row(
            d.event_id,
            d.event_type,
            d.aggregate_id or "",
            str(d.attempts),
            d.dead_at.isoformat(timespec="seconds"),
            d.last_error or "",
        )
    Console().print(table)


@app.command("retry")
@settings_command(DeadRetryOptions, OutboxOption)
def dead_retry(values: Values) -> None:
    """Make dead events pending again, with their attempts reset."""
    options = DeadRetryOptions.from_mapping(one_outbox(values, DeadRetryOptions))
    setup_logging(secrets=options.secrets())
    ids = options.event_ids
    with connection(options.database_url, application_name="outbox-relay dead") as conn:
        migrations.check_schema(conn, options.schema_name)
        requeued = dead_events.retry_dead(conn, options.schema_name, ids, all_=options.all_events)
    typer.echo(f"requeued {len(requeued)} event(s)")
    missing = set(ids) - set(requeued)
    if missing:
        typer.echo(f"not dead (or unknown): {', '.join(sorted(missing))}", err=True)
        raise typer.Exit(ExitCode.FAILURE)
