"""Consumer-side commands: ``consume``, ``topology apply``, ``dlq list|replay|purge``,
``consumer-status``. Registered on the main app by ``outbox_relay.cli``.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from outbox_relay.cli.common import parse_duration, setup_logging
from outbox_relay.consumer import Consumer, ConsumerSettings, dlq
from outbox_relay.consumer import topology as topo
from outbox_relay.consumer.inbox import InboxStats, inbox_stats
from outbox_relay.errors import ConfigError, DatabaseUnavailableError
from outbox_relay.redact import redact_url
from outbox_relay.relay.settings import DEFAULT_BROKER_URL, DEFAULT_DATABASE_URL, check_database_url

ENV = "OUTBOX_RELAY_"

# -- options shared by these commands --------------------------------------------------------

BrokerUrl = Annotated[
    str, typer.Option("--broker-url", envvar=f"{ENV}BROKER_URL", help="AMQP URL of RabbitMQ.")
]
DatabaseUrl = Annotated[
    str,
    typer.Option(
        "--database-url",
        envvar=f"{ENV}DATABASE_URL",
        help="PostgreSQL URL of the consumer's own database (holds the inbox).",
    ),
]
Queue = Annotated[
    str,
    typer.Option("--queue", envvar=f"{ENV}QUEUE", help="The consumer's queue, e.g. order.events."),
]
Bindings = Annotated[
    list[str] | None,
    typer.Option(
        "--binding",
        envvar=f"{ENV}BINDING",
        help="Routing pattern bound to the queue, e.g. 'order.*' (repeatable).",
    ),
]
Exchange = Annotated[
    str,
    typer.Option(
        "--exchange", envvar=f"{ENV}EXCHANGE", help="Topic exchange the relay publishes to."
    ),
]
QueueTypeOption = Annotated[
    topo.QueueType,
    typer.Option(
        "--queue-type",
        envvar=f"{ENV}QUEUE_TYPE",
        help="classic, or quorum (replicated: the durable choice for clusters).",
        case_sensitive=False,
    ),
]
MaxAttempts = Annotated[
    int,
    typer.Option(
        "--max-attempts",
        envvar=f"{ENV}MAX_ATTEMPTS",
        help="Deliveries of a failing event before it is dead-lettered.",
    ),
]
RetryDelay = Annotated[
    float,
    typer.Option(
        "--retry-delay",
        envvar=f"{ENV}RETRY_DELAY",
        help="First retry delay in seconds; doubles per attempt.",
    ),
]
RetryDelayMax = Annotated[
    float,
    typer.Option(
        "--retry-delay-max", envvar=f"{ENV}RETRY_DELAY_MAX", help="Longest retry delay in seconds."
    ),
]
Schema = Annotated[
    str, typer.Option("--schema", envvar=f"{ENV}SCHEMA", help="Schema holding the inbox table.")
]
ConsumerName = Annotated[
    str | None,
    typer.Option(
        "--consumer-name",
        envvar=f"{ENV}CONSUMER_NAME",
        help="Inbox key of this consumer (default: the queue name).",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

topology_app = typer.Typer(
    help="Declare consumer queues, retry path and dead-letter queue.", no_args_is_help=True
)
dlq_app = typer.Typer(
    help="Inspect, replay and purge a consumer's dead-letter queue.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Add the consumer commands to the ``outbox-relay`` app."""
    app.command("consume")(consume)
    app.command("consumer-status")(consumer_status)
    app.add_typer(topology_app, name="topology")
    app.add_typer(dlq_app, name="dlq")


