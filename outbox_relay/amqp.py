"""RabbitMQ connections as the relay's publisher and the consumer both open them: one set of
timeouts and TCP keepalives, and pika's errors translated the same way everywhere (wrong
credentials or a missing vhost are configuration errors, exit code 3, from every command)."""

from __future__ import annotations

import pika
import pika.exceptions
from pika.adapters.utils.connection_workflow import (
    AMQPConnectorException,
    AMQPConnectorStackTimeout,
)

from outbox_relay import tls
from outbox_relay.errors import BrokerUnavailableError, ConfigError, OutboxRelayError, TlsError
from outbox_relay.redact import Scrubber, redact_url

# What opening a blocking connection can raise: pika lets some connector failures (a server
# that hangs up mid-handshake) escape as AMQPConnectorException, outside AMQPError, and a
# failed TLS handshake as the ssl module's own error (an OSError).
CONNECT_ERRORS = (pika.exceptions.AMQPError, AMQPConnectorException, OSError)

# Seconds for TCP, the AMQP handshake and authentication together: a host that answers
# nothing, or a service of another kind that keeps the socket open, is given up on in time.
CONNECT_TIMEOUT = 10.0
# TCP keepalives on the broker socket: a vanished peer is noticed in about 30 s (Linux); and
# data the peer never acknowledges (a cut link while sending) aborts the socket after 30 s
# (TCP_USER_TIMEOUT, milliseconds) instead of the kernel's ~15 minutes of retransmissions.
TCP_KEEPALIVE = {
    "TCP_KEEPIDLE": 10,
    "TCP_KEEPINTVL": 5,
    "TCP_KEEPCNT": 3,
    "TCP_USER_TIMEOUT": 30_000,
}


def heartbeat_for(silence: float) -> int:
    """The AMQP heartbeat (seconds) that notices a silent broker within ``silence`` seconds.

    pika checks every heartbeat + 5 s whether anything arrived since the last check, and
    closes the connection after one check interval without a byte (RabbitMQ sends a heartbeat
    every half interval on a live link), so silence is noticed within 2 x (heartbeat + 5) s:
    a heartbeat of ``silence / 2 - 5`` keeps that within ``silence``. RabbitMQ advises no less
    than 5 s (false alarms on a busy host); 10 s for the default 30 s."""
    return max(5, int(silence / 2 - 5))


# Reply codes RabbitMQ closes a connection with when the settings must change.
_REFUSED = {
    403: "refused the credentials (ACCESS_REFUSED): check the user and password in --broker-url",
    530: "refused the virtual host (NOT_ALLOWED): check the vhost in --broker-url (%2F is /)",
}


def parameters(
    url: str,
    *,
    tls_files: tls.TlsFiles | None = None,
    timeout: float = CONNECT_TIMEOUT,
    heartbeat: int | None = None,
) -> pika.URLParameters:
    """``url`` as pika's parameters, with our timeouts and, for ``amqps://``, the TLS files
    (``--broker-ca-file``, ...); a malformed URL or an unusable file is a ConfigError."""
    try:
        params = pika.URLParameters(url)
    except Exception as exc:  # pika raises assorted errors for malformed URLs
        # Its message may quote a piece of the URL (a password misread as a port).
        reason = Scrubber([url])(str(exc))
        raise ConfigError(f"--broker-url: invalid AMQP URL ({reason}): {redact_url(url)}") from None
    if (
        params.ssl_options is not None
        and tls_files is not None
        and any((tls_files.ca_file, tls_files.cert_file))
    ):
        # Verifies the chain against the CA file and the host name against the URL's host;
        # pika's own default for amqps:// (no files) verifies against the system's store.
        params.ssl_options = pika.SSLOptions(tls_files.context(), server_hostname=params.host)
    params.socket_timeout = timeout
    # Ends pika's own connection workflow in time (rather than our closing it half-way).
    params.stack_timeout = timeout
    params.connection_attempts = 1
    if heartbeat is not None:
        params.heartbeat = heartbeat
    params.tcp_options = dict(TCP_KEEPALIVE)
    # A broker under a resource alarm blocks publishers; give up on it like on a lost link.
    params.blocked_connection_timeout = timeout * 3
    return params


def translate(exc: BaseException, url: str, *, answered: bool = False) -> OutboxRelayError:
    """A connection failure as the project's error: ConfigError when retrying cannot help.
    ``answered``: the URL has answered like RabbitMQ before, in this process."""
    where = redact_url(url)
    refused = tls.refused("RabbitMQ", where, exc)
    if refused is not None:
        return refused
    if isinstance(exc, pika.exceptions.ConnectionClosedByBroker) and exc.reply_code in _REFUSED:
        return ConfigError(f"RabbitMQ at {where} {_REFUSED[exc.reply_code]}")
    if isinstance(exc, pika.exceptions.ProbableAuthenticationError):
        return ConfigError(f"RabbitMQ at {where} {_REFUSED[403]}")
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        return ConfigError(f"RabbitMQ at {where} {_REFUSED[530]}")
    if isinstance(exc, pika.exceptions.IncompatibleProtocolError):
        if url.lower().startswith("amqps:") and "SSLEOFError" in str(exc):
            # TLS 1.3 completes the client's handshake before the server has checked the
            # client's certificate: a refusal shows as the connection ending right after.
            return TlsError(
                f"--broker-url: TLS with RabbitMQ at {where} failed: the server closed the "
                "connection right after the TLS handshake (does it require a client "
                f"certificate? set {tls.CERT_OPTION} and {tls.KEY_OPTION}, or check that it "
                "trusts their CA)"
            )
        if answered:
            # Once the URL answered like RabbitMQ, it is RabbitMQ: a hang-up before the
            # handshake is a restart, or a proxy (HAProxy, a load balancer) with no broker behind
            # it. Retried, not called a wrong URL (which would stop the relay mid-run).
            return BrokerUnavailableError(
                f"RabbitMQ at {where} closed the connection before the AMQP handshake "
                "(restarting, or a proxy with no broker behind it)"
            )
        return ConfigError(
            f"--broker-url: {where} did not answer like an AMQP 0-9-1 server (is the host or "
            "port that of another service?)"
        )
    if isinstance(exc, AMQPConnectorStackTimeout) or "Timeout while setting up AMQP" in str(exc):
        return BrokerUnavailableError(
            f"no AMQP handshake from {where} within {CONNECT_TIMEOUT:g}s (is it a RabbitMQ "
            "server, and reachable?)"
        )
    return BrokerUnavailableError(
        f"cannot connect to RabbitMQ at {where}: {Scrubber([url])(repr(exc))}"
    )
