"""The one way this package connects to PostgreSQL: timeouts, keepalives, an application name,
and psycopg's errors translated into the project's (so every command reports the same problem
with the same exit code)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.abc import PQGen
from psycopg.errors import _WaitTimeout  # what Connection.wait(timeout=) raises
from psycopg.rows import TupleRow

from outbox_relay.errors import ConfigError, DatabaseUnavailableError, SchemaError, TlsError
from outbox_relay.redact import redact_url

# Seconds to wait for a connection (TCP, TLS and the authentication exchange).
CONNECT_TIMEOUT = 10

# Client-side TCP keepalives: a peer that vanished without closing (a dead host, a cut link) is
# noticed within about 30 s instead of the kernel's two hours; tcp_user_timeout (ms) ends a
# connection whose sent data goes unacknowledged for 30 s (a cut link mid-query) instead of
# the kernel's ~15 minutes of retransmissions. Ignored on Unix sockets.
CLIENT_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}

# Connection failures no retry can fix: the URL, the role or the server's configuration must
# change. libpq reports them only as text.
_SETTINGS_REFUSED = re.compile(
    r"invalid \S+ value|invalid connection option|password authentication failed|"
    r"no password supplied|role \"[^\"]*\" does not exist|database \"[^\"]*\" does not exist|"
    r"no pg_hba\.conf entry|server does not support SSL|certificate verify failed|"
    r"root certificate file|server certificate for \S+ does not match host name|"
    r"permission denied for database|is not permitted to log in|invalid port number"
)
# TLS failures: the server's certificate did not verify (wrong CA, expired, another host name),
# a file named by sslrootcert / sslcert / sslkey cannot be used, or the server refused our
# client certificate. Configuration errors: a retry meets the same refusal.
_TLS_REFUSED = re.compile(
    r"certificate verify failed|root certificate file|does not match host name|"
    r"could not (?:open|read|load) (?:certificate|private key|root certificate)|"
    r"certificate present, but not private key|private key file \S+ has group or world access|"
    r"requires a valid client certificate|certificate authentication failed|"
    r"(?:tlsv1|sslv3|tlsv13) alert|server does not support SSL|no SSL connection",
    re.IGNORECASE,
)
# What to check, by what libpq said.
_TLS_HINTS = (
    (
        "certificate verify failed",
        "sslrootcert must name the CA that signed the server's certificate, and the "
        "certificate must be valid now",
    ),
    ("does not match host name", "the URL's host must be a name the certificate was issued for"),
    ("server does not support SSL", "the server has TLS off; ssl = on in postgresql.conf"),
    ("requires a valid client certificate", "set sslcert and sslkey in the URL"),
    ("alert", "the server refused our client certificate (sslcert/sslkey)"),
)
# libpq's prefix before the reason: 'connection failed: connection to server at "h", port 5432
# failed: '.
_LIBPQ_PREFIX = re.compile(r"^(?:connection failed: )?connection to server at [^:]*? failed: ")
# Another kind of server answered at the address.
_NOT_POSTGRESQL = re.compile(
    r"received invalid response to SSL negotiation|expected authentication request from server|"
    r"unsupported frontend protocol|invalid response"
)


def describe(url: str) -> str:
    """The URL as logs and errors may show it."""
    return redact_url(url)


def translate(exc: BaseException, where: str) -> Exception:
    """psycopg's error as the project's: retryable, a configuration problem, or a schema problem."""
    if isinstance(exc, pg_errors.UndefinedTable | pg_errors.UndefinedFunction):
        return SchemaError(f"{exc.diag.message_primary}: run `outbox-relay migrate`")
    # One line: libpq's messages run on over several ("server closed the connection
    # unexpectedly\n\tThis probably means...").
    text = " ".join(str(exc).split())
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        if _NOT_POSTGRESQL.search(text):
            return ConfigError(
                f"--database-url: {where} did not answer like a PostgreSQL server (is the host "
                f"or port that of another service?): {text}"
            )
        if _TLS_REFUSED.search(text):
            reason = _LIBPQ_PREFIX.sub("", text)
            hint = next((h for needle, h in _TLS_HINTS if needle in reason), None)
            return TlsError(
                f"--database-url: TLS with PostgreSQL at {where} failed: {reason}"
                + (f" ({hint})" if hint else "")
            )
        if _SETTINGS_REFUSED.search(text):
            return ConfigError(f"--database-url: PostgreSQL at {where} refused: {text}")
        if isinstance(exc, psycopg.errors.ConnectionTimeout):
            return DatabaseUnavailableError(
                f"PostgreSQL at {where}: no answer within {CONNECT_TIMEOUT}s (is it a PostgreSQL "
                "server, and reachable?)"
            )
        return DatabaseUnavailableError(f"PostgreSQL at {where}: {text}")
    if isinstance(exc, pg_errors.InsufficientPrivilege):
        return ConfigError(f"PostgreSQL at {where} refused: {exc.diag.message_primary or text}")
    return DatabaseUnavailableError(f"PostgreSQL at {where}: {text}")


_TRANSLATED = (psycopg.OperationalError, psycopg.InterfaceError, pg_errors.UndefinedTable,
               pg_errors.UndefinedFunction)  # fmt: skip


@contextmanager
def translate_errors(where: str) -> Iterator[None]:
    try:
        yield
    except _TRANSLATED as exc:
        raise translate(exc, where) from exc


@asynccontextmanager
async def translate_errors_async(where: str) -> AsyncIterator[None]:
    try:
        yield
    except _TRANSLATED as exc:
        raise translate(exc, where) from exc


def _parameters(application_name: str, autocommit: bool) -> dict[str, Any]:
    return {
        "connect_timeout": CONNECT_TIMEOUT,
        "application_name": application_name[:63],
        "autocommit": autocommit,
        **CLIENT_KEEPALIVES,
    }


RV = TypeVar("RV")


class AnsweringConnection(psycopg.Connection[TupleRow]):
    """A synchronous connection that gives up on a server that does not answer.

    A cut link or a frozen host behind something that still acknowledges TCP (a proxy, a load
    balancer, a NAT gateway) defeats keepalives and tcp_user_timeout: a query would wait for an
    answer forever. Here every wait for the server (a query, a commit, a COPY chunk) ends after
    ``answer_timeout`` seconds: the connection is closed (its protocol state is unknown, as
    psycopg does when a cancellation goes unanswered) and OperationalError raised, so
    ``broken`` tells a dead link from a failed query. Set a server-side statement_timeout
    below ``answer_timeout`` so that a query merely slow fails first, as a query.
    """

    answer_timeout: float | None = None

    def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:
        limit = self.answer_timeout if timeout is None else timeout
        try:
            return super().wait(gen, interval, limit)
        except _WaitTimeout:
            if timeout is not None:  # psycopg's own timed wait (notifies): its to handle
                raise
            self.pgconn.finish()
            raise psycopg.OperationalError(
                f"PostgreSQL did not answer within {limit:g}s (a dead link or a frozen server)"
            ) from None


def connect(
    url: str,
    *,
    application_name: str = "outbox-relay",
    autocommit: bool = True,
    answer_timeout: float | None = None,
) -> psycopg.Connection[Any]:
    """A synchronous connection (the CLI, the consumer's inbox, CDC set-up); with
    ``answer_timeout`` an :class:`AnsweringConnection`."""
    with translate_errors(describe(url)):
        if answer_timeout is None:
            return psycopg.connect(url, **_parameters(application_name, autocommit))
        conn = AnsweringConnection.connect(url, **_parameters(application_name, autocommit))
        conn.answer_timeout = answer_timeout
        return conn


async def connect_async(
    url: str, *, application_name: str = "outbox-relay", autocommit: bool = False
) -> psycopg.AsyncConnection[Any]:
    """An asyncio connection (the relay's store, its LISTEN connection, the backlog sampler)."""
    async with translate_errors_async(describe(url)):
        return await psycopg.AsyncConnection.connect(
            url, **_parameters(application_name, autocommit)
        )


@contextmanager
def connection(
    url: str, *, application_name: str = "outbox-relay", autocommit: bool = True
) -> Iterator[psycopg.Connection[Any]]:
    """``with connection(url) as conn:``: closed afterwards, errors translated throughout."""
    conn = connect(url, application_name=application_name, autocommit=autocommit)
    with conn, translate_errors(describe(url)):
        yield conn
