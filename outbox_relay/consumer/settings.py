"""The consumer's settings (``outbox-relay consume``, ``topology apply``, ``dlq``, ...)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field, model_validator

from outbox_relay.consumer.topology import MAX_PARTITIONS, QueueType, Topology, retry_delays
from outbox_relay.redact import redact_url
from outbox_relay.settings import (
    DEFAULT_DATABASE_URL,
    BrokerLinkSettings,
    Count,
    DatabaseUrl,
    Duration,
    Exchange,
    Flag,
    Schema,
    Seconds,
    Settings,
)


def check_queue_name(name: str) -> str:
    if not name or name.startswith("amq.") or len(name.encode()) > 200 or not name.isprintable():
        raise ValueError(
            f"{name!r} is not a usable queue name (1-200 printable bytes, not starting with amq.)"
        )
    return name


def check_binding(pattern: str) -> str:
    if not pattern or any(word == "" for word in pattern.split(".")) or len(pattern) > 255:
        raise ValueError(f"{pattern!r} is not a routing pattern (dot-separated words, * and #)")
    return pattern


QueueName = Annotated[
    str,
    AfterValidator(check_queue_name),
    Field(description="The consumer's queue, e.g. order.events."),
    Flag(metavar="NAME"),
]
MaxAttempts = Annotated[
    Count,
    Field(le=100, description="Deliveries of a failing event before it is dead-lettered."),
]
RetryDelay = Annotated[
    Seconds, Field(le=86_400, description="First retry delay in seconds; doubles per attempt.")
]
RetryDelayMax = Annotated[Seconds, Field(le=86_400, description="Longest retry delay in seconds.")]
ConsumerName = Annotated[
    str | None,
    Field(
        min_length=1,
        max_length=200,
        description="Inbox key of this consumer (default: the queue name).",
    ),
    Flag(metavar="NAME"),
]


class RetrySettings(Settings):
    """How failed deliveries are retried: the retry queues' delays."""

    max_attempts: MaxAttempts = 5
    retry_delay: RetryDelay = 1.0
    retry_delay_max: RetryDelayMax = 300.0

    def delays(self) -> tuple[float, ...]:
        return retry_delays(self.max_attempts, self.retry_delay, self.retry_delay_max)


# Options that only shape an --ordered consumer: given without it, they would be silently ignored.
ORDERED_ONLY = frozenset({"partition_queues", "rebalance_interval"})


class TopologySettings(RetrySettings, BrokerLinkSettings):
    """One consumer queue, its bindings, retry queues and dead-letter queue."""

    queue: QueueName
    bindings: Annotated[
        tuple[Annotated[str, AfterValidator(check_binding)], ...],
        Field(
            alias="binding",
            description="Routing pattern bound to the queue, e.g. 'order.*' (repeatable).",
        ),
        Flag(metavar="PATTERN"),
    ] = ()
    exchange: Exchange = "events"
    queue_type: Annotated[
        QueueType,
        Field(description="classic, or quorum (replicated: the durable choice for clusters)."),
    ] = QueueType.CLASSIC
    ordered: Annotated[
        bool,
        Field(
            description="Handle each aggregate's events one at a time, in publish order, "
            "across all workers (partition queues keyed by the aggregate_id header; needs "
            "RabbitMQ's rabbitmq_consistent_hash_exchange plugin)."
        ),
    ] = False
    # Not "partitions": `migrate --partitions` (OUTBOX_RELAY_PARTITIONS) is the relay's.
    partition_queues: Annotated[
        Count,
        Field(
            le=MAX_PARTITIONS,
            description="With --ordered: how many partition queues, the most workers that share "
            "the work. Fixed once events flow (a new count moves aggregates).",
        ),
    ] = 16

    @model_validator(mode="after")
    def _ordered_options_need_ordered(self) -> TopologySettings:
        if not self.ordered:
            for name in sorted(self.model_fields_set & ORDERED_ONLY):
                flag = "--" + name.replace("_", "-")
                raise ValueError(
                    f"{flag}: applies with --ordered only (it shapes partition queues)"
                )
        return self

    def topology(self) -> Topology:
        return Topology(
            queue=self.queue,
            bindings=self.bindings,
            exchange=self.exchange,
            queue_type=self.queue_type,
            delays=self.delays(),
            ordered=self.ordered,
            partitions=self.partition_queues,
        )


class ConsumerSettings(TopologySettings):
    """How a worker connects and behaves; built by ``outbox-relay consume`` or by hand."""

    database_url: DatabaseUrl = DEFAULT_DATABASE_URL
    schema_name: Schema = "public"
    prefetch: Annotated[
        Count, Field(le=65535, description="Unacked messages buffered per worker.")
    ] = 100
    consumer_name: ConsumerName = None
    inbox_retention: Annotated[
        Duration,
        Field(
            description="How long processed event ids are remembered (longer than any redelivery)."
        ),
    ] = 7 * 24 * 3600.0
    cleanup_interval: Annotated[
        Duration, Field(description="How often old inbox rows are deleted.")
    ] = 3600.0
    declare_topology: Annotated[
        bool,
        Field(
            alias="declare",
            description="Declare the topology on start (turn off when operators own it).",
        ),
        Flag(decl="--declare/--no-declare"),
    ] = True
    rebalance_interval: Annotated[
        Seconds,
        Field(
            le=3600,
            description="With --ordered: how often a worker counts the workers and claims or "
            "hands over partitions (also how soon a dead worker's partitions are taken over).",
        ),
    ] = 1.0
    broker_timeout: Annotated[
        Seconds,
        Field(
            le=3600,
            description="Seconds without a byte from RabbitMQ after which the connection counts "
            "as dead and is reopened (a cut link, a frozen host); the AMQP heartbeat is derived "
            "from it, so a handler running longer than about 2/3 of it loses the connection "
            "(its event is redelivered, and deduplicated). At least 20 s in effect.",
        ),
    ] = 60.0
    statement_timeout: Annotated[
        Seconds,
        Field(
            le=86_400,
            description="Longest query on the inbox connection, the handler's queries included "
            "(PostgreSQL's statement_timeout); a query still unanswered 5 s later counts as a "
            "dead link, and the worker reconnects.",
        ),
    ] = 60.0
    migrate_inbox: Annotated[bool, Flag(cli=False)] = True
    # As the relay's: after a link comes back, work resumes within seconds (docs/deploy.md,
    # "Dead links"), not after a backoff grown during the outage.
    reconnect_max_delay: Annotated[float, Field(gt=0), Flag(cli=False)] = 5.0

    @property
    def inbox_consumer(self) -> str:
        return self.consumer_name or self.queue

    def describe(self) -> dict[str, Any]:
        return {
            "broker_url": redact_url(self.broker_url),
            "database_url": redact_url(self.database_url),
            "queue": self.queue,
            "bindings": list(self.bindings),
            "prefetch": self.prefetch,
            "max_attempts": self.max_attempts,
            "queue_type": str(self.queue_type),
            "ordered": self.ordered,
            **({"partition_queues": self.partition_queues} if self.ordered else {}),
        }
