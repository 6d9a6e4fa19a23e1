"""The window of events on the wire, in per-aggregate commit order.

Claimed rows arrive in id order, which the outbox's insert trigger makes equal to commit order
for every aggregate. Every claimed batch joins one window, and one rule keeps the order: an event
goes out the moment the previous event of its aggregate is confirmed, not when the whole wave
that carried it is. Confirms are handled as the broker sends them (one by one or as RabbitMQ's
``multiple`` acks), so the window slides instead of draining between waves: the number of
unconfirmed events stays near what the order allows, min(window, aggregates with pending events).
Events whose turn comes at the same moment go in one publish call (a *wave*).

If an event fails (nacked, returned, refused), later events of its aggregate are *held back*:
not sent, not counted as an attempt, left pending. The failure is recorded when its batch
settles; claims from then on see it in the table (the claim query skips an aggregate whose
earliest pending event is backing off), so the aggregate's chain is kept, holding back what
later claims bring, until a claim starts after that settle has committed.

Events without an aggregate have no order to keep and go at once.

Suspects. A broker that closes the connection because of one message (a frame too large, a
string its protocol forbids) fails every event on the wire with it. The relay then marks the
events that were unconfirmed as *suspects*; after reconnecting, each suspect is sent alone, with
nothing else in flight, so a connection lost again is the suspect's own doing: it is *charged*
an attempt (recorded like any failure, dead after --max-attempts) while everything else flows.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from outbox_relay.messages import Failure, OutboxMessage, PublishResult, failed

OnResult = Callable[[int, PublishResult], None]


# ``publisher.publish_batch``: sends a wave, reports each result as it arrives.
Publish = Callable[[Sequence[OutboxMessage], OnResult], Awaitable[Sequence[PublishResult]]]


@dataclass(slots=True, eq=False)
class Batch:
    """Rows claimed together on one connection: they stay locked there until settled."""

    messages: list[OutboxMessage]
    lane: Any = None  # the connection holding the rows' locks (the relay's business)
    token: Any = None  # what the source needs back when it has settled (CDC: an LSN)
    # Rows locked with the batch but left for a later claim (CDC: held back for the table path).
    # Their aggregates stay blocked until the batch has settled, like those of a failed event.
    held_back: list[OutboxMessage] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)  # row ids the broker confirmed
    failures: list[Failure] = field(default_factory=list)
    held: int = 0  # events held back behind a failed one of their aggregate
    unresolved: int = 0
    committed: bool = False  # its settle has committed: claims from now on see its outcome
    claimed_at: float = field(default_factory=time.monotonic)

    @property
    def ids(self) -> list[int]:
        return [message.id for message in self.messages]


@dataclass(slots=True, eq=False)
class _Link:
    message: OutboxMessage
    batch: Batch
    chain: _Chain | None


@dataclass(slots=True, eq=False)
class _Chain:
    """One aggregate's events in the window, in commit order."""

    in_flight: _Link | None = None
    waiting: deque[_Link] = field(default_factory=deque)
    # Once an event failed, later events are held back until the table shows the failure and
    # the held rows are pending again: until every batch in ``holders`` (the failed event's
    # and those holding events back) has settled.
    blocked: bool = False
    holders: list[Batch] = field(default_factory=list)


