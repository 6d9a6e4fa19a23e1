"""The one interface between the relay core and a message broker."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Annotated, Any, ClassVar, Protocol, Self, runtime_checkable

from pydantic import AfterValidator, Field, model_validator

from outbox_relay.envelopes import CloudEvents, MessageFormat
from outbox_relay.messages import OutboxMessage, PublishResult
from outbox_relay.redact import redact_url
from outbox_relay.routing import Router, parse_route
from outbox_relay.settings import (
    BrokerLinkSettings,
    Count,
    Exchange,
    Flag,
    Seconds,
    Settings,
    check_exchange,
    route,
)


def check_topic_prefix(prefix: str) -> str:
    if not TOPIC_PREFIX.fullmatch(prefix):
        raise ValueError(
            f"{prefix!r} is not a usable prefix (letters, digits, '_', '-', separated by single "
            "'.', at most 100 characters; no wildcards or spaces), e.g. 'events'"
        )
    return prefix


def check_ce_source(source: str | None) -> str | None:
    # A URI-reference (CloudEvents 1.0): not empty, no blanks or control characters.
    if source is not None and (not source or not source.isprintable() or " " in source):
        raise ValueError(
            f"{source!r} is not a URI-reference (not empty, no blanks or control characters), "
            "e.g. 'https://example.com/orders' or '/orders'"
        )
    return source


TOPIC_PREFIX = re.compile(r"(?=.{1,100}$)[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def check_route(rule: str) -> str:
    parse_route(rule)
    return rule


def check_destination(scheme: str, destination: str) -> None:
    """A route's destination must be something the broker routes by."""
    if scheme in ("amqp", "amqps"):
        check_exchange(destination)
    elif scheme in PREFIXED_SCHEMES:
        check_topic_prefix(destination)
    elif not destination.lower().startswith(("http://", "https://")):
        raise ValueError(f"{destination!r} is not a webhook URL (http:// or https://)")


# The source of a publisher built without a relay (serve fills in the outbox's, see
# RelaySettings): tests, scripts.
FALLBACK_SOURCE = "/outbox-relay"

# Larger messages are dead-lettered at once; RabbitMQ's own default limit (3.8 to 3.13).
DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024


# Broker options holding secrets (webhook_secret, ...): masked in reprs, scrubbed from logs.
SECRET_OPTION = re.compile(r"secret|password|token|credential", re.IGNORECASE)

# Brokers whose destination names start with --topic-prefix.
PREFIXED_SCHEMES = frozenset({"nats", "tls", "redis", "rediss", "mqtt", "mqtts"})


