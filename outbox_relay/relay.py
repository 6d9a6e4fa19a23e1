"""The relay core: claim pending outbox rows, publish them with confirms, mark them sent.

Broker-agnostic: it talks to a :class:`~outbox_relay.publishers.base.Publisher` and never imports
a broker client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential,
)

from outbox_relay.errors import BrokerUnavailableError, DatabaseUnavailableError
from outbox_relay.messages import OutboxMessage, PublishResult
from outbox_relay.ordering import plan_waves
from outbox_relay.publishers.base import Publisher
from outbox_relay.settings import Mode, RelaySettings
from outbox_relay.store import Failure, OutboxStore
from outbox_relay.wakeup import Waker

log = logging.getLogger(__name__)

TRANSIENT = (DatabaseUnavailableError, BrokerUnavailableError)
HOUSEKEEPING_EVERY = 60.0


class Relay:
    def __init__(self, settings: RelaySettings, publisher: Publisher) -> None:
        self._settings = settings
        self._publisher = publisher
        self._store = OutboxStore(settings)
        self._waker = (
            Waker(
                settings.database_url,
                self._store.queries.notify_channel,
                self._store.queries.application_name,
            )
            if settings.mode is Mode.NOTIFY
            else None
        )
        self._stop = asyncio.Event()
        self._listening = False
        # Writers in progress when producers were asked to ring; see _await_unringing_writers.
        self._unringing: list[int] = []
        self.leading = False

    def stop(self) -> None:
        """Stop claiming; the batch in flight is finished (or released) and run() returns."""
        self._stop.set()

    async def run(self) -> None:
        """Relay until stop() is called, reconnecting to PostgreSQL and the broker on its own."""
        quick_failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await self._connect()
                await self._lead()
                await self._pump()
            except TRANSIENT as exc:
                log.warning("disconnected: %s", exc, extra={"error": str(exc)})
                # A link that fails right after connecting must not turn into a busy loop.
                quick_failures = quick_failures + 1 if time.monotonic() - started < 30 else 0
                await self._disconnect()
                await self._sleep(min(10.0, 0.1 * 2**quick_failures))
            finally:
                await self._disconnect()

    # -- connection management -------------------------------------------------------------

    async def _connect(self) -> None:
        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0
            log.warning(
                "cannot connect, retrying in %.1fs: %s",
                delay,
                exc,
                extra={"attempt": state.attempt_number, "retry_in": round(delay, 2)},
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TRANSIENT),
            wait=wait_exponential(multiplier=0.2, max=10),
            stop=lambda _state: self._stop.is_set(),
            sleep=self._sleep,
            before_sleep=log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._disconnect()
                await self._store.connect()
                if self._waker is not None:
                    await self._waker.connect()
                await self._publisher.connect()

    async def _disconnect(self) -> None:
        if self._listening:
            with contextlib.suppress(*TRANSIENT):
                await self._store.stop_listening()
            self._listening = False
        await self._store.rollback()
        await self._store.close()
        if self._waker is not None:
            await self._waker.close()
        await self._publisher.close()
        self.leading = False

    async def _lead(self) -> None:
        """Become the one relay publishing this outbox, or wait as a standby until it frees."""
        said_standby = False
        while not self._stop.is_set():
            if await self._store.try_lead():
                self.leading = True
                log.info("leading: publishing the outbox", extra={"schema": self._settings.schema})
                return
            if not said_standby:
                log.info("standby: another relay is publishing this outbox; waiting to take over")
                said_standby = True
            await self._sleep(self._settings.poll_interval)

    # -- the loop ---------------------------------------------------------------------------

    async def _pump(self) -> None:
        store = self._store
        next_housekeeping = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() >= next_housekeeping:
                await store.housekeeping()
                next_housekeeping = time.monotonic() + HOUSEKEEPING_EVERY
            batch = await store.claim(self._settings.batch_size)
            if batch:
                await self._relay_batch(batch)
                if self._listening:
                    await store.stop_listening()
                    self._listening = False
                continue
            await store.commit()
            if self._waker is not None and not self._listening:
                # Ask producers to ring, then look once more: a row committed before they could
                # see the request would otherwise wait for the polling fallback.
                self._unringing = await store.start_listening(self._listening_ttl)
                self._listening = True
                continue
            if self._unringing:
                await self._await_unringing_writers()
                continue
            await self._idle()

    @property
    def _listening_ttl(self) -> float:
        # Refreshed every poll interval; lapses soon after a relay dies so producers stop ringing.
        return self._settings.poll_interval * 3 + 5

    async def _await_unringing_writers(self) -> None:
        """A writer whose trigger ran just before the relay asked for NOTIFY, and that committed
        just after the relay's last look, would otherwise wait for the polling fallback. Wait for
        the writers that were in progress then to end (usually a millisecond), then look again.
        A notification or the poll interval ends the wait too."""
        deadline = time.monotonic() + self._settings.poll_interval
        delay = 0.001
        while not self._stop.is_set() and time.monotonic() < deadline:
            if await self._store.all_ended(self._unringing):
                break
            assert self._waker is not None
            if await self._waker.wait(delay):
                break
            delay = min(delay * 2, 0.05)
        self._unringing = []

    async def _idle(self) -> None:
        timeout = self._settings.poll_interval
        retry_in = await self._store.next_retry_in()
        if retry_in is not None:
            timeout = min(timeout, retry_in + 0.01)
        if self._waker is None:
            await self._sleep(timeout)
            return
        waiting = asyncio.ensure_future(self._waker.wait(timeout))
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not waiting.done():
                waiting.cancel()
        woke = waiting.done() and not waiting.cancelled() and waiting.result()
        if not woke and not self._stop.is_set():
            await self._store.start_listening(self._listening_ttl)

    async def _relay_batch(self, batch: Sequence[OutboxMessage]) -> None:
        started = time.perf_counter()
        try:
            results = await self._publish_in_order(batch)
        except BaseException:
            await self._store.rollback()
            raise
        sent = [message.id for message, result in results if result.confirmed]
        failures = [
            Failure(message.id, result.reason or "not confirmed", result.permanent)
            for message, result in results
            if not result.confirmed
        ]
        dead = await self._store.settle(sent, failures)
        for message, result in results:
            if not result.confirmed:
                log.warning(
                    "publish failed: %s",
                    result.reason,
                    extra={
                        "event_id": message.event_id,
                        "event_type": message.event_type,
                        "aggregate_id": message.aggregate_id,
                        "attempt": message.attempts + 1,
                        "permanent": result.permanent,
                    },
                )
        if dead:
            log.error("dead-lettered %d event(s): see `outbox-relay dead list`", dead)
        log.debug(
            "batch published",
            extra={
                "batch_size": len(batch),
                "sent": len(sent),
                "failed": len(failures),
                "seconds": round(time.perf_counter() - started, 4),
            },
        )

    async def _publish_in_order(
        self, batch: Sequence[OutboxMessage]
    ) -> list[tuple[OutboxMessage, PublishResult]]:
        results: list[tuple[OutboxMessage, PublishResult]] = []
        failed_aggregates: set[str] = set()
        for wave in plan_waves(batch):
            sendable = [m for m in wave if m.aggregate_id not in failed_aggregates]
            if not sendable:
                continue
            outcomes = await self._publisher.publish_batch(sendable)
            for message, result in zip(sendable, outcomes, strict=True):
                if not result.confirmed and message.aggregate_id is not None:
                    failed_aggregates.add(message.aggregate_id)
                results.append((message, result))
        return results

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
