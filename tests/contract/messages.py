"""What the publisher contract cases publish, shared with the broker-specific and routing tests:
events with ordered payloads per aggregate, and a fresh publisher that sends batches of them."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from outbox_relay.messages import OutboxMessage, PublishResult
from outbox_relay.publishers import create_publisher
from tests.contract.adapters import ROUTED, BrokerUnderTest

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def make_messages(
    count: int,
    *,
    event_type: str = ROUTED,
    aggregates: Sequence[str] = ("agg-1",),
    headers: dict[str, Any] | None = None,
    first_id: int = 1,
) -> list[OutboxMessage]:
    """``count`` events, aggregates taking turns, payloads naming their aggregate and sequence."""
    now = datetime.now(UTC)
    made = []
    for n in range(count):
        aggregate = aggregates[n % len(aggregates)]
        payload = {"aggregate": aggregate, "n": n, "note": "grüße"}
        made.append(
            OutboxMessage(
                id=first_id + n,
                event_id=str(uuid.uuid4()),
                event_type=event_type,
                aggregate_type="order",
                aggregate_id=aggregate,
                payload=json.dumps(payload, separators=(",", ":")).encode(),
                headers=dict(headers or {"producer": "contract"}),
                created_at=now,
            )
        )
    return made


def publish(
    broker: BrokerUnderTest, *batches: Sequence[OutboxMessage], **overrides: Any
) -> list[list[PublishResult]]:
    """Connect a fresh publisher, publish the batches one after the other, close."""

    async def run() -> list[list[PublishResult]]:
        publisher = create_publisher(broker.settings(**overrides))
        await publisher.connect()
        try:
            assert publisher.is_healthy()
            return [await publisher.publish_batch(batch) for batch in batches]
        finally:
            await publisher.close()

    return asyncio.run(run())