def load_consumer(spec: str) -> Consumer:
    """``module:attr`` -> a Consumer; a plain function becomes a consumer of every event type."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--handler: {spec!r} is not module:object (e.g. myapp.events:consumer)")
    # Console scripts do not put the working directory on sys.path; `python -m` does.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--handler: cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise ConfigError(f"--handler: {module_name!r} has no attribute {attr!r}") from exc
    if isinstance(target, Consumer):
        return target
    if callable(target):
        consumer = Consumer(attr)
        consumer.add_handler("#", target)
        return consumer
    raise ConfigError(f"--handler: {spec!r} is neither a Consumer nor a function")


def _topology(
    queue: str,
    bindings: list[str] | None,
    exchange: str,
    queue_type: topo.QueueType,
    max_attempts: int,
    retry_delay: float,
    retry_delay_max: float,
) -> topo.Topology:
    return topo.Topology(
        queue=queue,
        bindings=tuple(bindings or ()),
        exchange=exchange,
        queue_type=queue_type,
        delays=topo.retry_delays(max_attempts, retry_delay, retry_delay_max),
    )


# -- consume -------------------------------------------------------------------------------------


def consume(
    handler: Annotated[
        str,
        typer.Option(
            "--handler",
            envvar=f"{ENV}HANDLER",
            help="module:object: a Consumer (handlers per routing pattern) or one function.",
        ),
    ],
    queue: Queue = "",
    binding: Bindings = None,
    exchange: Exchange = "events",
    queue_type: QueueTypeOption = topo.QueueType.CLASSIC,
    prefetch: Annotated[
        int,
        typer.Option(
            "--prefetch", envvar=f"{ENV}PREFETCH", help="Unacked messages buffered per worker."
        ),
    ] = 100,
    max_attempts: MaxAttempts = 5,
    retry_delay: RetryDelay = 1.0,
    retry_delay_max: RetryDelayMax = 300.0,
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL,
    broker_url: BrokerUrl = DEFAULT_BROKER_URL,
    schema: Schema = "public",
    consumer_name: ConsumerName = None,
    inbox_retention: Annotated[
        str,
        typer.Option(
            "--inbox-retention",
            envvar=f"{ENV}INBOX_RETENTION",
            help="How long processed event ids are remembered (longer than any redelivery).",
        ),
    ] = "7d",
    cleanup_interval: Annotated[
        str,
        typer.Option(
            "--cleanup-interval",
            envvar=f"{ENV}CLEANUP_INTERVAL",
            help="How often old inbox rows are deleted.",
        ),
    ] = "1h",
    declare: Annotated[
        bool,
        typer.Option(
            "--declare/--no-declare",
            envvar=f"{ENV}DECLARE",
            help="Declare the topology on start (turn off when operators own it).",
        ),
    ] = True,
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level", envvar=f"{ENV}LOG_LEVEL", help="debug, info, warning or error."
        ),
    ] = "info",
    log_format: Annotated[
        str, typer.Option("--log-format", envvar=f"{ENV}LOG_FORMAT", help="text or json.")
    ] = "text",
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            envvar=f"{ENV}METRICS_PORT",
            help="Serve Prometheus metrics on http://0.0.0.0:PORT/metrics.",
        ),
    ] = None,
    health_port: Annotated[
        int | None,
        typer.Option(
            "--health-port",
            envvar=f"{ENV}HEALTH_PORT",
            help="Serve /livez and /readyz (consuming from the broker) on this port.",
        ),
    ] = None,
) -> None:
    """Run a worker: handle events from QUEUE exactly once (inbox), retry, dead-letter; stop on SIGTERM."""
    setup_logging(log_level, log_format)
    if not queue:
        raise ConfigError("--queue: required (or OUTBOX_RELAY_QUEUE)")
    consumer = load_consumer(handler)
    settings = ConsumerSettings(
        broker_url=broker_url,
        database_url=check_database_url(database_url),
        queue=queue,
        bindings=tuple(binding or consumer.patterns),
        exchange=exchange,
        queue_type=queue_type,
        prefetch=prefetch,
        max_attempts=max_attempts,
        retry_delay=retry_delay,
        retry_delay_max=retry_delay_max,
        schema=schema,
        consumer_name=consumer_name,
        inbox_retention=parse_duration("--inbox-retention", inbox_retention),
        cleanup_interval=parse_duration("--cleanup-interval", cleanup_interval),
        declare_topology=declare,
    )
    from outbox_relay.observability.wiring import ConsumerObservability

    # Tracing (OTEL_* variables) and metrics; the handler runs in a span continuing the relay's.
    observability = ConsumerObservability(queue, metrics_port=metrics_port)
    try:
        worker = consumer.worker(settings, hooks=observability.hooks)
        observability.serve_health(worker, health_port)
        with worker.stop_on_signals():
            worker.run()
    finally:
        observability.close()


# -- topology ------------------------------------------------------------------------------------


@topology_app.command("apply")
def topology_apply(
    queue: Queue = "",
    binding: Bindings = None,
    exchange: Exchange = "events",
    queue_type: QueueTypeOption = topo.QueueType.CLASSIC,
    max_attempts: MaxAttempts = 5,
    retry_delay: RetryDelay = 1.0,
    retry_delay_max: RetryDelayMax = 300.0,
    broker_url: BrokerUrl = DEFAULT_BROKER_URL,
) -> None:
    """Declare the exchange, QUEUE with its bindings, retry queues and QUEUE.dlq (idempotent)."""
    if not queue:
        raise ConfigError("--queue: required (or OUTBOX_RELAY_QUEUE)")
    topology = _topology(
        queue, binding, exchange, queue_type, max_attempts, retry_delay, retry_delay_max
    )
    topo.apply(broker_url, topology)
    typer.echo(
        f"declared {queue!r} ({queue_type}) on {exchange!r} bound to "
        f"{', '.join(topology.bindings) or 'nothing'}; retry queues: "
        f"{', '.join(topology.retry_queues) or 'none'}; dead letters: {topology.dead_letter_queue!r}"
    )


# -- dlq -------------------------------------------------------------------------------------------


@dlq_app.command("list")
def dlq_list(
    queue: Queue = "",
    broker_url: BrokerUrl = DEFAULT_BROKER_URL,
    limit: Annotated[
        int, typer.Option("--limit", help="Show at most this many, oldest first.")
    ] = 100,
    as_json: AsJson = False,
) -> None:
    """Show dead-lettered messages with their failure reason (they stay in the DLQ)."""
    if not queue:
        raise ConfigError("--queue: required (or OUTBOX_RELAY_QUEUE)")
    total, dead = dlq.list_dead(broker_url, queue, limit)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "total": total,
                    "messages": [
                        {
                            "event_id": d.event_id,
                            "event_type": d.event_type,
                            "attempts": d.attempts,
                            "reason": d.reason,
                            "failed_at": d.failed_at,
                            "body": d.body.decode("utf-8", "replace"),
                        }
                        for d in dead
                    ],
                }
            )
        )
        return
    table = Table(title=f"{queue}.dlq: {total} message(s)")
    for column in ("event id", "type", "attempts", "failed at", "reason"):
        table.add_column(column)
    for d in dead:
        table.add_row(
            d.event_id or "",
            d.event_type or "",
            str(d.attempts or ""),
            d.failed_at or "",
            d.reason or "",
        )
    Console(width=200).print(table)


@dlq_app.command("replay")
def dlq_replay(
    event_ids: Annotated[
        list[str] | None, typer.Argument(help="Replay only these event ids (default: all).")
    ] = None,
    queue: Queue = "",
    broker_url: BrokerUrl = DEFAULT_BROKER_URL,
    limit: Annotated[int | None, typer.Option("--limit", help="Replay at most this many.")] = None,
) -> None:
    """Send dead messages back to QUEUE (confirmed before removal: a crash loses nothing)."""
    if not queue:
        raise ConfigError("--queue: required (or OUTBOX_RELAY_QUEUE)")
    moved = dlq.replay(broker_url, queue, event_ids=event_ids or (), limit=limit)
    typer.echo(f"replayed {moved} message(s) to {queue!r}")


@dlq_app.command("purge")
def dlq_purge(
    queue: Queue = "",
    broker_url: BrokerUrl = DEFAULT_BROKER_URL,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete every message in QUEUE.dlq."""
    if not queue:
        raise ConfigError("--queue: required (or OUTBOX_RELAY_QUEUE)")
    if not yes:
        typer.confirm(f"delete every message in {queue}.dlq?", abort=True)
    typer.echo(f"purged {dlq.purge(broker_url, queue)} message(s) from {queue}.dlq")


