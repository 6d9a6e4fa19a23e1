"""Consumer-side commands: ``consume``, ``topology apply``, ``dlq list|replay|purge``,
``consumer-status``."""

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

import typer
from pydantic import AfterValidator, Field, model_validator
from rich.console import Console
from rich.table import Table

from outbox_relay.cli.common import setup_logging
from outbox_relay.cli.options import Values, pick, settings_command
from outbox_relay.consumer import dlq
from outbox_relay.consumer import topology as topo
from outbox_relay.consumer.inbox import InboxStats, inbox_stats
from outbox_relay.consumer.routing import Consumer
from outbox_relay.consumer.settings import (
    ConsumerName,
    ConsumerSettings,
    QueueName,
    RetrySettings,
    TopologySettings,
)
from outbox_relay.db.connect import connection
from outbox_relay.errors import ConfigError
from outbox_relay.observability.settings import ObservabilitySettings
from outbox_relay.redact import redact_url
from outbox_relay.settings import (
    BrokerLinkSettings,
    Flag,
    Schema,
    Settings,
    check_broker_url,
    check_database_url,
)

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
    except Exception as exc:  # the module's own code may fail in any way while it is imported
        raise ConfigError(
            f"--handler: cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"--handler: {module_name!r} has no attribute {attr!r}") from None
    if isinstance(target, Consumer):
        return target
    if callable(target):
        consumer = Consumer(attr)
        consumer.add_handler("#", target)
        return consumer
    raise ConfigError(f"--handler: {spec!r} is neither a Consumer nor a function")


# -- consume -------------------------------------------------------------------------------------


class ConsumeOptions(Settings):
    handler: Annotated[
        str,
        Field(
            description="module:object: a Consumer (handlers per routing pattern) or one function."
        ),
        Flag(metavar="MODULE:OBJECT"),
    ]


@settings_command(ConsumeOptions, ConsumerSettings, ObservabilitySettings)
def consume(values: Values) -> None:
    """Run a worker: handle events from QUEUE exactly once (inbox), retry, dead-letter; stop on SIGTERM."""
    observability = ObservabilitySettings.from_mapping(pick(values, ObservabilitySettings))
    consumer_values = pick(values, ConsumerSettings)
    handler = ConsumeOptions.from_mapping(pick(values, ConsumeOptions)).handler
    setup_logging(observability.log_level, observability.log_format)
    consumer = load_consumer(handler)
    if "binding" not in consumer_values:
        consumer_values["binding"] = consumer.patterns
    settings = ConsumerSettings.from_mapping(consumer_values)
    setup_logging(observability.log_level, observability.log_format, settings.secrets())
    from outbox_relay.observability.wiring import ConsumerObservability

    # Tracing (OTEL_* variables) and metrics; the handler runs in a span continuing the relay's.
    wiring = ConsumerObservability(settings.queue, observability)
    try:
        worker = consumer.worker(settings, hooks=wiring.hooks)
        wiring.serve_health(worker)
        with worker.stop_on_signals():
            worker.run()
    finally:
        wiring.close()


# -- topology ------------------------------------------------------------------------------------


@topology_app.command("apply")
@settings_command(TopologySettings)
def topology_apply(values: Values) -> None:
    """Declare the exchange, QUEUE with its bindings, retry queues and QUEUE.dlq (idempotent)."""
    settings = TopologySettings.from_mapping(values)
    setup_logging(secrets=settings.secrets())
    topology = settings.topology()
    topo.apply(settings.broker_url, topology, tls_files=settings.broker_tls)
    bound = ", ".join(topology.bindings) or "nothing"
    if topology.ordered:
        typer.echo(
            f"declared {topology.queue!r} ordered: {topology.hash_exchange!r} (consistent hash "
            f"on the aggregate_id header) on {topology.exchange!r} bound to {bound}, feeding "
            f"{topology.partitions} partition queue(s) {topology.partition_queue(0)!r}.."
            f"{topology.partition_queue(topology.partitions - 1)!r}; retries in place; dead "
            f"letters: {topology.dead_letter_queue!r}"
        )
        return
    typer.echo(
        f"declared {topology.queue!r} ({topology.queue_type}) on {topology.exchange!r} bound to "
        f"{bound}; retry queues: "
        f"{', '.join(topology.retry_queues) or 'none'}; dead letters: {topology.dead_letter_queue!r}"
    )


# -- dlq -------------------------------------------------------------------------------------------


class DlqOptions(BrokerLinkSettings):
    queue: QueueName


class DlqListOptions(DlqOptions):
    limit: Annotated[
        int,
        Field(gt=0, le=1_000_000, description="Show at most this many, oldest first."),
        Flag(env=False),
    ] = 100
    as_json: Annotated[
        bool, Field(alias="json", description="Print JSON instead of a table."), Flag(env=False)
    ] = False


class DlqReplayOptions(DlqOptions):
    event_ids: Annotated[
        list[str],
        Field(description="Replay only these event ids (default: all)."),
        Flag(argument=True, metavar="[EVENT_ID]..."),
    ] = Field(default_factory=list)
    limit: Annotated[
        int | None,
        Field(gt=0, le=1_000_000, description="Replay at most this many."),
        Flag(env=False),
    ] = None


class DlqPurgeOptions(DlqOptions):
    yes: Annotated[bool, Field(description="Do not ask for confirmation."), Flag(env=False)] = False


@dlq_app.command("list")
@settings_command(DlqListOptions)
def dlq_list(values: Values) -> None:
    """Show dead-lettered messages with their failure reason (they stay in the DLQ)."""
    options = DlqListOptions.from_mapping(values)
    setup_logging(secrets=options.secrets())
    queue = options.queue
    total, dead = dlq.list_dead(
        options.broker_url, queue, options.limit, tls_files=options.broker_tls
    )
    if options.as_json:
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
@settings_command(DlqReplayOptions)
def dlq_replay(values: Values) -> None:
    """Send dead messages back to QUEUE (confirmed before removal: a crash loses nothing)."""
    options = DlqReplayOptions.from_mapping(values)
    setup_logging(secrets=options.secrets())
    moved = dlq.replay(
        options.broker_url,
        options.queue,
        event_ids=options.event_ids,
        limit=options.limit,
        tls_files=options.broker_tls,
    )
    typer.echo(f"replayed {moved} message(s) to {options.queue!r}")


@dlq_app.command("purge")
@settings_command(DlqPurgeOptions)
def dlq_purge(values: Values) -> None:
    """Delete every message in QUEUE.dlq."""
    options = DlqPurgeOptions.from_mapping(values)
    setup_logging(secrets=options.secrets())
    queue = options.queue
    if not options.yes:
        typer.confirm(f"delete every message in {queue}.dlq?", abort=True)
    typer.echo(
        f"purged {dlq.purge(options.broker_url, queue, tls_files=options.broker_tls)} message(s) from {queue}.dlq"
    )


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


def sum_stats(found: list[ManagementStats | None]) -> ManagementStats | None:
    """The partitions' figures added up (None if the management API answered for none)."""
    known = [stats for stats in found if stats is not None]
    if not known:
        return None
    return ManagementStats(
        unacked=sum(s.unacked for s in known),
        redeliver_rate=sum(s.redeliver_rate for s in known),
        deliver_rate=sum(s.deliver_rate for s in known),
    )


def check_optional_database_url(url: str | None) -> str | None:
    return None if url is None else check_database_url(url)


def check_management_url(url: str | None) -> str | None:
    """The management API's base URL: http(s)://host[:port], checked like a broker URL."""
    if url is None:
        return None
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"{redact_url(url)!r} is not an HTTP URL (e.g. http://localhost:15672)")
    return check_broker_url(url)


