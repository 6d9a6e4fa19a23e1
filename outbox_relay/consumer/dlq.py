"""Inspect, replay and purge a consumer's dead-letter queue (``<queue>.dlq``).

Replay never loses a message: each one is published to the main queue and confirmed by the broker
before its DLQ copy is acked. A crash in between leaves both copies; the inbox makes the duplicate
harmless. For an ordered queue (``--ordered``) the message goes through the queue's
consistent-hash exchange to its aggregate's partition, behind the events already there: it is
handled after the events of its aggregate that followed it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions

from outbox_relay.consumer import topology as topo
from outbox_relay.consumer.events import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    FAILED_AT_HEADER,
    FAILURE_REASON_HEADER,
    copy_properties,
)
from outbox_relay.errors import BrokerUnavailableError, ConfigError
from outbox_relay.tls import TlsFiles

log = logging.getLogger(__name__)

# Headers added by the consumer or the broker while failing; a replayed message starts afresh.
_FAILURE_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
)


@dataclass(frozen=True, slots=True)
class DeadMessage:
    event_id: str | None
    event_type: str | None
    attempts: int | None
    reason: str | None
    failed_at: str | None
    headers: dict[str, Any]
    body: bytes


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def dead_message(properties: pika.BasicProperties, body: bytes) -> DeadMessage:
    headers = dict(properties.headers or {})
    attempts = headers.get(ATTEMPTS_HEADER)
    reason = headers.get(FAILURE_REASON_HEADER)
    if reason is None and headers.get("x-death"):
        # Dead-lettered by the broker itself (e.g. a nack without requeue, a delivery limit).
        death = headers["x-death"][0]
        reason = f"dead-lettered by RabbitMQ: {_text(death.get('reason'))}"
    return DeadMessage(
        event_id=properties.message_id or _text(headers.get("event_id")),
        event_type=properties.type,
        attempts=int(attempts) if isinstance(attempts, int) else None,
        reason=_text(reason),
        failed_at=_text(headers.get(FAILED_AT_HEADER)),
        headers=headers,
        body=body,
    )


def _check_exists(channel: Any, name: str) -> int:
    try:
        return int(channel.queue_declare(name, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            raise ConfigError(
                f"queue {name!r} does not exist: run `outbox-relay topology apply` "
                "(or start the consumer) first"
            ) from exc
        raise BrokerUnavailableError(f"inspecting queue {name!r} failed: {exc}") from exc


def list_dead(
    broker_url: str, queue: str, limit: int = 100, *, tls_files: TlsFiles | None = None
) -> tuple[int, list[DeadMessage]]:
    """(messages in the DLQ, the first ``limit`` of them); nothing is removed."""
    topology = topo.Topology(queue)
    connection = topo.connect(broker_url, tls_files=tls_files)
    try:
        channel = connection.channel()
        total = _check_exists(channel, topology.dead_letter_queue)
        found = []
        for _ in range(min(total, limit)):
            method, properties, body = channel.basic_get(topology.dead_letter_queue)
            if method is None:
                break
            found.append(dead_message(properties, body))
        # Closing returns every message we peeked at to the queue, in its place.
        return total, found
    except pika.exceptions.AMQPError as exc:
        raise BrokerUnavailableError(f"reading the DLQ failed: {exc!r}") from exc
    finally:
        if connection.is_open:
            connection.close()


def replay(
    broker_url: str,
    queue: str,
    *,
    event_ids: Collection[str] = (),
    limit: int | None = None,
    tls_files: TlsFiles | None = None,
) -> int:
    """Move dead messages back to the queue (all, or those with ``event_ids``); return how many.

    Only the messages in the DLQ when the replay starts are considered, so a message that fails
    again during the replay is not replayed twice.
    """
    topology = topo.Topology(queue)
    wanted = set(event_ids)
    connection = topo.connect(broker_url, tls_files=tls_files)
    moved = 0
    try:
        channel = connection.channel()
        if topo.is_ordered(connection, queue):
            # Routed by its aggregate_id header to its partition, like a new event.
            exchange, routing_key = topology.hash_exchange, ""
        else:
            _check_exists(channel, topology.queue)
            exchange, routing_key = "", topology.queue
        total = _check_exists(channel, topology.dead_letter_queue)
        channel.confirm_delivery()
        for _ in range(total):
            if limit is not None and moved >= limit:
                break
            method, properties, body = channel.basic_get(topology.dead_letter_queue)
            if method is None:
                break
            dead = dead_message(properties, body)
            if wanted and dead.event_id not in wanted:
                continue  # left unacked: back in the DLQ when the connection closes
            headers = {
                k: v
                for k, v in dead.headers.items()
                if k not in _FAILURE_HEADERS
                and k not in (ATTEMPT_HEADER, ATTEMPTS_HEADER, FAILURE_REASON_HEADER)
                and k != FAILED_AT_HEADER
                and not k.startswith("x-outbox-last-")
            }
            try:
                # Confirmed (confirm_delivery) before the DLQ copy is acked.
                channel.basic_publish(
                    exchange,
                    routing_key,
                    body,
                    copy_properties(properties, headers),
                    mandatory=True,
                )
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                raise BrokerUnavailableError(
                    f"RabbitMQ did not accept the replayed message {dead.event_id}: {exc!r}"
                ) from exc
            channel.basic_ack(method.delivery_tag)
            moved += 1
            log.info("replayed dead message", extra={"event_id": dead.event_id, "queue": queue})
    except pika.exceptions.AMQPError as exc:
        raise BrokerUnavailableError(
            f"replay stopped after {moved} message(s): {exc!r}; rerun it (nothing was lost)"
        ) from exc
    finally:
        if connection.is_open:
            connection.close()
    return moved


def purge(broker_url: str, queue: str, *, tls_files: TlsFiles | None = None) -> int:
    """Delete every message in the DLQ; return how many."""
    topology = topo.Topology(queue)
    connection = topo.connect(broker_url, tls_files=tls_files)
    try:
        channel = connection.channel()
        _check_exists(channel, topology.dead_letter_queue)
        return int(channel.queue_purge(topology.dead_letter_queue).method.message_count)
    except pika.exceptions.AMQPError as exc:
        raise BrokerUnavailableError(f"purging the DLQ failed: {exc!r}") from exc
    finally:
        if connection.is_open:
            connection.close()
