"""Calling hooks: the one way the relay and the consumer call their callbacks (tracing, metrics,
users' own). Each hook is called in turn; one that raises is logged and skipped, so delivery
never depends on observability."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

H = TypeVar("H")


class HookDispatcher(Generic[H]):
    """Calls a callback on several hooks; subclasses implement a hooks protocol with it."""

    kind = "hook"  # how log lines name these hooks ("relay hook", "consumer hook")

    def __init__(self, hooks: Iterable[H]) -> None:
        self.hooks = tuple(hooks)

    def call(self, name: str, *args: Any) -> None:
        """``hook.name(*args)`` on every hook that has it, each failure contained."""
        for hook in self.hooks:
            method = getattr(hook, name, None)
            if method is not None:
                with self.contained(name):
                    method(*args)

    @contextmanager
    def contained(self, name: str) -> Iterator[None]:
        """Log and swallow what a hook's ``name`` callback raises."""
        try:
            yield
        except Exception:
            log.exception("%s %s failed (ignored)", self.kind, name)
