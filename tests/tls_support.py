"""A private CA and certificates for TLS tests, made with the ``openssl`` command (no network).

``Pki(directory)`` holds a CA, a second CA nobody trusts, and certificates signed by the first:
for ``localhost`` and ``127.0.0.1``, for another host name only, an expired one, and client
certificates. Server-side contexts (the HTTPS webhook sink's) come from here too.
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

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
