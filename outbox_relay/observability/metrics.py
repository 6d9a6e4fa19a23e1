"""OpenTelemetry metrics for the relay and the consumer, and a Prometheus scrape endpoint.

Every instrument is named ``outbox_relay.*`` (Prometheus: ``outbox_relay_*``, counters with
``_total``, durations with ``_seconds``); docs/observability.md lists them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from opentelemetry import metrics

from outbox_relay.db.pool import Coordinator
from outbox_relay.db.queries import Queries
from outbox_relay.errors import ConfigError, MissingExtraError, OutboxRelayError
from outbox_relay.messages import OutboxMessage, PublishResult
from outbox_relay.observability.tracing import otlp_protocol

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider

    from outbox_relay.consumer.events import Event
    from outbox_relay.messages import Failure

log = logging.getLogger(__name__)

PREFIX = "outbox_relay."
# Seconds: from a millisecond (a confirm on localhost) to ten minutes (a backlog after an outage).
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
# Waves up to this size have every event's delivery lag recorded; bigger ones a sample of it.
LAG_SAMPLES_PER_WAVE = 64


def metrics_exporter_names() -> list[str]:
    """OTEL_METRICS_EXPORTER as a list; nothing configured means no exporter (see tracing)."""
    value = os.environ.get("OTEL_METRICS_EXPORTER", "").strip().lower()
    names = [n.strip() for n in value.split(",") if n.strip()]
    return [] if "none" in names else names


def configure_metrics(
    default_service_name: str,
    *,
    prometheus_port: int | None = None,
    prometheus_host: str = "127.0.0.1",
    set_global: bool = True,
) -> MeterProvider | None:
    """A meter provider with the readers asked for: a Prometheus endpoint on ``prometheus_port``
    and/or what OTEL_METRICS_EXPORTER names (otlp, console, prometheus). None when neither."""
    names = metrics_exporter_names()
    if "prometheus" in names and prometheus_port is None:
        prometheus_port = int(os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464"))
        prometheus_host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", prometheus_host)
    if not names and prometheus_port is None:
        return None
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            MetricReader,
            PeriodicExportingMetricReader,
        )
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    except ModuleNotFoundError as exc:
        raise MissingExtraError(
            "metrics need the OpenTelemetry SDK: pip install 'outbox-relay[otel]'"
        ) from exc
    readers: list[MetricReader] = []
    if prometheus_port is not None:
        readers.append(_prometheus_reader(prometheus_host, prometheus_port))
    for name in names:
        if name == "otlp":
            readers.append(PeriodicExportingMetricReader(_otlp_metric_exporter()))
        elif name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr)))
        elif name != "prometheus":
            raise ConfigError(
                f"OTEL_METRICS_EXPORTER: {name!r} is not one of otlp, prometheus, console, none"
            )
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: default_service_name}
    provider = MeterProvider(metric_readers=readers, resource=Resource.create(attributes))
    if set_global:
        metrics.set_meter_provider(provider)
    return provider


def _prometheus_reader(host: str, port: int) -> Any:
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
    except ModuleNotFoundError as exc:
        raise MissingExtraError(
            "--metrics-port needs the Prometheus exporter: pip install 'outbox-relay[otel]'"
        ) from exc
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise ConfigError(f"--metrics-port: cannot listen on {host}:{port}: {exc}") from exc
    log.info("serving metrics", extra={"url": f"http://{host}:{port}/metrics"})
    return PrometheusMetricReader()


def _otlp_metric_exporter() -> Any:
    try:
        if otlp_protocol("metrics") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        else:
            # The gRPC and HTTP exporters are distinct classes with one interface; either is the exporter.
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[assignment]
                OTLPMetricExporter,
            )
    except ModuleNotFoundError as exc:
        raise MissingExtraError(
            "OTEL_METRICS_EXPORTER=otlp needs the OTLP exporter: pip install 'outbox-relay[otel]'"
        ) from exc
    return OTLPMetricExporter()


def failure_reason(reason: str | None, permanent: bool) -> str:
    """A low-cardinality label for a publisher's failure text."""
    text = (reason or "").lower()
    for prefix, label in (
        ("unroutable", "unroutable"),
        ("nacked", "nacked"),
        ("payload of", "too_large"),
        ("headers cannot", "unencodable"),
    ):
        if text.startswith(prefix):
            return label
    return "rejected" if permanent else "other"


# -- relay ---------------------------------------------------------------------------------------


@dataclass
class Backlog:
    """The last sampled backlog, read by the observable gauges."""

    pending: int | None = None
    oldest_age: float | None = None


