"""Wires tracing, metrics and health probes into ``outbox-relay serve`` and ``consume``.

Everything here is decided once at start-up: with no ``OTEL_*`` variables, no ``--metrics-port``
and no ``--health-port``, the relay runs without hooks and nothing extra happens per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from outbox_relay.consumer.hooks import CompositeConsumerHooks, ConsumerHooks
from outbox_relay.db.pool import Coordinator
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
    """Tracing and metrics hooks, backlog samplers and the health server of a ``serve``
    process: the providers and the endpoints once, the hooks and a sampler per outbox."""

    def __init__(self, observability: ObservabilitySettings | None = None) -> None:
        self._observability = observability = observability or ObservabilitySettings()
        self.tracer_provider = configure_tracing(RELAY_SERVICE)
        self.meter_provider = _configure_metrics(
            RELAY_SERVICE,
            prometheus_port=observability.metrics_port,
            prometheus_host=observability.metrics_host,
        )
        self.health: HealthServer | None = None
        self._started = False
        # Per relay (by its outbox's name): its backlog sampler and metrics, to stop when the
        # outbox is let go (schema discovery).
        self._samplers: dict[str | None, BacklogSampler] = {}
        self._sampling: dict[str | None, asyncio.Task[None]] = {}
        self._metrics: dict[str | None, RelayMetrics] = {}

    def hooks_for(
        self,
        settings: RelaySettings,
        publisher_name: str,
        coordinator: Coordinator,
        outbox: str | None = None,
    ) -> RelayHooks | None:
        """The hooks of one relay; ``outbox`` (its name in a config file) labels its metrics;
        its backlog is sampled through ``coordinator`` (its database's, db/pool.py)."""
        hooks: list[RelayHooks] = []
        if self.tracer_provider is not None:
            tracer = self.tracer_provider.get_tracer(INSTRUMENTATION)
            hooks.append(
                RelayTracing(tracer, system=publisher_name, destination=settings.publisher.exchange)
            )
        if self.meter_provider is not None:
            backlog = Backlog()
            meter = self.meter_provider.get_meter(INSTRUMENTATION)
            metrics = RelayMetrics(
                meter,
                system=publisher_name,
                destination=settings.publisher.exchange,
                backlog=backlog,
                relay=settings.relay_name_or_default,
                outbox=outbox,
            )
            hooks.append(metrics)
            self._metrics[outbox] = metrics
            sampler = BacklogSampler(
                coordinator,
                settings.schema_name,
                backlog,
                interval=max(1.0, min(15.0, settings.poll_interval * 5)),
            )
            self._samplers[outbox] = sampler
            if self._started:
                self._sampling[outbox] = asyncio.create_task(sampler.run())
        return CompositeHooks(hooks) if hooks else None

    async def release(self, outbox: str | None) -> None:
        """Forget a relay's sampler and metrics: its outbox is no longer relayed."""
        self._samplers.pop(outbox, None)
        metrics = self._metrics.pop(outbox, None)
        if metrics is not None:
            metrics.close()
        task = self._sampling.pop(outbox, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def start(
        self,
        relays: Callable[[], Sequence[Relay]],
        stale_after: float,
    ) -> None:
        """Serve the probes: ready when every relay (of the moment: ``relays()``) is, alive
        while every one makes progress; start sampling the backlogs."""
        port = self._observability.health_port
        if port is not None:
            self.health = HealthServer(
                port,
                ready=lambda: all(relay.is_ready() for relay in relays()),
                heartbeat=lambda: min(
                    (relay.heartbeat for relay in relays()), default=time.monotonic()
                ),
                stale_after=stale_after,
                host=self._observability.health_host,
            )
            await self.health.start()
        self._started = True
        for outbox, sampler in self._samplers.items():
            self._sampling[outbox] = asyncio.create_task(sampler.run())

    async def close(self) -> None:
        tasks = list(self._sampling.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
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
