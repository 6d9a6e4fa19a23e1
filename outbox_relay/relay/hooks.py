"""Callbacks around the relay's work, so tracing and metrics stay out of the relay core.

The relay calls a :class:`RelayHooks` (usually a :class:`CompositeHooks` of the tracing and the
metrics hooks) and never imports OpenTelemetry. A hook that raises is logged and ignored: delivery
never depends on observability.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from outbox_relay.hooks import HookDispatcher
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


class CompositeHooks(HookDispatcher[RelayHooks]):
    """Several RelayHooks as one (outbox_relay/hooks.py: each in turn, failures contained)."""

    kind = "relay hook"

    def after_claim(self, messages: Sequence[OutboxMessage], seconds: float) -> None:
        self.call("after_claim", messages, seconds)

    def before_publish(self, messages: Sequence[OutboxMessage]) -> Sequence[OutboxMessage]:
        for hook in self.hooks:
            changed = messages
            with self.contained("before_publish"):
                changed = hook.before_publish(messages)
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
        self.call("after_publish", messages, results, seconds)

    def on_publish_error(self, messages: Sequence[OutboxMessage], error: BaseException) -> None:
        self.call("on_publish_error", messages, error)

    def after_settle(
        self, sent: Sequence[int], failures: Sequence[Failure], dead: int, seconds: float
    ) -> None:
        self.call("after_settle", sent, failures, dead, seconds)

    def after_rebalance(self, owned: int, gained: int, lost: int) -> None:
        self.call("after_rebalance", owned, gained, lost)
