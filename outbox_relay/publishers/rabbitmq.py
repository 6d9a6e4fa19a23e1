"""RabbitMQ via pika's asyncio adapter, with pipelined publisher confirms.

A batch is written to the socket in one go (``mandatory`` so unroutable messages come back as
``basic.return``; ``delivery_mode=2``), then the broker's acks and nacks, which may cover many
delivery tags at once (``multiple``), settle it. RabbitMQ sends a message's ``basic.return``
before its ``basic.ack``, so a returned message is known to have failed by the time it is acked.
Several batches may be in flight on the channel at once; each delivery tag maps to its batch.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Sequence
from itertools import takewhile
from typing import Any

import pika
import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from outbox_relay import amqp
from outbox_relay.errors import BrokerUnavailableError, ConfigError
from outbox_relay.messages import CONFIRMED, OutboxMessage, PublishResult, failed
from outbox_relay.publishers.base import BrokerOptions, PublisherSettings
from outbox_relay.redact import redact_url

log = logging.getLogger(__name__)


def _amqp_value(value: Any) -> Any:
    """AMQP tables have no float type in pika; carry floats as their JSON text."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {k: _amqp_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_amqp_value(v) for v in value]
    return value


class _CorkedConnection(AsyncioConnection):
    """pika hands every AMQP frame to the socket on its own: three send() calls per message, which
    costs more than encoding it. While corked, frames are collected and written in one piece."""

    _corked: list[bytes] | None = None

    def cork(self) -> None:
        self._corked = []

    def uncork(self) -> None:
        frames, self._corked = self._corked, None
        if frames and self.is_open:
            super()._adapter_emit_data(b"".join(frames))

    def _adapter_emit_data(self, data: bytes) -> None:
        if self._corked is None:
            super()._adapter_emit_data(data)
        else:
            self._corked.append(data)


class RabbitMQOptions(BrokerOptions):
    """RabbitMQ needs nothing beyond the common settings (--exchange, --confirm-timeout, ...)."""


OPTIONS = RabbitMQOptions

# Messages encoded between two hand-offs to the event loop: large enough to amortize the write,
# small enough that the broker starts on a batch at once and acks are read while it is sent.
_CHUNK = 200


class _Batch:
    """One publish_batch call in flight: its results, filled in as the broker settles them."""

    def __init__(self, messages: Sequence[OutboxMessage]) -> None:
        self.messages = messages
        self.results: list[PublishResult | None] = [None] * len(messages)
        self.returned: dict[int, str] = {}
        self.tags: list[int] = []
        self.unsettled = 0
        self.done = asyncio.get_running_loop().create_future()

    def settle(self, index: int, result: PublishResult) -> None:
        reason = self.returned.get(index)
        self.results[index] = failed(reason) if reason and result.confirmed else result
        self.unsettled -= 1

    def maybe_done(self) -> None:
        if not self.unsettled and not self.done.done():
            self.done.set_result(None)


