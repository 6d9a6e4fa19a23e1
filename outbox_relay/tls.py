"""TLS for the broker links: one way to build a client context that verifies the peer, and one
way to say in a line why a TLS connection failed.

Every broker client takes an :class:`ssl.SSLContext` (pika, nats-py, redis-py, paho, httpx), so
the relay and the consumer build theirs here from ``--broker-ca-file``, ``--broker-cert-file``
and ``--broker-key-file``: the peer's certificate chain and host name are always verified
(``ssl.create_default_context``), against the CA file when one is given, else the system's
trust store. PostgreSQL needs nothing of this: libpq reads ``sslmode``, ``sslrootcert``,
``sslcert`` and ``sslkey`` from the database URL (see ``settings.check_database_url``).

A certificate that does not verify, or a server that refuses ours, is a configuration error
(exit 3): retrying cannot fix it, and falling back to plaintext would hide it.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

from outbox_relay.errors import ConfigError, TlsError

# The options, named once for messages.
CA_OPTION = "--broker-ca-file"
CERT_OPTION = "--broker-cert-file"
KEY_OPTION = "--broker-key-file"

# Broker URL schemes that mean TLS; the options apply to these only.
TLS_SCHEMES = ("amqps", "tls", "rediss", "mqtts", "https")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The files a broker client's TLS reads; all None: the system's trust store, no client
    certificate."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        """A client context verifying the server's chain and host name; a file that cannot be
        read or holds no usable PEM is one ConfigError naming its option."""
        try:
            # cafile replaces the system's trust store: only this CA's certificates verify.
            context = ssl.create_default_context(cafile=self.ca_file)
        except ssl.SSLError as exc:  # before OSError: it is one
            raise ConfigError(
                f"{CA_OPTION}: {self.ca_file!r} holds no PEM certificate ({_reason(exc)})"
            ) from None
        except OSError as exc:
            raise ConfigError(_unreadable(CA_OPTION, self.ca_file, exc)) from None
        if self.cert_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except OSError as exc:
                if not isinstance(exc, ssl.SSLError):
                    option, path = _which_file(self)
                    raise ConfigError(_unreadable(option, path, exc)) from None
                raise ConfigError(
                    f"{CERT_OPTION}/{KEY_OPTION}: cannot use {self.cert_file!r} with "
                    f"{self.key_file or 'the key in the same file'!r}: not a PEM certificate "
                    f"and its unencrypted private key, or they do not match ({_reason(exc)})"
                ) from None
        return context


def _which_file(files: TlsFiles) -> tuple[str, str | None]:
    """Which of the client certificate and key files cannot be opened."""
    if files.cert_file is not None and not os.access(files.cert_file, os.R_OK):
        return CERT_OPTION, files.cert_file
    return KEY_OPTION, files.key_file


def _unreadable(option: str, path: str | None, exc: OSError) -> str:
    return f"{option}: cannot read {path!r}: {exc.strerror or exc}"


def _reason(exc: ssl.SSLError) -> str:
    reason = exc.reason or (exc.args[-1] if exc.args else exc)
    return str(reason).replace("_", " ").lower()


# -- failures ------------------------------------------------------------------------------------

# OpenSSL reasons a server's alert or our own handshake give when the certificates (or the TLS
# settings) must change: a retry meets the same refusal.
_REFUSED_BY_SERVER = {
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust our client certificate (unknown CA): "
    f"check {CERT_OPTION}",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused our client certificate: check "
    f"{CERT_OPTION}",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server refused our client certificate as expired: "
    f"renew {CERT_OPTION}",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate: set "
    f"{CERT_OPTION} and {KEY_OPTION}",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the server refused the handshake (no common TLS version "
    "or cipher, or it requires a client certificate)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version both sides accept",
    "WRONG_VERSION_NUMBER": "the server did not answer in TLS (is TLS enabled on that port?)",
    "RECORD_LAYER_FAILURE": "the server did not answer in TLS (is TLS enabled on that port?)",
    "PACKET_LENGTH_TOO_LONG": "the server did not answer in TLS (is TLS enabled on that port?)",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it carries: causes, contexts, and what some clients keep
    as attributes (pika's connection workflow holds one error per attempt in ``exceptions``,
    each wrapping the socket's in ``exception``)."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for linked in (current.__cause__, current.__context__, getattr(current, "exception", None)):
            if isinstance(linked, BaseException):
                pending.append(linked)
        for attribute in ("exceptions", "args"):
            items = getattr(current, attribute, None)
            if isinstance(items, list | tuple):
                pending.extend(item for item in items if isinstance(item, BaseException))


def certificate_problem(exc: BaseException) -> str | None:
    """Why a TLS connection failed, when it is the certificates' (or the TLS settings') fault,
    as a phrase for one line; None for anything else (a refused or lost connection)."""
    for found in _chain(exc):
        if isinstance(found, ssl.SSLCertVerificationError):
            return _verification(found)
        if isinstance(found, ssl.SSLError):
            reason = str(found.reason or "")
            if reason in _REFUSED_BY_SERVER:
                return _REFUSED_BY_SERVER[reason]
            if reason == "CERTIFICATE_VERIFY_FAILED":
                return "the server's certificate did not verify"
    # Some clients keep only the text of the error they met.
    for found in _chain(exc):
        text = f"{found} {found!r}"
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            detail = text.partition("certificate verify failed")[2].strip(": ")
            detail = detail.split(" (_ssl.c")[0].strip()
            return f"the server's certificate did not verify{': ' + detail if detail else ''}"
        for reason, phrase in _REFUSED_BY_SERVER.items():
            if reason in text or reason.lower().replace("_", " ") in text.lower():
                return phrase
    return None


def _verification(exc: ssl.SSLCertVerificationError) -> str:
    message = str(exc.verify_message or "")
    code = exc.verify_code
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return "the server's certificate has expired"
    if code == 9:  # X509_V_ERR_CERT_NOT_YET_VALID
        return "the server's certificate is not valid yet (or this machine's clock is wrong)"
    if code in (62, 64) or "Hostname mismatch" in message or "IP address mismatch" in message:
        # The peer's name is not in the certificate: another host, or the URL's host name is
        # not the one the certificate was issued for.
        return f"the server's certificate is not valid for the host in the URL ({message})"
    if code in (2, 19, 20, 21):  # unknown issuer, self-signed chain, no local issuer
        return (
            f"the server's certificate is not signed by a trusted CA ({message}): check {CA_OPTION}"
        )
    return f"the server's certificate did not verify ({message or exc.reason})"


def hung_up_after_handshake(link: str, where: str, files: TlsFiles) -> TlsError:
    """The error for a server that completed the TLS handshake, then closed the connection
    without a word. Through TLS 1.3 a server checks the client certificate after the handshake
    and sends its alert as it hangs up; when our first request crosses that hang-up, the reset
    can swallow the alert, and the close is all the client sees."""
    if files.cert_file is None:
        problem = (
            "the server closed the connection right after the handshake, as one that requires "
            f"a client certificate does: set {CERT_OPTION} and {KEY_OPTION}"
        )
    else:
        problem = (
            "the server closed the connection right after the handshake, as one that refuses "
            f"our client certificate does: check {CERT_OPTION}"
        )
    return TlsError(f"--broker-url: TLS with {link} at {where} failed: {problem}")


def refused(link: str, where: str, exc: BaseException) -> TlsError | None:
    """The one-line error for a TLS failure that settings must fix, or None; raise it
    ``from exc`` (the CLI prints its message alone)."""
    problem = certificate_problem(exc)
    if problem is None:
        return None
    return TlsError(f"--broker-url: TLS with {link} at {where} failed: {problem}")
