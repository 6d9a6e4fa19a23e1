"""``outbox-relay replay``: publish kept events again; ``replay list``: the saved replays."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from typing import Annotated

import typer
from pydantic import Field
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from outbox_relay.cli.common import setup_logging
from outbox_relay.cli.options import Values, settings_command
from outbox_relay.db.connect import connection
from outbox_relay.db.replays import ReplayStore, list_replays
from outbox_relay.errors import ExitCode, PublishError
from outbox_relay.publishers import broker_options, check_options, create_publisher
from outbox_relay.publishers.base import PublisherSettings
from outbox_relay.relay.replay import Outcome, ReplaySettings, State, count, run_replay
from outbox_relay.settings import DEFAULT_DATABASE_URL, DatabaseUrl, Flag, Schema, Settings

app = typer.Typer(
    invoke_without_command=True,
    rich_markup_mode=None,
)

# Seconds between progress lines when stderr is not a terminal.
PLAIN_EVERY = 5.0


class ReplayListOptions(Settings):
    database_url: DatabaseUrl = DEFAULT_DATABASE_URL
    schema_name: Schema = "public"
    limit: Annotated[
        int,
        Field(gt=0, le=1_000_000, description="At most this many, newest first."),
        Flag(env=False),
    ] = 100
    as_json: Annotated[
        bool, Field(alias="json", description="One JSON array."), Flag(env=False)
    ] = False


@app.callback(invoke_without_command=True)
@settings_command(ReplaySettings, PublisherSettings, *(o for _schemes, o in broker_options()))
def replay(values: Values) -> None:
    """Publish kept events again, selected by time, event type and aggregate, in their original
    per-aggregate order, with publisher confirms and the header outbox-replay: true.

    Only events the relay sent and kept (serve --on-sent keep) are replayed; dead events only
    with --include-dead. Stop with Ctrl-C (the events already read are confirmed first) and
    continue with --resume. See docs/replay.md.
    """
    settings = ReplaySettings.from_mapping(values)
    setup_logging(secrets=settings.secrets())
    check_options(settings.publisher)
    code = asyncio.run(_main(settings))
    if code:
        raise typer.Exit(code)


@app.command("list")
@settings_command(ReplayListOptions)
def replay_list(values: Values) -> None:
    """List saved replays, newest first, with their position and state."""
    options = ReplayListOptions.from_mapping(values)
    setup_logging(secrets=options.secrets())
    with connection(options.database_url, application_name="outbox-relay replay") as conn:
        records = list_replays(conn, options.schema_name, options.limit)
    if options.as_json:
        typer.echo(json.dumps([record.as_dict() for record in records]))
        return
    table = Table(title=f"replays ({len(records)})")
    for column in ("name", "state", "replayed", "position", "destination", "started", "updated"):
        table.add_column(column)
    for record in records:
        table.add_row(
            record.name,
            record.state,
            str(record.replayed),
            f"{record.position} of {record.upper_id}",
            record.destination,
            record.started_at.isoformat(timespec="seconds"),
            record.updated_at.isoformat(timespec="seconds"),
        )
    Console().print(table)


async def _main(settings: ReplaySettings) -> int:
    store = ReplayStore(settings.database_url, settings.schema_name)
    await store.connect()
    try:
        if settings.dry_run:
            _plan, outcome = await count(settings, store)
            _print_counts(outcome)
            return 0
        return await _replay(settings, store)
    finally:
        await store.close()


async def _replay(settings: ReplaySettings, store: ReplayStore) -> int:
    loop = asyncio.get_running_loop()
    stop, abort = asyncio.Event(), asyncio.Event()
    received: list[signal.Signals] = []

    def on_signal(signum: signal.Signals) -> None:
        received.append(signum)
        if not stop.is_set():
            stop.set()
            sys.stderr.write(
                f"received {signum.name}: stopping once the events in flight are confirmed "
                "(again to stop at once)\n"
            )
        else:
            abort.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    publisher = create_publisher(settings.publisher)
    progress = _progress()
    try:
        outcome = await run_replay(
            settings, store, publisher, stop=stop, abort=abort, progress=progress
        )
    finally:
        progress.close()
        await publisher.close()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return _report(outcome, received)


def _report(outcome: Outcome, received: list[signal.Signals]) -> int:
    if outcome.total == 0:
        first, last = outcome.kept_range
        kept = (
            f" (kept events were sent from {first.isoformat(timespec='seconds')} to "
            f"{last.isoformat(timespec='seconds')})"
            if first is not None and last is not None
            else ""
        )
        typer.echo(f"nothing to replay: no kept event matches the selection{kept}")
    typer.echo(outcome.summary())
    resume = f"outbox-relay replay --resume --name {outcome.name} (with the same broker options)"
    if outcome.state is State.INTERRUPTED:
        typer.echo(
            f"replay {outcome.name!r} interrupted at position {outcome.position}; continue with: "
            f"{resume}",
            err=True,
        )
        return 128 + int(received[0]) if received else int(ExitCode.FAILURE)
    if outcome.state is State.FAILED:
        typer.echo(
            f"error: replay {outcome.name!r} stopped: {outcome.error}; progress saved at position "
            f"{outcome.position}; once fixed, continue with: {resume}",
            err=True,
        )
        return int(PublishError.exit_code)
    if outcome.total:
        typer.echo(f"replay {outcome.name!r} done")
    return 0


def _print_counts(outcome: Outcome) -> None:
    table = Table(title=f"dry run: {outcome.name}")
    for column in ("event type", "events", "dead"):
        table.add_column(column, justify="left" if column == "event type" else "right")
    for row in outcome.counts:
        table.add_row(row.event_type, str(row.kept), str(row.dead))
    Console().print(table)
    dead = (
        f"{outcome.dead_matched} dead included"
        if outcome.include_dead
        else f"{outcome.dead_skipped} dead skipped"
    )
    resumed = f", resuming after position {outcome.position}" if outcome.resumed else ""
    typer.echo(f"would replay {outcome.total} events ({dead}){resumed}; nothing was sent")


class _RichProgress:
    """A progress bar on a terminal (stderr)."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task: TaskID | None = None
        self._started = time.monotonic()

    def started(self, name: str, total: int) -> None:
        self._progress.start()
        self._started = time.monotonic()
        self._task = self._progress.add_task(f"replay {name}", total=total, rate="")

    def advanced(self, confirmed: int) -> None:
        if self._task is not None:
            rate = confirmed / max(time.monotonic() - self._started, 1e-9)
            self._progress.update(self._task, completed=confirmed, rate=f"{rate:,.0f} events/s")

    def close(self) -> None:
        self._progress.stop()


class _PlainProgress:
    """A line every few seconds when stderr is a file or a pipe (logs, CI)."""

    def __init__(self) -> None:
        self._name = ""
        self._total = 0
        self._started = self._shown = time.monotonic()

    def started(self, name: str, total: int) -> None:
        self._name, self._total = name, total
        self._started = self._shown = time.monotonic()
        sys.stderr.write(f"replay {name}: {total} events to publish\n")

    def advanced(self, confirmed: int) -> None:
        now = time.monotonic()
        if now - self._shown < PLAIN_EVERY:
            return
        self._shown = now
        rate = confirmed / max(now - self._started, 1e-9)
        sys.stderr.write(
            f"replay {self._name}: {confirmed} of {self._total} confirmed ({rate:.0f} events/s)\n"
        )

    def close(self) -> None:
        pass


def _progress() -> _RichProgress | _PlainProgress:
    return _RichProgress() if Console(stderr=True).is_terminal else _PlainProgress()
