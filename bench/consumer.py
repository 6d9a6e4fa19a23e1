"""A consumer on the bench queue noting when each message arrives (a process of its own)."""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.connection import Connection
from typing import Any

import pika


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