class PublisherSettings(BrokerLinkSettings):
    """What every publisher reads; options of one broker are in ``options`` (see BrokerOptions).
    The broker URL and its TLS files (``--broker-ca-file``, ...) come from BrokerLinkSettings."""

    exchange: Exchange = "events"
    confirm_timeout: Annotated[
        Seconds,
        Field(le=3600, description="Seconds to wait for broker confirms before reconnecting."),
    ] = 30.0
    max_message_bytes: Annotated[
        Count,
        Field(
            description="Larger messages (payload and headers) are dead-lettered at once; keep "
            "at or below the broker's own limit."
        ),
    ] = DEFAULT_MAX_MESSAGE_BYTES
    topic_prefix: Annotated[
        str,
        AfterValidator(check_topic_prefix),
        Field(
            description="NATS subject / Redis stream / MQTT topic prefix: events.order.created, "
            "events:order.created, events/order/created."
        ),
        Flag(metavar="PREFIX"),
    ] = "events"
    routes: Annotated[
        tuple[Annotated[str, AfterValidator(check_route)], ...],
        Field(
            alias="route",
            description="Routing rule MATCH=DESTINATION, first match wins (repeatable): "
            "'order.*=orders', 'aggregate:customer=customers', 'header.tenant:acme=acme'. The "
            "destination is an exchange (RabbitMQ), subject/stream/topic prefix (NATS, Redis, "
            "MQTT) or URL (webhook); unmatched events go to the default one.",
        ),
        Flag(metavar="RULE"),
    ] = ()
    message_format: Annotated[
        MessageFormat,
        Field(
            description="native: the relay's own mapping per broker; cloudevents-binary / "
            "cloudevents-structured: CloudEvents 1.0 per the broker's protocol binding (see "
            "docs/cloudevents.md)."
        ),
    ] = MessageFormat.NATIVE
    ce_source: Annotated[
        str | None,
        AfterValidator(check_ce_source),
        Field(
            description="The CloudEvents source attribute [default: "
            "postgresql://HOST[:PORT]/DATABASE/SCHEMA, the outbox's, without credentials]."
        ),
        Flag(metavar="URI"),
    ] = None
    # Unacknowledged messages a client may hold (MQTT's in-flight window); not a CLI option.
    max_in_flight: ClassVar[int] = 5000
    # The broker's own options by key (e.g. {"nats_stream": "EVENTS"}), validated by its
    # publisher module's BrokerOptions when the publisher is made.
    options: Annotated[Mapping[str, Any], Flag(cli=False)] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _broker_options_go_into_options(cls, values: Any) -> Any:
        return route(values, cls, "options")

    @model_validator(mode="after")
    def _options_that_apply(self) -> PublisherSettings:
        given, scheme = self.model_fields_set, self.scheme
        if "topic_prefix" in given and scheme not in PREFIXED_SCHEMES:
            raise ValueError(
                f"--topic-prefix: applies to NATS, Redis and MQTT brokers, not {scheme}://"
            )
        if "ce_source" in given and self.message_format is MessageFormat.NATIVE:
            raise ValueError(
                "--ce-source: applies to --message-format cloudevents-binary or "
                "cloudevents-structured only (--message-format is native)"
            )
        if "exchange" in given and scheme not in ("amqp", "amqps"):
            raise ValueError(f"--exchange: applies to RabbitMQ (amqp://) only, not {scheme}://")
        for rule in self.routes:
            destination = parse_route(rule).destination
            try:
                check_destination(scheme, destination)
            except ValueError as exc:
                raise ValueError(f"--route {rule!r}: {exc}") from None
        return self

    @property
    def default_destination(self) -> str:
        """Where an event no --route matches goes: the exchange, the prefix or the URL."""
        if self.scheme in ("amqp", "amqps"):
            return self.exchange
        if self.scheme in PREFIXED_SCHEMES:
            return self.topic_prefix
        return self.broker_url

    def router(self) -> Router:
        return Router.of(self.routes, self.default_destination)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if name == "options" and isinstance(value, Mapping):
                value = {k: "***" if SECRET_OPTION.search(k) else v for k, v in value.items()}
            yield name, value

    def secrets(self) -> Iterator[str]:
        yield from super().secrets()
        for key, value in self.options.items():
            if SECRET_OPTION.search(key) and isinstance(value, str) and value:
                yield value
        for rule in self.router().routes:  # webhook URLs may carry credentials
            if "://" in rule.destination:
                yield rule.destination

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if self.routes:
            described["routes"] = [
                rule.partition("=")[0] + "=" + redact_url(rule.partition("=")[2])
                if "://" in rule
                else rule
                for rule in self.routes
            ]
        return described

    @property
    def scheme(self) -> str:
        return self.broker_url.partition("://")[0].lower()

    @property
    def cloudevents(self) -> CloudEvents | None:
        """The CloudEvents builder publishers use, None in the native format."""
        if self.message_format is MessageFormat.NATIVE:
            return None
        return CloudEvents(self.ce_source or FALLBACK_SOURCE)


class BrokerOptions(Settings):
    """The options one broker's publisher adds; each publisher module declares a subclass whose
    fields are named after the broker (``nats_stream``, ``redis_maxlen``, ...)."""

    @classmethod
    def of(cls, settings: PublisherSettings) -> Self:
        """Validate this broker's options from ``settings.options``."""
        return cls.from_mapping(settings.options)


# Reports one message's result, by its position in the published sequence, as it arrives.
OnResult = Callable[[int, PublishResult], None]


@runtime_checkable
class Publisher(Protocol):
    """Publishes waves of messages and reports, per message, whether the broker confirmed it.

    A publisher pipelines: it sends the whole wave without waiting for each confirm, and reports
    each message's result through ``on_result`` the moment the broker answers for it (the relay
    releases the next event of that aggregate at once), then returns all results in the order of
    ``messages``. Messages in one wave are sent in that order. The relay calls
    ``publish_batch`` again before earlier calls have returned (events of separate calls need no
    order between them), so each call tracks its own confirms. When the connection is lost
    mid-wave it raises :class:`~outbox_relay.errors.BrokerUnavailableError` (its subclass
    ``BrokerRejectedMessageError`` when the broker closed it over something that was sent).
    """

    @property
    def name(self) -> str:
        """Short broker name for logs and metrics, e.g. ``rabbitmq``."""
        ...

    @property
    def max_message_bytes(self) -> int:
        """The largest message the broker takes (its announced limit, or the setting's)."""
        ...

    async def connect(self) -> None:
        """Connect and declare/check the destination (exchange, stream, ...)."""
        ...

    def message_problem(self, message: OutboxMessage) -> str | None:
        """Why the broker or its protocol can never carry ``message`` (a header too large, a
        character it forbids), checked before sending; None when it can. Such a message is
        dead-lettered at once: sending it could only fail it, or worse, the connection."""
        ...

    async def publish_batch(
        self, messages: Sequence[OutboxMessage], on_result: OnResult | None = None
    ) -> list[PublishResult]: ...

    async def close(self) -> None: ...

    def is_healthy(self) -> bool:
        """True while connected and able to publish."""
        ...
