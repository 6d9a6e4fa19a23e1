"""Redis Streams via redis-py's asyncio client, one pipelined round trip per batch.

Each event is an ``XADD`` to ``<prefix>:<event type>`` (``events:order.created``), or to the one
stream ``<prefix>`` with ``--redis-stream-mode single``. A batch is one pipeline without MULTI:
the replies, in order, are the confirms (Redis has appended the entry), and a command Redis
refuses (e.g. the key holds another type) fails only its own event. Redis has no deduplication,
so the event id is a field for consumers to dedupe on. ``--message-format`` cloudevents-*: the
relay's CloudEvents field mapping (``ce_*`` fields and ``data``; docs/cloudevents.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import logging
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from pydantic import Field

from outbox_relay.settings import Count, Flag

try:
    import redis.asyncio
    import redis.exceptions
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
except ModuleNotFoundError as missing:  # the 'redis' extra; its options still show in --help
    MISSING_CLIENT: ModuleNotFoundError | None = missing
else:
    MISSING_CLIENT = None

from outbox_relay import tls
from outbox_relay.envelopes import STRUCTURED_CONTENT_TYPE, CloudEvents, MessageFormat
from outbox_relay.errors import BrokerUnavailableError, ConfigError
from outbox_relay.messages import CONFIRMED, OutboxMessage, PublishResult, failed
from outbox_relay.publishers.base import BrokerOptions, OnResult, PublisherSettings
from outbox_relay.redact import redact_url

log = logging.getLogger(__name__)


# Redis's default proto-max-bulk-len: a larger field ends the connection ("invalid bulk length").
PROTO_MAX_BULK_LEN = 512 * 1024 * 1024
# The probe at connect time: PING, the one command every Redis answers, even before AUTH (with
# +PONG, or an error such as -NOAUTH, -DENIED or -LOADING: all in the protocol).
PING = b"*1\r\n$4\r\nPING\r\n"
# RESP2 and RESP3 reply types: the first byte of anything a Redis server sends.
RESP_TYPES = frozenset(b"+-:$*_,#!=(%~>|")
# Bytes of a first answer read (and quoted when it is not Redis's).
FIRST_ANSWER_BYTES = 16


class StreamMode(enum.StrEnum):
    PER_TYPE = "per-type"  # one stream per event type: PREFIX:TYPE
    SINGLE = "single"  # one stream: PREFIX


class RedisOptions(BrokerOptions):
    redis_stream_mode: Annotated[
        StreamMode,
        Field(
            description="per-type: one stream per event type (PREFIX:TYPE); single: one stream PREFIX."
        ),
        Flag(panel="Redis"),
    ] = StreamMode.PER_TYPE
    redis_maxlen: Annotated[
        Count | None,
        Field(description="Trim each stream to about this many entries (XADD MAXLEN ~)."),
        Flag(panel="Redis"),
    ] = None


OPTIONS = RedisOptions

_UNAVAILABLE: tuple[type[Exception], ...] = (
    (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
    if MISSING_CLIENT is None
    else (OSError,)
)
_ANY_FAILURE: tuple[type[Exception], ...] = (
    (*_UNAVAILABLE, redis.exceptions.RedisError) if MISSING_CLIENT is None else _UNAVAILABLE
)


def stream_fields(message: OutboxMessage) -> dict[str, str | bytes]:
    """The entry's fields; absent aggregate fields are left out (Redis has no null)."""
    fields: dict[str, str | bytes] = {
        "event_id": message.event_id,
        "event_type": message.event_type,
    }
    if message.aggregate_type is not None:
        fields["aggregate_type"] = message.aggregate_type
    if message.aggregate_id is not None:
        fields["aggregate_id"] = message.aggregate_id
    fields["payload"] = message.payload
    fields["headers"] = json.dumps(message.headers, separators=(",", ":"))
    fields["created_at"] = message.created_at.isoformat()
    return fields


def cloudevents_binary_fields(ce: CloudEvents, message: OutboxMessage) -> dict[str, str | bytes]:
    """Binary mode (the relay's mapping, after the NATS binding): each attribute as a field
    ``ce_<name>`` with its canonical string (fields are binary-safe: no percent-encoding), the
    payload as ``data``."""
    fields: dict[str, str | bytes] = {
        "ce_" + name: value for name, value in ce.text_attributes(message).items()
    }
    fields["data"] = message.payload
    return fields


def cloudevents_structured_fields(
    ce: CloudEvents, message: OutboxMessage
) -> dict[str, str | bytes]:
    """Structured mode: ``content_type`` application/cloudevents+json and the JSON event
    format as ``data``."""
    return {"content_type": STRUCTURED_CONTENT_TYPE, "data": ce.structured(message)}


def reply_problem(answer: bytes) -> str | None:
    """Why ``answer``, the first bytes a server sent back to PING, is no Redis reply (so the
    server is another kind of service), or None."""
    if not answer:
        return "it closed the connection without answering PING"
    if answer[0] not in RESP_TYPES:
        return f"it answered {answer[:FIRST_ANSWER_BYTES]!r} to PING"
    return None


