"""Callbacks around the relay's work, so tracing and metrics stay out of the relay core.

The relay calls a :class:`RelayHooks` (usually a :class:`CompositeHooks` of the tracing and the
metrics hooks) and never imports OpenTelemetry. A hook that raises is logged and ignored: delivery
never depends on observability.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from outbox_relay.messages import Failure, OutboxMessage, PublishResult

log = logging.getLogger(__name__)


class RelayHooks(Protocol):
    """What the relay reports. ``seconds`` are wall-clock durations measured by the relay."""

    def after_claim(self, messages: Sequence[OutboxMessage], seconds: float) -> None:
        """A batch was claimed (one call per batch, never per row)."""
        ...

    def before_publish(self, messages: Sequence[OutboxMessage]) -> Sequence[OutboxMessage]:
        """Called before each wave is handed to the publisher; returns the messages to send
        (the same ones, or copies with extra headers such as a new ``traceparent``)."""
        ...

    def after_publish(
        self,
        messages: Sequence[OutboxMessage],
        results: Sequence[PublishResult],
        seconds: float,
    ) -> None:
        """The broker answered for every message of the wave (``results`` in the same order)."""
        ...

    def on_publish_error(self, messages: Sequence[OutboxMessage], error: BaseException) -> None:
        """publish_batch raised (connection lost, confirm timeout): the wave will be retried."""
        ...

    def after_settle(
        self, sent: Sequence[int], failures: Sequence[Failure], dead: int, seconds: float
    ) -> None:
        """The batch's outcome was committed: ``dead`` events were dead-lettered."""
        ...

    def after_rebalance(self, owned: int, gained: int, lost: int) -> None:
        """This relay's share of the outbox changed: it now holds ``owned`` leases."""
        ...


class NoRelayHooks:
    """RelayHooks that do nothing; subclass it to implement only some callbacks."""

    def after_claim(self, messages: Sequence[OutboxMessage], seconds: float) -> None:
        pass

    def before_publish(self, messages: Sequence[OutboxMessage]) -> Sequence[OutboxMessage]:
        return messages

    def after_publish(
        self,
        messages: Sequence[OutboxMessage],
        results: Sequence[PublishResult],
        seconds: float,
    ) -> None:
        pass

    def on_publish_error(self, messages: Sequence[OutboxMessage], error: BaseException) -> None:
        pass

    def after_settle(
        self, sent: Sequence[int], failures: Sequence[Failure], dead: int, seconds: float
    ) -> None:
        pass

    def after_rebalance(self, owned: int, gained: int, lost: int) -> None:
        pass


class CompositeHooks:
    """Calls several RelayHooks in order; each one's failure is logged and contained."""

    def __init__(self, hooks: Sequence[RelayHooks]) -> None:
        self._hooks = tuple(hooks)

    def after_claim(self, messages: Sequence[OutboxMessage], seconds: float) -> None:
        for hook in self._hooks:
            try:
                hook.after_claim(messages, seconds)
            except Exception:
                log.exception("relay hook after_claim failed (ignored)")

    def before_publish(self, messages: Sequence[OutboxMessage]) -> Sequence[OutboxMessage]:
        for hook in self._hooks:
            try:
                changed = hook.before_publish(messages)
            except Exception:
                log.exception("relay hook before_publish failed (ignored)")
                continue
            if len(changed) != len(messages):
                # A hook may decorate messages, never drop or add them: that would lose events.
                log.error("relay hook before_publish changed the batch size (ignored)")
                continue
            messages = changed
        return messages

    def after_publish(
        self,
        messages: Sequence[OutboxMessage],
        results: Sequence[PublishResult],
        seconds: float,
    ) -> None:
        for hook in self._hooks:
            try:
                hook.after_publish(messages, results, seconds)
            except Exception:
                log.exception("relay hook after_publish failed (ignored)")

    def on_publish_error(self, messages: Sequence[OutboxMessage], error: BaseException) -> None:
        for hook in self._hooks:
            try:
                hook.on_publish_error(messages, error)
            except Exception:
                log.exception("relay hook on_publish_error failed (ignored)")

    def after_settle(
        self, sent: Sequence[int], failures: Sequence[Failure], dead: int, seconds: float
    ) -> None:
        for hook in self._hooks:
            try:
                hook.after_settle(sent, failures, dead, seconds)
            except Exception:
                log.exception("relay hook after_settle failed (ignored)")

    def after_rebalance(self, owned: int, gained: int, lost: int) -> None:
        for hook in self._hooks:
            try:
                hook.after_rebalance(owned, gained, lost)
            except Exception:
                log.exception("relay hook after_rebalance failed (ignored)")
