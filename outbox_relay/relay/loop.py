"""The relay core: claim pending outbox rows, publish them with confirms, mark them sent.

Broker-agnostic: it talks to a :class:`~outbox_relay.publishers.base.Publisher` and never imports
a broker client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential,
)

from outbox_relay.cdc.source import CdcSource
from outbox_relay.db.store import OutboxStore
from outbox_relay.errors import BrokerUnavailableError, DatabaseUnavailableError
from outbox_relay.messages import Failure, OutboxMessage, PublishResult
from outbox_relay.publishers.base import Publisher
from outbox_relay.relay.hooks import CompositeHooks, RelayHooks
from outbox_relay.relay.ordering import AggregateChains, LinkedBatch, publish_in_order
from outbox_relay.relay.settings import Mode, RelaySettings
from outbox_relay.relay.wakeup import Waker

log = logging.getLogger(__name__)

TRANSIENT = (DatabaseUnavailableError, BrokerUnavailableError)
HOUSEKEEPING_EVERY = 60.0


@dataclass(slots=True)
class _Flight:
    """A claimed batch being published and settled on its lane."""

    task: asyncio.Task[bool]
    linked: LinkedBatch
    row_ids: list[int]


class Relay:
    def __init__(
        self, settings: RelaySettings, publisher: Publisher, hooks: RelayHooks | None = None
    ) -> None:
        self._settings = settings
        self._publisher = publisher
        # Tracing and metrics; None (the default) costs nothing per batch.
        self._hooks = CompositeHooks([hooks]) if hooks is not None else None
        # time.monotonic() of the loop's last sign of life, for the health endpoint's /livez.
        self.heartbeat = time.monotonic()
        # Two connections ("lanes"): while one batch is being published, the next one is
        # claimed on the other, and the previous one settles; see _pump. The first lane holds
        # the leadership lock, does the idle-time work and is the one the other modules read.
        self._store = OutboxStore(settings)
        # In cdc mode the WAL feeds the first lane only; a second connection would sit idle.
        self._lanes = (
            (self._store,)
            if settings.mode is Mode.CDC
            else (self._store, OutboxStore(settings, role="lane2"))
        )
        # At most --batch-size rows are in flight (claimed, not yet settled) so that a relay
        # killed at any moment publishes at most that many twice: two halves, one per lane.
        self._max_in_flight = min(len(self._lanes), settings.batch_size)
        self._claim_size = settings.batch_size // self._max_in_flight
        self._waker = (
            Waker(
                settings.database_url,
                self._store.queries.notify_channel,
                self._store.queries.application_name,
            )
            if settings.mode is Mode.NOTIFY
            else None
        )
        # --mode cdc: the WAL says which rows to publish; publishing and settling stay here.
        self._cdc = CdcSource(settings, self._store) if settings.mode is Mode.CDC else None
        self._stop = asyncio.Event()
        self._listening = False
        # Writers in progress when producers were asked to ring; see _await_unringing_writers.
        self._unringing: list[int] = []
        self.leading = False

    def is_ready(self) -> bool:
        """Connected to PostgreSQL and to the broker (a standby is ready too: it can take over)."""
        return self._store.connected and self._publisher.is_healthy()

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
                if self._cdc is not None:
                    await self._cdc.pump(
                        self._publish_cdc, self._drain_table, self._stop, self._tick
                    )
                else:
                    await self._pump()
            except TRANSIENT as exc:
                log.warning("disconnected: %s", exc)
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
                for lane in self._lanes:
                    await lane.connect()
                if self._waker is not None:
                    await self._waker.connect()
                await self._publisher.connect()

    async def _disconnect(self) -> None:
        if self._cdc is not None:
            await self._cdc.close()
        if self._listening:
            with contextlib.suppress(*TRANSIENT):
                await self._store.stop_listening()
            self._listening = False
        for lane in self._lanes:
            await lane.rollback()
            await lane.close()
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
                log.info(
                    "leading: publishing the outbox", extra={"schema": self._settings.schema_name}
                )
                return
            if not said_standby:
                log.info("standby: another relay is publishing this outbox; waiting to take over")
                said_standby = True
            await self._sleep(self._settings.poll_interval)

    # -- the loop ---------------------------------------------------------------------------

    async def _pump(self) -> None:
        """Claim, publish and settle batches, two at a time.

        Batch k+1 is claimed on the other lane (passing over batch k's row ids) while batch k is
        published, and goes on the wire at once, behind k: an event waits only for the previous
        event of its aggregate still in flight (see outbox_relay.relay.ordering), so the broker always
        has work. A lane claims again once its previous batch has settled. If a batch was not all
        confirmed, everything in flight settles before the next claim, which then sees the failed
        events backing off in the table and holds their aggregates back.
        """
        in_flight: deque[_Flight] = deque()
        chains = AggregateChains()
        turn = 0
        next_housekeeping = time.monotonic()
        try:
            while not self._stop.is_set():
                self._tick()
                # This lane's previous batch must have settled before it claims again.
                if len(in_flight) == self._max_in_flight and not await self._land(
                    in_flight.popleft(), chains
                ):
                    await self._drain(in_flight, chains)
                if not in_flight and time.monotonic() >= next_housekeeping:
                    await self._store.housekeeping()
                    next_housekeeping = time.monotonic() + HOUSEKEEPING_EVERY
                store = self._lanes[turn]
                claimed_at = time.perf_counter()
                # Pass over the rows of the batches in flight on the other lanes.
                batch = await store.claim(
                    self._claim_size, in_flight=[i for f in in_flight for i in f.row_ids]
                )
                if batch:
                    if self._hooks is not None:
                        self._hooks.after_claim(batch, time.perf_counter() - claimed_at)
                    if self._listening:
                        await store.stop_listening(commit=False)  # commits with the batch
                        self._listening = False
                    linked = chains.link(batch)
                    task = asyncio.ensure_future(self._relay_batch(store, linked))
                    in_flight.append(_Flight(task, linked, [message.id for message in batch]))
                    turn = (turn + 1) % len(self._lanes)
                    continue
                await store.commit()
                if in_flight:
                    await self._drain(in_flight, chains)  # then look again with nothing in flight
                    continue
                await self._when_empty()
            await self._drain(in_flight, chains)  # stopping: finish what is in flight
        finally:
            for flight in in_flight:
                flight.task.cancel()
            await asyncio.gather(*(f.task for f in in_flight), return_exceptions=True)
            for flight in in_flight:
                chains.forget(flight.linked)

    @staticmethod
    async def _land(flight: _Flight, chains: AggregateChains) -> bool:
        """Collect a batch in flight once it has settled; True when all of it was confirmed.

        Its links are dropped only now, not when it settled: the other lane's claim may have
        started before that settle committed, and then links behind it in id order."""
        try:
            return await flight.task
        finally:
            chains.forget(flight.linked)

    @classmethod
    async def _drain(cls, in_flight: deque[_Flight], chains: AggregateChains) -> None:
        while in_flight:
            await cls._land(in_flight.popleft(), chains)

    async def _when_empty(self) -> None:
        """Nothing to claim: ask producers to ring, then wait for them or the poll interval."""
        if self._waker is not None and not self._listening:
            # Ask producers to ring, then look once more: a row committed before they could
            # see the request would otherwise wait for the polling fallback.
            self._unringing = await self._store.start_listening(self._listening_ttl)
            self._listening = True
            return
        if self._unringing:
            await self._await_unringing_writers()
            return
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

    async def _relay_batch(self, store: OutboxStore, batch: LinkedBatch) -> bool:
        """Publish and settle one claimed batch; True when the broker confirmed all of it."""
        started = time.perf_counter()
        try:
            try:
                results = await publish_in_order(batch.links, self._publish_wave)
            except BaseException:
                await store.rollback()
                raise
            sent = [message.id for message, result in results if result.confirmed]
            failures = [
                Failure(message.id, result.reason or "not confirmed", result.permanent)
                for message, result in results
                if not result.confirmed
            ]
            settled_at = time.perf_counter()
            dead = await store.settle(sent, failures)
        finally:
            batch.close()
        if self._hooks is not None:
            self._hooks.after_settle(sent, failures, dead, time.perf_counter() - settled_at)
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
                "batch_size": len(batch.links),
                "sent": len(sent),
                "failed": len(failures),
                "held_back": len(batch.links) - len(results),
                "seconds": round(time.perf_counter() - started, 4),
            },
        )
        return len(sent) == len(batch.links)

    async def _publish_wave(self, wave: list[OutboxMessage]) -> list[PublishResult]:
        hooks = self._hooks
        if hooks is None:
            return await self._publisher.publish_batch(wave)
        # The hooks may return copies carrying a new trace context; those are what is sent.
        wave[:] = hooks.before_publish(wave)
        started = time.perf_counter()
        try:
            outcomes = await self._publisher.publish_batch(wave)
        except BaseException as exc:
            hooks.on_publish_error(wave, exc)
            raise
        hooks.after_publish(wave, outcomes, time.perf_counter() - started)
        return outcomes

    # -- CDC mode: the same publish-and-settle path, fed by outbox_relay.cdc.source ----------------

    async def _publish_cdc(self, batch: Sequence[OutboxMessage]) -> bool:
        """Publish rows the CDC source claimed on the first lane, and settle them; True when
        the broker confirmed all of them."""
        return await self._relay_one(batch)

    async def _drain_table(self) -> None:
        """The table path in CDC mode: retries, held-back events, rows committed while no slot
        streamed. Claims until nothing is due."""
        while not self._stop.is_set():
            self._tick()
            batch = await self._store.claim(self._settings.batch_size)
            if not batch:
                break
            await self._relay_one(batch)
        await self._store.commit()

    async def _relay_one(self, batch: Sequence[OutboxMessage]) -> bool:
        """Publish and settle a batch on the first lane with nothing else in flight."""
        return await self._relay_batch(self._store, AggregateChains().link(batch))

    def _tick(self) -> None:
        """A sign of life for /livez, and a lost broker noticed even while idle, so the relay
        reconnects (and /readyz recovers) without waiting for the next event to fail."""
        self.heartbeat = time.monotonic()
        if not self._publisher.is_healthy():
            raise BrokerUnavailableError(f"lost the {self._publisher.name} connection")

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when asked to stop."""
        self.heartbeat = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
