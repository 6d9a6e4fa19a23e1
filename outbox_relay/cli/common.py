"""What every command does first: logging (secrets masked) and output helpers."""

from __future__ import annotations

from collections.abc import Iterable

from outbox_relay.observability import logs
from outbox_relay.observability.settings import LogFormat, LogLevel


def setup_logging(
    level: LogLevel | str = LogLevel.WARNING,
    fmt: LogFormat | str = LogFormat.TEXT,
    secrets: Iterable[str] = (),
) -> None:
    """Log to stderr at ``level``; every URL, password and token in ``secrets`` is masked in
    every line, from our loggers and third-party ones alike. One-shot commands log warnings
    only; ``serve`` and ``consume`` choose with --log-level."""
    logs.configure(str(LogLevel(level)), str(LogFormat(fmt)), secrets)
