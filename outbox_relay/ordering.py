"""Per-aggregate ordering of a claimed batch.

A batch arrives in id order, which the outbox's insert trigger makes equal to commit order for
every aggregate. Pipelining a whole batch would be fastest, but if the broker refused an event,
a later event of the same aggregate already on the wire would overtake it. So a batch is sent in
waves: wave k holds the k-th event of each aggregate (events without an aggregate have no order
to keep and all go in the first wave). Each wave is pipelined; the next starts once the broker has
confirmed the previous one, and an aggregate whose event failed sends nothing more in this batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from outbox_relay.messages import OutboxMessage


def plan_waves(batch: Sequence[OutboxMessage]) -> list[list[OutboxMessage]]:
    waves: list[list[OutboxMessage]] = []
    depth: dict[str, int] = {}
    for message in batch:
        level = 0
        if message.aggregate_id is not None:
            level = depth.get(message.aggregate_id, 0)
            depth[message.aggregate_id] = level + 1
        if level == len(waves):
            waves.append([])
        waves[level].append(message)
    return waves
