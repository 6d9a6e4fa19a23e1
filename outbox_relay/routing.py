"""Routing rules (``--route RULE``, repeatable): which destination an event goes to.

A rule is ``MATCH=DESTINATION``; the first rule that matches an event wins, and an event no rule
matches goes to the default destination (``--exchange`` for RabbitMQ, ``--topic-prefix`` for
NATS, Redis and MQTT, the URL of ``--broker-url`` for webhooks). ``MATCH`` is one of:

* ``order.*`` or ``type:order.*``: the event type, with AMQP topic wildcards (``*`` one word,
  ``#`` zero or more words);
* ``aggregate:customer``: the aggregate type, exactly;
* ``header.tenant:acme``: a header of the row, by its value as text (``true``, ``42``).

The destination is what the broker routes by: an exchange (RabbitMQ), a subject prefix (NATS),
a stream prefix (Redis), a topic prefix (MQTT) or a URL (webhook). Routing never changes order:
an aggregate's events are published one after another whatever their destinations.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from outbox_relay.messages import OutboxMessage, topic_matches, topic_pattern_problem

MatchKind = Literal["type", "aggregate", "header"]

_HEADER_MATCH = re.compile(r"header\.([^:=]+):(.*)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Route:
    """One rule: events that match go to ``destination``."""

    kind: MatchKind
    value: str  # the type pattern, the aggregate type or the header's value
    destination: str
    header: str | None = None  # the header's name, for kind "header"

    def matches(self, message: OutboxMessage) -> bool:
        if self.kind == "type":
            return topic_matches(self.value, message.event_type)
        if self.kind == "aggregate":
            return message.aggregate_type == self.value
        assert self.header is not None
        headers = message.headers
        return self.header in headers and header_text(headers[self.header]) == self.value


def parse_route(rule: str) -> Route:
    """``MATCH=DESTINATION`` as a Route; ValueError says what is wrong with it."""
    match, equals, destination = rule.partition("=")
    if not equals or not match or not destination:
        raise ValueError(
            f"route {rule!r} is not MATCH=DESTINATION (e.g. 'order.*=orders', "
            "'aggregate:customer=customers', 'header.tenant:acme=acme-events')"
        )
    if match.startswith("aggregate:"):
        aggregate = match.removeprefix("aggregate:")
        if not aggregate:
            raise ValueError(f"route {rule!r}: name an aggregate type after 'aggregate:'")
        return Route("aggregate", aggregate, destination)
    if match.startswith("header."):
        found = _HEADER_MATCH.fullmatch(match)
        if found is None:
            raise ValueError(
                f"route {rule!r}: write a header rule as header.NAME:VALUE=DESTINATION"
            )
        return Route("header", found.group(2), destination, header=found.group(1))
    pattern = match.removeprefix("type:")
    problem = topic_pattern_problem(pattern)
    if problem:
        raise ValueError(f"route {rule!r}: {problem}")
    return Route("type", pattern, destination)


def header_text(value: object) -> str:
    """A header's value as a rule compares it: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


class Router:
    """Chooses each event's destination by the rules, in order; ``default`` when none matches."""

    def __init__(self, routes: Sequence[Route], default: str) -> None:
        self.routes = tuple(routes)
        self.default = default
        # Rules on the event type alone decide by the type: remembered per type (bounded by the
        # number of event types, which routing keys already bound).
        self._by_type_only = all(route.kind == "type" for route in self.routes)
        self._cache: dict[str, str] = {}

    @classmethod
    def of(cls, rules: Sequence[str], default: str) -> Router:
        return cls([parse_route(rule) for rule in rules], default)

    def __bool__(self) -> bool:
        return bool(self.routes)

    def destinations(self) -> list[str]:
        """Every destination an event may go to, the default first (each once)."""
        return list(dict.fromkeys([self.default, *(route.destination for route in self.routes)]))

    def destination(self, message: OutboxMessage) -> str:
        if not self.routes:
            return self.default
        if self._by_type_only:
            found = self._cache.get(message.event_type)
            if found is None:
                found = self._cache[message.event_type] = self._first(message)
            return found
        return self._first(message)

    def _first(self, message: OutboxMessage) -> str:
        for route in self.routes:
            if route.matches(message):
                return route.destination
        return self.default