class ConsumerStatusOptions(RetrySettings, BrokerLinkSettings):
    queue: QueueName
    database_url: Annotated[
        str | None,
        AfterValidator(check_optional_database_url),
        Field(
            description="The consumer's database: adds applied events, redeliveries and "
            "handler latency."
        ),
        Flag(secret=True, metavar="URL"),
    ] = None
    schema_name: Schema = "public"
    consumer_name: ConsumerName = None
    management_url: Annotated[
        str | None,
        AfterValidator(check_management_url),
        Field(
            description="RabbitMQ management API (e.g. http://localhost:15672) for unacked and "
            "redelivery rate."
        ),
        Flag(metavar="URL", secret=True),
    ] = None
    window: Annotated[
        float,
        Field(gt=0, le=30 * 86_400, description="Seconds of inbox history for rates and latency."),
        Flag(env=False, metavar="SECONDS"),
    ] = 300.0
    as_json: Annotated[
        bool, Field(alias="json", description="Print JSON instead of a table."), Flag(env=False)
    ] = False

    @model_validator(mode="after")
    def _inbox_options_need_the_database(self) -> ConsumerStatusOptions:
        if "consumer_name" in self.model_fields_set and self.database_url is None:
            raise ValueError(
                "--consumer-name: names the consumer in its inbox, which needs --database-url"
            )
        return self


