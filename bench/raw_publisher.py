"""The ceiling: pika's SelectConnection publishing with a window of pipelined confirms.

Same exchange, same queue, same message shape as the relay (300-byte persistent JSON body,
message_id, type, timestamp, aggregate headers, mandatory), but no database at all: whatever the
relay does beyond this is its overhead. Runs in a process of its own (see ``run_in_child``).

``relay_shaped`` gives instead the exact messages the relay would send for a list of rows in a
``--message-format`` (properties encoded by the relay's own code, before the clock starts): the
broker's ceiling for that format, so a format's cost to the broker is told apart from the
relay's.

``batched`` writes make it the stronger ceiling: pika hands each frame to the socket on its own
(three sends per message); batched, the messages the acks of one read release are written in
one piece after that read, as the relay does (its publisher corks the connection). The broker
then gets fewer, larger segments to read.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

import pika
from bench_setup import AGGREGATE_TYPE, EVENT_TYPE, payload_json
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

# (routing key, body, properties): one message exactly as it goes on the wire.
Prepared = tuple[str, bytes, BasicProperties]


@dataclass
class RawResult:
    messages: int
    window: int
    seconds: float
    msg_per_s: float
    nacked: int
    returned: int
    cpu_percent: float  # of one core, this publisher process alone
    cpu_seconds: float  # user + sys of this process from first publish to last confirm
    cpu_us_per_msg: float


class _CorkedSelectConnection(SelectConnection):  # type: ignore[misc]  # pika is untyped (Any)
    """While corked, frames are collected and written in one piece (see ``batched``)."""

    corked: list[bytes] | None = None

    def _adapter_emit_data(self, data: bytes) -> None:
        if self.corked is None:
            super()._adapter_emit_data(data)
        else:
            self.corked.append(data)


class _WindowedPublisher:
    def __init__(
        self,
        url: str,
        exchange: str,
        count: int,
        window: int,
        on_start: Callable[[], None] | None = None,
        prepared: Sequence[Prepared] | None = None,
        batched: bool = False,
    ) -> None:
        self._parameters = pika.URLParameters(url)
        self._on_start = on_start
        self._exchange = exchange
        self._prepared = prepared
        self._count = count if prepared is None else len(prepared)
        self._window = window
        self._bodies = [payload_json(n).encode() for n in range(1000)]
        self._sent = 0
        self._confirmed = 0
        self._nacked = 0
        self._returned = 0
        self._unconfirmed: deque[int] = deque()
        self._settled_early: set[int] = set()
        self._channel: Channel | None = None
        self._connection: SelectConnection | None = None
        self._batched = batched
        self._fill_scheduled = False
        self._started = 0.0
        self._finished = 0.0
        self._cpu_before = 0.0
        self._cpu_after = 0.0
        self._error: str | None = None

    def run(self) -> RawResult:
        self._connection = (_CorkedSelectConnection if self._batched else SelectConnection)(
            self._parameters,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_error,
            on_close_callback=self._on_closed,
        )
        self._connection.ioloop.start()
        if self._error is not None and self._confirmed < self._count:
            raise RuntimeError(f"raw publisher failed: {self._error}")
        seconds = self._finished - self._started
        cpu = self._cpu_after - self._cpu_before
        return RawResult(
            messages=self._count,
            window=self._window,
            seconds=round(seconds, 4),
            msg_per_s=round(self._count / seconds, 1),
            nacked=self._nacked,
            returned=self._returned,
            cpu_percent=round(100 * cpu / seconds, 1),
            cpu_seconds=round(cpu, 3),
            cpu_us_per_msg=round(cpu * 1e6 / self._count, 2),
        )

    def _on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_error(self, _connection: Any, error: Any) -> None:
        self._error = str(error)
        assert self._connection is not None
        self._connection.ioloop.stop()

    def _on_closed(self, _connection: Any, reason: Any) -> None:
        if self._confirmed < self._count:
            self._error = str(reason)
        assert self._connection is not None
        self._connection.ioloop.stop()

    def _on_channel(self, channel: Channel) -> None:
        self._channel = channel
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirming)

    def _on_confirming(self, _frame: Any) -> None:
        # The clock (and the CPU count) starts connected, at the first publish.
        if self._on_start is not None:
            self._on_start()
        self._cpu_before = time.process_time()
        self._started = time.perf_counter()
        self._refill()

    def _refill(self) -> None:
        """Fill the window: at once, or (batched) once this read's acks are all handled."""
        if not self._batched:
            self._fill()
        elif not self._fill_scheduled:
            self._fill_scheduled = True
            assert self._connection is not None
            self._connection.ioloop.call_later(0, self._fill_corked)

    def _fill_corked(self) -> None:
        self._fill_scheduled = False
        connection = self._connection
        assert isinstance(connection, _CorkedSelectConnection)
        connection.corked = []
        try:
            self._fill()
        finally:
            frames, connection.corked = connection.corked, None
            if frames:
                connection._adapter_emit_data(b"".join(frames))

    def _fill(self) -> None:
        channel = self._channel
        assert channel is not None
        prepared = self._prepared
        while self._sent < self._count and len(self._unconfirmed) < self._window:
            n = self._sent
            if prepared is not None:
                routing_key, body, properties = prepared[n]
            else:
                routing_key, body = EVENT_TYPE, self._bodies[n % 1000]
                properties = BasicProperties(
                    content_type="application/json",
                    delivery_mode=2,
                    message_id=str(uuid.uuid4()),
                    type=EVENT_TYPE,
                    timestamp=int(time.time()),
                    headers={"aggregate_type": AGGREGATE_TYPE, "aggregate_id": str(n)},
                )
            channel.basic_publish(self._exchange, routing_key, body, properties, mandatory=True)
            self._sent += 1
            self._unconfirmed.append(self._sent)  # delivery tags start at 1

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if isinstance(method, Basic.Nack):
            self._nacked += 1
        tag = method.delivery_tag
        if method.multiple:
            while self._unconfirmed and self._unconfirmed[0] <= tag:
                settled = self._unconfirmed.popleft()
                if settled in self._settled_early:
                    self._settled_early.discard(settled)
                else:
                    self._confirmed += 1
        elif self._unconfirmed and self._unconfirmed[0] == tag:
            self._unconfirmed.popleft()
            self._confirmed += 1
        else:
            self._settled_early.add(tag)
            self._confirmed += 1
        # Drop tags settled out of order once they reach the head of the window.
        while self._unconfirmed and self._unconfirmed[0] in self._settled_early:
            self._settled_early.discard(self._unconfirmed.popleft())
        if self._confirmed >= self._count:
            self._finished = time.perf_counter()
            self._cpu_after = time.process_time()
            assert self._connection is not None
            self._connection.close()
            return
        self._refill()

    def _on_return(self, *_args: Any) -> None:
        self._returned += 1


