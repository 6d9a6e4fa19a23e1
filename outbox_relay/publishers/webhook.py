"""HTTP webhook via httpx: POST each event (or each batch) as JSON; a 2xx response is the confirm.

Body of one event::

    {"event_id": "...", "event_type": "order.created", "aggregate_type": "order",
     "aggregate_id": "123", "created_at": "2026-...", "headers": {...}, "payload": <the payload>}

With ``--webhook-batch`` the body is ``{"events": [<event>, ...]}`` (one wave of the relay's
batch) and the response settles all of them. Request headers: ``Idempotency-Key`` = the event id
(in batch mode a digest of the event ids), ``X-Outbox-Event-Id``/``-Event-Type``, the row's
``traceparent``/``tracestate`` (W3C trace context is an HTTP convention), and with
``--webhook-secret`` ``X-Outbox-Signature: sha256=<hex HMAC-SHA256 of the body>``.

With ``--message-format cloudevents-binary|cloudevents-structured`` the request follows the
CloudEvents HTTP binding instead (``ce-`` headers or an ``application/cloudevents+json`` body;
batches as ``application/cloudevents-batch+json``): docs/cloudevents.md.

Verdicts: 2xx confirmed; 408, 429 and 5xx failed and retried with backoff; any other 4xx is a
permanent failure (dead at once: resending the same request cannot change the answer); a
timeout fails the event (retried) when the endpoint still answers a probe. An endpoint that cannot
be reached at all, or that answers nothing (a cut link, a frozen host: the probe times out too),
raises BrokerUnavailableError, so the relay goes unready, reconnects and republishes the batch:
a dead link is noticed within twice ``--webhook-timeout`` (docs/deploy.md, "Dead links").
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
from collections.abc import Coroutine, Sequence
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field

from outbox_relay.settings import Flag, Seconds

try:
    import httpx
except ModuleNotFoundError as missing:  # the 'webhook' extra; its options still show in --help
    MISSING_CLIENT: ModuleNotFoundError | None = missing
else:
    MISSING_CLIENT = None

from outbox_relay import tls
from outbox_relay.envelopes import (
    BATCH_CONTENT_TYPE,
    DATA_CONTENT_TYPE,
    STRUCTURED_CONTENT_TYPE,
    MessageFormat,
    percent_encoded,
)
from outbox_relay.errors import BrokerUnavailableError, ConfigError
from outbox_relay.messages import CONFIRMED, OutboxMessage, PublishResult, failed
from outbox_relay.publishers.base import BrokerOptions, OnResult, PublisherSettings
from outbox_relay.redact import redact_url

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Outbox-Signature"
TRACE_HEADERS = ("traceparent", "tracestate")
# Longer trace headers stay in the body only (and longer CloudEvents attributes are refused in
# binary mode): servers refuse long header lines (431 from
# Python's http.server over 64 KiB, nginx over 8 KiB by default), and W3C trace context needs
# far less (a traceparent is 55 characters; vendors keep at least 512 of a tracestate).
MAX_TRACE_HEADER = 4096
RETRYABLE_4XX = frozenset({408, 429})


class WebhookOptions(BrokerOptions):
    webhook_secret: Annotated[
        str | None,
        Field(
            min_length=1,
            description="Shared secret: sign each body (X-Outbox-Signature: sha256=HMAC).",
        ),
        Flag(secret=True, panel="Webhook", metavar="SECRET"),
    ] = None
    webhook_timeout: Annotated[
        Seconds,
        Field(
            le=3600,
            description="Seconds to wait for the webhook's answer; twice this, a silent "
            "endpoint counts as a dead link.",
        ),
        Flag(panel="Webhook"),
    ] = 10.0
    webhook_batch: Annotated[
        bool,
        Field(
            description='POST events in batches ({"events": [...]}) instead of one request each.'
        ),
        Flag(decl="--webhook-batch/--webhook-per-event", panel="Webhook"),
    ] = False


OPTIONS = WebhookOptions


def event_body(message: OutboxMessage) -> bytes:
    """The event as JSON; the payload is embedded as PostgreSQL rendered it, not re-encoded."""
    envelope = {
        "event_id": message.event_id,
        "event_type": message.event_type,
        "aggregate_type": message.aggregate_type,
        "aggregate_id": message.aggregate_id,
        "created_at": message.created_at.isoformat(),
        "headers": message.headers,
    }
    head = json.dumps(envelope, separators=(",", ":"))[:-1].encode()
    return head + b',"payload":' + message.payload + b"}"


def is_header_value(value: str) -> bool:
    """Whether ``value`` can go in an HTTP header as it is (printable ASCII, not too long);
    anything else stays in the body's headers only."""
    return len(value) <= MAX_TRACE_HEADER and value.isascii() and value.isprintable()


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verdict(status: int, reason: str) -> PublishResult:
    if 200 <= status < 300:
        return CONFIRMED
    text = f"webhook answered {status} {reason}".rstrip()
    if 400 <= status < 500 and status not in RETRYABLE_4XX:
        return failed(text, permanent=True)
    return failed(text)


