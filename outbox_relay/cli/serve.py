"""``outbox-relay serve``: run the relay until SIGTERM or SIGINT.

With ``--config`` one process runs one :class:`~outbox_relay.relay.loop.Relay` per outbox of
the file, side by side on one event loop (each relay spends its time waiting on PostgreSQL and
the broker, as one relay does): each reconnects on its own, so one outbox's database being down
leaves the others relaying. A ``schemas`` glob adds and removes relays as schemas come and go
(:class:`Fleet`, :func:`_discover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from outbox_relay.cli import config_file
from outbox_relay.cli.common import setup_logging
from outbox_relay.cli.config_file import ConfigOption, Outbox, database_of
from outbox_relay.cli.options import Values, pick, settings_command
from outbox_relay.db.pool import DatabaseHub
from outbox_relay.errors import OutboxRelayError
from outbox_relay.observability.logs import OUTBOX
from outbox_relay.observability.settings import ObservabilitySettings
from outbox_relay.publishers import (
    SharedClients,
    broker_options,
    check_options,
    create_publisher,
)
from outbox_relay.publishers.base import PublisherSettings
from outbox_relay.relay.settings import RelaySettings

if TYPE_CHECKING:
    from outbox_relay.observability.wiring import RelayObservability
    from outbox_relay.relay.loop import Relay

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


# Seconds between looks for new and dropped schemas (schemas = "GLOB"): a schema created and
# migrated is relayed within this, plus a connect.
DISCOVERY_INTERVAL = 10.0


class Hubs:
    """One :class:`DatabaseHub` per database the file names: the outboxes of a database share
    its connections, at most the smallest ``max_db_connections`` among them. A ``schemas``
    glob's look for new schemas takes one connection of that budget."""

    def __init__(self, outboxes: Sequence[Outbox]) -> None:
        self._hubs: dict[str, DatabaseHub] = {}
        budget: dict[str, int] = {}
        for outbox in outboxes:
            url = outbox.settings.database_url
            budget[url] = min(budget.get(url, 1000), outbox.settings.max_db_connections)
        for url, size in budget.items():
            # pg_stat_activity names a lone outbox's connections by its schema, as before.
            alone = len(outboxes) == 1 and outboxes[0].schemas is None
            label = outboxes[0].settings.schema_name if alone else "fleet"
            hub = self._hubs[url] = DatabaseHub(url, size, label)
            if any(o.schemas is not None for o in outboxes if o.settings.database_url == url):
                hub.lanes.size = max(1, hub.lanes.size - 1)

    def of(self, settings: RelaySettings) -> DatabaseHub:
        return self._hubs[settings.database_url]

    async def close(self) -> None:
        for hub in self._hubs.values():
            await hub.close()


@dataclass(eq=False)
class _Member:
    outbox: Outbox
    relay: Relay
    task: asyncio.Task[None]
    discovered: bool


class Fleet:
    """The relays of one serve process: one per outbox of the file, and one per schema a
    ``schemas`` glob finds. A relay of a configured outbox that fails for good stops the
    process; one of a discovered schema is let go (the schema was dropped, most likely) and
    taken up again if the next look still finds the schema ready."""

    def __init__(self, wiring: RelayObservability, hubs: Hubs, shared: SharedClients) -> None:
        self._wiring = wiring
        self._hubs = hubs
        self._shared = shared
        self._loop = asyncio.get_running_loop()
        self.members: dict[str | None, _Member] = {}
        self.failure: BaseException | None = None
        self.stopping = False
        self.stopped = asyncio.Event()
        self.changed = asyncio.Event()

    def relays(self) -> list[Relay]:
        return [member.relay for member in self.members.values()]

    def add(self, outbox: Outbox, *, discovered: bool = False) -> None:
        from outbox_relay.relay.loop import Relay

        # Outboxes of a file on one broker share its connection (a relay alone keeps its own).
        shared = self._shared if outbox.name is not None else None
        publisher = create_publisher(outbox.settings.publisher, shared=shared)
        hub = self._hubs.of(outbox.settings)
        hooks = self._wiring.hooks_for(
            outbox.settings, publisher.name, hub.coordinator, outbox.name
        )
        relay = Relay(outbox.settings, publisher, hooks, hub=hub)
        # Every line the relay (and each task it starts) logs names its outbox.
        _named(outbox, log.info, "starting relay", extra=outbox.settings.describe())
        task = _named(outbox, asyncio.ensure_future, _failing_named(outbox, relay.run()))
        task.add_done_callback(lambda _task: self.changed.set())
        self.members[outbox.name] = _Member(outbox, relay, task, discovered)

    def let_go(self, name: str | None) -> None:
        """Stop one relay: it finishes its batches in flight and hands its partitions over."""
        member = self.members.get(name)
        if member is not None:
            member.relay.stop()
            self._loop.call_later(member.outbox.settings.shutdown_timeout, member.task.cancel)

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.stopped.set()
            for name in list(self.members):
                self.let_go(name)
        self.changed.set()

    async def reap(self) -> None:
        """Take the relays that ended out of the fleet."""
        for name, member in list(self.members.items()):
            task = member.task
            if not task.done():
                continue
            del self.members[name]
            await self._wiring.release(name)
            if task.cancelled():
                _named(
                    member.outbox,
                    log.warning,
                    "shutdown timed out: released the batch in flight, it will be published again",
                )
                continue
            error = task.exception()
            if error is None:
                continue
            if member.discovered and not self.stopping:
                # Most likely its schema was dropped; the next look takes it up again if not.
                _named(member.outbox, log.warning, "relay stopped on an error: %s", error)
            elif self.failure is None:
                # One outbox failed for good (not a lost connection: those are retried): the
                # others finish their batches and the process reports it.
                self.failure = error
                self.stop()


