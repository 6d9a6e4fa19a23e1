"""The ``outbox-relay`` command line."""

from __future__ import annotations

from outbox_relay.cli import consumer
from outbox_relay.cli.app import app, main

consumer.register(app)

__all__ = ["app", "main"]
