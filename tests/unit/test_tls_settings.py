"""TLS options: refused where they cannot take effect, files checked at start-up with the option
named, and TLS failures told apart from outages."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from outbox_relay.consumer.settings import TopologySettings
from outbox_relay.errors import ConfigError, TlsError
from outbox_relay.publishers.base import PublisherSettings
from outbox_relay.relay.settings import RelaySettings
from outbox_relay.settings import check_database_url
from outbox_relay.tls import TlsFiles, certificate_problem, hung_up_after_handshake


@pytest.mark.parametrize("scheme", ["amqp", "nats", "redis", "mqtt", "http"])
def test_a_ca_file_with_a_plaintext_broker_url_is_refused(scheme: str) -> None:
    with pytest.raises(ConfigError, match=r"--broker-ca-file: applies to TLS broker URLs only"):
        PublisherSettings(broker_url=f"{scheme}://localhost:1234", broker_ca_file="/ca.pem")


@pytest.mark.parametrize("scheme", ["amqps", "tls", "rediss", "mqtts", "https"])
def test_tls_options_with_a_tls_broker_url_are_taken(scheme: str) -> None:
    settings = PublisherSettings(
        broker_url=f"{scheme}://localhost:1234",
        broker_ca_file="/ca.pem",
        broker_cert_file="/c.pem",
        broker_key_file="/k.pem",
    )
    assert settings.broker_tls == TlsFiles("/ca.pem", "/c.pem", "/k.pem")


def test_relay_and_consumer_settings_take_the_same_options() -> None:
    relay = RelaySettings(broker_url="amqps://h/%2F", broker_ca_file="/ca.pem")
    assert relay.publisher.broker_tls.ca_file == "/ca.pem"
    consumer = TopologySettings(queue="q", broker_url="amqps://h/%2F", broker_ca_file="/ca.pem")
    assert consumer.broker_tls.ca_file == "/ca.pem"
    with pytest.raises(ConfigError, match="--broker-cert-file: applies to TLS"):
        TopologySettings(queue="q", broker_url="amqp://h/%2F", broker_cert_file="/c.pem")


def test_a_key_without_its_certificate_is_refused() -> None:
    with pytest.raises(ConfigError, match="--broker-key-file: needs --broker-cert-file"):
        PublisherSettings(broker_url="amqps://h/%2F", broker_key_file="/k.pem")


def test_a_missing_ca_file_names_the_option_and_the_cause(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError) as caught:
        TlsFiles(ca_file=str(missing)).context()
    assert (
        str(caught.value)
        == f"--broker-ca-file: cannot read {str(missing)!r}: No such file or directory"
    )


def test_a_ca_file_without_pem_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"--broker-ca-file: .* holds no PEM certificate"):
        TlsFiles(ca_file=str(junk)).context()


def test_a_missing_client_certificate_names_its_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--broker-cert-file: cannot read"):
        TlsFiles(cert_file=str(tmp_path / "c.pem"), key_file=str(tmp_path / "k.pem")).context()


def test_the_default_context_verifies_chain_and_host_name() -> None:
    context = TlsFiles().context()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://db/app?sslrootcert=/ca.pem",
        "postgresql://db/app?sslmode=prefer&sslrootcert=/ca.pem",
        "postgresql://db/app?sslmode=disable&sslcert=/c.pem&sslkey=/k.pem",
        "host=db dbname=app sslrootcert=/ca.pem sslmode=allow",
    ],
)
def test_certificate_files_with_a_mode_that_falls_back_to_plaintext_are_refused(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGSSLMODE", raising=False)
    with pytest.raises(ValueError, match="may connect without TLS: add sslmode=verify-full"):
        check_database_url(url)


@pytest.mark.parametrize("mode", ["require", "verify-ca", "verify-full"])
def test_certificate_files_with_a_mode_that_insists_on_tls_are_taken(mode: str) -> None:
    url = f"postgresql://db/app?sslmode={mode}&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/k.pem"
    assert check_database_url(url) == url


def test_pgsslmode_from_the_environment_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSSLMODE", "verify-full")
    assert check_database_url("postgresql://db/app?sslrootcert=/ca.pem")


def test_a_refused_connection_is_no_certificate_problem() -> None:
    assert certificate_problem(ConnectionRefusedError(111, "Connection refused")) is None


def test_a_verification_failure_in_a_cause_chain_is_found() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_code = 10
    verify.verify_message = "certificate has expired"
    outer = OSError("wrapped")
    outer.__cause__ = verify
    assert certificate_problem(outer) == "the server's certificate has expired"


def test_a_server_hanging_up_after_the_handshake_points_at_the_client_certificate() -> None:
    # TLS 1.3: the server's alert refusing a missing or bad client certificate can be lost to
    # the reset when our first request crosses its hang-up.
    without = hung_up_after_handshake("Redis", "rediss://h:6380/0", TlsFiles())
    with_one = hung_up_after_handshake("Redis", "rediss://h:6380/0", TlsFiles(cert_file="c.pem"))

    assert isinstance(without, TlsError)
    assert str(without).startswith("--broker-url: TLS with Redis at rediss://h:6380/0 failed: ")
    assert (
        "requires a client certificate does: set --broker-cert-file and --broker-key-file"
        in str(without)
    )
    assert "refuses our client certificate does: check --broker-cert-file" in str(with_one)
