"""A private CA and certificates for TLS tests, made with the ``openssl`` command (no network).

``Pki(directory)`` holds a CA, a second CA nobody trusts, and certificates signed by the first:
for ``localhost`` and ``127.0.0.1``, for another host name only, an expired one, and client
certificates. Server-side contexts for a TLS-terminating proxy (tests/faults.py) come from here.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.faults import HangingProxy

_CA_CONFIG = """
[ ca ]
default_ca = test_ca
[ test_ca ]
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
default_md = sha256
policy = any_name
copy_extensions = copy
unique_subject = no
[ any_name ]
commonName = supplied
"""


def _openssl(*args: str | Path) -> None:
    done = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, f"openssl {' '.join(map(str, args))}: {done.stderr}"


@dataclass(frozen=True)
class Leaf:
    cert: Path
    key: Path


class Pki:
    """Certificates in ``directory``; each made once, on first use."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = self._ca("ca", "outbox-relay test CA")
        self.other_ca = self._ca("other-ca", "a CA nobody here trusts")

    def _ca(self, name: str, common_name: str) -> Leaf:
        cert, key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
            "-days", "2", "-subj", f"/CN={common_name}",
        )  # fmt: skip
        return Leaf(cert, key)

    def leaf(
        self,
        name: str,
        common_name: str,
        *,
        hosts: tuple[str, ...] = (),
        signer: Leaf | None = None,
        start: str | None = None,
        end: str | None = None,
    ) -> Leaf:
        """A key and certificate for ``hosts`` (DNS names or IP addresses) signed by ``signer``
        (the CA); ``start``/``end`` as YYYYMMDDHHMMSSZ for a validity in the past."""
        signer = signer or self.ca
        cert, key, csr = (self.dir / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
        san = ",".join(
            f"IP:{host}" if host.replace(".", "").isdigit() or ":" in host else f"DNS:{host}"
            for host in hosts
        )
        extra = ["-addext", f"subjectAltName={san}"] if san else []
        _openssl(
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
            "-subj", f"/CN={common_name}", *extra,
        )  # fmt: skip
        ca_dir = self.dir / f"ca-db-{name}"
        ca_dir.mkdir(exist_ok=True)
        (ca_dir / "index.txt").write_text("")
        (ca_dir / "serial").write_text(f"{abs(hash(name)) % 10**12:012X}\n")
        config = ca_dir / "ca.cnf"
        config.write_text(_CA_CONFIG.format(dir=ca_dir))
        validity = ["-startdate", start, "-enddate", end] if start and end else ["-days", "2"]
        _openssl(
            "ca", "-batch", "-notext", "-config", config, "-cert", signer.cert,
            "-keyfile", signer.key, "-in", csr, "-out", cert, *validity,
        )  # fmt: skip
        key.chmod(0o600)
        return Leaf(cert, key)

    def server_context(self, leaf: Leaf, *, client_ca: Path | None = None) -> ssl.SSLContext:
        """A server's context presenting ``leaf``; with ``client_ca`` it requires a client
        certificate signed by that CA."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(leaf.cert, leaf.key)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(client_ca)
        return context


class NatsTlsProxy(HangingProxy):
    """A NATS server's TLS, in front of a plaintext one: NATS greets in plaintext (``INFO``)
    and the client upgrades the same connection when the greeting says ``tls_required``. The
    proxy forwards the server's INFO with ``tls_required`` set, takes the TLS handshake as the
    server would (``context``), then forwards plaintext to the real server."""

    def __init__(self, target_port: int, context: ssl.SSLContext) -> None:
        super().__init__(target_port)
        self._context = context
        self._loop.set_exception_handler(lambda _loop, _context: None)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self._target)
            except OSError:
                return
            try:
                greeting = await up_reader.readline()
                info = json.loads(greeting.partition(b" ")[2])
                info["tls_required"] = True
                writer.write(b"INFO " + json.dumps(info).encode() + b"\r\n")
                await writer.drain()
                await writer.start_tls(self._context)
            except (OSError, ValueError):  # ssl.SSLError is an OSError
                up_writer.close()
                return
            await self._forward(reader, writer, up_reader, up_writer)
        finally:
            self._writers.discard(writer)
            writer.close()
