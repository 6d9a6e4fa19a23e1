"""Wires tracing, metrics and health probes into ``outbox-relay serve`` and ``consume``.

Everything here is decided once at start-up: with no ``OTEL_*`` variables, no ``--metrics-port``
and no ``--health-port``, the relay runs without hooks and nothing extra happens per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from outbox_relay.consumer.hooks import CompositeConsumerHooks, ConsumerHooks
from outbox_relay.observability.health import HealthServer, HealthThread
from outbox_relay.observability.metrics import (
    Backlog,
    BacklogSampler,
    ConsumerMetrics,
    RelayMetrics,
)
from outbox_relay.observability.metrics import configure_metrics as _configure_metrics
from outbox_relay.observability.settings import ObservabilitySettings
from outbox_relay.observability.tracing import (
    INSTRUMENTATION,
    ConsumerTracing,
    RelayTracing,
    configure_tracing,
)
from outbox_relay.relay.hooks import CompositeHooks, RelayHooks

if TYPE_CHECKING:
    from outbox_relay.consumer.worker import Worker
    from outbox_relay.relay.loop import Relay
    from outbox_relay.relay.settings import RelaySettings

log = logging.getLogger(__name__)

RELAY_SERVICE = "outbox-relay"
CONSUMER_SERVICE = "outbox-relay-consumer"
CONSUMER_STALE_AFTER = 300.0


def liveness_timeout(settings: RelaySettings) -> float:
    """How long the relay loop may show no progress before /livez fails: longer than anything
    it legitimately waits for (a confirm timeout, a connect attempt, a poll interval)."""
    return max(60.0, 2 * settings.publisher.confirm_timeout + 3 * settings.poll_interval + 20)


class RelayObservability:
    """Tracing and metrics hooks, the backlog sampler and the health server of one relay."""

    def __init__(
        self,
        settings: RelaySettings,
        publisher_name: str,
        observability: ObservabilitySettings | None = None,
    ) -> None:
        self._settings = settings
        self._observability = observability = observability or ObservabilitySettings()
        self.tracer_provider = configure_tracing(RELAY_SERVICE)
        self.meter_provider = _configure_metrics(
            RELAY_SERVICE,
            prometheus_port=observability.metrics_port,
            prometheus_host=observability.metrics_host,
        )
        hooks: list[RelayHooks] = []
        if self.tracer_provider is not None:
            tracer = self.tracer_provider.get_tracer(INSTRUMENTATION)
            hooks.append(
                RelayTracing(tracer, system=publisher_name, destination=settings.publisher.exchange)
            )
        self._sampler: BacklogSampler | None = None
        if self.meter_provider is not None:
            backlog = Backlog()
            meter = self.meter_provider.get_meter(INSTRUMENTATION)
            hooks.append(
                RelayMetrics(
                    meter,
                    system=publisher_name,
                    destination=settings.publisher.exchange,
                    backlog=backlog,
                    relay=settings.relay_name_or_default,
                )
            )
            self._sampler = BacklogSampler(
                settings.database_url,
                settings.schema_name,
                backlog,
                interval=max(1.0, min(15.0, settings.poll_interval * 5)),
            )
        self.hooks: RelayHooks | None = CompositeHooks(hooks) if hooks else None
        self.health: HealthServer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, relay: Relay) -> None:
        port = self._observability.health_port
        if port is not None:
            self.health = HealthServer(
                port,
                ready=relay.is_ready,
                heartbeat=lambda: relay.heartbeat,
                stale_after=liveness_timeout(self._settings),
                host=self._observability.health_host,
            )
            await self.health.start()
        if self._sampler is not None:
            self._tasks.append(asyncio.create_task(self._sampler.run()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.health is not None:
            await self.health.close()
        # Flushes the spans and metrics still buffered; blocking, so off the loop.
        if self.tracer_provider is not None:
            await asyncio.to_thread(self.tracer_provider.shutdown)
        if self.meter_provider is not None:
            await asyncio.to_thread(self.meter_provider.shutdown)


class ConsumerObservability:
    """Tracing and metrics of one ``outbox-relay consume`` worker."""

    def __init__(self, queue: str, observability: ObservabilitySettings | None = None) -> None:
        self._observability = observability = observability or ObservabilitySettings()
        self.tracer_provider = configure_tracing(CONSUMER_SERVICE)
        self.meter_provider = _configure_metrics(
            CONSUMER_SERVICE,
            prometheus_port=observability.metrics_port,
            prometheus_host=observability.metrics_host,
        )
        hooks: list[ConsumerHooks] = []
        if self.tracer_provider is not None:
            hooks.append(ConsumerTracing(self.tracer_provider.get_tracer(INSTRUMENTATION)))
        if self.meter_provider is not None:
            hooks.append(
                ConsumerMetrics(self.meter_provider.get_meter(INSTRUMENTATION), queue=queue)
            )
        self.hooks: ConsumerHooks | None = CompositeConsumerHooks(hooks) if hooks else None
        self._health: HealthThread | None = None

    def serve_health(self, worker: Worker) -> None:
        """/readyz while the worker consumes; /livez until its loop stalls for 5 minutes (a
        handler may legitimately run that long)."""
        port = self._observability.health_port
        if port is None:
            return
        self._health = HealthThread(
            HealthServer(
                port,
                ready=worker.ready.is_set,
                heartbeat=lambda: worker.heartbeat,
                stale_after=CONSUMER_STALE_AFTER,
                host=self._observability.health_host,
            )
        )
        self._health.start()

    def close(self) -> None:
        if self._health is not None:
            self._health.close()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
