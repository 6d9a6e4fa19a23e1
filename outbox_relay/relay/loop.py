"""The relay core: claim pending outbox rows, publish them with confirms, mark them sent.

Broker-agnostic (it talks to a :class:`~outbox_relay.publishers.base.Publisher`) and
source-agnostic (notify, poll and cdc are :class:`~outbox_relay.relay.sources.Source` objects):
the loop has no mode branches.

Claim and settle happen in one transaction per batch, on one of a few connections ("lanes"):
while batches are published on the window, the next is claimed on a free lane and finished ones
settle on theirs. A relay killed at any moment leaves its claimed rows pending; they are simply
published again, so duplicates are bounded by the rows in flight (--batch-size).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from outbox_relay.db.archive import ArchivePolicy, SentArchive
from outbox_relay.db.pool import DatabaseHub
from outbox_relay.db.store import OutboxStore, Share
from outbox_relay.errors import (
    BrokerRejectedMessageError,
    BrokerUnavailableError,
    DatabaseUnavailableError,
)
from outbox_relay.messages import OutboxMessage, PublishResult
from outbox_relay.publishers.base import OnResult, Publisher
from outbox_relay.relay.hooks import CompositeHooks, RelayHooks
from outbox_relay.relay.leases import Leases
from outbox_relay.relay.settings import Mode, OnSent, RelaySettings
from outbox_relay.relay.sources import Source, TableSource
from outbox_relay.relay.upkeep import StorageUpkeep
from outbox_relay.relay.window import Batch, Window

log = logging.getLogger(__name__)

TRANSIENT = (DatabaseUnavailableError, BrokerUnavailableError)
HOUSEKEEPING_EVERY = 60.0
HOUSEKEEPING_SHARING = 20  # outboxes sharing a database before each prunes less often
# Seconds a relay that found work counts as busy for fair claim sizes, and the least a busy
# relay claims at once however many share the process.
FAIRNESS_WINDOW = 2.0
MIN_FAIR_CLAIM = 50
# Connections claiming and settling batches: while one batch settles, the next is claimed, and
# at least one more is on the wire, so the broker always has work.
LANES = 3
# Remembered suspects and strikes beyond this many are forgotten (oldest first).
MEMORY = 100_000
# In notify mode the idle poll is only a fallback (wake-ups come by NOTIFY): with many outboxes
# on one database it runs this many seconds per outbox sharing the connections, at least every
# --poll-interval and at most every SLOWEST_FALLBACK_POLL, so 200 idle tenants cost a few
# statements a second, not hundreds.
FALLBACK_POLL_SHARE = 0.05
SLOWEST_FALLBACK_POLL = 10.0


class Relay:
    def __init__(
        self,
        settings: RelaySettings,
        publisher: Publisher,
        hooks: RelayHooks | None = None,
        source: Source | None = None,
        hub: DatabaseHub | None = None,
    ) -> None:
        self._settings = settings
        # The connections to the outbox's database, shared with the other outboxes there when
        # one process relays several (cli/serve.py); a relay alone has a hub of its own.
        self._own_hub = hub is None
        self._hub = hub or DatabaseHub(
            settings.database_url, settings.max_db_connections, settings.schema_name
        )
        self._publisher = publisher
        # Tracing and metrics; None (the default) costs nothing per batch.
        self._hooks = CompositeHooks([hooks]) if hooks is not None else None
        # time.monotonic() of the loop's last sign of life, for the health endpoint's /livez.
        self.heartbeat = time.monotonic()
        # Why the relay is reconnecting (a link found dead), until it is connected again: unready
        # at once, not only once closing the dead connections has given up on them.
        self._link_down: str | None = None
        # --on-sent keep: sent rows move to partitions of outbox_sent (db/archive.py).
        archive = (
            SentArchive(ArchivePolicy.for_retention(settings.retention))
            if settings.on_sent is OnSent.KEEP
            else None
        )
        self._lanes = [
            OutboxStore(settings, self._hub.lanes, role=f"lane{n}" if n else "", archive=archive)
            for n in range(LANES)
        ]
        self._store = self._lanes[0]
        self._upkeep = StorageUpkeep(settings, self._hub, self._store.queries, archive)
        self._hub.lanes.reserve(LANES)
        # At most --batch-size rows are in flight (claimed, not yet settled), so that a relay
        # killed at any moment publishes at most that many twice.
        self._claim_size = max(1, settings.batch_size // LANES)
        self._source = source or _default_source(settings, self._store, self._hub)
        self._stop = asyncio.Event()
        self._stopping: asyncio.Future[Any] | None = None  # self._stop.wait(), waited on often
        self._leases = Leases(
            settings,
            self._hub.coordinator,
            scope="cdc-shard" if settings.mode is Mode.CDC else "partition",
            on_change=self._rebalanced,
        )
        # What a broker that closed the connection over a message taught (see window.py):
        # events to send alone, attempts to charge, and consecutive losses per unconfirmed event.
        self._suspects: set[str] = set()
        self._charges: dict[str, str] = {}
        self._strikes: dict[str, int] = {}
        # Whether rows may wait for a retry (a failure settled, partitions gained, or not known
        # since start): only then does an idle relay ask when the next retry is due.
        self._retries_possible = True
        self._last_share: Share | None = None

    @property
    def owned(self) -> frozenset[int]:
        """The partitions (--mode cdc: shards) this relay holds leases on."""
        return self._leases.owned

    @property
    def leading(self) -> bool:
        """Publishing: a member of the outbox's relays holding at least one lease."""
        return bool(self._leases.owned)

    def is_ready(self) -> bool:
        """Connected to PostgreSQL and to the broker (a relay holding no lease yet is ready
        too: it takes its share as soon as the others hand it over)."""
        return self._link_down is None and self._hub.connected and self._publisher.is_healthy()

    def stop(self) -> None:
        """Stop claiming; the batches in flight are finished (or released) and run() returns."""
        self._stop.set()

    async def run(self) -> None:
        """Relay until stop() is called, reconnecting to PostgreSQL and the broker on its own."""
        try:
            await self._relay()
        finally:
            if self._stopping is not None:
                self._stopping.cancel()
            self._hub.lanes.unreserve(LANES)
            if self._own_hub:
                await self._hub.close()

    async def _relay(self) -> None:
        quick_failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                # Nothing is in flight until the pump runs: a stop ends these steps at once,
                # even while a silent server keeps a handshake waiting.
                if not await self._unless_stopped(self._start()):
                    break
                await self._pump_while_leased()
                # Stopped with everything in flight settled: hand the partitions over at once.
                await self._leases.leave()
            except TRANSIENT as exc:
                self._link_down = str(exc)
                log.warning("disconnected: %s", exc)
                if isinstance(exc, DatabaseUnavailableError):
                    # The other connections to the database may wait on the same dead link.
                    self._hub.lanes.reset()
                # A link that fails right after connecting must not turn into a busy loop; a
                # failure that taught which message is to blame is progress, though.
                if time.monotonic() - started >= 30 or getattr(exc, "attributed", False):
                    quick_failures = 0
                else:
                    quick_failures += 1
                await self._disconnect()
                await self._sleep(min(10.0, 0.1 * 2**quick_failures))
            finally:
                await self._disconnect()

    async def _start(self) -> None:
        await self._connect()
        await self._leases.join(self._hub.lanes.pids())
        await self._source.open(self._store, self._stop)

    async def _unless_stopped(self, step: Coroutine[Any, Any, None]) -> bool:
        """Run ``step``; False (and ``step`` cancelled) if the relay is stopped first."""
        task = asyncio.ensure_future(step)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, stopped, return_exceptions=True)
        if task.cancelled():
            return False
        task.result()
        return True

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
            # At most 5 s between attempts: a link that comes back is used within about that
            # long (plus the connect itself), well inside the 10 s publishing may pause.
            wait=wait_exponential(multiplier=0.2, max=5),
            stop=lambda _state: self._stop.is_set(),
            sleep=self._sleep,
            before_sleep=log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._disconnect()
                await self._hub.open(listen=self._settings.mode is Mode.NOTIFY)
                await self._store.check_schema()
                await self._publisher.connect()
        self._link_down = None

    async def _disconnect(self) -> None:
        await self._upkeep.stop()
        await self._source.close()
        await self._leases.close()
        for lane in self._lanes:
            await lane.rollback()
        await self._publisher.close()

    def _rebalanced(self, owned: int, gained: int, lost: int) -> None:
        if gained:
            self._retries_possible = True
            self._source.nudge()
        if self._hooks is not None:
            self._hooks.after_rebalance(owned, gained, lost)

    def _share(self) -> Share:
        """What this relay may claim; the same object (its parameters built once) while its
        leases do not change."""
        leases, last = self._leases, self._last_share
        partitions = tuple(sorted(leases.owned))
        if last is None or last.partitions != partitions or last.count != leases.count:
            last = self._last_share = Share(
                relay=leases.relay,
                partitions=partitions,
                count=leases.count,
                scope="cdc-shard" if self._settings.mode is Mode.CDC else "partition",
            )
        return last

    # -- the loop ---------------------------------------------------------------------------

    async def _pump_while_leased(self) -> None:
        """Run the loop until it returns, or until the leases are lost: then it is abandoned
        at once, even mid-claim on a link that hangs, so nothing more is sent (fencing)."""
        pump = asyncio.ensure_future(self._pump())
        lost = asyncio.ensure_future(self._leases.lost.wait())
        try:
            await asyncio.wait({pump, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if self._leases.lost.is_set():
                # Unready now: cancelling the pump's queries below can wait on the dead link
                # (psycopg's cancel request and its timeouts, about 10 s more).
                self._link_down = "lost the outbox leases (PostgreSQL did not answer)"
            if not pump.done():
                pump.cancel()
            await asyncio.gather(pump, lost, return_exceptions=True)
        if not pump.cancelled():
            pump.result()
        self._leases.check()

    async def _pump(self) -> None:
        """Claim on free lanes, publish on the window, settle finished batches; see the module
        docstring. Returns when asked to stop (after finishing what is in flight)."""
        free: list[OutboxStore] = list(self._lanes)
        settling: set[asyncio.Task[None]] = set()
        window = Window(
            self._publish_wave,
            lambda batch: settling.add(self._settle_soon(batch, window, free, settling)),
            check=self._message_problem,
            suspects=self._suspects,
            charges=self._charges,
        )
        next_housekeeping = time.monotonic()
        try:
            while not self._stop.is_set():
                window.watch()
                self._tick(window, settling)
                self._upkeep.poke()
                if free:
                    await self._source.housekeeping(free[-1])
                if len(free) == len(self._lanes) and time.monotonic() >= next_housekeeping:
                    await free[-1].housekeeping()
                    # Many outboxes on one database: each prunes less often (it is cheap to
                    # let a few more minutes of old rows wait).
                    sharing = self._hub.coordinator.members
                    every = HOUSEKEEPING_EVERY * max(1.0, sharing / HOUSEKEEPING_SHARING)
                    next_housekeeping = time.monotonic() + every
                # While a batch that held events back is committing, a claim would take those
                # rows again and hold them again, becoming a holder itself: with several lanes
                # the chain would never see all its holders committed (a livelock).
                if free and not window.holders_settling():
                    lane = free.pop()
                    window.before_claim()
                    claimed_at = time.perf_counter()
                    batch = await self._source.claim(
                        lane, self._fair_claim_size(), window.in_flight_ids(), self._share()
                    )
                    if batch is not None:
                        self._hub.activity.busy(self)
                        batch.lane = lane
                        if self._hooks is not None:
                            self._hooks.after_claim(
                                batch.messages, time.perf_counter() - claimed_at
                            )
                        window.add(batch)
                        continue
                    await lane.commit()
                    free.append(lane)
                if window.batches or settling or len(free) < len(self._lanes):
                    # The source is worth watching only when a claim could follow (a lane is
                    # free): otherwise rows it has ready would only spin this loop.
                    claimable = free and not window.holders_settling()
                    readable = self._source.readable() if claimable else None
                    if readable is None:
                        await self._wait_for(window.changed())
                    else:
                        await self._wait_for(window.changed(), readable)
                    continue
                idle = free[-1]
                timeout = await self._idle_timeout(idle)
                await self._wait_for(self._source.wait(idle, timeout), seconds=timeout)
            # Stopping: finish what is in flight.
            while window.batches or settling:
                window.watch()
                self._tick(window, settling)
                self._upkeep.poke()
                await self._wait_for(window.changed())
        except TRANSIENT as exc:
            if window.error is exc:
                self._learn(exc, window)
            raise
        finally:
            await window.close()
            for task in settling:
                task.cancel()
            await asyncio.gather(*settling, return_exceptions=True)

    def _fair_claim_size(self) -> int:
        """A third of --batch-size, or, while other outboxes of the process have work too, a
        share of it: the broker confirms in arrival order, so a backlog with thousands of events
        on the wire would make every other outbox's events wait behind them."""
        sharing = self._hub.activity.relays(within=FAIRNESS_WINDOW)
        return max(MIN_FAIR_CLAIM, self._claim_size // sharing)

    def _tick(self, window: Window, settling: set[asyncio.Task[None]]) -> None:
        """A sign of life for /livez; a failed publish or settle ends the loop; a lost broker is
        noticed even while idle, so the relay reconnects (and /readyz recovers) at once."""
        self.heartbeat = time.monotonic()
        if window.error is not None:
            raise window.error
        # Stop publishing as soon as the leases may be lapsing (fencing; relay/leases.py).
        self._leases.check()
        for task in settling:
            if task.done() and not task.cancelled() and task.exception() is not None:
                error = task.exception()
                assert error is not None
                raise error
        if not self._publisher.is_healthy():
            raise BrokerUnavailableError(f"lost the {self._publisher.name} connection")

    async def _wait_for(self, *waits: Awaitable[None], seconds: float | None = None) -> None:
        """Until one of ``waits`` is done, the relay stops, or ``seconds`` (by default the poll
        interval) passed. Futures are waited on as they are (no task each turn); coroutines run
        as tasks, cancelled after."""
        stopping = self._stopping
        if (
            stopping is None
            or stopping.done()
            or stopping.get_loop() is not asyncio.get_running_loop()
        ):
            stopping = self._stopping = asyncio.ensure_future(self._stop.wait())
        started: list[asyncio.Future[Any]] = []
        pending: list[asyncio.Future[Any]] = [stopping]
        for wait in waits:
            future = asyncio.ensure_future(wait)
            pending.append(future)
            if future is not wait:  # a task of our own (a coroutine): cancelled after
                started.append(future)
        try:
            await asyncio.wait(
                pending,
                timeout=seconds or self._settings.poll_interval,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for task in started:
                task.cancel()

    async def _idle_timeout(self, store: OutboxStore) -> float:
        """Until the next poll, or sooner when a failed event's retry is due."""
        timeout = self._settings.poll_interval
        if self._settings.mode is Mode.NOTIFY:
            sharing = self._hub.coordinator.members
            timeout = max(timeout, min(SLOWEST_FALLBACK_POLL, sharing * FALLBACK_POLL_SHARE))
        if self._retries_possible:
            retry_in = await store.next_retry_in()
            self._retries_possible = retry_in is not None
            if retry_in is not None:
                timeout = min(timeout, retry_in + 0.01)
        return timeout

    def _settle_soon(
        self,
        batch: Batch,
        window: Window,
        free: list[OutboxStore],
        settling: set[asyncio.Task[None]],
    ) -> asyncio.Task[None]:
        async def settle() -> None:
            lane: OutboxStore = batch.lane
            started = time.perf_counter()
            dead = await lane.settle(batch.sent, batch.failures)
            if batch.failures:
                self._retries_possible = True
            window.settled(batch)
            self._source.settled(batch)
            free.append(lane)
            self._report(batch, dead, time.perf_counter() - started)

        def done(task: asyncio.Task[None]) -> None:
            # A failed settle stays in ``settling``: the loop raises its error (reconnect).
            if not task.cancelled() and task.exception() is None:
                settling.discard(task)
            window.notify()

        task = asyncio.ensure_future(settle())
        task.add_done_callback(done)
        return task

    def _report(self, batch: Batch, dead: int, seconds: float) -> None:
        if self._hooks is not None:
            self._hooks.after_settle(batch.sent, batch.failures, dead, seconds)
        by_id = {m.id: m for m in batch.messages} if batch.failures else {}
        for failure in batch.failures:
            message = by_id[failure.id]
            log.warning(
                "publish failed: %s",
                failure.reason,
                extra={
                    "event_id": message.event_id,
                    "event_type": message.event_type,
                    "aggregate_id": message.aggregate_id,
                    "attempt": message.attempts + 1,
                    "permanent": failure.permanent,
                },
            )
        if dead:
            log.error("dead-lettered %d event(s): see `outbox-relay dead list`", dead)
        log.debug(
            "batch settled",
            extra={
                "batch_size": len(batch.messages),
                "sent": len(batch.sent),
                "failed": len(batch.failures),
                "held_back": batch.held,
                "seconds": round(time.monotonic() - batch.claimed_at, 4),
            },
        )

    # -- publishing -------------------------------------------------------------------------

    def _message_problem(self, message: OutboxMessage) -> str | None:
        """Why ``message`` can never be published: over the size limit (the setting's, or the
        broker's own) or something the broker's protocol cannot carry."""
        limit = self._publisher.max_message_bytes
        size = message.size or len(message.payload)
        if size > limit:
            return (
                f"message of {size} bytes (payload and headers) exceeds the {limit}-byte limit "
                "(--max-message-bytes or the broker's)"
            )
        return self._publisher.message_problem(message)

    async def _publish_wave(
        self, wave: Sequence[OutboxMessage], on_result: OnResult
    ) -> Sequence[PublishResult]:
        hooks = self._hooks
        if hooks is None:
            return await self._publisher.publish_batch(wave, on_result)
        # The hooks may return copies carrying a new trace context; those are what is sent.
        sent = hooks.before_publish(wave)
        started = time.perf_counter()
        try:
            outcomes = await self._publisher.publish_batch(sent, on_result)
        except BaseException as exc:
            hooks.on_publish_error(sent, exc)
            raise
        hooks.after_publish(sent, outcomes, time.perf_counter() - started)
        return outcomes

    def _learn(self, exc: BaseException, window: Window) -> None:
        """After a lost connection: which unconfirmed events may have caused it (window.py)."""
        unconfirmed = window.unconfirmed()
        if not unconfirmed:
            self._strikes.clear()
            return
        solo = window.failed_solo
        if solo is not None:
            # It was alone on the wire: the loss is its doing.
            self._charges[solo.event_id] = (
                f"the broker closed the connection while this event was the only one on the "
                f"wire: {exc}"
            )
            exc.attributed = True  # type: ignore[attr-defined]  # read by run()
            log.warning(
                "the broker closed the connection over one event; charging it an attempt",
                extra={"event_id": solo.event_id, "event_type": solo.event_type},
            )
            return
        ids = [m.event_id for m in unconfirmed]
        if isinstance(exc, BrokerRejectedMessageError):
            suspects = ids
        else:
            # An ordinary loss: the same events unconfirmed at two losses in a row are suspects.
            strikes = {event_id: self._strikes.get(event_id, 0) + 1 for event_id in ids}
            self._strikes = strikes
            suspects = [event_id for event_id, count in strikes.items() if count >= 2]
        if suspects:
            self._suspects.update(suspects)
            exc.attributed = True  # type: ignore[attr-defined]  # read by run()
            log.warning(
                "the broker closed the connection with %d event(s) unconfirmed: sending each "
                "alone to find the one to blame",
                len(suspects),
            )
        _forget_oldest(self._suspects)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when asked to stop."""
        self.heartbeat = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)


def _default_source(settings: RelaySettings, store: OutboxStore, hub: DatabaseHub) -> Source:
    if settings.mode is Mode.CDC:
        from outbox_relay.cdc.source import CdcSource

        return CdcSource(settings)
    return TableSource(settings, hub.listener, store.queries.notify_channel, hub.coordinator)


def _forget_oldest(items: set[str]) -> None:
    while len(items) > MEMORY:
        items.pop()