@dataclass(frozen=True)
class Row:
    """An outbox row as the relay reads it, enough to shape its message."""

    event_type: str
    aggregate_type: str | None
    aggregate_id: str | None
    payload: bytes
    headers: dict[str, Any]


def relay_shaped(rows: Sequence[Row], message_format: str, source: str) -> list[Prepared]:
    """The messages the relay's RabbitMQ publisher sends for ``rows`` in ``message_format``,
    encoded by the publisher itself (``RabbitMQPublisher.encode``)."""
    from outbox_relay.messages import OutboxMessage
    from outbox_relay.publishers.base import PublisherSettings
    from outbox_relay.publishers.rabbitmq import RabbitMQPublisher

    settings: dict[str, Any] = {"message_format": message_format}
    if message_format != "native":
        settings["ce_source"] = source
    publisher = RabbitMQPublisher(PublisherSettings(**settings))
    prepared: list[Prepared] = []
    for n, row in enumerate(rows, start=1):
        message = OutboxMessage(
            n,
            str(uuid.uuid4()),
            row.event_type,
            row.aggregate_type,
            row.aggregate_id,
            row.payload,
            row.headers,
            datetime.now(UTC),
        )
        body, properties = publisher.encode(message)
        prepared.append((message.event_type, body, properties))
    return prepared


def run_in_child(
    url: str,
    exchange: str,
    count: int,
    window: int,
    pipe: Connection,
    announce_start: bool = False,
    shaped: tuple[Sequence[Row], str, str] | None = None,
    batched: bool = False,
) -> None:
    """Process target: publish ``count`` messages and send back a RawResult as a dict. With
    ``announce_start``, ("started", None) is sent first, the moment the first message goes out
    (connected and in confirm mode), so the caller can start measuring the broker then. With
    ``shaped`` (rows, message format, CloudEvents source), the messages are those the relay
    would send for the rows (``relay_shaped``), ``count`` aside."""

    def started() -> None:
        pipe.send(("started", None))

    try:
        prepared = None if shaped is None else relay_shaped(*shaped)
        result = _WindowedPublisher(
            url, exchange, count, window, started if announce_start else None, prepared, batched
        ).run()
        pipe.send(("ok", asdict(result)))
    except Exception as exc:
        pipe.send(("error", repr(exc)))
    finally:
        pipe.close()


def run(
    url: str,
    exchange: str,
    count: int,
    window: int,
    shaped: tuple[Sequence[Row], str, str] | None = None,
    on_start: Callable[[], None] | None = None,
    batched: bool = False,
) -> dict[str, Any]:
    """``run_in_child`` in a spawned process, waited for: its RawResult as a dict.
    ``on_start`` is called the moment the first message goes out (to start measuring the
    broker then)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=run_in_child,
        args=(url, exchange, count, window, sender, on_start is not None),
        kwargs={"shaped": shaped, "batched": batched},
        name="bench-raw",
    )
    process.start()
    sender.close()
    try:
        kind, value = _receive(receiver, count / 200 + 60)
        if kind == "started":
            assert on_start is not None
            on_start()
            kind, value = _receive(receiver, count / 200 + 60)
        process.join(10)
    finally:
        if process.is_alive():
            process.kill()
            process.join(10)
    if kind != "ok":
        raise RuntimeError(f"raw publisher: {value}")
    result: dict[str, Any] = value
    return result


def _receive(receiver: Connection, timeout: float) -> tuple[str, Any]:
    if not receiver.poll(timeout):
        raise RuntimeError(f"the raw publisher did not finish within {timeout:.0f}s")
    kind, value = receiver.recv()
    return str(kind), value
