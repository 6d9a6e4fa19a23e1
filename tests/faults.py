"""A TCP proxy that can stop forwarding without closing anything: a link that hangs.

A killed process or a stopped server closes its sockets, so the peer learns at once. A cut
link or a frozen host leaves the connection open with nobody answering; this proxy reproduces
that between a client and a server on this machine: ``freeze()`` stops reading and forwarding
in both directions (the kernel buffers fill, writes stall, no reply ever comes), ``thaw()``
resumes, nothing is closed either way. ``unplug()`` is the other way a proxy fails, as HAProxy or a
load balancer does when the server behind it restarts: open connections are closed, new ones
accepted and closed at once, until ``plug()``. Runs its own event loop on a thread, so synchronous tests
and relays on other threads or processes can use it alike.

``cut_and_restore`` is the dead-link scenario every such test runs: cut mid-stream for CUT_FOR
seconds, assert the process noticed within its documented bound (docs/deploy.md, "Dead links")
plus SLACK, stayed alive and unready while cut, and resumed within RESUMES_WITHIN of the thaw.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

from tests.conftest import wait_until

# How long every dead-link test keeps its link cut (the 60 s): longer than every bound,
# so the process must notice the dead link, not wait it out.
CUT_FOR = 60.0
# Added to each documented detection bound: a loaded two-core CI machine.
SLACK = 10.0
# Work must go on within this long after the link is back.
RESUMES_WITHIN = 10.0


class HangingProxy:
    """``with HangingProxy(5432) as proxy: connect to 127.0.0.1:proxy.port; proxy.freeze()``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._plugged = True
        self.port = 0

    def start(self) -> HangingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        # Tracked from the start: a connection accepted while frozen is closed with the proxy.
        self._writers.add(writer)
        try:
            await self._flowing.wait()  # a frozen link accepts but never gets anywhere
            if not self._plugged:
                return  # accepted, then closed: no server behind the proxy
            try:
                up_reader, up_writer = await asyncio.open_connection(*self._target)
            except OSError:
                return
            await self._forward(reader, writer, up_reader, up_writer)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        self._writers.add(up_writer)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer),
                self._pump(up_reader, writer),
                return_exceptions=True,
            )
        finally:
            self._writers.discard(up_writer)
            up_writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(65536)
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                await self._flowing.wait()  # data read just before a freeze is held too
                writer.write(data)
                await writer.drain()
        except OSError:
            # A reset on one side is passed on as a reset on the other. (A server that exits
            # with a query unread, as PostgreSQL's backends do on a fast shutdown, resets rather
            # than closes: without this the client would wait on a half-dead proxy connection
            # that a real network would have reset.)
            writer.transport.abort()

    def freeze(self) -> None:
        """Stop forwarding: every connection through the proxy hangs, none is closed."""
        assert self._flowing is not None
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def thaw(self) -> None:
        assert self._flowing is not None
        self._loop.call_soon_threadsafe(self._flowing.set)

    def unplug(self) -> None:
        """The server behind the proxy is gone: close every connection, accept and close new
        ones."""

        def cut() -> None:
            self._plugged = False
            for writer in list(self._writers):
                writer.transport.abort()

        self._loop.call_soon_threadsafe(cut)

    def plug(self) -> None:
        def restore() -> None:
            self._plugged = True

        self._loop.call_soon_threadsafe(restore)

    def close(self) -> None:
        async def shut() -> None:
            # Connections cancelled here are not news (asyncio would log each one).
            self._loop.set_exception_handler(lambda _loop, _context: None)
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            if self._flowing is not None:
                self._flowing.set()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> HangingProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Trap:
    """A TCP listener that counts the connections made to it and closes them at once (so a
    command that should not have connected fails fast instead of waiting out a timeout)."""

    def __init__(self) -> None:
        self.connections = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port: int = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def via(url: str, port: int) -> str:
    """``url`` pointed at 127.0.0.1:``port`` (the proxy), credentials, path and query kept."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(
        parts._replace(netloc=f"{userinfo + '@' if userinfo else ''}127.0.0.1:{port}")
    )


def readyz(port: int) -> Callable[[], bool]:
    """Whether the health endpoint on ``port`` answers 200 (not yet listening: not ready)."""

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            status = int(exc.code)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        assert status in (200, 503), f"/readyz answered {status}"
        return status == 200

    return ready


def cut_and_restore(
    proxy: HangingProxy,
    *,
    progress: Callable[[], int],
    log: Callable[[], str],
    alive: Callable[[], bool],
    ready: Callable[[], bool],
    bound: float,
    link_line: str,
    in_flight: int,
    flowing_at: int = 200,
) -> float:
    """Freeze once ``progress()`` (events delivered or applied) reaches ``flowing_at``: assert
    the process notices within ``bound`` + SLACK, unready, with ``link_line`` in its log; keep
    the link cut for CUT_FOR seconds, the process alive and unready throughout; thaw; assert
    progress resumes within RESUMES_WITHIN and readiness comes back. Progress counts as resumed
    beyond ``in_flight``: what the proxy held when it froze arrives at the thaw by itself.
    Returns the detection time."""
    wait_until(lambda: progress() >= flowing_at, timeout=60)
    assert ready()
    logged_before = len(log())
    proxy.freeze()
    cut_at = time.monotonic()
    try:
        wait_until(lambda: not ready(), timeout=bound + SLACK, interval=0.2)
    except AssertionError:
        raise AssertionError(
            f"still ready {bound + SLACK:g}s into the cut:\n{log()[-4000:]}"
        ) from None
    noticed = time.monotonic() - cut_at
    wait_until(lambda: link_line in log()[logged_before:], timeout=SLACK)
    assert noticed <= bound + SLACK, noticed
    # Still unready, and still alive, for as long as the link is dead.
    while time.monotonic() - cut_at < CUT_FOR:
        assert alive()
        assert not ready(), f"ready again {time.monotonic() - cut_at:.1f}s into the cut"
        time.sleep(1.0)
    done = progress()
    proxy.thaw()
    back_at = time.monotonic()
    wait_until(lambda: progress() > done + in_flight, timeout=RESUMES_WITHIN + 5)
    resumed = time.monotonic() - back_at
    assert resumed <= RESUMES_WITHIN, resumed
    wait_until(ready, timeout=RESUMES_WITHIN)
    print(f"{link_line}: noticed after {noticed:.1f}s (bound {bound:g}s), resumed {resumed:.1f}s")
    return noticed
