"""The test proxy (tests/faults.py) behaves like a network: a server's reset reaches the client
as a reset, not as a connection left open (which would make a restart look like a dead link)."""

from __future__ import annotations

import socket
import struct
import threading

from tests.faults import HangingProxy


def test_a_server_reset_reaches_the_client_through_the_proxy() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def reset_after_the_first_bytes() -> None:
            conn, _ = server.accept()
            conn.recv(1)  # more is sent and left unread
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # a reset

        peer = threading.Thread(target=reset_after_the_first_bytes, daemon=True)
        peer.start()
        with HangingProxy(server.getsockname()[1]) as proxy:
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            with client:
                client.sendall(b"q" * 1000)  # a query; the server dies before reading it all
                peer.join(5)
                try:
                    answer = client.recv(1)  # TimeoutError if the proxy left us hanging
                except ConnectionResetError:
                    answer = b""
                assert answer == b""
