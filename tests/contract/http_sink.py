"""A real HTTP server for the webhook publisher's tests: ``http.server`` on a thread.

It records every request and answers with the status its ``respond`` rule picks (200 unless told
otherwise). It can be stopped and started again on the same port, like a broker restart. With
``tls`` (a server-side SSLContext) it is an HTTPS endpoint: each connection's handshake runs on
that connection's own thread, so a client that refuses the certificate fails alone.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True, slots=True)
class Request:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> dict[str, object]:
        value: dict[str, object] = json.loads(self.body)
        return value


Respond = Callable[[Request], int]


class HttpSink:
    def __init__(
        self, respond: Respond | None = None, *, tls: ssl.SSLContext | None = None
    ) -> None:
        self.tls = tls
        self.respond: Respond = respond or (lambda _request: 200)
        self.delay = 0.0  # seconds to wait before answering (timeouts)
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.port = 0

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"https://localhost:{self.port}/hooks/outbox"  # the certificate's name
        return f"http://127.0.0.1:{self.port}/hooks/outbox"

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def start(self) -> HttpSink:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real endpoint would
            # One write per response, sent at once: headers and body in separate small
            # writes would meet Nagle + delayed ACK and cost 40 ms a request.
            wbufsize = 64 * 1024
            disable_nagle_algorithm = True

            def setup(self) -> None:
                super().setup()
                with sink._lock:
                    sink._connections.add(self.connection)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                request = Request(
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                with sink._lock:
                    sink._requests.append(request)
                if sink.delay:
                    time.sleep(sink.delay)  # the slow endpoint under test, not synchronisation
                status = sink.respond(request)
                body = b'{"ok":true}' if status < 300 else b'{"error":"no"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the publisher opens many connections at once
            daemon_threads = True

            def finish_request(self, request: Any, client_address: Any) -> None:
                if sink.tls is None:
                    super().finish_request(request, client_address)
                    return
                try:
                    wrapped = sink.tls.wrap_socket(request, server_side=True)
                except OSError:  # the client refused our certificate, or we refused its
                    return
                with wrapped:
                    super().finish_request(wrapped, client_address)

        server = Server(("127.0.0.1", self.port), Handler)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:  # keep-alive connections die with a real server too
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=10)
