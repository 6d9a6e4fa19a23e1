"""NATS JetStream via nats-py, with pipelined publish acks.

Subject = ``<prefix>.<event type>`` (``events.order.created``). A batch goes out with
``publish_async`` (every message written before any ack is awaited); the JetStream PubAck is the
confirm: the stream has stored the message. ``Nats-Msg-Id`` = event id, so a batch republished
after a lost connection or a relay crash is dropped by the stream's duplicate window instead of
stored twice. A subject no stream listens on gets "no responders": a failed, retried event.
``--message-format`` cloudevents-*: the CloudEvents NATS binding (docs/cloudevents.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

from outbox_relay.settings import Flag

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client
    from nats.js import JetStreamContext
except ModuleNotFoundError as missing:  # the 'nats' extra; its options still show in --help
    MISSING_CLIENT: ModuleNotFoundError | None = missing
else:
    MISSING_CLIENT = None

from outbox_relay import tls
from outbox_relay.envelopes import (
    STRUCTURED_CONTENT_TYPE,
    CloudEvents,
    MessageFormat,
    percent_encoded,
)
from outbox_relay.errors import BrokerRejectedMessageError, BrokerUnavailableError, ConfigError
from outbox_relay.messages import CONFIRMED, OutboxMessage, PublishResult, failed
from outbox_relay.publishers.base import BrokerOptions, OnResult, PublisherSettings
from outbox_relay.redact import redact_url

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"


def nats_headers(message: OutboxMessage) -> dict[str, str]:
    """The row's headers and the aggregate as NATS headers (strings; other JSON as its text)."""
    headers = {
        key: value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        for key, value in message.broker_headers().items()
    }
    headers[MSG_ID_HEADER] = message.event_id
    headers["Content-Type"] = "application/json"
    headers["Outbox-Event-Type"] = message.event_type
    headers["Outbox-Created-At"] = message.created_at.isoformat()
    return headers


def cloudevents_binary(ce: CloudEvents, message: OutboxMessage) -> tuple[bytes, dict[str, str]]:
    """NATS binding, binary mode: every attribute (datacontenttype too) as a ``ce-`` header,
    its value percent-encoded; the payload as the body."""
    headers = {
        "ce-" + name: percent_encoded(value) for name, value in ce.text_attributes(message).items()
    }
    headers[MSG_ID_HEADER] = message.event_id
    return message.payload, headers


def cloudevents_structured(ce: CloudEvents, message: OutboxMessage) -> tuple[bytes, dict[str, str]]:
    """NATS binding, structured mode: the JSON event format, told apart by Content-Type."""
    headers = {MSG_ID_HEADER: message.event_id, "Content-Type": STRUCTURED_CONTENT_TYPE}
    return ce.structured(message), headers


# nats-py accepts HTTP-style token names only; "Nats-" names are the server's own (expected
# stream, sequence, rollup, ...): a row's header must not steer JetStream.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What the server closes a connection with when a message was to blame.
_MESSAGE_FAULT = re.compile(r"maximum payload|header", re.IGNORECASE)
# JetStream refuses a message whose header block is larger (error 10097).
MAX_HEADER_BLOCK = 65535
_OWN_HEADERS = frozenset({MSG_ID_HEADER, "Content-Type", "Outbox-Event-Type", "Outbox-Created-At"})


def header_problem(headers: dict[str, str]) -> str | None:
    """NATS headers are MIME-style lines: token names, values on one line."""
    for key, value in headers.items():
        if not _HEADER_NAME.fullmatch(key):
            return f"header name {key[:80]!r} cannot be a NATS header (letters, digits, -_.!#$%&'*+^`|~)"
        if key.lower().startswith("nats-") and key not in _OWN_HEADERS:
            return f"header {key[:80]!r} is reserved by NATS (names starting with Nats-)"
        if "\r" in value or "\n" in value:
            return f"header {key[:80]!r} has a line break, which NATS headers cannot carry"
        if value != value.strip():
            return f"header {key[:80]!r} starts or ends with blanks, which NATS headers drop"
    return None


