"""``outbox-relay serve``: run the relay until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from outbox_relay.cli.common import setup_logging
from outbox_relay.cli.options import Values, pick, settings_command
from outbox_relay.observability.settings import ObservabilitySettings
from outbox_relay.publishers import broker_options, check_options, create_publisher
from outbox_relay.publishers.base import PublisherSettings
from outbox_relay.relay.settings import RelaySettings

log = logging.getLogger("outbox_relay")


@settings_command(
    RelaySettings,
    PublisherSettings,
    *(options for _schemes, options in broker_options()),
    ObservabilitySettings,
)
def serve(values: Values) -> None:
    """Run the relay daemon until SIGTERM or SIGINT.

    Every option is also an OUTBOX_RELAY_* variable. Tracing and metrics are configured with the
    standard OTEL_* variables (OTEL_SERVICE_NAME, OTEL_TRACES_EXPORTER=otlp|console|none,
    OTEL_EXPORTER_OTLP_ENDPOINT, ...); see docs/observability.md.
    """
    observability = ObservabilitySettings.from_mapping(pick(values, ObservabilitySettings))
    relay_values = {k: v for k, v in values.items() if k not in pick(values, ObservabilitySettings)}
    settings = RelaySettings.from_mapping(relay_values)
    setup_logging(observability.log_level, observability.log_format, settings.secrets())
    # The broker's own options are checked here, before anything connects.
    check_options(settings.publisher)
    asyncio.run(run(settings, observability))


def _unhandled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An error in a client library's callback (asyncio would print its stack trace): one
    line; the trace at --log-level debug. Delivery does not depend on those callbacks."""
    exc = context.get("exception")
    log.warning("ignored an error in a background callback: %s", exc or context.get("message"))
    log.debug("background callback error", exc_info=exc)


async def run(settings: RelaySettings, observability: ObservabilitySettings) -> None:
    from outbox_relay.observability.wiring import RelayObservability
    from outbox_relay.relay.loop import Relay

    asyncio.get_running_loop().set_exception_handler(_unhandled)
    publisher = create_publisher(settings.publisher)
    wiring = RelayObservability(settings, publisher.name, observability)
    relay = Relay(settings, publisher, wiring.hooks)
    await wiring.start(relay)
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(relay.run())
    stopping: asyncio.Future[None] = loop.create_future()

    def on_signal(signum: signal.Signals) -> None:
        if stopping.done():
            return
        stopping.set_result(None)
        log.info("received %s: finishing the batch in flight", signum.name)
        relay.stop()
        loop.call_later(settings.shutdown_timeout, task.cancel)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    log.info("starting relay", extra=settings.describe())
    try:
        await task
    except asyncio.CancelledError:
        log.warning("shutdown timed out: released the batch in flight, it will be published again")
    finally:
        await wiring.close()
    log.info("stopped")
