"""The consumer library: idempotent handlers for the events the relay publishes.

::

    from outbox_relay.consumer import Consumer, Event

    consumer = Consumer("order-service")

    @consumer.handler("order.created")
    def send_confirmation(event: Event, db: psycopg.Connection) -> None:
        db.execute("INSERT INTO emails (order_id) VALUES (%s)", (event.aggregate_id,))

Modules: ``routing`` (Consumer: handlers by pattern), ``worker`` (one consuming connection),
``inbox`` (exactly-once effects), ``topology`` (queues, retry queues, dead letters), ``dlq``
(inspect and replay dead letters), ``events`` (the Event and the message headers), ``hooks``,
``settings``.
"""

from __future__ import annotations

from outbox_relay.consumer.events import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    FAILED_AT_HEADER,
    FAILURE_REASON_HEADER,
    LAST_ERROR_HEADER,
    Event,
    PermanentError,
    Reject,
)
from outbox_relay.consumer.hooks import ConsumerHooks, NoHooks
from outbox_relay.consumer.inbox import PsycopgInbox, SQLAlchemyInbox, migrate_inbox
from outbox_relay.consumer.routing import Consumer
from outbox_relay.consumer.settings import ConsumerSettings
from outbox_relay.consumer.worker import Worker
from outbox_relay.messages import topic_matches

__all__ = [
    "ATTEMPTS_HEADER",
    "ATTEMPT_HEADER",
    "FAILED_AT_HEADER",
    "FAILURE_REASON_HEADER",
    "LAST_ERROR_HEADER",
    "Consumer",
    "ConsumerHooks",
    "ConsumerSettings",
    "Event",
    "NoHooks",
    "PermanentError",
    "PsycopgInbox",
    "Reject",
    "SQLAlchemyInbox",
    "Worker",
    "migrate_inbox",
    "topic_matches",
]
