"""Consumers on the bench queue, each a process of its own: ``Consumer`` notes when each message
arrives; ``DeliveryRecorder`` writes down every delivery, duplicates included, and rides out
broker restarts (the fault soak)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import time
from multiprocessing.connection import Connection
from typing import Any

import pika
import pika.exceptions


def _child(url: str, queue: str, pipe: Connection) -> None:
    arrived: dict[str, float] = {}
    expected: int | None = None
    deadline = float("inf")
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=5000)

    def on_message(_ch: Any, _method: Any, properties: Any, _body: bytes) -> None:
        arrived.setdefault(properties.message_id, time.time())

    channel.basic_consume(queue, on_message, auto_ack=True)
    pipe.send("ready")
    while expected is None or (len(arrived) < expected and time.time() < deadline):
        connection.process_data_events(time_limit=0.05)
        if pipe.poll():
            # ("expect", count, timeout): finish once that many arrived or the timeout passes.
            _, expected, timeout = pipe.recv()
            deadline = time.time() + timeout
    connection.close()
    pipe.send(arrived)
    pipe.close()


class Consumer:
    def __init__(self, url: str, queue: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(
            target=_child, args=(url, queue, child_end), name="bench-consumer"
        )
        self._process.start()
        child_end.close()
        if not self._pipe.poll(60) or self._pipe.recv() != "ready":
            raise RuntimeError("bench consumer did not start")

    def finish(self, expected: int, timeout: float) -> dict[str, float]:
        """Wait until ``expected`` messages arrived (or ``timeout``); message_id -> arrival."""
        self._pipe.send(("expect", expected, timeout))
        if not self._pipe.poll(timeout + 30):
            raise RuntimeError("bench consumer did not report")
        arrived: dict[str, float] = self._pipe.recv()
        self._process.join(10)
        return arrived

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)


def _record(url: str, queue: str, path: str, pipe: Connection) -> None:
    """Consume with manual acks, each delivery written (and flushed) before it is acked, so a
    broker restart loses none: what was unacked comes again, flagged redelivered."""
    stopping = False
    with open(path, "a", encoding="utf-8") as out:
        while not stopping:
            connection = None
            try:
                connection = pika.BlockingConnection(
                    pika.URLParameters(url + "?heartbeat=10&connection_attempts=1")
                )
                channel = connection.channel()
                channel.basic_qos(prefetch_count=1000)
                last_tag = 0

                def on_message(_ch: Any, method: Any, properties: Any, body: bytes) -> None:
                    nonlocal last_tag
                    step = json.loads(body)
                    # event id, aggregate, seq, arrival time, redelivered by the broker (0/1)
                    out.write(
                        f"{properties.message_id}\t{step['aggregate']}\t{step['seq']}\t"
                        f"{time.time():.6f}\t{int(method.redelivered)}\n"
                    )
                    last_tag = method.delivery_tag

                channel.basic_consume(queue, on_message)
                if not stopping:
                    pipe.send("ready")
                while not stopping:
                    connection.process_data_events(time_limit=0.05)
                    if last_tag:
                        out.flush()
                        channel.basic_ack(last_tag, multiple=True)
                        last_tag = 0
                    if pipe.poll():
                        stopping = pipe.recv() == "stop"
            except (pika.exceptions.AMQPError, OSError):
                out.flush()
                time.sleep(0.5)  # the broker is restarting: again, on a new connection
                if pipe.poll():
                    stopping = pipe.recv() == "stop"
            finally:
                if connection is not None and connection.is_open:
                    with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                        connection.close()
    pipe.send("stopped")
    pipe.close()


class DeliveryRecorder:
    """Every delivery on ``queue`` as a line of ``path``: event id, aggregate, seq, arrival time
    and the broker's redelivered flag, tab-separated (payloads ``{"aggregate", "seq"}``)."""

    def __init__(self, url: str, queue: str, path: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(
            target=_record, args=(url, queue, path, child_end), name="bench-recorder"
        )
        self._process.start()
        child_end.close()
        if not self._pipe.poll(60) or self._pipe.recv() != "ready":
            raise RuntimeError("bench delivery recorder did not start")

    def stop(self, timeout: float = 30) -> None:
        self._pipe.send("stop")
        while self._pipe.poll(timeout):
            if self._pipe.recv() == "stopped":
                break
        self._process.join(10)
        self.kill()

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)