def header_block_size(headers: dict[str, str]) -> int:
    """Bytes of the NATS/1.0 header block nats-py writes for ``headers``."""
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items()) + 2


def check_stream_name(name: str) -> str:
    """JetStream stream names: no whitespace, '.', '*', '>', slashes or control characters."""
    if (
        not name
        or len(name) > 255
        or any(c in name for c in ".*>/\\")
        or not name.isprintable()
        or any(c.isspace() for c in name)
    ):
        raise ValueError(
            f"{name!r} is not a JetStream stream name (1-255 printable characters without "
            "spaces, '.', '*', '>', '/' or '\\'), e.g. EVENTS"
        )
    return name


class NatsOptions(BrokerOptions):
    nats_stream: Annotated[
        str,
        AfterValidator(check_stream_name),
        Field(
            description="JetStream stream, created at start-up (subjects PREFIX.>) unless it exists."
        ),
        Flag(metavar="NAME", panel="NATS"),
    ] = "EVENTS"


OPTIONS = NatsOptions


class NatsConnections:
    """One NATS connection per server (URL and TLS files) for the publishers of one process
    (``serve --config``): JetStream publishes and their acks are independent per message, so
    outboxes share it as they would share a server. A lost connection fails every publisher on
    it; each reconnects, and the first to do so opens the next connection for all."""

    def __init__(self) -> None:
        self._shared: dict[tuple[str, object], _SharedNats] = {}
        self._opening = asyncio.Lock()

    async def attach(self, publisher: NatsPublisher, lost: asyncio.Future[None]) -> Client:
        key = (publisher._settings.broker_url, publisher._settings.broker_tls)
        async with self._opening:
            shared = self._shared.get(key)
            if shared is None or not shared.client.is_connected:
                fresh = _SharedNats()
                fresh.client = await publisher.open_client(fresh.losses)
                shared = self._shared[key] = fresh
        shared.users[publisher] = lost
        return shared.client

    async def detach(self, publisher: NatsPublisher) -> Client | None:
        """Forget ``publisher``; the connection to close when it was the last one on it."""
        for key, shared in list(self._shared.items()):
            if shared.users.pop(publisher, None) is not None and not shared.users:
                del self._shared[key]
                return shared.client
        return None


class _SharedNats:
    client: Client

    def __init__(self) -> None:
        self.users: dict[NatsPublisher, asyncio.Future[None]] = {}

    def losses(self) -> list[asyncio.Future[None]]:
        return list(self.users.values())


