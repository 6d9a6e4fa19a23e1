"""A TCP proxy that can stop forwarding without closing anything: a link that hangs.

A killed process or a stopped server closes its sockets, so the peer learns at once. A cut
link or a frozen host leaves the connection open with nobody answering; this proxy reproduces
that between a client and a server on this machine: ``freeze()`` stops reading and forwarding
in both directions (the kernel buffers fill, writes stall, no reply ever comes), ``thaw()``
resumes, nothing is closed either way. ``unplug()`` is the other way a proxy fails, as HAProxy or a
load balancer does when the server behind it restarts: open connections are closed, new ones
accepted and closed at once, until ``plug()``. Runs its own event loop on a thread, so synchronous tests
and relays on other threads or processes can use it alike.

With ``tls`` (a server-side SSLContext) it also terminates TLS: clients speak TLS to the proxy,
which forwards plaintext to the server, so a client's TLS (verification of the server's
certificate and host name, its own certificate when the context requires one) is exercised for
real without reconfiguring a shared service.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from types import TracebackType


class HangingProxy:
    """``with HangingProxy(5432) as proxy: connect to 127.0.0.1:proxy.port; proxy.freeze()``."""

    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", *, tls: ssl.SSLContext | None = None
    ) -> None:
        self._target = (target_host, target_port)
        self._tls = tls
        self._loop = asyncio.new_event_loop()
        if tls is not None:
            # A client refusing our certificate aborts the handshake: expected here, not news.
            self._loop.set_exception_handler(lambda _loop, _context: None)
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
        self._server = await asyncio.start_server(
            self._accept,
            "127.0.0.1",
            0,
            ssl=self._tls,
            ssl_handshake_timeout=10 if self._tls is not None else None,
        )
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
