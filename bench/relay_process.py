"""A real in-process ``Relay`` in a child process of its own, driven over a pipe.

A process, not a thread: the bench's producers and consumer would otherwise share the relay's
GIL and slow it down. The child imports and builds everything first and says ``ready``; the
parent starts the clock and says ``go``; the child answers ``leading`` once the relay leads, and
on ``sample`` sends the confirm timestamps since the last sample and where its time went so far
(a long run, bench/outbox_soak.py); on ``stop`` stops the relay the way SIGTERM does and sends
back its confirm timestamps and where its time went.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from outbox_relay.db.store import OutboxStore
from outbox_relay.messages import OutboxMessage, PublishResult
from outbox_relay.publishers import create_publisher
from outbox_relay.publishers.base import OnResult, Publisher
from outbox_relay.relay.loop import Relay
from outbox_relay.relay.settings import Mode, RelaySettings


class ConfirmClock:
    """A Publisher wrapper timing each publish and, when asked, noting when each event was
    confirmed (for commit-to-confirm latency)."""

    def __init__(self, inner: Publisher, stopwatch: Stopwatch, *, note_events: bool) -> None:
        self._inner = inner
        self._stopwatch = stopwatch
        self._note_events = note_events
        self.confirmed_at: dict[str, float] = {}

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def max_message_bytes(self) -> int:
        return self._inner.max_message_bytes

    def message_problem(self, message: OutboxMessage) -> str | None:
        return self._inner.message_problem(message)

    async def connect(self) -> None:
        await self._inner.connect()

    async def publish_batch(
        self, messages: Sequence[OutboxMessage], on_result: OnResult | None = None
    ) -> list[PublishResult]:
        started = time.perf_counter()
        if self._note_events:

            def noted(index: int, result: PublishResult) -> None:
                # The moment each confirm arrives, not when the whole wave is done (into the
                # dict of the moment: take_confirmed() may have swapped it since the wave left).
                if result.confirmed:
                    self.confirmed_at.setdefault(messages[index].event_id, time.time())
                if on_result is not None:
                    on_result(index, result)

            results = await self._inner.publish_batch(messages, noted)
        else:
            results = await self._inner.publish_batch(messages, on_result)
        self._stopwatch.add("publish", time.perf_counter() - started, len(messages))
        return results

    def take_confirmed(self) -> dict[str, float]:
        """The confirm times noted since the last call (a long run reports them in slices)."""
        taken, self.confirmed_at = self.confirmed_at, {}
        return taken

    async def close(self) -> None:
        await self._inner.close()

    def is_healthy(self) -> bool:
        return self._inner.is_healthy()


class Stopwatch:
    """Time spent in the relay's steps, to explain its throughput: claiming rows, publishing
    them (send + wait for confirms) and settling them (mark sent + commit); and, for latency,
    the idle path (commits, asking producers to ring, waiting for in-progress writers). In
    ``--mode cdc``, ``claim`` is the table path and ``claim_ids`` the WAL path.

    The store's methods are wrapped in this bench process only; the relay is unchanged. With
    pipelined batches the steps overlap, so their sum may exceed the wall time."""

    # The idle-path steps explain latency: each is a round trip (most with a commit).
    STEPS = tuple(
        (name, OutboxStore, name)
        for name in (
            "claim",
            "settle",
            "commit",
            "start_listening",
            "stop_listening",
            "all_ended",
            "next_retry_in",
            # --mode cdc: transactions read from the WAL, claimed by id.
            "materialize",
            "claim_ids",
            "wait_visible",
            "earliest_pending",
        )
    )

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.rows: dict[str, int] = {}

    def install(self) -> None:
        for step, owner, attribute in self.STEPS:
            original = getattr(owner, attribute, None)
            if original is not None:
                setattr(owner, attribute, self.timed(step, original))

    def timed(
        self, step: str, function: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = None
            try:
                result = await function(*args, **kwargs)
                return result
            finally:
                rows = len(result) if isinstance(result, list) else 0
                self.add(step, time.perf_counter() - started, rows)

        return wrapper

    def add(self, step: str, seconds: float, rows: int = 0) -> None:
        self.seconds[step] = self.seconds.get(step, 0.0) + seconds
        self.calls[step] = self.calls.get(step, 0) + 1
        self.rows[step] = self.rows.get(step, 0) + rows

    def report(self) -> dict[str, Any]:
        """Per step: calls, seconds and, for claim and publish, rows (claimed; published)."""
        report: dict[str, Any] = {}
        for step in sorted(self.seconds):
            report[step] = {"calls": self.calls[step], "seconds": round(self.seconds[step], 3)}
            if self.rows[step]:
                report[step]["rows"] = self.rows[step]
        return report


def _child(settings_kwargs: dict[str, Any], clock: bool, pipe: Connection) -> None:
    logging.basicConfig(level=logging.WARNING, format="relay(bench): %(levelname)s %(message)s")
    # The relay's own warnings say enough when a shared service restarts; pika's are a flood.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    try:
        asyncio.run(_serve(settings_kwargs, clock, pipe))
    except Exception as exc:
        pipe.send(("error", repr(exc)))
    finally:
        pipe.close()


async def _serve(settings_kwargs: dict[str, Any], clock: bool, pipe: Connection) -> None:
    values = dict(settings_kwargs)
    # RelaySettings compares the mode by identity: a plain "notify" string would mean poll mode.
    values["mode"] = Mode(values.get("mode", Mode.NOTIFY))
    settings = RelaySettings(**values)
    stopwatch = Stopwatch()
    stopwatch.install()
    timing = ConfirmClock(create_publisher(settings.publisher), stopwatch, note_events=clock)
    relay = Relay(settings, timing)
    loop = asyncio.get_running_loop()
    pipe.send(("ready", None))
    command = await loop.run_in_executor(None, pipe.recv)
    if command != "go":
        return
    running = asyncio.create_task(relay.run())
    # Relay exposes ``leading`` as a flag, not an event: look at it every few milliseconds.
    while not relay.leading and not running.done():  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    if running.done():
        running.result()  # raises the relay's error
    pipe.send(("leading", None))
    # "sample" (any number of times): the confirms since the last sample and the steps so far;
    # then "stop".
    while await loop.run_in_executor(None, pipe.recv) == "sample":
        if running.done():
            running.result()  # raises the relay's error
        pipe.send(("sample", (timing.take_confirmed(), stopwatch.report())))
    relay.stop()
    await running
    pipe.send(("stopped", (timing.confirmed_at, stopwatch.report())))


class RelayProcess:
    """``with RelayProcess(settings_kwargs) as relay: relay.go(); ...; relay.stop()``."""

    def __init__(self, settings_kwargs: dict[str, Any], *, clock: bool = False) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(
            target=_child, args=(settings_kwargs, clock, child_end), name="bench-relay"
        )
        self._process.start()
        child_end.close()
        self._expect("ready", timeout=60)
        self.confirmed_at: dict[str, float] = {}
        self.steps: dict[str, Any] = {}

    def _expect(self, what: str, timeout: float) -> Any:
        if not self._pipe.poll(timeout):
            raise RuntimeError(f"bench relay: no {what!r} within {timeout}s")
        try:
            kind, value = self._pipe.recv()
        except EOFError:
            self._process.join(5)
            raise RuntimeError(
                f"bench relay exited (code {self._process.exitcode}) before {what!r}"
            ) from None
        if kind != what:
            raise RuntimeError(f"bench relay: expected {what!r}, got {kind!r}: {value}")
        return value

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def go(self) -> None:
        """Start relaying now (connects, takes the lead, drains)."""
        self._pipe.send("go")

    def wait_leading(self, timeout: float = 30) -> None:
        self._expect("leading", timeout)

    def sample(self, timeout: float = 60) -> tuple[dict[str, float], dict[str, Any]]:
        """While running: event_id -> confirm time of the events confirmed since the last
        sample (when clocked), and the time spent per step so far (cumulative)."""
        self._pipe.send("sample")
        confirmed_at, steps = self._expect("sample", timeout)
        return confirmed_at, steps

    def stop(self, timeout: float = 60) -> dict[str, float]:
        """Stop the relay as SIGTERM would; returns event_id -> confirm time (when clocked).
        ``steps`` then holds the time spent claiming, publishing and settling."""
        if self._process.is_alive():
            self._pipe.send("stop")
            self.confirmed_at, self.steps = self._expect("stopped", timeout)
        self._process.join(10)
        return self.confirmed_at

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