# -- consumer-status -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManagementStats:
    unacked: int
    redeliver_rate: float
    deliver_rate: float


def management_stats(management_url: str, broker_url: str, queue: str) -> ManagementStats | None:
    """Unacked count and redelivery rate from the management plugin, or None if unavailable."""
    amqp = urllib.parse.urlsplit(broker_url)
    vhost = urllib.parse.unquote(amqp.path[1:]) if len(amqp.path) > 1 else "/"
    url = (
        f"{management_url.rstrip('/')}/api/queues/"
        f"{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(queue, safe='')}"
    )
    request = urllib.request.Request(url)
    credentials = f"{urllib.parse.unquote(amqp.username or 'guest')}:{urllib.parse.unquote(amqp.password or 'guest')}"
    request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            data = json.load(response)
    except (OSError, urllib.error.URLError, ValueError):
        return None
    stats = data.get("message_stats") or {}
    return ManagementStats(
        unacked=int(data.get("messages_unacknowledged", 0)),
        redeliver_rate=float((stats.get("redeliver_details") or {}).get("rate", 0.0)),
        deliver_rate=float((stats.get("deliver_get_details") or {}).get("rate", 0.0)),
    )


def consumer_status(
    queue: Queue = "",
    broker_url: BrokerUrl = DEFAULT_BROKER_URL,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            envvar=f"{ENV}DATABASE_URL",
            help="The consumer's database: adds applied events, redeliveries and handler latency.",
        ),
    ] = None,
    schema: Schema = "public",
    consumer_name: ConsumerName = None,
    max_attempts: MaxAttempts = 5,
    retry_delay: RetryDelay = 1.0,
    retry_delay_max: RetryDelayMax = 300.0,
    management_url: Annotated[
        str | None,
        typer.Option(
            "--management-url",
            envvar=f"{ENV}MANAGEMENT_URL",
            help="RabbitMQ management API (e.g. http://localhost:15672) for unacked and redelivery rate.",
        ),
    ] = None,
    window: Annotated[
        float, typer.Option("--window", help="Seconds of inbox history for rates and latency.")
    ] = 300.0,
    as_json: AsJson = False,
) -> None:
    """Queue depth, unacked, DLQ and retry depth, redelivery rate and handler latency of a consumer."""
    if not queue:
        raise ConfigError("--queue: required (or OUTBOX_RELAY_QUEUE)")
    topology = topo.Topology(
        queue, delays=topo.retry_delays(max_attempts, retry_delay, retry_delay_max)
    )
    main, dead, *retries = topo.queue_depths(
        broker_url, [queue, topology.dead_letter_queue, *topology.retry_queues]
    )
    if main.messages is None:
        raise ConfigError(f"queue {queue!r} does not exist: run `outbox-relay topology apply`")
    retry_depth = sum(r.messages or 0 for r in retries)
    management = management_stats(management_url, broker_url, queue) if management_url else None
    inbox: InboxStats | None = None
    if database_url:
        check_database_url(database_url)
        try:
            with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
                inbox = inbox_stats(conn, consumer_name or queue, schema, window)
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(
                f"cannot connect to PostgreSQL at {redact_url(database_url)}: {exc}"
            ) from exc
    report: dict[str, Any] = {
        "queue": queue,
        "ready": main.messages,
        "consumers": main.consumers,
        "unacked": management.unacked if management else None,
        "redeliver_rate_per_s": management.redeliver_rate if management else None,
        "deliver_rate_per_s": management.deliver_rate if management else None,
        "retrying": retry_depth,
        "dlq_depth": dead.messages,
        "window_s": window,
        "inbox": asdict(inbox) if inbox else None,
    }
    if as_json:
        typer.echo(json.dumps(report))
        return
    table = Table(title=f"consumer {queue!r}")
    table.add_column("signal")
    table.add_column("value", justify="right")

    def show(value: Any, unit: str = "") -> str:
        return (
            "n/a"
            if value is None
            else f"{value:.1f}{unit}"
            if isinstance(value, float)
            else f"{value}{unit}"
        )

    rows = [
        ("queue depth (ready)", show(report["ready"])),
        ("consumers", show(report["consumers"])),
        ("unacked", show(report["unacked"])),
        ("redeliveries / s (broker)", show(report["redeliver_rate_per_s"])),
        ("waiting in retry queues", show(retry_depth)),
        ("DLQ depth", show(report["dlq_depth"])),
    ]
    if inbox is not None:
        share = inbox.retried_or_redelivered / inbox.applied if inbox.applied else 0.0
        rows += [
            (f"applied, last {window:.0f}s", show(inbox.applied)),
            ("applied after a retry/redelivery", f"{share:.1%}"),
            ("handler latency p50", show(inbox.handler_ms_p50, " ms")),
            ("handler latency p95", show(inbox.handler_ms_p95, " ms")),
            ("handler latency max", show(inbox.handler_ms_max, " ms")),
        ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
