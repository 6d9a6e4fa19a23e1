"""A test helper's loop on a thread of its own (producers, a stand-in relay), stopped and checked
by the test that started it."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Self


class BackgroundLoop(ABC):
    """Runs :meth:`work` on a daemon thread until :meth:`stop`, which joins the thread and
    re-raises whatever the work failed with: a helper that broke fails its test, it does not
    go quiet. ``work`` returns once ``stopping`` is set."""

    def __init__(self, name: str, *, join_timeout: float = 30.0) -> None:
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self._join_timeout = join_timeout
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @abstractmethod
    def work(self) -> None:
        """The loop itself; returns once ``stopping`` is set (or its work is done)."""

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(self._join_timeout)
        assert not self._thread.is_alive(), f"{self._thread.name} did not stop"
        if self.failure is not None:
            raise AssertionError(f"{self._thread.name} failed: {self.failure!r}") from self.failure

    def _run(self) -> None:
        try:
            self.work()
        except BaseException as exc:
            self.failure = exc
