"""The ``outbox-relay`` application: its commands, and errors as one readable block."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, NoReturn

import psycopg
import typer

from outbox_relay import __version__
from outbox_relay.cli import consumer, dead, emit, migrate, replay, serve, slot, status
from outbox_relay.db.connect import translate
from outbox_relay.errors import ExitCode, OutboxRelayError
from outbox_relay.observability.logs import scrub

log = logging.getLogger("outbox_relay")

app = typer.Typer(
    name="outbox-relay",
    help="Relay events from a PostgreSQL transactional outbox to a message broker, "
    "with publisher confirms and per-aggregate commit order.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


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


app.command("serve")(serve.serve)
app.command("migrate")(migrate.migrate)
app.command("status")(status.status)
app.command("emit")(emit.emit)
app.add_typer(dead.app, name="dead")
app.add_typer(slot.app, name="slot")
app.add_typer(replay.app, name="replay")
consumer.register(app)


def fail(exc: OutboxRelayError) -> NoReturn:
    """Print the error and its causes once, masked, and exit with the error's code."""
    lines = [f"error: {exc}"]
    cause = exc.__cause__ if exc.shows_cause else None
    while cause is not None:
        text = str(cause).strip().splitlines()
        if text and text[0] not in lines[-1]:
            lines.append(f"  caused by: {text[0]}")
        cause = cause.__cause__
    sys.stderr.write(scrub("\n".join(lines)) + "\n")
    sys.exit(exc.exit_code)


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except OutboxRelayError as exc:
        fail(exc)
    except psycopg.Error as exc:
        # A right the command needs and the role lacks, or a query the server refused.
        error = translate(exc, "the database")
        fail(error if isinstance(error, OutboxRelayError) else OutboxRelayError(str(exc)))
    except typer.BadParameter as exc:
        # A value the command line parser itself refused (a flag's variable set to "maybe"):
        # a bad value like any other, exit 3.
        sys.stderr.write(scrub(f"error: {exc.format_message()}") + "\n")
        sys.exit(ExitCode.CONFIG)
    except typer.TyperException as exc:
        # Usage errors (an unknown option, a missing argument) in one line, then where to look.
        sys.stderr.write(scrub(f"error: {exc.format_message()} (see --help)") + "\n")
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(ExitCode.FAILURE)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a bug: one line for the user, the trace for --log-level debug
        log.debug("unexpected error", exc_info=True)
        sys.stderr.write(scrub(f"error: unexpected {type(exc).__name__}: {exc}") + "\n")
        sys.exit(ExitCode.FAILURE)
    sys.exit(code if isinstance(code, int) else 0)