# Connections of a Redis client shared by the outboxes of a process: two pipelines on the wire
# at once keep Redis busy (it runs commands one at a time anyway).
SHARED_CONNECTIONS = 2


class RedisClients:
    """One Redis client per server (URL and TLS files) for the publishers of one process
    (``serve --config``): every outbox's pipelines take turns on its SHARED_CONNECTIONS
    connections."""

    def __init__(self) -> None:
        self._shared: dict[tuple[str, object], tuple[Any, set[RedisStreamsPublisher]]] = {}

    def attach(self, publisher: RedisStreamsPublisher) -> Any:
        key = (publisher._settings.broker_url, publisher._settings.broker_tls)
        shared = self._shared.get(key)
        if shared is None:
            shared = self._shared[key] = (publisher.make_client(shared=True), set())
        shared[1].add(publisher)
        return shared[0]

    def detach(self, publisher: RedisStreamsPublisher) -> Any:
        """Forget ``publisher``; the client to close when it was the last one on it."""
        for key, (client, users) in list(self._shared.items()):
            if publisher in users:
                users.discard(publisher)
                if not users:
                    del self._shared[key]
                    return client
        return None


class RedisStreamsPublisher:
    """Appends events to Redis streams with ``XADD`` (optionally ``MAXLEN ~``)."""

    name = "redis"

    def __init__(self, settings: PublisherSettings, clients: RedisClients | None = None) -> None:
        self._settings = settings
        self._options = RedisOptions.of(settings)
        self._router = settings.router()
        # rediss:// only: the files are checked here, at start-up; redis-py builds its own
        # context from them (it takes no SSLContext), verifying the chain and the host name.
        settings.broker_tls_context()
        files = settings.broker_tls
        self._tls_arguments: dict[str, Any] = (
            {
                "ssl_cert_reqs": "required",
                "ssl_check_hostname": True,
                "ssl_ca_certs": files.ca_file,
                "ssl_certfile": files.cert_file,
                "ssl_keyfile": files.key_file,
            }
            if settings.scheme == "rediss"
            else {}
        )
        # Any: redis-py ships inline types while types-redis (for redis 4) may also be installed,
        # and the two disagree (generic or not, aclose or close).
        self._client: Any = None
        self._healthy = False
        # Shared with the other relays of the process (serve --config), or None: its own.
        self._clients = clients
        # Once the URL answered like Redis, it is Redis: a later connection dropped before any
        # reply (a restart, a proxy without a backend) is retried, not called a wrong URL.
        self._answered = False
        ce = settings.cloudevents
        self._fields: Callable[[OutboxMessage], dict[str, str | bytes]] = (
            stream_fields
            if ce is None
            else functools.partial(
                cloudevents_structured_fields
                if settings.message_format is MessageFormat.STRUCTURED
                else cloudevents_binary_fields,
                ce,
            )
        )

    def stream(self, message: OutboxMessage) -> str:
        """Its --route's prefix (or --topic-prefix), then (per-type mode) the event type."""
        prefix = self._router.destination(message)
        if self._options.redis_stream_mode is StreamMode.SINGLE:
            return prefix
        return f"{prefix}:{message.event_type}"

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        where = redact_url(self._settings.broker_url)
        client = self._clients.attach(self) if self._clients is not None else self.make_client()
        self._client = client
        try:
            if not self._answered:
                await self._check_server(client, where)
            await client.ping()
        except ConfigError:
            await self.close()
            raise
        except redis.exceptions.AuthenticationError as exc:
            await self.close()
            raise ConfigError(f"Redis at {where} refused the credentials: {exc}") from exc
        except redis.exceptions.InvalidResponse as exc:
            await self.close()
            if self._answered:
                raise BrokerUnavailableError(
                    f"cannot connect to Redis at {where}: its answer was no Redis reply"
                ) from exc
            raise ConfigError(
                f"--broker-url: {where} did not answer like a Redis server (is the host or port "
                "that of another service?)"
            ) from exc
        except _ANY_FAILURE as exc:
            await self.close()
            refused = tls.refused("Redis", where, exc)
            if refused is not None:
                raise refused from exc
            raise BrokerUnavailableError(f"cannot connect to Redis at {where}: {exc}") from exc
        self._healthy = self._answered = True
        log.info("connected to broker", extra={"broker": "redis", "url": where})

    def make_client(self, shared: bool = False) -> Any:
        """A client of the URL (connections open at its first command); ``shared`` by the
        publishers of a process: at most SHARED_CONNECTIONS connections, pipelines waiting
        their turn for one."""
        arguments: dict[str, Any] = {
            "socket_connect_timeout": min(self._settings.confirm_timeout, 10.0),
            "socket_timeout": self._settings.confirm_timeout,
            # The relay retries, and republishes the whole batch: a hidden client retry of a
            # pipeline would only add duplicates.
            "retry": Retry(NoBackoff(), 0),
            **self._tls_arguments,
        }
        try:
            if not shared:
                return redis.asyncio.Redis.from_url(self._settings.broker_url, **arguments)
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                self._settings.broker_url,
                max_connections=SHARED_CONNECTIONS,
                timeout=self._settings.confirm_timeout,
                **arguments,
            )
            return redis.asyncio.Redis(connection_pool=pool)
        except ValueError as exc:
            where = redact_url(self._settings.broker_url)
            raise ConfigError(f"--broker-url: invalid Redis URL {where}: {exc}") from exc

    async def _check_server(self, client: Any, where: str) -> None:
        """One PING on a connection of its own, before the client's first, its answer read raw.

        redis-py cannot say whether a connection it lost was ever answered: RabbitMQ resetting
        the connection after Redis's first command, PostgreSQL or Mosquitto closing it, read as
        "Connection reset by peer" or "Connection closed by server", like a Redis that went
        away. Here a peer that accepts the connection and then hangs up or answers anything
        but a Redis reply is another kind of service; one that cannot be reached, or says
        nothing (a broker may be starting), stays a retried error. Done until the URL has
        answered like Redis once."""
        pool = client.connection_pool
        # The client's own connection settings (host, port, TLS context), not connected.
        connection = pool.connection_class(**pool.connection_kwargs)
        ssl_context = getattr(connection, "ssl_context", None)
        timeout = min(self._settings.confirm_timeout, 10.0)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    connection.host,
                    connection.port,
                    ssl=ssl_context.get() if ssl_context is not None else None,
                ),
                timeout=timeout,
            )
        except (OSError, TimeoutError) as exc:
            refused = tls.refused("Redis", where, exc)
            if refused is not None:
                raise refused from exc
            raise BrokerUnavailableError(f"cannot connect to Redis at {where}: {exc!r}") from exc
        try:
            writer.write(PING)
            await asyncio.wait_for(writer.drain(), timeout=timeout)
            answer = await asyncio.wait_for(reader.read(FIRST_ANSWER_BYTES), timeout=timeout)
        except TimeoutError as exc:
            raise BrokerUnavailableError(
                f"no answer to PING from {where} within {timeout:g}s (is it a Redis server?)"
            ) from exc
        except OSError as exc:
            # Through TLS 1.3 a server refusing our client certificate says so here, at the
            # first read after the handshake: a certificate problem, not another service.
            refused = tls.refused("Redis", where, exc)
            if refused is not None:
                raise refused from exc
            answer = b""  # reset: hung up without answering
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), timeout=timeout)
        if not answer and ssl_context is not None:
            raise tls.hung_up_after_handshake("Redis", where, self._settings.broker_tls)
        problem = reply_problem(answer)
        if problem is not None:
            raise ConfigError(
                f"--broker-url: {where} did not answer like a Redis server ({problem}; is the "
                "host or port that of another service?)"
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        self._healthy = False
        if self._clients is not None:
            client = self._clients.detach(self)  # the last one out closes it
        if client is not None:
            with contextlib.suppress(*_ANY_FAILURE):
                await client.aclose()

    def is_healthy(self) -> bool:
        return self._client is not None and self._healthy

    # -- publishing ------------------------------------------------------------------------

    @property
    def max_message_bytes(self) -> int:
        """Redis refuses (and drops the connection over) a value above proto-max-bulk-len."""
        return min(self._settings.max_message_bytes, PROTO_MAX_BULK_LEN)

    def message_problem(self, message: OutboxMessage) -> str | None:
        return None  # XADD is binary-safe: any value within the size limit goes

    async def publish_batch(
        self, messages: Sequence[OutboxMessage], on_result: OnResult | None = None
    ) -> list[PublishResult]:
        client = self._client
        if client is None or not self._healthy:
            raise BrokerUnavailableError("not connected to Redis")
        maxlen = self._options.redis_maxlen
        results: list[PublishResult] = [CONFIRMED] * len(messages)
        pipe = client.pipeline(transaction=False)
        for message in messages:
            pipe.xadd(
                self.stream(message),
                self._fields(message),
                maxlen=maxlen,
                approximate=True,
            )
        if messages:
            try:
                replies = await pipe.execute(raise_on_error=False)
            except _UNAVAILABLE as exc:
                self._healthy = False
                raise BrokerUnavailableError(f"lost the Redis connection: {exc}") from exc
            finally:
                await pipe.reset()
            for reply in replies:
                if isinstance(reply, _UNAVAILABLE):
                    self._healthy = False
                    raise BrokerUnavailableError(f"lost the Redis connection: {reply}")
            # One round trip answers the whole wave: the results arrive together.
            for index, reply in enumerate(replies):
                if isinstance(reply, Exception):
                    stream = self.stream(messages[index])
                    results[index] = failed(f"XADD to {stream!r} refused by Redis: {reply}")
                if on_result is not None:
                    on_result(index, results[index])
        return results