class WebhookPublisher:
    """POSTs events to an HTTP endpoint, concurrently within a wave."""

    name = "webhook"

    def __init__(self, settings: PublisherSettings) -> None:
        self._settings = settings
        self._options = WebhookOptions.of(settings)
        parts = urlsplit(settings.broker_url)
        if not parts.hostname:
            raise ConfigError(f"--broker-url: no host in {redact_url(settings.broker_url)}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._router = settings.router()
        # https:// only: verifies the chain (--broker-ca-file) and the URL's host name, and
        # presents --broker-cert-file to endpoints that require a client certificate.
        self._tls = settings.broker_tls_context()
        self._client: httpx.AsyncClient | None = None
        # A connection of its own for the liveness probe: the main pool may be full of requests
        # hung on a dead link, and queueing behind them would delay the verdict.
        self._prober: httpx.AsyncClient | None = None
        self._probe: asyncio.Future[bool] | None = None
        self._ce = settings.cloudevents
        self._format = settings.message_format
        if self._format is MessageFormat.BINARY and self._options.webhook_batch:
            raise ConfigError(
                "--message-format cloudevents-binary: the HTTP binding's binary mode carries one "
                "event per request; with --webhook-batch use cloudevents-structured (batches are "
                "sent as application/cloudevents-batch+json)"
            )

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        where = redact_url(self._settings.broker_url)
        client = httpx.AsyncClient(
            # Waiting for one of the 64 connections is not the endpoint being slow: with
            # thousands of events in flight, requests queue for a connection without a limit.
            timeout=httpx.Timeout(self._options.webhook_timeout, pool=None),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
            follow_redirects=False,
            verify=self._tls if self._tls is not None else True,
        )
        # HTTP has no session to open. One OPTIONS request (safe: no side effects) makes an
        # unreachable endpoint a clean BrokerUnavailableError at start-up, like other brokers,
        # and a service of another kind at the address a configuration error.
        # Every URL an event may go to: --broker-url, then each --route's.
        for url in self._router.destinations():
            where = redact_url(url)
            try:
                await client.request("OPTIONS", url)
            except (httpx.ConnectError, httpx.TimeoutException) as exc:
                await client.aclose()
                refused = tls.refused("the webhook", where, exc)
                if refused is not None:
                    raise refused from exc
                raise BrokerUnavailableError(
                    f"cannot reach the webhook at {where}: {exc!r}"
                ) from exc
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                await client.aclose()
                refused = tls.refused("the webhook", where, exc)
                if refused is not None:  # TLS 1.3: a refused client certificate shows on read
                    raise refused from exc
                raise ConfigError(
                    f"--broker-url: {where} did not answer like an HTTP server (is the host or "
                    "port that of another service?)"
                ) from exc
            except httpx.HTTPError as exc:
                await client.aclose()
                raise BrokerUnavailableError(
                    f"cannot reach the webhook at {where}: {exc!r}"
                ) from exc
        self._client = client
        self._prober = httpx.AsyncClient(
            timeout=httpx.Timeout(self._options.webhook_timeout),
            # A fresh connection per probe: a kept-alive one may be stale, which proves nothing.
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=0),
            follow_redirects=False,
            verify=self._tls if self._tls is not None else True,
        )
        log.info(
            "connected to broker",
            extra={"broker": "webhook", "url": redact_url(self._settings.broker_url)},
        )

    async def close(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
        for client in (self._client, self._prober):
            if client is not None:
                await client.aclose()
        self._client = self._prober = None

    def is_healthy(self) -> bool:
        return self._client is not None

    # -- publishing ------------------------------------------------------------------------

    @property
    def max_message_bytes(self) -> int:
        return self._settings.max_message_bytes

    def message_problem(self, message: OutboxMessage) -> str | None:
        """The body carries any JSON, and native headers that HTTP cannot carry are left out;
        in CloudEvents binary mode every attribute is a header, and servers refuse long ones."""
        ce = self._ce
        if ce is None or self._format is not MessageFormat.BINARY:
            return None
        for name, value in ce.text_attributes(message).items():
            size = len(percent_encoded(value))
            if size > MAX_TRACE_HEADER:
                return (
                    f"attribute {name!r} takes {size} bytes as the HTTP header ce-{name}, over "
                    f"{MAX_TRACE_HEADER} (servers refuse long header lines); use "
                    "--message-format cloudevents-structured"
                )
        return None

    async def publish_batch(
        self, messages: Sequence[OutboxMessage], on_result: OnResult | None = None
    ) -> list[PublishResult]:
        client = self._client
        if client is None:
            raise BrokerUnavailableError("webhook publisher is not connected")
        results: list[PublishResult | None] = [None] * len(messages)

        def report(index: int, result: PublishResult) -> None:
            results[index] = result
            if on_result is not None:
                on_result(index, result)

        if messages and self._options.webhook_batch:
            # One request per run of events routed to the same URL, one run after the other:
            # an aggregate's events never overtake each other across URLs.
            start = 0
            for url, run in itertools.groupby(messages, key=self._router.destination):
                count = len(list(run))
                result = await self._post(
                    client, self._batch_request(messages[start : start + count]), url
                )
                for index in range(start, start + count):
                    report(index, result)
                start += count
        elif messages:
            # Aggregates in parallel, each aggregate's events one after the other: concurrent
            # requests may be handled in any order, and a later event must not overtake.
            chains: dict[str | None, list[int]] = {}
            for index, message in enumerate(messages):
                chains.setdefault(message.aggregate_id, []).append(index)
            unordered = chains.pop(None, [])
            work = [self._chain(client, messages, chain, report) for chain in chains.values()]
            work += [self._chain(client, messages, [index], report) for index in unordered]
            await _all_or_first_error(work)
        return [result if result is not None else CONFIRMED for result in results]

    async def _chain(
        self,
        client: httpx.AsyncClient,
        messages: Sequence[OutboxMessage],
        chain: list[int],
        report: OnResult,
    ) -> None:
        for position, index in enumerate(chain):
            message = messages[index]
            result = await self._post(
                client, self._event_request(message), self._router.destination(message)
            )
            report(index, result)
            if not result.confirmed:
                for later in chain[position + 1 :]:
                    report(
                        later,
                        failed("not sent: an earlier event of its aggregate failed in this batch"),
                    )
                return

    def _event_request(self, message: OutboxMessage) -> tuple[bytes, dict[str, str]]:
        if self._ce is not None:
            return self._cloudevent_request(message)
        body = event_body(message)
        headers = {
            "Idempotency-Key": message.event_id,
            "X-Outbox-Event-Id": message.event_id,
            "X-Outbox-Event-Type": message.event_type,
        }
        for name in TRACE_HEADERS:
            value = message.headers.get(name)
            if isinstance(value, str) and is_header_value(value):
                headers[name] = value
        return body, headers

    def _cloudevent_request(self, message: OutboxMessage) -> tuple[bytes, dict[str, str]]:
        """HTTP binding: binary mode (``ce-`` headers, percent-encoded; the payload as the body)
        or structured mode (the JSON event format). Idempotency-Key and the W3C trace headers
        stay: they are HTTP's own, and the endpoint's infrastructure reads them."""
        ce = self._ce
        assert ce is not None
        headers = {"Idempotency-Key": message.event_id}
        for name in TRACE_HEADERS:
            value = message.headers.get(name)
            if isinstance(value, str) and is_header_value(value):
                headers[name] = value
        if self._format is MessageFormat.STRUCTURED:
            headers["Content-Type"] = STRUCTURED_CONTENT_TYPE
            return ce.structured(message), headers
        for name, value in ce.text_attributes(message).items():
            if name != "datacontenttype":  # it is the Content-Type
                headers["ce-" + name] = percent_encoded(value)
        headers["Content-Type"] = DATA_CONTENT_TYPE
        return message.payload, headers

    def _batch_request(self, batch: Sequence[OutboxMessage]) -> tuple[bytes, dict[str, str]]:
        ids = hashlib.sha256("\n".join(m.event_id for m in batch).encode()).hexdigest()
        headers = {"Idempotency-Key": f"batch-{ids[:40]}", "X-Outbox-Batch-Size": str(len(batch))}
        ce = self._ce
        if ce is not None:
            # The HTTP binding's batched mode: a JSON array of events in the JSON format.
            headers["Content-Type"] = BATCH_CONTENT_TYPE
            return b"[" + b",".join(ce.structured(m) for m in batch) + b"]", headers
        body = b'{"events":[' + b",".join(event_body(m) for m in batch) + b"]}"
        return body, headers

    async def _post(
        self, client: httpx.AsyncClient, request: tuple[bytes, dict[str, str]], url: str
    ) -> PublishResult:
        """POST to ``url``: the --broker-url, or the event's --route destination."""
        body, headers = request
        headers.setdefault("Content-Type", "application/json")
        secret = self._options.webhook_secret
        if secret:
            headers[SIGNATURE_HEADER] = sign(secret, body)
        try:
            response = await client.post(url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            # A slow endpoint fails this event (retried with backoff); one that answers nothing,
            # not even the probe, is a dead link: stop, unready, until it answers again.
            if not await self._reachable():
                raise self._unreachable(exc) from exc
            return failed(
                f"webhook did not answer within {self._options.webhook_timeout}s "
                f"(--webhook-timeout): {type(exc).__name__}"
            )
        except httpx.ConnectError as exc:
            raise self._unreachable(exc) from exc
        except (httpx.RemoteProtocolError, httpx.NetworkError) as exc:
            # The connection broke during this request. If the endpoint still answers, it was
            # this request (e.g. a body it resets on): fail it alone; else the link is down.
            if not await self._reachable():
                raise self._unreachable(exc) from exc
            return failed(f"the webhook broke the connection during the request: {exc!r}")
        except httpx.HTTPError as exc:
            return failed(f"webhook request failed: {exc!r}")
        return verdict(response.status_code, response.reason_phrase)

    async def _reachable(self) -> bool:
        """Whether the endpoint answers a probe (any status) within --webhook-timeout. The
        requests failing together on a dead link share one probe."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_once())
        return await asyncio.shield(self._probe)

    async def _probe_once(self) -> bool:
        prober = self._prober
        if prober is None:
            return False
        try:
            await prober.request("OPTIONS", self._settings.broker_url)
        except httpx.HTTPError:
            return False
        return True

    def _unreachable(self, exc: Exception) -> BrokerUnavailableError:
        return BrokerUnavailableError(
            f"cannot reach the webhook at {redact_url(self._settings.broker_url)}: {exc!r}"
        )


async def _all_or_first_error(work: list[Coroutine[Any, Any, None]]) -> None:
    """Run ``work`` concurrently; on the first error cancel the rest and raise it. A dead link
    found by one request ends the wave at once instead of after every other request's timeout."""
    tasks = [asyncio.ensure_future(step) for step in work]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            assert error is not None
            raise error
