"""The ``outbox-relay`` command line: serve, migrate, status, emit, dead."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from outbox_relay import __version__, producer
from outbox_relay.cdc import slots
from outbox_relay.cli.common import parse_duration, setup_logging
from outbox_relay.db import dead_events as deadletters
from outbox_relay.db import grants as grants_module
from outbox_relay.db import migrations
from outbox_relay.db.status import read_status
from outbox_relay.errors import ConfigError, DatabaseUnavailableError, ExitCode, OutboxRelayError
from outbox_relay.publishers import create_publisher
from outbox_relay.redact import redact_url
from outbox_relay.relay.settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BROKER_URL,
    DEFAULT_DATABASE_URL,
    Mode,
    OnSent,
    RelaySettings,
    check_database_url,
    check_replication_name,
    default_replication_name,
)

log = logging.getLogger("outbox_relay")
ENV = "OUTBOX_RELAY_"

app = typer.Typer(
    name="outbox-relay",
    help="Relay events from a PostgreSQL transactional outbox to a message broker, "
    "with publisher confirms and per-aggregate commit order.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
dead_app = typer.Typer(
    help="Inspect and requeue events the relay gave up on.", no_args_is_help=True
)
app.add_typer(dead_app, name="dead")
slot_app = typer.Typer(
    help="Manage the --mode cdc replication slot (docs/cdc.md).", no_args_is_help=True
)
app.add_typer(slot_app, name="slot")

# -- shared options ----------------------------------------------------------------------------

DatabaseUrl = Annotated[
    str,
    typer.Option(
        "--database-url",
        envvar=f"{ENV}DATABASE_URL",
        help="PostgreSQL URL of the outbox database.",
        show_default=True,
    ),
]
Schema = Annotated[
    str,
    typer.Option("--schema", envvar=f"{ENV}SCHEMA", help="Schema holding the outbox tables."),
]
LogLevel = Annotated[
    str,
    typer.Option("--log-level", envvar=f"{ENV}LOG_LEVEL", help="debug, info, warning or error."),
]
MetricsPort = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        envvar=f"{ENV}METRICS_PORT",
        help="Serve Prometheus metrics on http://0.0.0.0:PORT/metrics.",
    ),
]
LogFormat = Annotated[
    str,
    typer.Option(
        "--log-format", envvar=f"{ENV}LOG_FORMAT", help="text or json (one object a line)."
    ),
]
SlotName = Annotated[
    str | None,
    typer.Option(
        "--slot-name",
        envvar=f"{ENV}SLOT_NAME",
        help="CDC: logical replication slot [default: outbox_relay_<schema>].",
    ),
]
Publication = Annotated[
    str | None,
    typer.Option(
        "--publication",
        envvar=f"{ENV}PUBLICATION",
        help="CDC: publication on <schema>.outbox [default: outbox_relay_<schema>].",
    ),
]


@contextmanager
def _connect(database_url: str, **kwargs: Any) -> Iterator[psycopg.Connection[Any]]:
    check_database_url(database_url)
    try:
        conn = psycopg.connect(database_url, connect_timeout=10, **kwargs)
    except psycopg.Error as exc:
        raise DatabaseUnavailableError(
            f"cannot connect to PostgreSQL at {redact_url(database_url)}: {exc}".strip()
        ) from exc
    with conn:
        yield conn


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"outbox-relay {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
) -> None:
    """Relay events from a PostgreSQL transactional outbox to a message broker."""


# -- serve ---------------------------------------------------------------------------------------


@app.command()
def serve(
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL,
    broker_url: Annotated[
        str,
        typer.Option(
            "--broker-url",
            envvar=f"{ENV}BROKER_URL",
            help="Broker URL; the scheme picks the broker.",
        ),
    ] = DEFAULT_BROKER_URL,
    schema: Schema = "public",
    mode: Annotated[
        Mode,
        typer.Option(
            "--mode",
            envvar=f"{ENV}MODE",
            help="notify: LISTEN/NOTIFY wake-ups plus polling; poll: polling only; "
            "cdc: stream inserts from the WAL (logical replication, see docs/cdc.md).",
            case_sensitive=False,
        ),
    ] = Mode.NOTIFY,
    slot_name: SlotName = None,
    publication: Publication = None,
    heartbeat_interval: Annotated[
        float,
        typer.Option(
            "--heartbeat-interval",
            envvar=f"{ENV}HEARTBEAT_INTERVAL",
            help="CDC: seconds of outbox silence before a WAL heartbeat lets the slot advance.",
        ),
    ] = 10.0,
    wal_message_prefix: Annotated[
        str | None,
        typer.Option(
            "--wal-message-prefix",
            envvar=f"{ENV}WAL_MESSAGE_PREFIX",
            help="CDC: also publish events written with pg_logical_emit_message(true, PREFIX, "
            "json) [default: outbox_relay.<schema>].",
        ),
    ] = None,
    exchange: Annotated[
        str,
        typer.Option(
            "--exchange", envvar=f"{ENV}EXCHANGE", help="Durable topic exchange to publish to."
        ),
    ] = "events",
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            envvar=f"{ENV}BATCH_SIZE",
            help="Most rows in flight at once (claimed as two overlapping halves); a killed relay publishes at most this many twice.",
        ),
    ] = DEFAULT_BATCH_SIZE,
    poll_interval: Annotated[
        float,
        typer.Option(
            "--poll-interval",
            envvar=f"{ENV}POLL_INTERVAL",
            help="Seconds between polls when idle (the fallback for missed wake-ups).",
        ),
    ] = 1.0,
    max_attempts: Annotated[
        int,
        typer.Option(
            "--max-attempts",
            envvar=f"{ENV}MAX_ATTEMPTS",
            help="Failed publishes before an event is dead.",
        ),
    ] = 10,
    retry_backoff: Annotated[
        float,
        typer.Option(
            "--retry-backoff",
            envvar=f"{ENV}RETRY_BACKOFF",
            help="First retry delay in seconds; doubles per attempt.",
        ),
    ] = 1.0,
    retry_backoff_max: Annotated[
        float,
        typer.Option(
            "--retry-backoff-max", envvar=f"{ENV}RETRY_BACKOFF_MAX", help="Longest retry delay."
        ),
    ] = 300.0,
    on_sent: Annotated[
        OnSent,
        typer.Option(
            "--on-sent",
            envvar=f"{ENV}ON_SENT",
            help="delete: remove rows once confirmed; keep: set published_at, prune after --retention.",
            case_sensitive=False,
        ),
    ] = OnSent.DELETE,
    retention: Annotated[
        str,
        typer.Option(
            "--retention", envvar=f"{ENV}RETENTION", help="How long kept rows stay (e.g. 24h, 7d)."
        ),
    ] = "7d",
    confirm_timeout: Annotated[
        float,
        typer.Option(
            "--confirm-timeout",
            envvar=f"{ENV}CONFIRM_TIMEOUT",
            help="Seconds to wait for broker confirms before reconnecting.",
        ),
    ] = 30.0,
    max_message_bytes: Annotated[
        int,
        typer.Option(
            "--max-message-bytes",
            envvar=f"{ENV}MAX_MESSAGE_BYTES",
            help="Larger payloads are dead-lettered (keep at or below the broker's limit).",
        ),
    ] = 128 * 1024 * 1024,
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            "--shutdown-timeout",
            envvar=f"{ENV}SHUTDOWN_TIMEOUT",
            help="On SIGTERM, seconds to finish the batch in flight before releasing it.",
        ),
    ] = 5.0,
    topic_prefix: Annotated[
        str,
        typer.Option(
            "--topic-prefix",
            envvar=f"{ENV}TOPIC_PREFIX",
            help="NATS subject / Redis stream / MQTT topic prefix: events.order.created, "
            "events:order.created, events/order/created.",
        ),
    ] = "events",
    nats_stream: Annotated[
        str,
        typer.Option(
            "--nats-stream",
            envvar=f"{ENV}NATS_STREAM",
            help="JetStream stream, created at start-up (subjects PREFIX.>) unless it exists.",
        ),
    ] = "EVENTS",
    redis_stream_mode: Annotated[
        str,
        typer.Option(
            "--redis-stream-mode",
            envvar=f"{ENV}REDIS_STREAM_MODE",
            help="per-type: one stream per event type (PREFIX:TYPE); single: one stream PREFIX.",
        ),
    ] = "per-type",
    redis_maxlen: Annotated[
        int | None,
        typer.Option(
            "--redis-maxlen",
            envvar=f"{ENV}REDIS_MAXLEN",
            help="Trim each stream to about this many entries (XADD MAXLEN ~).",
        ),
    ] = None,
    mqtt_qos: Annotated[
        int,
        typer.Option(
            "--mqtt-qos", envvar=f"{ENV}MQTT_QOS", help="1 (PUBACK) or 2 (PUBCOMP) confirms."
        ),
    ] = 1,
    webhook_secret: Annotated[
        str | None,
        typer.Option(
            "--webhook-secret",
            envvar=f"{ENV}WEBHOOK_SECRET",
            help="Shared secret: sign each body (X-Outbox-Signature: sha256=HMAC).",
            show_default=False,
        ),
    ] = None,
    webhook_timeout: Annotated[
        float,
        typer.Option(
            "--webhook-timeout",
            envvar=f"{ENV}WEBHOOK_TIMEOUT",
            help="Seconds to wait for the webhook's answer.",
        ),
    ] = 10.0,
    webhook_batch: Annotated[
        bool,
        typer.Option(
            "--webhook-batch/--webhook-per-event",
            envvar=f"{ENV}WEBHOOK_BATCH",
            help='POST events in batches ({"events": [...]}) instead of one request each.',
        ),
    ] = False,
    metrics_port: MetricsPort = None,
    health_port: Annotated[
        int | None,
        typer.Option(
            "--health-port",
            envvar=f"{ENV}HEALTH_PORT",
            help="Serve /livez and /readyz (Kubernetes probes) on this port.",
        ),
    ] = None,
    log_level: LogLevel = "info",
    log_format: LogFormat = "text",
) -> None:
    """Run the relay daemon until SIGTERM or SIGINT.

    Tracing and metrics are configured with the standard OTEL_* variables (OTEL_SERVICE_NAME,
    OTEL_TRACES_EXPORTER=otlp|console|none, OTEL_EXPORTER_OTLP_ENDPOINT, ...); see
    docs/observability.md.
    """
    setup_logging(log_level, log_format)
    settings = RelaySettings(
        database_url=database_url,
        broker_url=broker_url,
        schema=schema,
        mode=mode,
        exchange=exchange,
        batch_size=batch_size,
        poll_interval=poll_interval,
        max_attempts=max_attempts,
        retry_backoff=retry_backoff,
        retry_backoff_max=retry_backoff_max,
        on_sent=on_sent,
        retention=parse_duration("--retention", retention),
        confirm_timeout=confirm_timeout,
        max_message_bytes=max_message_bytes,
        shutdown_timeout=shutdown_timeout,
        topic_prefix=topic_prefix,
        nats_stream=nats_stream,
        redis_stream_mode=redis_stream_mode,
        redis_maxlen=redis_maxlen,
        mqtt_qos=mqtt_qos,
        webhook_secret=webhook_secret,
        webhook_timeout=webhook_timeout,
        webhook_batch=webhook_batch,
        slot_name=slot_name,
        publication=publication,
        heartbeat_interval=heartbeat_interval,
        wal_message_prefix=wal_message_prefix,
    )
    asyncio.run(_serve(settings, metrics_port=metrics_port, health_port=health_port))


async def _serve(
    settings: RelaySettings, *, metrics_port: int | None = None, health_port: int | None = None
) -> None:
    from outbox_relay.observability.wiring import RelayObservability
    from outbox_relay.relay.loop import Relay

    publisher = create_publisher(settings.publisher_settings())
    observability = RelayObservability(
        settings, publisher.name, metrics_port=metrics_port, health_port=health_port
    )
    relay = Relay(settings, publisher, observability.hooks)
    await observability.start(relay)
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(relay.run())

    def on_signal(signum: signal.Signals) -> None:
        if relay_stopping.done():
            return
        relay_stopping.set_result(None)
        log.info("received %s: finishing the batch in flight", signum.name)
        relay.stop()
        loop.call_later(settings.shutdown_timeout, task.cancel)

    relay_stopping: asyncio.Future[None] = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    log.info("starting relay", extra=settings.describe())
    try:
        await task
    except asyncio.CancelledError:
        log.warning("shutdown timed out: released the batch in flight, it will be published again")
    finally:
        await observability.close()
    log.info("stopped")


# -- migrate / status / emit ----------------------------------------------------------------------


@app.command()
def migrate(
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL,
    schema: Schema = "public",
    cdc: Annotated[
        bool,
        typer.Option(
            "--cdc",
            help="Also create the publication and replication slot for --mode cdc "
            "(needs wal_level=logical, table ownership and the REPLICATION attribute).",
        ),
    ] = False,
    slot_name: SlotName = None,
    publication: Publication = None,
    grants: Annotated[
        bool,
        typer.Option(
            "--grants",
            help="Also create (if missing) the least-privilege roles and give them exactly "
            "their rights: --app-role may only insert events, --relay-role has what the relay "
            "needs (with --cdc: also REPLICATION). Re-run after every upgrade.",
        ),
    ] = False,
    app_role: Annotated[
        str,
        typer.Option(
            "--app-role",
            envvar=f"{ENV}APP_ROLE",
            help="With --grants: the application role (NOLOGIN when created; grant it to your "
            "service's login role).",
        ),
    ] = grants_module.DEFAULT_APP_ROLE,
    relay_role: Annotated[
        str,
        typer.Option(
            "--relay-role",
            envvar=f"{ENV}RELAY_ROLE",
            help="With --grants: the role the relay logs in as (LOGIN when created, no password).",
        ),
    ] = grants_module.DEFAULT_RELAY_ROLE,
) -> None:
    """Create or upgrade the outbox tables, functions and triggers (safe to re-run)."""
    with _connect(database_url, autocommit=True) as conn:
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
        if cdc:
            pub = check_replication_name(
                "--publication", publication or default_replication_name(schema)
            )
            slot = check_replication_name(
                "--slot-name", slot_name or default_replication_name(schema)
            )
            slots.check_wal_level(conn, schema)
            made = slots.ensure_publication(conn, schema, pub)
            typer.echo(f"publication {pub!r}: {'created' if made else 'already there'}")
            made = slots.ensure_slot(conn, schema, slot)
            typer.echo(f"replication slot {slot!r}: {'created' if made else 'already there'}")
        if grants:
            report = grants_module.apply_grants(
                conn, schema, app_role=app_role, relay_role=relay_role, cdc=cdc
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


@app.command()
def status(
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL,
    schema: Schema = "public",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (stable keys).")
    ] = False,
    fail_on_lag: Annotated[
        float | None,
        typer.Option(
            "--fail-on-lag",
            help="Exit with code 6 when the oldest pending event is older than this many seconds.",
        ),
    ] = None,
    fail_on_wal_bytes: Annotated[
        int | None,
        typer.Option(
            "--fail-on-wal-bytes",
            help="CDC: exit with code 6 when the replication slot retains more WAL than this.",
        ),
    ] = None,
    slot_name: SlotName = None,
) -> None:
    """Show the backlog, the lag, throughput, dead letters, connected relays and the CDC slot."""
    with _connect(database_url, autocommit=True) as conn:
        current = read_status(conn, schema, slot_name)
    lagging = fail_on_lag is not None and current.oldest_pending_age_seconds > fail_on_lag
    retained = current.slot_retained_wal_bytes
    wal_lagging = fail_on_wal_bytes is not None and (retained or 0) > fail_on_wal_bytes
    lagging = lagging or wal_lagging
    if as_json:
        typer.echo(json.dumps({**current.as_dict(), "lagging": lagging}))
    else:
        table = Table(title=f"outbox {schema!r} (schema version {current.schema_version})")
        table.add_column("metric")
        table.add_column("value", justify="right")
        rows = [
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
        Console().print(table)
    if wal_lagging:
        typer.echo(
            f"lagging: slot {current.slot_name!r} retains {retained} bytes of WAL "
            f"(limit {fail_on_wal_bytes})",
            err=True,
        )
    if lagging and not wal_lagging:
        typer.echo(
            f"lagging: oldest pending event is {current.oldest_pending_age_seconds:.1f}s old "
            f"(limit {fail_on_lag}s)",
            err=True,
        )
    if lagging:
        raise typer.Exit(ExitCode.LAGGING)


@app.command()
def emit(
    event_type: Annotated[
        str, typer.Argument(help="Event type = routing key, e.g. order.created.")
    ],
    payload: Annotated[str, typer.Option("--payload", help="JSON payload.")] = "{}",
    aggregate_id: Annotated[
        str | None, typer.Option("--aggregate-id", help="Ordering key, e.g. the order id.")
    ] = None,
    aggregate_type: Annotated[
        str | None, typer.Option("--aggregate-type", help="e.g. order.")
    ] = None,
    header: Annotated[
        list[str] | None, typer.Option("--header", help="KEY=VALUE, repeatable.")
    ] = None,
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL,
    schema: Schema = "public",
) -> None:
    """Write one event to the outbox (handy for demos and smoke tests)."""
    try:
        body = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--payload: invalid JSON: {exc}") from exc
    headers: dict[str, str] = {}
    for item in header or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--header: {item!r} is not KEY=VALUE")
        headers[key] = value
    from outbox_relay.observability.tracing import configure_tracing

    # A traced emit from the command line starts its own trace (OTEL_TRACES_EXPORTER=console...).
    tracer_provider = configure_tracing("outbox-relay-emit")
    with _connect(database_url) as conn:
        migrations.check_schema(conn, schema)
        event_id = producer.emit(
            conn,
            event_type,
            payload=body,
            aggregate_id=aggregate_id,
            aggregate_type=aggregate_type,
            headers=headers,
            schema=schema,
        )
        conn.commit()
    if tracer_provider is not None:
        tracer_provider.shutdown()
    typer.echo(str(event_id))


# -- dead letters --------------------------------------------------------------------------------


@dead_app.command("list")
def dead_list(
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL,
    schema: Schema = "public",
    limit: Annotated[int, typer.Option("--limit", help="At most this many, oldest first.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
) -> None:
    """List dead-lettered events with their last error."""
    with _connect(database_url, autocommit=True) as conn:
        migrations.check_schema(conn, schema)
        dead = deadletters.list_dead(conn, schema, limit)
    if as_json:
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


@dead_app.command("retry")
def dead_retry(
    event_ids: Annotated[list[str] | None, typer.Argument(help="Event ids to requeue.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Requeue every dead event.")] = False,
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL,
    schema: Schema = "public",
) -> None:
    """Make dead events pending again, with their attempts reset."""
    ids = event_ids or []
    if not ids and not all_:
        raise ConfigError("dead retry: give EVENT_ID... or --all")
    for event_id in ids:
        try:
            uuid.UUID(event_id)
        except ValueError:
            raise ConfigError(f"dead retry: {event_id!r} is not an event id (a UUID)") from None
    with _connect(database_url, autocommit=True) as conn:
        migrations.check_schema(conn, schema)
        requeued = deadletters.retry_dead(conn, schema, ids, all_=all_)
    typer.echo(f"requeued {len(requeued)} event(s)")
    missing = set(ids) - set(requeued)
    if missing:
        typer.echo(f"not dead (or unknown): {', '.join(sorted(missing))}", err=True)
        raise typer.Exit(ExitCode.FAILURE)


# -- CDC slot ------------------------------------------------------------------------------------


@slot_app.command("status")
def slot_status(
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL,
    schema: Schema = "public",
    slot_name: SlotName = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object (null: no slot).")
    ] = False,
) -> None:
    """Show whether the slot exists and streams, its confirmed position and retained WAL."""
    slot = check_replication_name("--slot-name", slot_name or default_replication_name(schema))
    with _connect(database_url, autocommit=True) as conn:
        found = slots.slot_status(conn, schema, slot)
    if as_json:
        typer.echo(json.dumps(None if found is None else dataclasses.asdict(found)))
    elif found is None:
        typer.echo(f"replication slot {slot!r}: none")
    else:
        state = f"active (pid {found.active_pid})" if found.active else "inactive"
        typer.echo(
            f"replication slot {slot!r}: {state}, confirmed flush LSN "
            f"{found.confirmed_flush_lsn}, retains {found.retained_wal_bytes} bytes of WAL"
        )


@slot_app.command("drop")
def slot_drop(
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL,
    schema: Schema = "public",
    slot_name: SlotName = None,
    publication: Publication = None,
    with_publication: Annotated[
        bool, typer.Option("--with-publication", help="Drop the publication too.")
    ] = False,
) -> None:
    """Drop the replication slot so the server stops retaining WAL for it (stop the relays
    first). Pending rows stay in the table: a relay started later recreates the slot and
    publishes them from there."""
    slot = check_replication_name("--slot-name", slot_name or default_replication_name(schema))
    with _connect(database_url, autocommit=True) as conn:
        dropped = slots.drop_slot(conn, schema, slot)
        typer.echo(f"replication slot {slot!r}: {'dropped' if dropped else 'none'}")
        if with_publication:
            pub = check_replication_name(
                "--publication", publication or default_replication_name(schema)
            )
            slots.drop_publication(conn, schema, pub)
            typer.echo(f"publication {pub!r}: dropped")


# -- entry point ---------------------------------------------------------------------------------


def _fail(exc: OutboxRelayError) -> NoReturn:
    lines = [f"error: {exc}"]
    cause = exc.__cause__
    while cause is not None:
        text = str(cause).strip().splitlines()
        if text and text[0] not in lines[-1]:
            lines.append(f"  caused by: {text[0]}")
        cause = cause.__cause__
    sys.stderr.write("\n".join(lines) + "\n")
    sys.exit(exc.exit_code)


def main() -> None:
    try:
        app()
    except OutboxRelayError as exc:
        _fail(exc)
    except psycopg.errors.InsufficientPrivilege as exc:
        # A role without a right the command needs: one line, never a stack trace.
        _fail(ConfigError(f"PostgreSQL refused: {exc.diag.message_primary or exc}"))
