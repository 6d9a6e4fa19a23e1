"""Helpers shared by every command: durations and logging set-up."""

from __future__ import annotations

import re

from outbox_relay.errors import ConfigError
from outbox_relay.observability import logs

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(option: str, text: str) -> float:
    """'90' / '90s' / '15m' / '24h' / '7d' -> seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"{option}: {text!r} is not a duration (e.g. 30s, 15m, 24h, 7d)")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def setup_logging(level: str, fmt: str) -> None:
    if level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"--log-level: {level!r} is not one of debug, info, warning, error")
    if fmt not in {"text", "json"}:
        raise ConfigError(f"--log-format: {fmt!r} is not one of text, json")
    logs.configure(level, fmt)