async def run(outboxes: Sequence[Outbox], observability: ObservabilitySettings) -> None:
    """Relay every outbox until SIGTERM or SIGINT, or until one fails for good: then the others
    stop too (finishing their batches) and the error, naming the outbox, ends the process."""
    from outbox_relay.observability.wiring import RelayObservability, liveness_timeout

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_unhandled)
    wiring = RelayObservability(observability)
    hubs = Hubs(outboxes)
    fleet = Fleet(wiring, hubs, SharedClients())
    static = [outbox for outbox in outboxes if outbox.schemas is None]
    for outbox in static:
        fleet.add(outbox)
    await wiring.start(
        fleet.relays, stale_after=max(liveness_timeout(o.settings) for o in outboxes)
    )
    taken = {(database_of(o.settings.database_url), o.settings.schema_name) for o in static}
    looking = [
        asyncio.ensure_future(_discover(fleet, outbox, taken))
        for outbox in outboxes
        if outbox.schemas is not None
    ]

    def on_signal(signum: signal.Signals) -> None:
        if not fleet.stopping:
            log.info("received %s: finishing the batch in flight", signum.name)
        fleet.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        while not (fleet.stopping and not fleet.members):
            await fleet.changed.wait()
            fleet.changed.clear()
            await fleet.reap()
    finally:
        for task in looking:
            task.cancel()
        await asyncio.gather(*looking, return_exceptions=True)
        await wiring.close()
        await hubs.close()
    if fleet.failure is not None:
        raise fleet.failure
    log.info("stopped")


async def _discover(
    fleet: Fleet, template: Outbox, taken: set[tuple[tuple[str, str, str], str]]
) -> None:
    """Relay every schema ``template.schemas`` matches, as the schemas come and go."""
    from outbox_relay.db.connect import connection
    from outbox_relay.db.discovery import outbox_schemas

    settings, pattern = template.settings, template.schemas
    assert pattern is not None
    database = database_of(settings.database_url)
    prefix = f"{template.name}:"

    def look(known: frozenset[str]) -> list[str]:
        with connection(settings.database_url, application_name="outbox-relay discovery") as conn:
            return outbox_schemas(conn, pattern, known=known)

    relayed: set[str] = set()  # schemas taken up and not yet found gone
    while not fleet.stopping:
        try:
            found = set(await asyncio.to_thread(look, frozenset(relayed)))
        except (OutboxRelayError, psycopg.Error) as exc:
            # The relays already running retry on their own; the next look may succeed.
            _named(template, log.warning, "schema discovery failed: %s", exc)
        else:
            found = {schema for schema in found if (database, schema) not in taken}
            current = {
                name[len(prefix) :]
                for name, member in fleet.members.items()
                if member.discovered and name is not None and name.startswith(prefix)
            }
            for schema in sorted(found - current):
                if fleet.stopping:
                    break
                outbox = Outbox(
                    f"{prefix}{schema}", settings.model_copy(update={"schema_name": schema})
                )
                if schema not in relayed:
                    _named(outbox, log.info, "found schema %r: relaying it", schema)
                relayed.add(schema)
                fleet.add(outbox, discovered=True)
            # Gone: dropped (its relay may have stopped on an error already) or un-migrated.
            for schema in sorted(relayed - found):
                name = f"{prefix}{schema}"
                _named(
                    Outbox(name, settings),
                    log.info,
                    "schema %r is gone (or no longer migrated): letting it go",
                    schema,
                )
                relayed.discard(schema)
                fleet.let_go(name)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fleet.stopped.wait(), timeout=DISCOVERY_INTERVAL)


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