class Window:
    """Sends claimed batches in per-aggregate order, a confirm at a time; see the module docstring.

    ``on_batch_done(batch)`` is called once every event of a batch is resolved (confirmed,
    failed or held back), when it can be settled. A publish that raises (the connection is
    lost) ends the window: ``error`` holds the exception and ``unconfirmed()`` what was on the
    wire; a new window starts after reconnecting.
    """

    def __init__(
        self,
        publish: Publish,
        on_batch_done: Callable[[Batch], None],
        *,
        check: Callable[[OutboxMessage], str | None] = lambda _m: None,
        suspects: set[str] | None = None,
        charges: dict[str, str] | None = None,
    ) -> None:
        self._publish = publish
        self._on_batch_done = on_batch_done
        # Why a message can never be sent (too large, unencodable): dead at once.
        self._check = check
        # Event ids to send alone (see the module docstring), and the attempts they are charged.
        self.suspects = suspects if suspects is not None else set()
        self.charges = charges if charges is not None else {}
        self._chains: dict[str, _Chain] = {}
        self._batches: list[Batch] = []
        self._ready: list[_Link] = []
        self._flush_scheduled = False
        self._waves: set[asyncio.Task[None]] = set()
        self._on_wire: dict[int, _Link] = {}  # id(link) -> link, sent and not yet answered
        self._solo: _Link | None = None
        self.error: BaseException | None = None
        # The suspect that was alone on the wire when the connection was lost (window.py doc).
        self.failed_solo: OutboxMessage | None = None
        # A future rather than an Event: the relay waits on it every turn, and waiting on a
        # future creates no task (the loop turns once per confirm when events are few).
        self._changed: asyncio.Future[None] | None = None

    # -- what the relay asks -------------------------------------------------------------------

    @property
    def batches(self) -> list[Batch]:
        """Batches not yet settled, oldest first."""
        return self._batches

    def in_flight_ids(self) -> list[int]:
        """Rows of every batch not yet settled (a claim must pass over them)."""
        ids = [m.id for batch in self._batches for m in batch.messages]
        ids.extend(m.id for batch in self._batches for m in batch.held_back)
        return ids

    def unconfirmed(self) -> list[OutboxMessage]:
        """Events handed to the broker and not yet answered, in id order."""
        return sorted((link.message for link in self._on_wire.values()), key=lambda m: m.id)

    @property
    def on_wire(self) -> int:
        return len(self._on_wire)

    def watch(self) -> None:
        """Start watching for changes: call before looking at the window's state, then wait with
        changed(). (Clearing when the wait starts would lose a change made in between.)"""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()

    def changed(self) -> asyncio.Future[None]:
        """Done once a batch is done or settled, or a publish failed, since watch()."""
        if self._changed is None:
            self.watch()
        assert self._changed is not None
        return self._changed

    def notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    def holders_settling(self) -> bool:
        """A finished batch that held events back has not committed its settle yet."""
        return any(b.held and b.unresolved == -1 and not b.committed for b in self._batches)

    # -- adding batches ------------------------------------------------------------------------

    def before_claim(self) -> None:
        """Forget chains blocked by batches whose settle has committed: the claim about to start
        sees those failures in the table."""
        stale = [key for key, chain in self._chains.items() if _unblocked(chain)]
        for key in stale:
            del self._chains[key]

    def add(self, batch: Batch) -> None:
        """Chain a freshly claimed batch (rows in id order) behind everything in the window."""
        self._batches.append(batch)
        batch.unresolved = len(batch.messages)
        chains = self._chains
        for message in batch.messages:
            key = message.aggregate_id
            chain: _Chain | None = None
            if key is not None:
                chain = chains.get(key)
                if chain is None:
                    chain = chains[key] = _Chain()
            link = _Link(message, batch, chain)
            if chain is None:
                self._go(link)
            elif chain.blocked:
                self._hold(link)
            elif chain.in_flight is None and not chain.waiting:
                chain.in_flight = link
                self._go(link)
            else:
                chain.waiting.append(link)
        # Whatever a later claim brings of a held-back row's aggregate must wait for that row,
        # which is pending again only once this batch has settled.
        for message in batch.held_back:
            if message.aggregate_id is not None:
                chain = chains.get(message.aggregate_id)
                if chain is None:
                    chain = chains[message.aggregate_id] = _Chain()
                # Events of the chain already waiting are older than the held-back row: they
                # still go in turn; only what is added from now on is held.
                chain.blocked = True
                chain.holders.append(batch)
        batch.held += len(batch.held_back)
        self._maybe_done(batch)

    def settled(self, batch: Batch) -> None:
        """The batch's outcome is committed; it leaves the window."""
        batch.committed = True
        self._batches.remove(batch)
        for chain_key in [k for k, c in self._chains.items() if _idle(c)]:
            del self._chains[chain_key]
        self.notify()

    async def close(self) -> None:
        """Stop sending; in-flight publish calls are cancelled (their rows stay pending)."""
        self._ready.clear()
        waves = list(self._waves)
        for task in waves:
            task.cancel()
        await asyncio.gather(*waves, return_exceptions=True)

    # -- sending -------------------------------------------------------------------------------

    def _go(self, link: _Link) -> None:
        """The link's turn has come: fail it at once if it can never go, else queue it."""
        message = link.message
        problem = message.problem or self._check(message)
        if problem is not None:
            self._resolve(link, failed(problem, permanent=True))
            return
        charge = self.charges.pop(message.event_id, None)
        if charge is not None:
            self._resolve(link, failed(charge))
            return
        self._ready.append(link)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        try:
            self._flush_ready()
        except Exception as exc:  # a bug must end the window, not hang it
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.notify()

    def _flush_ready(self) -> None:
        if self.error is not None or not self._ready or self._solo is not None:
            return
        ready, self._ready = self._ready, []
        if self.suspects:
            suspect = next((lk for lk in ready if lk.message.event_id in self.suspects), None)
            if suspect is not None:
                # Alone on the wire: wait for everything else to be answered, send it by itself,
                # and send nothing else until its answer (or the lost connection) comes.
                self._ready = ready
                if not self._on_wire:
                    ready.remove(suspect)
                    self._solo = suspect
                    self._send([suspect])
                return
        self._send(ready)

    def _send(self, wave: list[_Link]) -> None:
        for link in wave:
            self._on_wire[id(link)] = link
        task = asyncio.ensure_future(self._publish_wave(wave))
        self._waves.add(task)
        task.add_done_callback(self._waves.discard)

    async def _publish_wave(self, wave: list[_Link]) -> None:
        def on_result(index: int, result: PublishResult) -> None:
            link = wave[index]
            if self._on_wire.pop(id(link), None) is not None:
                try:
                    self._resolve(link, result)
                except Exception as exc:  # called from the client library: never lose it
                    self._fail(exc)

        try:
            results = await self._publish([link.message for link in wave], on_result)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if self.error is None:
                self.error = exc
                if self._solo is not None and wave == [self._solo]:
                    self.failed_solo = self._solo.message
            self.notify()
            return
        # Results the publisher returned without reporting them one by one.
        for index, result in enumerate(results):
            on_result(index, result)

    def _resolve(self, link: _Link, result: PublishResult) -> None:
        batch, message, chain = link.batch, link.message, link.chain
        if link is self._solo:
            self._solo = None
        if result.confirmed:
            batch.sent.append(message.id)
            self.suspects.discard(message.event_id)
            if chain is not None and chain.in_flight is link:
                chain.in_flight = None
                if chain.waiting:
                    successor = chain.waiting.popleft()
                    chain.in_flight = successor
                    self._go(successor)
        else:
            reason = result.reason or "not confirmed"
            batch.failures.append(Failure(message.id, reason, result.permanent))
            if chain is not None:
                if chain.in_flight is link:
                    chain.in_flight = None
                chain.blocked = True
                chain.holders.append(batch)
                while chain.waiting:
                    self._hold(chain.waiting.popleft())
        batch.unresolved -= 1
        self._maybe_done(batch)
        if self._solo is None and (self._ready or not self._on_wire) and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _hold(self, link: _Link) -> None:
        """Not sent, not an attempt: the row stays pending and goes after its predecessor."""
        chain = link.chain
        if chain is not None and link.batch not in chain.holders:
            chain.holders.append(link.batch)
        link.batch.held += 1
        link.batch.unresolved -= 1
        self._maybe_done(link.batch)

    def _maybe_done(self, batch: Batch) -> None:
        if batch.unresolved == 0:
            batch.unresolved = -1  # reported once
            self._on_batch_done(batch)
            self.notify()


def _unblocked(chain: _Chain) -> bool:
    return (
        chain.blocked
        and all(batch.committed for batch in chain.holders)
        and chain.in_flight is None
        and not chain.waiting
    )


def _idle(chain: _Chain) -> bool:
    return not chain.blocked and chain.in_flight is None and not chain.waiting


def messages_of(batches: Iterable[Batch]) -> list[OutboxMessage]:
    return [m for batch in batches for m in batch.messages]
