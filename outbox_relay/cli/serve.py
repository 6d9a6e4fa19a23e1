"""``outbox-relay serve``: run the relay until SIGTERM or SIGINT.

With ``--config`` one process runs one :class:`~outbox_relay.relay.loop.Relay` per outbox of
the file, side by side on one event loop (each relay spends its time waiting on PostgreSQL and
the broker, as one relay does): each reconnects on its own, so one outbox's database being down
leaves the others relaying.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Coroutine, Sequence
from typing import Any

from outbox_relay.cli import config_file
from outbox_relay.cli.common import setup_logging
from outbox_relay.cli.config_file import ConfigOption, Outbox
from outbox_relay.cli.options import Values, pick, settings_command
from outbox_relay.errors import OutboxRelayError
from outbox_relay.observability.logs import OUTBOX
from outbox_relay.observability.settings import ObservabilitySettings
from outbox_relay.publishers import broker_options, check_options, create_publisher
from outbox_relay.publishers.base import PublisherSettings
from outbox_relay.relay.settings import RelaySettings

log = logging.getLogger("outbox_relay")


@settings_command(
    ConfigOption,
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
    given = {k: v for k, v in values.items() if k != "config"}
    path = values.get("config")
    if path is not None:
        # Every outbox validated (its broker's options too) before anything connects.
        config = config_file.load(path, given, os.environ)
        outboxes, observability = config.outboxes, config.observability
        secrets = list(config.secrets())
    else:
        observability = ObservabilitySettings.from_mapping(pick(given, ObservabilitySettings))
        relay_values = {
            k: v for k, v in given.items() if k not in pick(given, ObservabilitySettings)
        }
        settings = RelaySettings.from_mapping(relay_values)
        # The broker's own options are checked here, before anything connects.
        check_options(settings.publisher)
        outboxes, secrets = [Outbox(None, settings)], list(settings.secrets())
    setup_logging(observability.log_level, observability.log_format, secrets)
    asyncio.run(run(outboxes, observability))


def _unhandled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An error in a client library's callback (asyncio would print its stack trace): one
    line; the trace at --log-level debug. Delivery does not depend on those callbacks."""
    exc = context.get("exception")
    log.warning("ignored an error in a background callback: %s", exc or context.get("message"))
    log.debug("background callback error", exc_info=exc)


async def run(outboxes: Sequence[Outbox], observability: ObservabilitySettings) -> None:
    """Relay every outbox until SIGTERM or SIGINT, or until one fails for good: then the others
    stop too (finishing their batches) and the error, naming the outbox, ends the process."""
    from outbox_relay.observability.wiring import RelayObservability
    from outbox_relay.relay.loop import Relay

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_unhandled)
    wiring = RelayObservability(observability)
    relays: list[tuple[Outbox, Relay]] = []
    for outbox in outboxes:
        publisher = create_publisher(outbox.settings.publisher)
        hooks = wiring.hooks_for(outbox.settings, publisher.name, outbox.name)
        relays.append((outbox, Relay(outbox.settings, publisher, hooks)))
    await wiring.start([(outbox.settings, relay) for outbox, relay in relays])
    tasks: list[asyncio.Task[None]] = []
    for outbox, relay in relays:
        # Every line the relay (and each task it starts) logs names its outbox.
        _named(outbox, log.info, "starting relay", extra=outbox.settings.describe())
        tasks.append(_named(outbox, asyncio.ensure_future, _failing_named(outbox, relay.run())))
    stopping: asyncio.Future[None] = loop.create_future()

    def stop() -> None:
        if stopping.done():
            return
        stopping.set_result(None)
        for (outbox, relay), task in zip(relays, tasks, strict=True):
            relay.stop()
            loop.call_later(outbox.settings.shutdown_timeout, task.cancel)

    def on_signal(signum: signal.Signals) -> None:
        if not stopping.done():
            log.info("received %s: finishing the batch in flight", signum.name)
        stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    failure: BaseException | None = None
    try:
        pending: set[asyncio.Task[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None and failure is None:
                    # One outbox failed for good (not a lost connection: those are retried):
                    # the others finish their batches and the process reports it.
                    failure = task.exception()
                    stop()
        for (outbox, _relay), task in zip(relays, tasks, strict=True):
            if task.cancelled():
                _named(
                    outbox,
                    log.warning,
                    "shutdown timed out: released the batch in flight, it will be published again",
                )
    finally:
        await wiring.close()
    if failure is not None:
        raise failure
    log.info("stopped")


def _named(outbox: Outbox, call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call(*args)`` with the outbox's name in the logging context (tasks it creates keep
    it: asyncio copies the context into each task)."""
    token = OUTBOX.set(outbox.name)
    try:
        return call(*args, **kwargs)
    finally:
        OUTBOX.reset(token)


async def _failing_named(outbox: Outbox, step: Coroutine[Any, Any, None]) -> None:
    """Run ``step``; an error that ends it names the outbox (with several, the line must say
    which one failed)."""
    try:
        await step
    except OutboxRelayError as exc:
        if outbox.name is not None:
            # Same class (same exit code), same causes: only the message gains the name.
            exc.args = (f"outbox {outbox.name!r}: {exc}", *exc.args[1:])
        raise