class _RelayInstruments:
    """The relay's instruments, made once per meter and shared by every relay of the process
    (serve --config runs one per outbox): the SDK hands a second instrument of one name the
    first one back, and would drop a second observable gauge's callback, so each gauge here
    reports every registered relay's value under its own labels."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.members: list[RelayMetrics] = []
        self.published = meter.create_counter(
            PREFIX + "events.published", unit="{event}", description="Events the broker confirmed."
        )
        self.failures = meter.create_counter(
            PREFIX + "publish.failures",
            unit="{event}",
            description="Publishes that failed, by reason (unroutable, nacked, too_large, "
            "unencodable, broker_unavailable, ...); each is retried or dead-lettered.",
        )
        self.dead = meter.create_counter(
            PREFIX + "events.dead_lettered",
            unit="{event}",
            description="Events the relay gave up on.",
        )
        self.batch = meter.create_histogram(
            PREFIX + "batch.size",
            unit="{event}",
            description="Events claimed per batch.",
            explicit_bucket_boundaries_advisory=BATCH_BUCKETS,
        )
        self.confirm = meter.create_histogram(
            PREFIX + "publish.duration",
            unit="s",
            description="From handing a wave to the broker to its last confirm.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.lag = meter.create_histogram(
            PREFIX + "delivery.lag",
            unit="s",
            description="From the event's created_at (its transaction) to the broker's confirm; "
            "waves of more than 64 events record an evenly spaced sample of them.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        meter.create_observable_gauge(
            PREFIX + "partitions.owned",
            callbacks=[self._observe("owned")],
            unit="{partition}",
            description="Partitions (--mode cdc: shards) this relay holds leases on.",
        )
        self.rebalances = meter.create_counter(
            PREFIX + "rebalances",
            unit="{rebalance}",
            description="Changes of this relay's share of the outbox (partitions gained or lost).",
        )
        self.lease_losses = meter.create_counter(
            PREFIX + "lease.losses",
            unit="{partition}",
            description="Partitions this relay gave up (handed over, or lost to another relay).",
        )
        meter.create_observable_gauge(
            PREFIX + "pending",
            callbacks=[self._observe("pending")],
            unit="{event}",
            description="Events waiting to be published (sampled periodically).",
        )
        meter.create_observable_gauge(
            PREFIX + "pending.oldest_age",
            callbacks=[self._observe("oldest_age")],
            unit="s",
            description="Age of the oldest pending event (sampled periodically).",
        )

    def _observe(self, what: str) -> metrics.CallbackT:
        def observe(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            return [
                observation
                for member in list(self.members)
                if (observation := member.observation(what)) is not None
            ]

        return observe


_INSTRUMENTS: weakref.WeakKeyDictionary[metrics.Meter, _RelayInstruments] = (
    weakref.WeakKeyDictionary()
)


class RelayMetrics:
    """RelayHooks counting what one relay publishes; the backlog gauges read :class:`Backlog`.

    ``outbox`` (the outbox's name in a config file) labels every value, so one process relaying
    several outboxes reports each apart; its cardinality is the number of [[outbox]] tables."""

    def __init__(
        self,
        meter: metrics.Meter,
        *,
        system: str,
        destination: str,
        backlog: Backlog,
        relay: str | None = None,
        outbox: str | None = None,
    ) -> None:
        self._attrs = {
            "messaging.system": system,
            "messaging.destination.name": destination,
            **({"outbox": outbox} if outbox else {}),
        }
        # The share metrics say whose share they count (several relays, one dashboard).
        self._share_attrs = {**self._attrs, **({"relay": relay} if relay else {})}
        self._backlog = backlog
        instruments = _INSTRUMENTS.get(meter)
        if instruments is None:
            instruments = _INSTRUMENTS[meter] = _RelayInstruments(meter)
        instruments.members.append(self)
        self._instruments = instruments
        self._published = instruments.published
        self._failures = instruments.failures
        self._dead = instruments.dead
        self._batch = instruments.batch
        self._confirm = instruments.confirm
        self._lag = instruments.lag
        self._rebalances = instruments.rebalances
        self._lease_losses = instruments.lease_losses
        self._owned = 0

    def close(self) -> None:
        """Stop reporting this relay's gauges (its outbox is no longer relayed)."""
        if self in self._instruments.members:
            self._instruments.members.remove(self)

    def observation(self, what: str) -> metrics.Observation | None:
        """This relay's current value of an observable gauge (None: not sampled yet)."""
        if what == "owned":
            return metrics.Observation(self._owned, self._share_attrs)
        value = self._backlog.pending if what == "pending" else self._backlog.oldest_age
        return None if value is None else metrics.Observation(value, self._attrs)

    def after_rebalance(self, owned: int, gained: int, lost: int) -> None:
        self._owned = owned
        self._rebalances.add(1, self._share_attrs)
        if lost:
            self._lease_losses.add(lost, self._share_attrs)

    def after_claim(self, messages: Sequence[OutboxMessage], seconds: float) -> None:
        self._batch.record(len(messages), self._attrs)

    def before_publish(self, messages: Sequence[OutboxMessage]) -> Sequence[OutboxMessage]:
        return messages

    def after_publish(
        self,
        messages: Sequence[OutboxMessage],
        results: Sequence[PublishResult],
        seconds: float,
    ) -> None:
        self._confirm.record(seconds, self._attrs)
        confirmed: list[OutboxMessage] = []
        for message, result in zip(messages, results, strict=False):
            if result.confirmed:
                confirmed.append(message)
            else:
                reason = failure_reason(result.reason, result.permanent)
                self._failures.add(1, {**self._attrs, "reason": reason})
        if not confirmed:
            return
        self._published.add(len(confirmed), self._attrs)
        # A histogram record costs the SDK 3-6 us, as much as a tenth of publishing the event:
        # a big wave records an evenly spaced sample (its oldest event first) instead of all.
        now = time.time()
        record_lag = self._lag.record
        for message in confirmed[:: max(1, len(confirmed) // LAG_SAMPLES_PER_WAVE)]:
            record_lag(max(0.0, now - message.created_at.timestamp()), self._attrs)

    def on_publish_error(self, messages: Sequence[OutboxMessage], error: BaseException) -> None:
        self._failures.add(len(messages), {**self._attrs, "reason": "broker_unavailable"})

    def after_settle(
        self, sent: Sequence[int], failures: Sequence[Failure], dead: int, seconds: float
    ) -> None:
        if dead:
            self._dead.add(dead, self._attrs)


# Seconds a backlog sample may wait for other statements to share its round trip.
SAMPLE_COMPANY = 0.2


class BacklogSampler:
    """Samples the backlog every ``interval`` seconds through the coordinator of the outbox's
    database (db/pool.py: in the shared rounds of statements, no connection of its own), so a
    scrape never waits on the database and the claiming connections are left alone."""

    def __init__(
        self, coordinator: Coordinator, schema: str, backlog: Backlog, interval: float = 15.0
    ) -> None:
        self._coordinator = coordinator
        self._query = Queries(schema)["pending_summary"]
        self._backlog = backlog
        self._interval = interval

    async def run(self) -> None:
        """Sample until cancelled; database errors are logged and retried next interval."""
        statement = ""
        while True:
            try:
                if not statement:
                    statement = await self._coordinator.mogrify(self._query, {})
                row = await self._coordinator.beat(statement, SAMPLE_COMPANY)
                if row is not None:
                    self._backlog.pending = int(row[0])
                    self._backlog.oldest_age = float(row[1] or 0.0)
            except (psycopg.Error, OutboxRelayError) as exc:
                log.debug("backlog sample failed: %s", exc)
            await asyncio.sleep(self._interval)


# -- consumer ------------------------------------------------------------------------------------


class ConsumerMetrics:
    """Consumer hooks counting handled, deduplicated, retried and dead-lettered events."""

    def __init__(self, meter: metrics.Meter, *, queue: str) -> None:
        self._queue = queue
        self._handled = meter.create_counter(
            PREFIX + "consumer.handled", unit="{event}", description="Events handled (committed)."
        )
        self._deduped = meter.create_counter(
            PREFIX + "consumer.deduped",
            unit="{event}",
            description="Deliveries skipped because the inbox had seen the event.",
        )
        self._retried = meter.create_counter(
            PREFIX + "consumer.retried", unit="{event}", description="Handler failures retried."
        )
        self._dead = meter.create_counter(
            PREFIX + "consumer.dead_lettered",
            unit="{event}",
            description="Events sent to the dead-letter queue.",
        )
        self._redelivered = meter.create_counter(
            PREFIX + "consumer.redelivered",
            unit="{event}",
            description="Deliveries the broker flagged as redelivered.",
        )
        self._latency = meter.create_histogram(
            PREFIX + "consumer.handler.duration",
            unit="s",
            description="Handler plus inbox transaction time.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )

    def _attrs(self, event_type: str | None) -> dict[str, str]:
        return {
            "messaging.destination.subscription.name": self._queue,
            "event_type": event_type or "",
        }

    def on_handled(self, event: Event, seconds: float) -> None:
        self._handled.add(1, self._attrs(event.event_type))

    def on_deduped(self, event: Event) -> None:
        self._deduped.add(1, self._attrs(event.event_type))

    def on_retried(self, event: Event, delay: float, reason: str) -> None:
        self._retried.add(1, self._attrs(event.event_type))

    def on_dead_lettered(self, event_id: str | None, event_type: str | None, reason: str) -> None:
        self._dead.add(1, self._attrs(event_type))

    def on_redelivered(self, event_id: str | None, event_type: str | None) -> None:
        self._redelivered.add(1, self._attrs(event_type))

    def on_handler_latency(self, event_type: str, seconds: float) -> None:
        self._latency.record(seconds, self._attrs(event_type))