class NatsPublisher:
    """Publishes to JetStream; the stream (``--nats-stream``) is created or checked at start-up."""

    name = "nats"

    def __init__(
        self, settings: PublisherSettings, connections: NatsConnections | None = None
    ) -> None:
        self._settings = settings
        # Shared with the other relays of the process (serve --config), or None: its own.
        self._connections = connections
        self._options = NatsOptions.of(settings)
        self._tls = settings.broker_tls_context()
        self._prefix = settings.topic_prefix
        self._router = settings.router()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._lost: asyncio.Future[None] | None = None
        self._ce = settings.cloudevents
        self._structured = settings.message_format is MessageFormat.STRUCTURED

    def _encode(self, message: OutboxMessage) -> tuple[bytes, dict[str, str]]:
        """Body and headers of ``message`` in the chosen format."""
        ce = self._ce
        if ce is None:
            return message.payload, nats_headers(message)
        if self._structured:
            return cloudevents_structured(ce, message)
        return cloudevents_binary(ce, message)

    def subject_of(self, message: OutboxMessage) -> str:
        """The message's subject: its --route's prefix (or --topic-prefix), then its type."""
        if not self._router:
            return f"{self._prefix}.{message.event_type}"
        return f"{self._router.destination(message)}.{message.event_type}"

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        where = redact_url(self._settings.broker_url)
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lost = lost
        if self._connections is not None:
            self._nc = await self._connections.attach(self, lost)
        else:
            self._nc = await self.open_client(lambda: [lost])
        self._js = self._nc.jetstream(
            timeout=self._settings.confirm_timeout,
            # A batch is the relay's window; unacked futures are cancelled (freeing their slots)
            # when it ends, so nats-py's own limit must never make a batch wait.
            publish_async_max_pending=1_000_000,
        )
        try:
            await self._ensure_stream(self._js)
        except BaseException:
            await self.close()
            raise
        log.info("connected to broker", extra={"broker": "nats", "url": where})

    async def open_client(self, losses: Callable[[], Iterable[asyncio.Future[None]]]) -> Client:
        """A connection to the server; when it is lost, every future ``losses()`` gives then
        fails (one per publisher on it: several with a shared connection)."""
        where = redact_url(self._settings.broker_url)
        errors: list[Exception] = []

        async def on_disconnected() -> None:
            last = errors[-1] if errors else None
            for lost in losses():
                if lost.done():
                    continue
                if last is not None and _MESSAGE_FAULT.search(str(last)):
                    # The server closed the connection over something that was sent.
                    lost.set_exception(
                        BrokerRejectedMessageError(f"NATS closed the connection: {last}")
                    )
                else:
                    lost.set_exception(
                        BrokerUnavailableError(f"lost the NATS connection to {where}")
                    )

        async def on_error(exc: Exception) -> None:
            errors.append(exc)
            log.debug("NATS client error: %r", exc)

        await self._check_server(where)
        try:
            # The relay owns reconnecting (and republishing the batch in flight), so the client
            # must not silently reconnect and leave acks hanging.
            return await nats.connect(
                self._settings.broker_url,
                allow_reconnect=False,
                # nats-py retries even the first connect (60 x 2 s by default; 0 = forever):
                # two quick tries, then the relay's own backoff takes over.
                max_reconnect_attempts=1,
                reconnect_time_wait=0.2,
                connect_timeout=min(self._settings.confirm_timeout, 10.0),
                disconnected_cb=on_disconnected,
                closed_cb=on_disconnected,
                error_cb=on_error,
                # tls:// only: verifies the chain (--broker-ca-file) and the URL's host name.
                tls=self._tls,
            )
        except nats.errors.AuthorizationError as exc:
            raise ConfigError(
                f"NATS at {where} refused the credentials: check the user, password or token in "
                "--broker-url"
            ) from exc
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            refused = tls.refused("NATS", where, exc)
            if refused is not None:
                raise refused from exc
            raise BrokerUnavailableError(f"cannot connect to NATS at {where}: {exc!r}") from exc

    async def _check_server(self, where: str) -> None:
        """Read the server's INFO line before the client sends anything.

        A NATS server greets every connection with ``INFO {...}``; anything else is another
        kind of service. And ``tls://`` must mean TLS: nats-py upgrades only when the server
        requires it, and would otherwise send the credentials in plaintext, so a ``tls://`` URL
        pointing at a server that does not require TLS is refused before any CONNECT is sent.
        """
        parts = urlsplit(self._settings.broker_url)
        host, port = parts.hostname or "localhost", parts.port or 4222
        timeout = min(self._settings.confirm_timeout, 10.0)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), timeout=timeout
            )
        except (OSError, TimeoutError) as exc:
            raise BrokerUnavailableError(f"cannot connect to NATS at {where}: {exc!r}") from exc
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            raise BrokerUnavailableError(
                f"no NATS greeting from {where} within {timeout:g}s (is it a NATS server?)"
            ) from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if not line.startswith(b"INFO "):
            raise ConfigError(
                f"--broker-url: {where} did not answer like a NATS server (is the host or port "
                "that of another service?)"
            )
        try:
            info = json.loads(line[5:])
        except ValueError:
            info = {}
        if parts.scheme.lower() == "tls" and not info.get("tls_required"):
            raise ConfigError(
                f"--broker-url: tls:// but the NATS server at {where} does not require TLS; "
                "refusing to send credentials in plaintext (enable TLS on the server, or use "
                "nats:// deliberately)"
            )

    async def _routed_elsewhere(self, js: JetStreamContext) -> list[str]:
        """The --route prefixes another stream already listens on (they stay its)."""
        taken = []
        for prefix in self._router.destinations()[1:]:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.find_stream_name_by_subject(f"{prefix}.>")
                taken.append(prefix)
        return taken

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        stream = self._options.nats_stream
        wanted = f"{self._prefix}.>"
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            # The stream also takes the routes' prefixes that no other stream listens on.
            elsewhere = await self._routed_elsewhere(js)
            routed = [
                f"{prefix}.>"
                for prefix in self._router.destinations()[1:]
                if prefix not in elsewhere
            ]
            try:
                await js.add_stream(name=stream, subjects=[wanted, *routed])
            except nats.js.errors.BadRequestError as exc:
                # Typically: the subjects overlap another stream's.
                raise ConfigError(
                    f"--nats-stream: cannot create JetStream stream {stream!r} for {wanted!r}: "
                    f"{exc.description}"
                ) from exc
            log.info("created JetStream stream", extra={"stream": stream, "subjects": wanted})
            return
        except nats.js.errors.ServiceUnavailableError as exc:
            raise ConfigError(
                "NATS server has JetStream disabled (start nats-server with -js)"
            ) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise BrokerUnavailableError(
                f"cannot read JetStream stream {stream!r}: {exc!r}"
            ) from exc
        subjects = list(info.config.subjects or [])
        elsewhere = await self._routed_elsewhere(js)
        for prefix in self._router.destinations()[1:]:
            if f"{prefix}.>" not in subjects and ">" not in subjects and prefix not in elsewhere:
                log.warning(
                    "no JetStream stream listens on %r (a --route destination): events routed "
                    "there will fail as unroutable; add it to a stream's subjects",
                    f"{prefix}.>",
                )
        if wanted not in subjects and ">" not in subjects:
            # Narrower subjects may be on purpose; events outside them fail with a clear reason.
            log.warning(
                "JetStream stream %r listens on %s, not %r: events outside those subjects will "
                "fail as unroutable",
                stream,
                subjects,
                wanted,
            )

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        self._js = None
        lost, self._lost = self._lost, None
        if self._connections is not None:
            nc = await self._connections.detach(self)  # the last one out closes it
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await asyncio.wait_for(nc.close(), timeout=5)
        if lost is not None and lost.done():
            lost.exception()  # retrieved: asyncio would otherwise log it as never retrieved

    def is_healthy(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    # -- publishing ------------------------------------------------------------------------

    @property
    def max_message_bytes(self) -> int:
        """The server's max_payload (headers and payload together), once connected."""
        nc = self._nc
        limit = self._settings.max_message_bytes
        return min(limit, nc.max_payload) if nc is not None and nc.max_payload else limit

    def message_problem(self, message: OutboxMessage) -> str | None:
        body, headers = self._encode(message)
        problem = header_problem(headers)
        if problem:
            return problem
        block = header_block_size(headers)
        if block > MAX_HEADER_BLOCK:
            return (
                f"NATS headers take {block} bytes, over JetStream's {MAX_HEADER_BLOCK}-byte limit"
            )
        total, limit = block + len(body), self.max_message_bytes
        if total > limit:
            return (
                f"headers and payload take {total} bytes, over the {limit}-byte limit (NATS "
                "max_payload or --max-message-bytes)"
            )
        return None

    async def publish_batch(
        self, messages: Sequence[OutboxMessage], on_result: OnResult | None = None
    ) -> list[PublishResult]:
        js, nc, lost = self._js, self._nc, self._lost
        if js is None or nc is None or lost is None or not nc.is_connected:
            raise BrokerUnavailableError("not connected to NATS")
        results: list[PublishResult | None] = [None] * len(messages)
        pending: dict[int, asyncio.Future[Any]] = {}

        def report(index: int, result: PublishResult) -> None:
            if results[index] is None:
                results[index] = result
                if on_result is not None:
                    on_result(index, result)

        def answered(index: int, message: OutboxMessage, future: asyncio.Future[Any]) -> None:
            if not future.cancelled():
                report(index, self._result(future, message))

        try:
            for index, message in enumerate(messages):
                body, headers = self._encode(message)
                future = await js.publish_async(
                    self.subject_of(message),
                    body,
                    # No stall timeout: nats-py would then await each message through a task,
                    # and every message would be flushed in a socket write of its own.
                    wait_stall=None,
                    headers=headers,
                )
                pending[index] = future
                future.add_done_callback(functools.partial(answered, index, message))
            if pending:
                await self._await_acks(pending, lost)
        except (nats.errors.Error, OSError) as exc:
            if isinstance(exc, nats.js.errors.TooManyStalledMsgsError | nats.errors.TimeoutError):
                raise BrokerUnavailableError(
                    f"NATS did not ack within {self._settings.confirm_timeout}s"
                ) from exc
            raise BrokerUnavailableError(f"NATS publish failed: {exc!r}") from exc
        finally:
            for future in pending.values():
                if not future.done():
                    future.cancel()
        return [result if result is not None else CONFIRMED for result in results]

    async def _await_acks(
        self, pending: dict[int, asyncio.Future[Any]], lost: asyncio.Future[None]
    ) -> None:
        """Wait for every PubAck. A message left without one while others of the wave were
        acked on a live connection failed on its own (JetStream refuses some messages without
        answering: nats-io/nats.py#985): it fails alone, to be retried; if nothing was acked,
        the server is not answering and the relay reconnects."""
        futures = list(pending.values())
        acks: asyncio.Future[Any] = asyncio.gather(*futures, return_exceptions=True)
        done, _ = await asyncio.wait(
            {acks, lost},
            timeout=self._settings.confirm_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if acks in done:
            return
        acks.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acks
        if lost in done:
            cause = lost.exception()
            if isinstance(cause, BrokerRejectedMessageError):
                raise cause
            raise BrokerUnavailableError("lost the NATS connection mid-batch") from cause
        answered = sum(1 for f in futures if f.done() and not f.cancelled())
        unanswered = len(futures) - answered
        if not answered:
            raise BrokerUnavailableError(
                f"NATS did not ack {unanswered} message(s) within {self._settings.confirm_timeout}s"
            )
        for future in futures:
            if not future.done():
                future.set_exception(
                    nats.errors.TimeoutError()  # reported as this message's own failure
                )

    def _result(self, future: asyncio.Future[Any], message: OutboxMessage) -> PublishResult:
        exc = future.exception()
        if exc is None:
            return CONFIRMED  # a duplicate ack (ack.duplicate) also means: the stream has it
        subject = self.subject_of(message)
        if isinstance(exc, nats.js.errors.NoStreamResponseError):
            return failed(
                f"unroutable: no JetStream stream is bound to subject {subject!r}; add it to the "
                f"subjects of stream {self._options.nats_stream!r} (--nats-stream)"
            )
        if isinstance(exc, nats.js.errors.APIError):
            return failed(f"rejected by JetStream for {subject!r}: {exc.description or exc!r}")
        if isinstance(exc, nats.errors.TimeoutError):
            return failed(
                f"no JetStream PubAck for {subject!r} within {self._settings.confirm_timeout}s "
                "while the server acked others (it refused this message without answering)"
            )
        return failed(f"NATS publish of {subject!r} failed: {exc!r}")
