"""The handler the acceptance tests run with ``outbox-relay consume --handler
tests.acceptance.consumer_app:consumer``: records each application in ``effects``.

``CONSUMER_APP_WORK_SECONDS`` makes each handler call take that long inside its transaction (a
stand-in for real work, so a signal can arrive mid-handler). Events with ``{"poison": true}`` fail
while the test's ``switches.poison_fails`` is true; events with ``{"fail_times": n}`` fail their
first n attempts. With ``CONSUMER_APP_MARK_TRANSACTIONS`` set, the handler's transaction shows as
``application_name`` ``consumer-app-<pid>`` in ``pg_stat_activity`` until it ends (so a test can
kill the very worker whose transaction is open).
"""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg

from outbox_relay.consumer import Consumer, Event

consumer = Consumer("acceptance")


@consumer.handler("order.*")
def apply(event: Event, db: psycopg.Connection[Any]) -> None:
    if os.environ.get("CONSUMER_APP_MARK_TRANSACTIONS"):
        # Like SET LOCAL: back to the worker's own name when the transaction ends.
        db.execute(
            "SELECT set_config('application_name', %s, true)", (f"consumer-app-{os.getpid()}",)
        )
    if event.attempt <= int(event.payload.get("fail_times", 0)):
        raise ConnectionError(f"flaky dependency (attempt {event.attempt})")
    db.execute(
        "INSERT INTO effects (event_id, event_type, worker) VALUES (%s, %s, %s)",
        (event.event_id, event.event_type, str(os.getpid())),
    )
    if event.payload.get("poison"):
        row = db.execute("SELECT poison_fails FROM switches").fetchone()
        if row and row[0]:
            raise RuntimeError("poison order: cannot compute the tax")
    time.sleep(float(os.environ.get("CONSUMER_APP_WORK_SECONDS", "0")))
