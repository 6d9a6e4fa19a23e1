"""``outbox-relay emit``: write one event to the outbox (demos and smoke tests)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from pydantic import Field, field_validator

from outbox_relay import producer
from outbox_relay.cli.common import setup_logging
from outbox_relay.cli.config_file import OutboxOption, one_outbox
from outbox_relay.cli.options import Values, settings_command
from outbox_relay.db import migrations
from outbox_relay.db.connect import connection
from outbox_relay.messages import event_type_problem
from outbox_relay.settings import DEFAULT_DATABASE_URL, DatabaseUrl, Flag, Schema, Settings


class EmitOptions(Settings):
    event_type: Annotated[
        str,
        Field(description="Event type = routing key, e.g. order.created."),
        Flag(argument=True, metavar="EVENT_TYPE"),
    ]
    payload: Annotated[str, Field(description="JSON payload."), Flag(env=False, metavar="JSON")] = (
        "{}"
    )
    aggregate_id: Annotated[
        str | None,
        Field(description="Ordering key, e.g. the order id."),
        Flag(env=False, metavar="ID"),
    ] = None
    aggregate_type: Annotated[
        str | None, Field(description="e.g. order."), Flag(env=False, metavar="TYPE")
    ] = None
    header: Annotated[
        list[str], Field(description="KEY=VALUE, repeatable."), Flag(env=False, metavar="KEY=VALUE")
    ] = Field(default_factory=list)
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL
    schema_name: Schema = "public"

    @field_validator("event_type")
    @classmethod
    def _routing_key(cls, value: str) -> str:
        problem = event_type_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("payload")
    @classmethod
    def _json(cls, value: str) -> str:
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc}") from None
        return value

    @field_validator("header")
    @classmethod
    def _pairs(cls, value: list[str]) -> list[str]:
        for item in value:
            key, sep, _ = item.partition("=")
            if not sep or not key:
                raise ValueError(f"{item!r} is not KEY=VALUE")
        return value

    def headers(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.header)


@settings_command(EmitOptions, OutboxOption)
def emit(values: Values) -> None:
    """Write one event to the outbox (handy for demos and smoke tests)."""
    options = EmitOptions.from_mapping(one_outbox(values, EmitOptions))
    setup_logging(secrets=options.secrets())
    from outbox_relay.observability.tracing import configure_tracing

    # A traced emit from the command line starts its own trace (OTEL_TRACES_EXPORTER=console...).
    tracer_provider = configure_tracing("outbox-relay-emit")
    body: Any = json.loads(options.payload)
    with connection(
        options.database_url, application_name="outbox-relay emit", autocommit=False
    ) as conn:
        migrations.check_schema(conn, options.schema_name)
        event_id = producer.emit(
            conn,
            options.event_type,
            payload=body,
            aggregate_id=options.aggregate_id,
            aggregate_type=options.aggregate_type,
            headers=options.headers(),
            schema=options.schema_name,
        )
        conn.commit()
    if tracer_provider is not None:
        tracer_provider.shutdown()
    typer.echo(str(event_id))
