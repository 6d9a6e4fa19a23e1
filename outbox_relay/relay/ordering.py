"""Per-aggregate ordering across every event the relay has on the wire.

Claimed rows arrive in id order, which the outbox's insert trigger makes equal to commit order for
every aggregate. The relay keeps several batches in flight at once, so the broker is never left
waiting for a round trip. One rule keeps the order: an event is sent only once the previous event
of its aggregate still in flight has been confirmed. If that one failed, the event is held back
(left pending, not sent, not counted as an attempt) and goes out after it on a later claim.
Events without an aggregate have no order to keep and go at once.

A batch's links stay in the chains until the relay has collected the batch after its settle, not
merely until the settle: a claim that started on the other connection before the settle committed
does not see the failure in the table, so it must still find the failed event's link. Claims that
start later see it there (the claim query skips aggregates whose earliest pending event is backing
off).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from outbox_relay.messages import OutboxMessage, PublishResult

Publish = Callable[[list[OutboxMessage]], Awaitable[list[PublishResult]]]


@dataclass(slots=True, eq=False)
class Link:
    """One event of a batch and its place in its aggregate's chain."""

    message: OutboxMessage
    # The previous event of the same aggregate still in flight: True once the broker confirmed
    # it, False if it failed or was held back itself. None: nothing to wait for.
    after: asyncio.Future[bool] | None
    # This event's own outcome, awaited by the next event of its aggregate.
    outcome: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def may_go(self) -> bool | None:
        """True: send it now. False: hold it back. None: wait for the previous event."""
        if self.after is None:
            return True
        if not self.after.done():
            return None
        return self.after.result()

    def resolve(self, confirmed: bool) -> None:
        if not self.outcome.done():
            self.outcome.set_result(confirmed)


@dataclass(slots=True)
class LinkedBatch:
    owner: int
    links: list[Link]

    def close(self) -> None:
        """The batch has settled (or was given up): events not confirmed by now never will be,
        so whatever is chained behind them is held back, never left waiting."""
        for link in self.links:
            link.resolve(False)


class AggregateChains:
    """The last in-flight event of each aggregate, across all batches in flight."""

    def __init__(self) -> None:
        self._tails: dict[str, tuple[Link, int]] = {}
        self._owners = itertools.count()

    def link(self, batch: Sequence[OutboxMessage]) -> LinkedBatch:
        """Chain a freshly claimed batch (in id order) behind everything already in flight."""
        owner = next(self._owners)
        links: list[Link] = []
        tails = self._tails
        for message in batch:
            key = message.aggregate_id
            if key is None:
                links.append(Link(message, None))
                continue
            tail = tails.get(key)
            link = Link(message, tail[0].outcome if tail is not None else None)
            tails[key] = (link, owner)
            links.append(link)
        return LinkedBatch(owner, links)

    def forget(self, batch: LinkedBatch) -> None:
        """Drop a collected batch's links: claims from now on see its outcome in the table."""
        batch.close()
        for link in batch.links:
            key = link.message.aggregate_id
            if key is not None:
                tail = self._tails.get(key)
                if tail is not None and tail[1] == batch.owner:
                    del self._tails[key]

    def __len__(self) -> int:
        return len(self._tails)


async def publish_in_order(
    links: Sequence[Link], publish: Publish
) -> list[tuple[OutboxMessage, PublishResult]]:
    """Send each event of a linked batch as soon as its aggregate's previous one is confirmed.

    Events whose turn has come together go in one ``publish`` call; calls overlap, with each
    other and with other batches' calls. Returns the events that were sent with their results,
    in the order they were settled; an event held back is not among them and stays pending. A
    ``publish`` that raises (the broker is gone) ends the batch with that error.
    """
    results: list[tuple[OutboxMessage, PublishResult]] = []

    async def send(ready: list[Link]) -> None:
        try:
            outcomes = await publish([link.message for link in ready])
        except BaseException:
            for link in ready:
                link.resolve(False)
            raise
        for link, result in zip(ready, outcomes, strict=True):
            results.append((link.message, result))
            link.resolve(result.confirmed)

    waiting = list(links)
    sending: set[asyncio.Future[None]] = set()
    try:
        while waiting or sending:
            ready: list[Link] = []
            still_waiting: list[Link] = []
            for link in waiting:  # in id order: a hold-back reaches its followers in one pass
                verdict = link.may_go()
                if verdict is None:
                    still_waiting.append(link)
                elif verdict:
                    ready.append(link)
                else:
                    link.resolve(False)
            waiting = still_waiting
            if ready:
                sending.add(asyncio.ensure_future(send(ready)))
            wake: set[asyncio.Future[Any]] = set(sending)
            wake.update(link.after for link in waiting if link.after is not None)
            if not wake:
                break
            done, _ = await asyncio.wait(wake, return_when=asyncio.FIRST_COMPLETED)
            for finished in done & sending:
                sending.discard(finished)
                finished.result()
    finally:
        for task in sending:
            task.cancel()
        if sending:
            await asyncio.gather(*sending, return_exceptions=True)
    return results
