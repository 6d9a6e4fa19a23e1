"""``outbox-relay migrate``: create or upgrade the outbox schema, its CDC slot and its roles."""

from __future__ import annotations

import os
from typing import Annotated, Any

import psycopg
import typer
from pydantic import AfterValidator, Field, model_validator

from outbox_relay.cdc import slots
from outbox_relay.cli import config_file
from outbox_relay.cli.common import setup_logging
from outbox_relay.cli.config_file import ConfigOption
from outbox_relay.cli.options import Values, settings_command
from outbox_relay.db import discovery, leases, migrations
from outbox_relay.db import grants as outbox_grants
from outbox_relay.db.connect import connection
from outbox_relay.errors import ConfigError, OutboxRelayError
from outbox_relay.relay.settings import Mode, Publication, RelaySettings, SlotName
from outbox_relay.settings import (
    DEFAULT_DATABASE_URL,
    DatabaseUrl,
    Flag,
    Schema,
    Settings,
    env_name,
    option_name,
)


def check_role(role: str) -> str:
    problem = outbox_grants.role_name_problem(role)
    if problem:
        raise ValueError(problem)
    return role


RoleName = Annotated[str, AfterValidator(check_role), Flag(metavar="ROLE")]


def check_glob(pattern: str | None) -> str | None:
    if pattern is not None and not pattern.strip():
        raise ValueError("must be a glob of schema names (e.g. 'tenant_*')")
    return pattern


class MigrateOptions(Settings):
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL
    schema_name: Schema = "public"
    schemas: Annotated[
        str | None,
        AfterValidator(check_glob),
        Field(
            description="Instead of --schema: every existing schema of the database matching "
            "this glob (*, ?, [...]) that holds an outbox already; one holding none is skipped "
            "(create it with --schema NAME)."
        ),
        Flag(env=False, metavar="GLOB"),
    ] = None
    cdc: Annotated[
        bool,
        Field(
            description="Also create the publication and replication slot for --mode cdc "
            "(needs wal_level=logical, table ownership and the REPLICATION attribute)."
        ),
        Flag(env=False),
    ] = False
    slot_name: SlotName = None
    publication: Publication = None
    partitions: Annotated[
        int | None,
        Field(
            ge=1,
            le=1024,
            description="Split the outbox into this many partitions, each leased to one relay "
            "(64 when first migrated; a power of two spreads the rows evenly). Changing it "
            "makes every running relay give its share up and take a new one (docs/deploy.md).",
        ),
        Flag(env=False, metavar="N"),
    ] = None
    cdc_shards: Annotated[
        int | None,
        Field(
            ge=1,
            le=64,
            description="With --cdc: one replication slot and publication per shard, each "
            "streamed by one relay (1 when not given: a single slot).",
        ),
        Flag(env=False, metavar="S"),
    ] = None
    grants: Annotated[
        bool,
        Field(
            description="Also create (if missing) the least-privilege roles and give them "
            "exactly their rights: --app-role may only insert events, --relay-role has what "
            "the relay needs (with --cdc: also REPLICATION). Re-run after every upgrade."
        ),
        Flag(env=False),
    ] = False
    app_role: Annotated[
        RoleName,
        Field(
            description="With --grants: the application role (NOLOGIN when created; grant it "
            "to your service's login role)."
        ),
    ] = outbox_grants.DEFAULT_APP_ROLE
    relay_role: Annotated[
        RoleName,
        Field(
            description="With --grants: the role the relay logs in as (LOGIN when created, no "
            "password)."
        ),
    ] = outbox_grants.DEFAULT_RELAY_ROLE

    @model_validator(mode="after")
    def _cdc_options_need_cdc(self) -> MigrateOptions:
        # Not --slot-name or --publication: they are also variables that the environment of a
        # `serve --mode cdc` sets, and migrate may run there without --cdc.
        if self.cdc_shards is not None and not self.cdc:
            raise ValueError("--cdc-shards: applies to --cdc only (it shards the CDC slots)")
        return self


@settings_command(MigrateOptions, ConfigOption)
def migrate(values: Values) -> None:
    """Create or upgrade the outbox tables, functions and triggers (safe to re-run).

    With --config: every outbox of the file, in its order; the CDC slots and publications of
    those whose mode is cdc. With --schemas GLOB: every existing schema of the database
    matching it that holds an outbox already.
    """
    path = values.get("config")
    options = MigrateOptions.from_mapping({k: v for k, v in values.items() if k != "config"})
    if options.schemas is not None:
        _check_glob_options(values, options, path)
    if path is None:
        setup_logging(secrets=options.secrets())
        if options.schemas is not None:
            _migrate_glob(options, options.schemas)
        else:
            _migrate(options)
        return
    if options.cdc:
        raise ConfigError(
            f"--cdc: not with --config {path}: the CDC slots of the outboxes whose mode is cdc "
            "are made anyway (to shard them, migrate that outbox alone with --cdc-shards)"
        )
    given = {k: v for k, v in values.items() if k in config_file.PER_OUTBOX}
    config = config_file.load(path, given, os.environ, observability=False)
    setup_logging(secrets=config.secrets())
    # A schemas glob: the schemas it matches that hold an outbox already (an upgrade); a new
    # tenant's schema is made with `migrate --schema` when the tenant is.
    for outbox in config_file.expand_schemas(config):
        settings = outbox.settings
        typer.echo(f"outbox {outbox.name!r}:")
        one = options.model_copy(
            update={
                "database_url": settings.database_url,
                "schema_name": settings.schema_name,
                "slot_name": settings.slot_name,
                "publication": settings.publication,
                "cdc": settings.mode is Mode.CDC,
            }
        )
        try:
            _migrate(one)
        except OutboxRelayError as exc:
            exc.args = (f"outbox {outbox.name!r}: {exc}", *exc.args[1:])
            raise


