"""Kubernetes probes: ``/livez`` and ``/readyz`` over plain HTTP, no dependencies.

The server runs on the relay's own event loop on purpose: a loop that is stuck cannot answer, so
the probe times out, and a loop that runs but whose relay made no progress for ``stale_after``
seconds answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_END_OF_HEADERS = (b"\r\n", b"\n", b"")
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    """Serves ``/livez`` (``heartbeat()`` is a time.monotonic() newer than ``stale_after``) and
    ``/readyz`` (``ready()`` is true: connected to PostgreSQL and the broker)."""

    def __init__(
        self,
        port: int,
        *,
        ready: Callable[[], bool],
        heartbeat: Callable[[], float],
        stale_after: float,
        host: str = "127.0.0.1",
    ) -> None:
        self._host = host
        self._port = port
        self._ready = ready
        self._heartbeat = heartbeat
        self._stale_after = stale_after
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None, "not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self._host, self._port)
        except OSError as exc:
            from outbox_relay.errors import ConfigError

            raise ConfigError(
                f"--health-port: cannot listen on {self._host}:{self._port}: {exc}"
            ) from exc
        log.info("serving health probes", extra={"url": f"http://{self._host}:{self.port}/"})

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    def check(self, path: str) -> tuple[int, dict[str, object]]:
        """(status code, JSON body) for a probe path."""
        if path == "/livez":
            age = time.monotonic() - self._heartbeat()
            alive = age <= self._stale_after
            return (200 if alive else 503), {
                "status": "ok" if alive else "stuck",
                "heartbeat_age_seconds": round(age, 3),
            }
        if path == "/readyz":
            ready = self._ready()
            return (200 if ready else 503), {"status": "ready" if ready else "not ready"}
        return 404, {"status": "not found"}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            while await asyncio.wait_for(reader.readline(), timeout=5) not in _END_OF_HEADERS:
                pass  # headers: nothing in them matters to a probe
            parts = request.decode("latin-1").split()
            if len(parts) < 2:
                return
            method, path = parts[0], parts[1].split("?", 1)[0]
            body: dict[str, object]
            if method not in ("GET", "HEAD"):
                code, body = 405, {"status": "method not allowed"}
            else:
                code, body = self.check(path)
            payload = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + (payload if method != "HEAD" else b"")
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class HealthThread:
    """A :class:`HealthServer` on a thread with its own event loop, for the (synchronous)
    consumer worker. Only ``/livez`` staleness reveals a stuck worker there."""

    def __init__(self, server: HealthServer) -> None:
        self._server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="health", daemon=True)

    def start(self) -> None:
        """Listen; raises ConfigError here when the port is taken."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._server.start(), self._loop).result(timeout=10)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        done = asyncio.run_coroutine_threadsafe(self._server.close(), self._loop)
        with contextlib.suppress(Exception):
            done.result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
