"""Run a real Relay in-process: a background thread with its own asyncio loop.

Tests stay synchronous (psycopg, pika's BlockingConnection) while the relay runs exactly as
``outbox-relay serve`` runs it, with a real publisher against the real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg

from outbox_relay.publishers import create_publisher
from outbox_relay.relay.hooks import RelayHooks
from outbox_relay.relay.loop import Relay
from outbox_relay.relay.settings import Mode, RelaySettings
from tests.conftest import RabbitQueue, wait_until


def relay_settings(
    database_url: str, broker_url: str | None = None, exchange: str | None = None, **overrides: Any
) -> RelaySettings:
    """Settings tuned for tests: short poll interval and quick retries unless overridden.
    ``exchange`` is RabbitMQ's; other brokers take their own options in ``overrides``."""
    values: dict[str, Any] = {
        "database_url": database_url,
        **({"broker_url": broker_url} if broker_url is not None else {}),
        **({"exchange": exchange} if exchange is not None else {}),
        "mode": Mode.NOTIFY,
        "poll_interval": 0.2,
        "retry_backoff": 0.1,
        "retry_backoff_max": 1.0,
        "confirm_timeout": 10.0,
    }
    values.update(overrides)
    return RelaySettings(**values)


class RelayThread:
    """One Relay on a background thread. ``with RelayThread(settings) as relay: ...``."""

    def __init__(
        self, settings: RelaySettings, name: str = "relay", hooks: RelayHooks | None = None
    ) -> None:
        self.settings = settings
        self._hooks = hooks
        self._name = name
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._relay: Relay | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def leading(self) -> bool:
        return self._relay is not None and self._relay.leading

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> RelayThread:
        if self._thread is not None:
            raise RuntimeError("a RelayThread runs once; make another")
        self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise AssertionError("the relay thread did not start within 10s")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the relay to stop (it finishes or releases its batch), wait, re-raise its error."""
        thread, loop, relay = self._thread, self._loop, self._relay
        if thread is None:
            return
        if thread.is_alive() and loop is not None and relay is not None:
            # RuntimeError: the loop already closed, the thread is finishing.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(relay.stop)
        thread.join(timeout)
        if thread.is_alive():
            raise AssertionError(f"the relay did not stop within {timeout}s")
        if self._error is not None:
            error, self._error = self._error, None
            raise AssertionError(f"the relay failed: {error!r}") from error

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by stop(), never lost in the thread
            self._error = exc
        finally:
            self._started.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._relay = Relay(self.settings, create_publisher(self.settings.publisher), self._hooks)
        self._started.set()
        await self._relay.run()

    def __enter__(self) -> RelayThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.stop()
            return
        # The test already failed: stop quietly so its own error is the one reported.
        with contextlib.suppress(AssertionError):
            self.stop()


@dataclass(frozen=True)
class Delivery:
    """One message taken off a test queue, decoded for assertions."""

    routing_key: str
    exchange: str
    properties: Any
    body: bytes

    @property
    def event_id(self) -> str:
        return str(self.properties.message_id)

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})

    @property
    def aggregate_id(self) -> str | None:
        value = self.headers.get("aggregate_id")
        return None if value is None else str(value)

    def json(self) -> Any:
        return json.loads(self.body)


def first_deliveries(deliveries: list[Delivery]) -> list[Delivery]:
    """Each event's first delivery, in arrival order (republished copies left out)."""
    seen: set[str] = set()
    first = []
    for delivery in deliveries:
        if delivery.event_id not in seen:
            seen.add(delivery.event_id)
            first.append(delivery)
    return first


def collect(queue: RabbitQueue, count: int, timeout: float = 30.0) -> list[Delivery]:
    """Drain ``queue`` until at least ``count`` messages arrived (in queue order)."""
    got: list[Delivery] = []

    def enough() -> bool:
        got.extend(
            Delivery(method.routing_key, method.exchange, props, body)
            for method, props, body in queue.drain()
        )
        return len(got) >= count

    try:
        wait_until(enough, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{len(got)} of {count} messages arrived within {timeout}s") from exc
    return got


def drain(queue: RabbitQueue) -> list[Delivery]:
    """Whatever is in ``queue`` right now."""
    return [Delivery(m.routing_key, m.exchange, p, b) for m, p, b in queue.drain()]


def scalar(database_url: str, query: str, params: Sequence[Any] = ()) -> Any:
    """One value from a short autocommit connection (the tests' view of the outbox)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(query.encode(), params).fetchone()
    return None if row is None else row[0]


def per_aggregate(deliveries: Sequence[Delivery], key: str = "seq") -> dict[str, list[Any]]:
    """aggregate_id -> the payload field ``key`` of its messages, in arrival order."""
    order: dict[str, list[Any]] = {}
    for delivery in deliveries:
        order.setdefault(str(delivery.aggregate_id), []).append(delivery.json()[key])
    return order


def rows(database_url: str, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """All rows of a query on a short autocommit connection."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(query.encode(), params).fetchall()


def start_cli_relay(
    database_url: str, broker_url: str, exchange: str, log_path: Path, **options: str
) -> subprocess.Popen[bytes]:
    """``outbox-relay serve`` as a separate process, for tests that kill it outright."""
    env = {
        **os.environ,
        "OUTBOX_RELAY_DATABASE_URL": database_url,
        "OUTBOX_RELAY_BROKER_URL": broker_url,
        "OUTBOX_RELAY_EXCHANGE": exchange,
        **{f"OUTBOX_RELAY_{name.upper()}": value for name, value in options.items()},
    }
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [str(Path(sys.executable).with_name("outbox-relay")), "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL: no shutdown code runs, as when a host dies."""
    if process.poll() is None:
        process.kill()
    process.wait(10)