def _check_glob_options(values: Values, options: MigrateOptions, path: str | None) -> None:
    """--schemas names the schemas; what else would name them (or be shared by them) is refused."""
    if path is not None:
        raise ConfigError(
            f"--schemas: not with --config {path}: the file says which schemas (give an "
            "[[outbox]] table schemas = 'GLOB'), or use --database-url and --schemas without it"
        )
    if "schema" in values:
        raise ConfigError(
            f"--schemas: not with {option_name('schema')} ({env_name('schema')}): give one "
            "schema or a glob of existing ones, not both"
        )
    if options.cdc:
        for key in ("slot_name", "publication"):
            if key in values:
                raise ConfigError(
                    f"{option_name(key)} ({env_name(key)}): would be shared by every schema "
                    "--schemas matches (leave it out: each gets outbox_relay_<schema>)"
                )


def _migrate_glob(options: MigrateOptions, pattern: str) -> None:
    """Migrate (upgrade) every schema matching ``pattern`` that holds an outbox; report the
    matching ones that hold none as skipped: creating an outbox in every schema a glob happens
    to match (a tenant's other tables, a half-made tenant) is too easy a mistake."""
    with connection(options.database_url, application_name="outbox-relay migrate") as conn:
        found = discovery.match_schemas(conn, pattern)
    for schema in found.outboxes:
        try:
            _migrate(options.model_copy(update={"schema_name": schema}))
        except OutboxRelayError as exc:
            if repr(schema) not in str(exc):
                exc.args = (f"schema {schema!r}: {exc}", *exc.args[1:])
            raise
    for schema in found.without_outbox:
        typer.echo(
            f"schema {schema!r}: holds no outbox, skipped (create one with "
            f"`outbox-relay migrate --schema {schema}`)"
        )
    for schema in found.unusable:
        typer.echo(
            f"schema {schema!r}: skipped, not a plain lowercase identifier (the relay never "
            "serves it)"
        )
    skipped = len(found.without_outbox) + len(found.unusable)
    if not found.outboxes:
        typer.echo(f"no schema matching {pattern!r} holds an outbox: nothing migrated")
    else:
        typer.echo(
            f"{len(found.outboxes)} schema(s) matching {pattern!r} migrated, {skipped} skipped"
        )


def _migrate(options: MigrateOptions) -> None:
    schema = options.schema_name
    with connection(options.database_url, application_name="outbox-relay migrate") as conn:
        try:
            applied = migrations.migrate(conn, schema)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ConfigError(
                f"cannot migrate schema {schema!r}: {exc.diag.message_primary}; run "
                "`outbox-relay migrate` as the database owner (or a role that may create the "
                "schema and its tables), not as the relay or application role"
            ) from None
        version = migrations.check_schema(conn, schema)
        if applied:
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in applied)
            typer.echo(f"schema {schema!r}: applied {names}; now at version {version}")
        else:
            typer.echo(f"schema {schema!r}: already at version {version}, nothing to do")
        if options.partitions is not None:
            leases.set_lease_count(conn, schema, "partition", options.partitions)
            typer.echo(f"partitions: {options.partitions}")
        if options.cdc:
            _cdc(conn, options)
        if options.grants:
            _grant(conn, options)


def _cdc(conn: psycopg.Connection[Any], options: MigrateOptions) -> None:
    """The slot and publication of each CDC shard (shard 0 keeps the single-slot names)."""
    from outbox_relay.cdc.source import slot_names

    schema = options.schema_name
    settings = RelaySettings.from_mapping(
        {
            "mode": "cdc",
            "schema": schema,
            "slot_name": options.slot_name,
            "publication": options.publication,
        }
    )
    shards = options.cdc_shards or max(1, leases.lease_count(conn, schema, "cdc-shard"))
    slots.check_wal_level(conn, schema)
    for shard in range(shards):
        names = slot_names(settings, shard, shards)
        made = slots.ensure_publication(conn, schema, names.publication, shard=shard, shards=shards)
        typer.echo(f"publication {names.publication!r}: {'created' if made else 'already there'}")
        made = slots.ensure_slot(conn, schema, names.slot)
        typer.echo(f"replication slot {names.slot!r}: {'created' if made else 'already there'}")
    leases.set_lease_count(conn, schema, "cdc-shard", shards)
    if shards > 1:
        typer.echo(f"CDC shards: {shards}")


def _grant(conn: psycopg.Connection[Any], options: MigrateOptions) -> None:
    schema, app_role, relay_role = options.schema_name, options.app_role, options.relay_role
    report = outbox_grants.apply_grants(
        conn, schema, app_role=app_role, relay_role=relay_role, cdc=options.cdc
    )
    for role, kind in ((app_role, "NOLOGIN"), (relay_role, "LOGIN")):
        if role in report.created:
            typer.echo(f"role {role!r}: created ({kind})")
    replication = ", REPLICATION" if report.replication else ""
    typer.echo(
        f"grants on schema {schema!r}: {app_role!r} may insert events; "
        f"{relay_role!r} may relay them{replication}"
    )
    for warning in report.warnings:
        typer.echo(f"  warning: {warning}", err=True)
    if relay_role in report.created:
        typer.echo(
            f"  the relay logs in as {relay_role!r}: give it a password with "
            f"ALTER ROLE {relay_role} PASSWORD '...' unless your pg_hba.conf uses another method"
        )
    if app_role in report.created:
        typer.echo(
            f"  applications get the insert right with GRANT {app_role} TO <their login role>"
        )