@settings_command(ConsumerStatusOptions)
def consumer_status(values: Values) -> None:
    """Queue depth, unacked, DLQ and retry depth, redelivery rate and handler latency of a consumer."""
    options = ConsumerStatusOptions.from_mapping(values)
    setup_logging(secrets=options.secrets())
    queue, broker_url, window = options.queue, options.broker_url, options.window
    tls_files = options.broker_tls
    partition_count = topo.ordered_partitions(broker_url, queue, tls_files=tls_files)
    partitions: list[topo.QueueDepth] | None = None
    retry_depth: int | None = None
    if partition_count is None:
        topology = topo.Topology(queue, delays=options.delays())
        main, dead, *retries = topo.queue_depths(
            broker_url,
            [queue, topology.dead_letter_queue, *topology.retry_queues],
            tls_files=tls_files,
        )
        if main.messages is None:
            raise ConfigError(f"queue {queue!r} does not exist: run `outbox-relay topology apply`")
        ready, consumers = main.messages, main.consumers
        retry_depth = sum(r.messages or 0 for r in retries)
    else:
        # Ordered: the partitions hold the events; retries happen in place (unacked).
        topology = topo.Topology(queue, ordered=True, partitions=max(1, partition_count))
        dead, workers, *partitions = topo.queue_depths(
            broker_url,
            [topology.dead_letter_queue, topology.workers_queue, *topology.partition_queues],
            tls_files=tls_files,
        )
        ready = sum(p.messages or 0 for p in partitions)
        consumers = workers.consumers
    management_url = options.management_url
    management = (
        sum_stats(
            [management_stats(management_url, broker_url, q) for q in topology.consumed_queues]
        )
        if management_url
        else None
    )
    inbox: InboxStats | None = None
    if options.database_url:
        with connection(
            options.database_url, application_name="outbox-relay consumer-status"
        ) as conn:
            inbox = inbox_stats(conn, options.consumer_name or queue, options.schema_name, window)
    report: dict[str, Any] = {
        "queue": queue,
        "ordered": partitions is not None,
        "ready": ready,
        "consumers": consumers,
        "unacked": management.unacked if management else None,
        "redeliver_rate_per_s": management.redeliver_rate if management else None,
        "deliver_rate_per_s": management.deliver_rate if management else None,
        "retrying": retry_depth,
        "dlq_depth": dead.messages,
        "window_s": window,
        "inbox": asdict(inbox) if inbox else None,
        "partitions": None
        if partitions is None
        else [{"queue": p.name, "ready": p.messages, "consumers": p.consumers} for p in partitions],
    }
    if options.as_json:
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

    ordered = partitions is not None
    rows = [
        ("queue depth (ready)", show(report["ready"])),
        ("workers" if ordered else "consumers", show(report["consumers"])),
        ("unacked", show(report["unacked"])),
        ("redeliveries / s (broker)", show(report["redeliver_rate_per_s"])),
        ("waiting in retry queues", "n/a (retried in place)" if ordered else show(retry_depth)),
        ("DLQ depth", show(report["dlq_depth"])),
    ]
    if partitions is not None:
        claimed = sum(1 for p in partitions if p.consumers)
        rows.append(("partitions claimed", f"{claimed} of {len(partitions)}"))
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
