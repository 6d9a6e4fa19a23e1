"""The ``outbox-relay`` command line: one module per command group (``serve``, ``migrate``,
``status``, ``emit``, ``dead``, ``slot``, ``consumer``), options generated from the settings
declarations (``options``)."""

from __future__ import annotations

from outbox_relay.cli.app import app, main

__all__ = ["app", "main"]