class RabbitMQPublisher:
    """Publishes to a durable topic exchange (``events`` by default), routing key = event type."""

    name = "rabbitmq"

    def __init__(self, settings: PublisherSettings) -> None:
        self._settings = settings
        self._parameters = amqp.parameters(settings.broker_url)
        self._connection: _CorkedConnection | None = None
        self._channel: Channel | None = None
        # Several batches may be in flight at once (the relay sends the next before the previous
        # is confirmed). Delivery tag -> (batch, position), in tag order; message id -> the same.
        self._unconfirmed: dict[int, tuple[_Batch, int]] = {}
        self._by_message_id: dict[str, tuple[_Batch, int]] = {}
        self._batches: set[_Batch] = set()
        self._next_tag = 1
        self._failure: BaseException | None = None
        self._opening: asyncio.Future[None] | None = None
        self._closing: asyncio.Future[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        where = redact_url(self._settings.broker_url)

        def on_open(connection: AsyncioConnection) -> None:
            connection.channel(on_open_callback=on_channel)

        def on_open_error(_connection: AsyncioConnection, exc: BaseException | str) -> None:
            if not opened.done():
                error = exc if isinstance(exc, BaseException) else Exception(exc)
                opened.set_exception(amqp.translate(error, self._settings.broker_url))

        def on_channel(channel: Channel) -> None:
            self._channel = channel
            channel.add_on_close_callback(self._on_channel_closed)
            channel.add_on_return_callback(self._on_return)

            def on_confirm(frame: Any) -> None:
                # Delivery tags restart on every channel: a late ack from a channel given up on
                # must not settle this one's messages.
                if channel is self._channel:
                    self._on_confirm(frame)

            channel.confirm_delivery(ack_nack_callback=on_confirm, callback=on_confirming)

        def on_confirming(_frame: Any) -> None:
            assert self._channel is not None
            self._channel.exchange_declare(
                exchange=self._settings.exchange,
                exchange_type="topic",
                durable=True,
                callback=on_declared,
            )

        def on_declared(_frame: Any) -> None:
            if not opened.done():
                opened.set_result(None)

        self._failure = None
        self._next_tag = 1
        self._unconfirmed.clear()
        self._by_message_id.clear()
        self._connection = _CorkedConnection(
            self._parameters,
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=loop,
        )
        self._opening = opened
        try:
            # pika gives up itself after amqp.CONNECT_TIMEOUT (stack_timeout); this is a backstop.
            await asyncio.wait_for(opened, timeout=amqp.CONNECT_TIMEOUT + 5)
        except TimeoutError as exc:
            await self.close()
            raise BrokerUnavailableError(
                f"no AMQP handshake from {where} within {amqp.CONNECT_TIMEOUT:g}s (is it a "
                "RabbitMQ server, and reachable?)"
            ) from exc
        except BaseException:
            await self.close()
            raise
        log.info("connected to broker", extra={"broker": "rabbitmq", "url": where})

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = None
        if connection is None or connection.is_closed or connection.is_closing:
            return
        closed = asyncio.get_running_loop().create_future()
        self._closing = closed
        try:
            connection.close()
            await asyncio.wait_for(closed, timeout=5)
        except (TimeoutError, pika.exceptions.AMQPError):
            pass

    def is_healthy(self) -> bool:
        return (
            self._connection is not None
            and self._connection.is_open
            and self._channel is not None
            and self._channel.is_open
        )

    # -- publishing ------------------------------------------------------------------------

    async def publish_batch(self, messages: Sequence[OutboxMessage]) -> list[PublishResult]:
        channel = self._channel
        if channel is None or not self.is_healthy():
            raise BrokerUnavailableError("not connected to RabbitMQ") from self._failure
        batch = _Batch(messages)
        self._batches.add(batch)
        exchange = self._settings.exchange
        limit = self._settings.max_message_bytes
        connection = self._connection
        assert connection is not None
        try:
            for index, message in enumerate(messages):
                if index % _CHUNK == 0:
                    connection.uncork()
                    if index:
                        await asyncio.sleep(0)  # let the loop write the chunk and read acks
                    if not self.is_healthy():
                        raise BrokerUnavailableError(
                            "lost the RabbitMQ connection"
                        ) from self._failure
                    connection.cork()
                if len(message.payload) > limit:
                    batch.results[index] = failed(
                        f"payload of {len(message.payload)} bytes exceeds the {limit}-byte limit "
                        "(--max-message-bytes)",
                        permanent=True,
                    )
                    continue
                headers = message.broker_headers()
                properties = BasicProperties(
                    content_type="application/json",
                    delivery_mode=2,
                    message_id=message.event_id,
                    type=message.event_type,
                    timestamp=int(message.created_at.timestamp()),
                    headers=_amqp_value(headers) if headers else None,
                )
                try:
                    channel.basic_publish(
                        exchange, message.event_type, message.payload, properties, mandatory=True
                    )
                except (
                    pika.exceptions.UnsupportedAMQPFieldException,
                    # A header name over 255 bytes; an AMQPError, but no sign of a broken link.
                    pika.exceptions.ShortStringTooLong,
                    # An integer header outside 64 bits.
                    struct.error,
                    ValueError,
                    TypeError,
                ) as exc:
                    # Marshalled before anything is written, so nothing was sent.
                    batch.results[index] = failed(
                        f"headers cannot be encoded as AMQP: {exc!r}", permanent=True
                    )
                    continue
                except pika.exceptions.AMQPError as exc:
                    raise BrokerUnavailableError(f"RabbitMQ publish failed: {exc!r}") from exc
                self._unconfirmed[self._next_tag] = (batch, index)
                self._by_message_id[message.event_id] = (batch, index)
                batch.tags.append(self._next_tag)
                batch.unsettled += 1
                self._next_tag += 1
            connection.uncork()
            batch.maybe_done()
            try:
                await asyncio.wait_for(
                    asyncio.shield(batch.done), timeout=self._settings.confirm_timeout
                )
            except TimeoutError as exc:
                raise BrokerUnavailableError(
                    f"RabbitMQ did not confirm {batch.unsettled} message(s) "
                    f"within {self._settings.confirm_timeout}s"
                ) from exc
        finally:
            connection.uncork()
            self._forget(batch)
        return [result if result is not None else CONFIRMED for result in batch.results]

    # -- pika callbacks --------------------------------------------------------------------

    def _forget(self, batch: _Batch) -> None:
        self._batches.discard(batch)
        if batch.done.done() and not batch.done.cancelled():
            batch.done.exception()  # raised already in another form; not worth a log line
        for tag in batch.tags:
            self._unconfirmed.pop(tag, None)
        for message in batch.messages:
            self._by_message_id.pop(message.event_id, None)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if isinstance(method, Basic.Ack):
            result = CONFIRMED
        else:
            result = failed("nacked by RabbitMQ (internal error or queue overflow)")
        tag = method.delivery_tag
        # _unconfirmed is in ascending tag order, so the tags an ack with multiple covers are
        # a prefix of it.
        covered = list(takewhile(tag.__ge__, self._unconfirmed)) if method.multiple else [tag]
        touched: set[_Batch] = set()
        for covered_tag in covered:
            entry = self._unconfirmed.pop(covered_tag, None)
            if entry is None:
                continue
            batch, index = entry
            batch.settle(index, result)
            touched.add(batch)
        for batch in touched:
            batch.maybe_done()

    def _on_return(
        self, channel: Channel, method: Basic.Return, properties: BasicProperties, _body: bytes
    ) -> None:
        if channel is not self._channel or properties.message_id is None:
            return
        entry = self._by_message_id.get(properties.message_id)
        if entry is not None:
            batch, index = entry
            batch.returned[index] = (
                f"unroutable: {method.reply_code} {method.reply_text} (exchange "
                f"{method.exchange!r}, routing key {method.routing_key!r}); bind a queue or "
                "set an alternate exchange"
            )

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        opening = self._opening
        if opening is not None and not opening.done():
            opening.set_exception(self._describe(exc))
        for batch in self._batches:
            if not batch.done.done():
                batch.done.set_exception(self._describe(exc))

    def _describe(self, exc: BaseException) -> BaseException:
        if isinstance(exc, pika.exceptions.ChannelClosedByBroker) and exc.reply_code == 406:
            return ConfigError(
                f"RabbitMQ refused the exchange {self._settings.exchange!r}: {exc.reply_text} "
                "(it exists with another type or flags; it must be a durable topic exchange)"
            )
        return BrokerUnavailableError(f"lost the RabbitMQ connection: {exc!r}")

    def _on_channel_closed(self, channel: Channel, exc: BaseException) -> None:
        if channel is not self._channel:
            return  # one given up on, or closed on purpose
        self._channel = None
        self._fail(exc)
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close()

    def _on_connection_closed(self, connection: AsyncioConnection, exc: BaseException) -> None:
        if connection is self._connection:  # not one given up on, nor closed on purpose
            self._channel = None
            self._fail(exc)
        closing = self._closing
        if closing is not None and not closing.done():
            closing.set_result(None)
