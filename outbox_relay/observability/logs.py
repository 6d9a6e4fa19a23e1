"""Log formatting for the CLI: one line per event, key=value text or JSON, secrets masked.

Every line goes through a :class:`~outbox_relay.redact.Scrubber` last, whichever logger wrote
it (ours, pika's, httpx's, ...), so no configured password or token reaches the output.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from outbox_relay.redact import Scrubber

# The outbox a line is about, when one process relays several (serve --config): set around each
# relay's task, so every line it (and every task it starts) logs carries ``outbox=<name>``.
OUTBOX: ContextVar[str | None] = ContextVar("outbox_relay_outbox", default=None)


class _OutboxFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        name = OUTBOX.get()
        if name is not None and not hasattr(record, "outbox"):
            record.outbox = name
        return True


# Attributes every LogRecord has; anything else was passed with ``extra=`` and is context.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class _ScrubbingFormatter(logging.Formatter):
    def __init__(self, scrubber: Scrubber | None = None) -> None:
        super().__init__()
        self.scrubber = scrubber or Scrubber()

    def format(self, record: logging.LogRecord) -> str:
        return self.scrubber(self.render(record))

    def render(self, record: logging.LogRecord) -> str:
        raise NotImplementedError


class JsonFormatter(_ScrubbingFormatter):
    def render(self, record: logging.LogRecord) -> str:
        scrub = self.scrubber
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
            # Masked before encoding: JSON escapes would hide a secret from the last pass.
            **{k: scrub(v) if isinstance(v, str) else v for k, v in _context(record).items()},
        }
        if record.exc_info:
            entry["exception"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry, default=lambda value: scrub(str(value)))


class TextFormatter(_ScrubbingFormatter):
    def render(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{k}={v}" for k, v in _context(record).items())
        # One entry, one line: drivers' messages often carry newlines and tabs. Masked first:
        # a password holding two spaces or a tab would not be found once they are folded.
        message = " ".join(self.scrubber(record.getMessage()).split())
        line = f"{_timestamp(record)} {record.levelname:<7} {message}"
        if context:
            line = f"{line}  {context}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


# Third-party loggers that say, at INFO or DEBUG, what our own lines say once (and httpx's
# request lines carry full URLs): quiet unless they warn.
_CHATTY = {"pika": logging.CRITICAL, "httpx": logging.WARNING, "httpcore": logging.WARNING,
           "nats": logging.WARNING, "asyncio": logging.WARNING}  # fmt: skip


def configure(level: str = "INFO", fmt: str = "text", secrets: Iterable[str] = ()) -> None:
    """One handler on stderr for every logger; ``secrets`` (URLs, shared secrets) are masked."""
    scrubber = Scrubber(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(scrubber) if fmt == "json" else TextFormatter(scrubber))
    handler.addFilter(_OutboxFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name, quiet in _CHATTY.items():
        logging.getLogger(name).setLevel(max(quiet, root.level))


def scrub(text: str) -> str:
    """``text`` with the configured secrets masked (for output that is not a log line)."""
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        if isinstance(formatter, _ScrubbingFormatter):
            return formatter.scrubber(text)
    return Scrubber()(text)
