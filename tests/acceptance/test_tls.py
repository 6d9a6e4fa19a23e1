"""TLS on the relay's and the consumer's links, verified, configured only through documented
options: PostgreSQL through libpq's URL parameters (``sslmode=verify-full``, ``sslrootcert``,
``sslcert``, ``sslkey``), brokers through ``--broker-ca-file``, ``--broker-cert-file`` and
``--broker-key-file`` (as ``OUTBOX_RELAY_BROKER_*`` variables here).

A private CA made with ``openssl`` signs every certificate. PostgreSQL gets TLS by a reload
(``ALTER SYSTEM SET ssl = on`` and its files; never a restart), put back as it was afterwards;
plaintext connections of other users keep working throughout. The shared brokers are not
touched: the tests start private RabbitMQ nodes, a Redis, a NATS server (JetStream) and Mosquitto
brokers of their own (tests/private_services.py) with their own TLS listeners on other ports, and
an HTTPS webhook sink, so both sides of each TLS link are the real ones.

Every certificate problem must end the command at start-up with exit code 3 and one line that
names the link and the cause, never a retry loop and never a plaintext fallback.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika
import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from tests import private_services
from tests.acceptance.conftest import RelayProcess, cli_env, run_cli
from tests.conftest import RabbitQueue, wait_until
from tests.private_services import PrivateServer, PrivateServers, ServerTls
from tests.services import Services
from tests.tls_support import Leaf, Pki

pytestmark = pytest.mark.acceptance

EXIT_CONFIG = 3
# A certificate failure is found on the first connection: far sooner than any retry backoff.
FAILS_WITHIN = 25.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server_leaf(pki: Pki) -> Leaf:
    return pki.leaf("server", "localhost", hosts=("localhost", "127.0.0.1"))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "  caused by"))]


def assert_one_line_config_error(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert done.returncode == EXIT_CONFIG, (done.returncode, done.stderr[-3000:])
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def serve_once(
    env: dict[str, str], timeout: float = FAILS_WITHIN
) -> subprocess.CompletedProcess[str]:
    """``serve`` expected to stop by itself (a configuration error) within ``timeout``."""
    started = time.monotonic()
    try:
        done = run_cli("serve", env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"serve still running after {timeout}s (retrying a certificate failure?): "
            f"{(exc.stderr or b'')[-2000:]!r}"
        ) from None
    assert time.monotonic() - started < timeout
    return done


def emit(env: dict[str, str], count: int, aggregate: str = "a1") -> None:
    """``count`` events of one aggregate (payloads ``{"n": 0}``, ``{"n": 1}``, ...), written as
    an application writes them: INSERTs into the outbox, in one transaction."""
    with psycopg.connect(env["OUTBOX_RELAY_DATABASE_URL"]) as conn:
        conn.cursor().executemany(
            "INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload)"
            " VALUES ('order.created', 'order', %s, %s)",
            [(aggregate, Jsonb({"n": index})) for index in range(count)],
        )


def payload_numbers(queue: RabbitQueue, count: int) -> list[int]:
    import json

    got: list[int] = []

    def all_there() -> bool:
        got.extend(json.loads(body)["n"] for _m, _p, body in queue.drain())
        return len(got) >= count

    wait_until(all_there, timeout=30)
    return got


# -- PostgreSQL: TLS switched on by a reload, and put back ------------------------------------------

_SSL_SETTINGS = ("ssl", "ssl_cert_file", "ssl_key_file", "ssl_ca_file")


class PostgresTls:
    """Turns TLS on for the shared PostgreSQL by ALTER SYSTEM and a reload; ``close()`` puts
    every setting, pg_hba.conf and the files back as they were."""

    def __init__(self, admin_url: str, pki: Pki) -> None:
        self.admin_url = admin_url
        self.pki = pki
        self.token = uuid.uuid4().hex[:10]
        self.files: list[str] = []
        self.hba_file: str | None = None
        self.hba_original: bytes | None = None
        with self._admin() as conn:
            row = conn.execute("SHOW data_directory").fetchone()
            assert row is not None
            self.data_directory = str(row[0])
            # Values set by an earlier ALTER SYSTEM are restored, not reset.
            self.previous = {
                name: setting
                for name, setting, sourcefile in conn.execute(
                    "SELECT name, setting, sourcefile FROM pg_settings WHERE name = ANY(%s)",
                    (list(_SSL_SETTINGS),),
                )
                if sourcefile and sourcefile.endswith("postgresql.auto.conf")
            }

    def _admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_url, autocommit=True, sslmode="disable")

    def _write(self, conn: psycopg.Connection[Any], name: str, source: Path) -> str:
        """``source`` copied into the server's data directory by the server itself (COPY TO
        writes as the server's user, the owner PostgreSQL demands of a key file)."""
        path = f"{self.data_directory}/outbox_tls_test_{self.token}_{name}"
        lines = source.read_text().splitlines()
        conn.execute(
            sql.SQL(
                "COPY (SELECT line FROM unnest({}::text[]) WITH ORDINALITY AS t(line, n) "
                "ORDER BY n) TO {}"
            ).format(sql.Literal(lines), sql.Literal(path))
        )
        self.files.append(path)
        if os.path.exists(path):
            # The server's umask may leave it group-readable; PostgreSQL refuses such a key.
            os.chmod(path, 0o600)
        return path

    def serve(self, leaf: Leaf) -> None:
        """Present ``leaf``; client certificates are checked against the test CA."""
        with self._admin() as conn:
            cert = self._write(conn, f"{len(self.files)}.crt", leaf.cert)
            key = self._write(conn, f"{len(self.files)}.key", leaf.key)
            ca = self._write(conn, f"{len(self.files)}.ca", self.pki.ca.cert)
            for name, value in (
                ("ssl_cert_file", cert),
                ("ssl_key_file", key),
                ("ssl_ca_file", ca),
            ):
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), sql.Literal(value)
                    )
                )
            conn.execute("ALTER SYSTEM SET ssl = on")
            conn.execute("SELECT pg_reload_conf()")
        self._wait_for(cert)

    def _wait_for(self, cert: str) -> None:
        """Until new connections get TLS with ``cert`` (a reload takes effect for the
        connections made after the postmaster reread the configuration)."""

        def in_force() -> bool:
            try:
                with psycopg.connect(self.admin_url, sslmode="require") as conn:
                    row = conn.execute("SHOW ssl_cert_file").fetchone()
                    return row is not None and row[0] == cert
            except psycopg.OperationalError:
                return False

        wait_until(in_force, timeout=15, interval=0.2)

    def require_client_certificate(self, role: str) -> None:
        """pg_hba.conf: ``role`` may log in over TLS with a client certificate only (its CN)."""
        with self._admin() as conn:
            row = conn.execute("SHOW hba_file").fetchone()
            assert row is not None
            self.hba_file = str(row[0])
        path = Path(self.hba_file)
        self.hba_original = path.read_bytes()
        ours = (
            f"hostssl all {role} 127.0.0.1/32 cert\n"
            f"hostssl all {role} ::1/128 cert\n"
            f"host all {role} all reject\n"
        ).encode()
        path.write_bytes(ours + self.hba_original)  # in place: owner and mode stay
        self._reload()

    def _reload(self) -> None:
        with self._admin() as conn:
            conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)  # the postmaster rereads the files asynchronously

    def close(self) -> None:
        errors: list[BaseException] = []
        if self.hba_file is not None and self.hba_original is not None:
            try:
                Path(self.hba_file).write_bytes(self.hba_original)
                assert Path(self.hba_file).read_bytes() == self.hba_original
            except BaseException as exc:  # go on putting the rest back
                errors.append(exc)
        try:
            with self._admin() as conn:
                for name in _SSL_SETTINGS:
                    if name in self.previous:
                        conn.execute(
                            sql.SQL("ALTER SYSTEM SET {} = {}").format(
                                sql.Identifier(name), sql.Literal(self.previous[name])
                            )
                        )
                    else:
                        conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
                conn.execute("SELECT pg_reload_conf()")
        except BaseException as exc:
            errors.append(exc)
        time.sleep(0.5)
        for path in self.files:
            with contextlib.suppress(OSError):  # the server's own filesystem may be elsewhere
                os.remove(path)
        if errors:
            raise errors[0]


@pytest.fixture(scope="module")
def postgres_tls(services: Services, pki: Pki, server_leaf: Leaf) -> Iterator[PostgresTls]:
    tls = PostgresTls(services.postgres_admin_url, pki)
    try:
        tls.serve(server_leaf)
        yield tls
    finally:
        tls.close()


def tls_database_url(database_url: str, host: str = "localhost", **parameters: str) -> str:
    parts = urlsplit(database_url)
    query = "&".join(f"{k}={v}" for k, v in {"sslmode": "verify-full", **parameters}.items())
    netloc = f"{parts.username or 'postgres'}@{host}:{parts.port or 5432}"
    return f"postgresql://{netloc}{parts.path}?{query}"


# -- brokers: private instances with their own TLS listeners ------------------------------------------


@dataclass(frozen=True)
class TlsBrokers:
    """Private brokers (tests/private_services.py) presenting a certificate for ``localhost``
    only (so ``127.0.0.1`` in a URL is another host name), signed by the test CA."""

    rabbitmq: PrivateServer  # a client certificate optional, verified when given
    rabbitmq_strict: PrivateServer  # a client certificate required
    rabbitmq_expired: PrivateServer  # presents an expired certificate
    redis: PrivateServer
    redis_strict: PrivateServer  # a client certificate required, as for the others
    nats: PrivateServer
    nats_strict: PrivateServer
    mosquitto: PrivateServer
    mosquitto_strict: PrivateServer


@pytest.fixture(scope="module")
def broker_leaf(pki: Pki) -> Leaf:
    return pki.leaf("broker", "localhost", hosts=("localhost",))


@pytest.fixture(scope="module")
def brokers(pki: Pki, broker_leaf: Leaf) -> Iterator[TlsBrokers]:
    expired = pki.leaf(
        "broker-expired", "localhost", hosts=("localhost",),
        start="20200101000000Z", end="20200102000000Z",
    )  # fmt: skip
    lenient = ServerTls(broker_leaf, pki.ca.cert)
    strict = ServerTls(broker_leaf, pki.ca.cert, client_cert_required=True)
    with PrivateServers() as servers:
        yield TlsBrokers(
            *servers.start(
                private_services.rabbitmq(lenient),
                private_services.rabbitmq(strict),
                private_services.rabbitmq(ServerTls(expired, pki.ca.cert)),
                private_services.redis(lenient),
                private_services.redis(strict),
                private_services.nats(lenient),
                private_services.nats(strict),
                private_services.mosquitto(lenient),
                private_services.mosquitto(strict),
            )
        )


def amqps_url(broker_url: str, port: int, host: str = "localhost") -> str:
    parts = urlsplit(broker_url)
    return f"amqps://{parts.username}:{parts.password}@{host}:{port}{parts.path or '/%2F'}"


def rabbit_port(broker_url: str) -> int:
    return urlsplit(broker_url).port or 5672


def private_amqp_url(node: PrivateServer) -> str:
    """The node's plaintext port, where the test itself declares and reads queues."""
    return f"amqp://guest:guest@127.0.0.1:{node.plain_port}/%2F"


def private_queue(node: PrivateServer) -> RabbitQueue:
    """A fresh exchange on ``node`` with a queue bound to everything."""
    url = private_amqp_url(node)
    exchange, name = f"events.tls.{uuid.uuid4().hex[:8]}", f"q.tls.{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        channel.exchange_declare(exchange, "topic", durable=True)
        channel.queue_declare(name, durable=True)
        channel.queue_bind(name, exchange, "#")
    finally:
        conn.close()
    return RabbitQueue(url, exchange, name, ["#"])


# -- the relay over verified TLS on both links ----------------------------------------------------------


def test_relay_over_verify_full_postgres_and_amqps_publishes_every_event_in_order(
    postgres_tls: PostgresTls,
    pki: Pki,
    database_url: str,
    broker_url: str,
    brokers: TlsBrokers,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    # Given PostgreSQL with TLS, RabbitMQ's own amqps listener, and the relay told only the CA
    queue = private_queue(brokers.rabbitmq)
    env = cli_env(
        database_url=tls_database_url(database_url, sslrootcert=str(pki.ca.cert)),
        broker_url=amqps_url(broker_url, brokers.rabbitmq.tls_port),
        broker_ca_file=pki.ca.cert,
        exchange=queue.exchange,
        poll_interval=0.2,
    )
    # migrate and status take the same URL
    assert run_cli("migrate", env=env).returncode == 0
    emit(env, 10)
    # When the relay runs
    relay = relay_factory(env).start()
    try:
        # Then every event arrives, in order, and the relay's PostgreSQL sessions are TLS
        assert payload_numbers(queue, 10) == list(range(10))
        with psycopg.connect(database_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
                "WHERE a.datname = current_database() AND a.application_name LIKE 'outbox-relay%'"
            ).fetchall()
        assert rows
        assert all(ssl_on for (ssl_on,) in rows), rows
        status = run_cli("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
    finally:
        assert relay.terminate() == 0


# -- PostgreSQL: bad certificates are configuration errors -------------------------------------------


def test_postgres_certificate_from_another_ca_is_one_line_exit_3(
    postgres_tls: PostgresTls, pki: Pki, database_url: str, broker_url: str
) -> None:
    env = cli_env(database_url=tls_database_url(database_url, sslrootcert=str(pki.other_ca.cert)))
    line = assert_one_line_config_error(run_cli("status", env=env), "TLS with PostgreSQL")
    assert "certificate verify failed" in line
    env["OUTBOX_RELAY_BROKER_URL"] = broker_url
    assert_one_line_config_error(serve_once(env), "TLS with PostgreSQL", "verify failed")


def test_postgres_host_name_not_in_its_certificate_is_one_line_exit_3(
    postgres_tls: PostgresTls, pki: Pki, database_url: str, broker_url: str
) -> None:
    # The server's certificate is for localhost only, not for the address 127.0.0.2... the
    # test CA's certificate names localhost and 127.0.0.1; ask for another name of the host.
    other = pki.leaf("pg-other-name", "db.internal.example", hosts=("db.internal.example",))
    postgres_tls.serve(other)
    try:
        env = cli_env(
            database_url=tls_database_url(database_url, sslrootcert=str(pki.ca.cert)),
            broker_url=broker_url,
        )
        line = assert_one_line_config_error(serve_once(env), "TLS with PostgreSQL")
        assert "does not match host name" in line, line
    finally:
        postgres_tls.serve(
            postgres_tls.pki.leaf("server-again", "localhost", hosts=("localhost", "127.0.0.1"))
        )


def test_postgres_expired_certificate_is_one_line_exit_3(
    postgres_tls: PostgresTls, pki: Pki, database_url: str, broker_url: str
) -> None:
    expired = pki.leaf(
        "pg-expired", "localhost", hosts=("localhost", "127.0.0.1"),
        start="20200101000000Z", end="20200102000000Z",
    )  # fmt: skip
    postgres_tls.serve(expired)
    try:
        env = cli_env(
            database_url=tls_database_url(database_url, sslrootcert=str(pki.ca.cert)),
            broker_url=broker_url,
        )
        assert_one_line_config_error(serve_once(env), "TLS with PostgreSQL", "verify failed")
    finally:
        postgres_tls.serve(pki.leaf("server-fresh", "localhost", hosts=("localhost", "127.0.0.1")))


def test_postgres_missing_root_certificate_file_is_one_line_exit_3(
    postgres_tls: PostgresTls, database_url: str, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-ca.crt"
    env = cli_env(database_url=tls_database_url(database_url, sslrootcert=str(missing)))
    assert_one_line_config_error(run_cli("migrate", env=env), "TLS with PostgreSQL", str(missing))


def test_postgres_certificate_files_without_a_verifying_sslmode_are_refused(
    pki: Pki, database_url: str
) -> None:
    # libpq's default (prefer) would fall back to plaintext when TLS fails: never silently.
    url = tls_database_url(database_url, sslrootcert=str(pki.ca.cert)).replace(
        "sslmode=verify-full&", ""
    )
    assert_one_line_config_error(
        run_cli("status", env=cli_env(database_url=url)),
        "--database-url",
        "sslrootcert",
        "sslmode=verify-full",
    )


def test_postgres_client_certificate_required_by_pg_hba(
    postgres_tls: PostgresTls, pki: Pki, database_url: str
) -> None:
    role = f"outbox_tls_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER").format(sql.Identifier(role)))
    try:
        postgres_tls.require_client_certificate(role)
        client = pki.leaf(f"client-{role}", role)
        base = tls_database_url(database_url, sslrootcert=str(pki.ca.cert)).replace(
            "postgres@", f"{role}@"
        )
        # With its certificate the role gets in ...
        with_cert = f"{base}&sslcert={client.cert}&sslkey={client.key}"
        done = run_cli("status", "--json", env=cli_env(database_url=with_cert))
        assert done.returncode == 0, done.stderr
        # ... without it, one line and exit 3
        line = assert_one_line_config_error(
            run_cli("status", env=cli_env(database_url=base)), "--database-url"
        )
        assert "certificate" in line, line
    finally:
        if postgres_tls.hba_original is not None and postgres_tls.hba_file is not None:
            Path(postgres_tls.hba_file).write_bytes(postgres_tls.hba_original)
            postgres_tls._reload()
            postgres_tls.hba_file = None
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


# -- RabbitMQ's own amqps listener: client certificates, and bad certificates -------------------------


def test_rabbitmq_client_certificate_required_and_given_publishes(
    pki: Pki,
    database_url: str,
    broker_url: str,
    brokers: TlsBrokers,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    # fail_if_no_peer_cert = true: the node takes this connection only with the certificate
    queue = private_queue(brokers.rabbitmq_strict)
    client = pki.leaf("relay-client", "outbox-relay")
    env = cli_env(
        database_url=database_url,
        broker_url=amqps_url(broker_url, brokers.rabbitmq_strict.tls_port),
        broker_ca_file=pki.ca.cert,
        broker_cert_file=client.cert,
        broker_key_file=client.key,
        exchange=queue.exchange,
        poll_interval=0.2,
    )
    emit(env, 5)
    relay = relay_factory(env).start()
    try:
        assert payload_numbers(queue, 5) == list(range(5))
    finally:
        assert relay.terminate() == 0


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("other-ca", "not signed by a trusted CA"),
        ("wrong-host", "not valid for the host"),
        ("expired", "expired"),
        ("client-cert-required", "client certificate"),
        ("client-cert-unknown-ca", "client certificate"),
        ("plaintext", "did not answer in TLS"),
    ],
)
def test_rabbitmq_bad_certificate_is_one_line_exit_3(
    case: str,
    needle: str,
    pki: Pki,
    database_url: str,
    broker_url: str,
    brokers: TlsBrokers,
) -> None:
    node, host, ca_file = brokers.rabbitmq, "localhost", pki.ca.cert
    port = node.tls_port
    client: Leaf | None = None
    if case == "other-ca":
        ca_file = pki.other_ca.cert  # the relay trusts another CA than the node's
    elif case == "wrong-host":
        host = "127.0.0.1"  # the node's certificate names localhost only
    elif case == "expired":
        port = brokers.rabbitmq_expired.tls_port
    elif case == "client-cert-required":
        port = brokers.rabbitmq_strict.tls_port
    elif case == "client-cert-unknown-ca":
        port = brokers.rabbitmq_strict.tls_port
        client = pki.leaf("relay-foreign", "outbox-relay", signer=pki.other_ca)
    else:
        port = rabbit_port(broker_url)  # the shared node's plaintext port, asked for TLS
    env = cli_env(
        database_url=database_url,
        broker_url=amqps_url(broker_url, port, host=host),
        broker_ca_file=ca_file,
    )
    if client is not None:
        env["OUTBOX_RELAY_BROKER_CERT_FILE"] = str(client.cert)
        env["OUTBOX_RELAY_BROKER_KEY_FILE"] = str(client.key)
    line = assert_one_line_config_error(serve_once(env), "TLS with RabbitMQ", needle)
    assert "guest" not in line.replace("guest:***", "")  # no password in the line
    # The consumer takes the same options and fails the same way (as do its other commands:
    # one connection function serves them all).
    queue = f"q.tls.{uuid.uuid4().hex[:8]}"
    consume = run_cli(
        "consume", "--handler", "tests.acceptance.consumer_app:consumer", "--queue", queue, env=env
    )
    assert_one_line_config_error(consume, "TLS with RabbitMQ", needle)


def test_consumer_commands_take_the_broker_tls_options(
    pki: Pki, broker_url: str, brokers: TlsBrokers
) -> None:
    queue = f"q.tls.{uuid.uuid4().hex[:8]}"
    env = cli_env(
        broker_url=amqps_url(broker_url, brokers.rabbitmq.tls_port), broker_ca_file=pki.ca.cert
    )
    done = run_cli("topology", "apply", "--queue", queue, "--binding", "order.*", env=env)
    assert done.returncode == 0, done.stderr
    listed = run_cli("dlq", "list", "--queue", queue, "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    status = run_cli("consumer-status", "--queue", queue, "--json", env=env)
    assert status.returncode == 0, status.stderr


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("broker_ca_file", "PKI/ca.crt", "applies to TLS broker URLs only"),
        ("broker_key_file", "PKI/ca.key", "applies to TLS broker URLs only"),
    ],
)
def test_tls_options_with_a_plaintext_broker_url_are_refused(
    option: str, value: str, needle: str, pki: Pki, database_url: str, broker_url: str
) -> None:
    env = cli_env(database_url=database_url, broker_url=broker_url)
    env[f"OUTBOX_RELAY_{option.upper()}"] = value.replace("PKI", str(pki.dir))
    flag = "--" + option.replace("_", "-")
    assert_one_line_config_error(run_cli("serve", env=env), flag, needle)
    assert_one_line_config_error(
        run_cli("topology", "apply", "--queue", "q.x", env=env), flag, needle
    )


def test_unreadable_broker_ca_file_is_one_line_exit_3(
    database_url: str, broker_url: str, tmp_path: Path
) -> None:
    env = cli_env(
        database_url=database_url,
        broker_url=amqps_url(broker_url, rabbit_port(broker_url)),
        broker_ca_file=tmp_path / "missing.crt",
    )
    assert_one_line_config_error(serve_once(env), "--broker-ca-file", "cannot read", "missing.crt")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    env["OUTBOX_RELAY_BROKER_CA_FILE"] = str(not_pem)
    assert_one_line_config_error(serve_once(env), "--broker-ca-file", "no PEM certificate")


# -- Redis, NATS, Mosquitto and the webhook: their own TLS listeners, the same options --------------


@dataclass
class Target:
    """One broker's TLS listener as the relay is pointed at it, and what arrived there."""

    broker_url: str
    link: str  # how the relay's error lines name it
    settings: dict[str, str]
    received: Callable[[], int]
    stop: Callable[[], None] = lambda: None


def redis_target(server: PrivateServer) -> Target:
    import redis

    prefix = unique("tls")

    def received() -> int:
        client = redis.Redis(host="127.0.0.1", port=server.plain_port)
        try:
            return sum(int(client.xlen(key)) for key in client.keys(f"{prefix}:*"))
        finally:
            client.close()

    return Target(
        f"rediss://localhost:{server.tls_port}/0",
        "TLS with Redis",
        {"topic_prefix": prefix},
        received,
    )


def nats_target(server: PrivateServer, pki: Pki) -> Target:
    """Read over TLS too (NATS has one client port), with a certificate of the test's own."""
    import asyncio
    import ssl

    import nats
    import nats.js.errors

    prefix, stream = unique("tls"), unique("TLS").upper()
    reader = pki.leaf("nats-reader", "test-reader")

    async def count() -> int:
        context = ssl.create_default_context(cafile=str(pki.ca.cert))
        context.load_cert_chain(reader.cert, reader.key)
        nc = await nats.connect(
            f"tls://localhost:{server.tls_port}", tls=context, allow_reconnect=False
        )
        try:
            info = await nc.jetstream().stream_info(stream)
            return int(info.state.messages)
        except nats.js.errors.NotFoundError:
            return 0  # the relay has not created the stream yet
        finally:
            await nc.close()

    return Target(
        f"tls://localhost:{server.tls_port}",
        "TLS with NATS",
        {"topic_prefix": prefix, "nats_stream": stream},
        lambda: asyncio.run(count()),
    )


def mqtt_target(server: PrivateServer) -> Target:
    from tests.brokers import MqttSubscriber

    prefix = unique("tls")
    assert server.plain_port is not None
    subscriber = MqttSubscriber(f"{prefix}/#", port=server.plain_port).start()
    return Target(
        f"mqtts://localhost:{server.tls_port}",
        "TLS with the MQTT broker",
        {"topic_prefix": prefix},
        subscriber.unique_count,
        subscriber.stop,
    )


def webhook_target(pki: Pki, leaf: Leaf) -> Target:
    from tests.contract.http_sink import HttpSink

    sink = HttpSink(tls=pki.server_context(leaf)).start()
    return Target(
        sink.url,
        "TLS with the webhook",
        {},
        lambda: len({r.headers.get("idempotency-key") for r in sink.requests} - {None}),
        sink.stop,
    )


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def publishes(
    target: Target, env: dict[str, str], relay_factory: Callable[..., RelayProcess]
) -> None:
    """Three events through a relay with ``env``, all of them arriving."""
    emit(env, 3)
    relay = relay_factory(env).start()
    try:
        wait_until(lambda: target.received() >= 3, timeout=30, interval=0.2)
    finally:
        assert relay.terminate() == 0


@pytest.mark.parametrize("scheme", ["rediss", "tls", "mqtts", "https"])
def test_other_brokers_over_their_own_tls_publish_and_refuse_a_foreign_ca(
    scheme: str,
    pki: Pki,
    broker_leaf: Leaf,
    database_url: str,
    brokers: TlsBrokers,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    target = {
        "rediss": lambda: redis_target(brokers.redis),
        "tls": lambda: nats_target(brokers.nats, pki),
        "mqtts": lambda: mqtt_target(brokers.mosquitto),
        "https": lambda: webhook_target(pki, broker_leaf),
    }[scheme]()
    try:
        env = cli_env(
            database_url=database_url,
            broker_url=target.broker_url,
            broker_ca_file=pki.ca.cert,
            poll_interval=0.2,
            **target.settings,
        )
        publishes(target, env, relay_factory)
        # The same server, a relay that trusts another CA: one line, exit 3.
        env["OUTBOX_RELAY_BROKER_CA_FILE"] = str(pki.other_ca.cert)
        assert_one_line_config_error(serve_once(env), target.link, "not signed by a trusted CA")
    finally:
        target.stop()


@pytest.mark.parametrize("scheme", ["rediss", "tls", "mqtts"])
def test_other_brokers_requiring_a_client_certificate(
    scheme: str,
    pki: Pki,
    database_url: str,
    brokers: TlsBrokers,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    target = {
        "rediss": lambda: redis_target(brokers.redis_strict),
        "tls": lambda: nats_target(brokers.nats_strict, pki),
        "mqtts": lambda: mqtt_target(brokers.mosquitto_strict),
    }[scheme]()
    try:
        env = cli_env(
            database_url=database_url,
            broker_url=target.broker_url,
            broker_ca_file=pki.ca.cert,
            poll_interval=0.2,
            **target.settings,
        )
        # Without a client certificate: one line, exit 3 (TLS 1.3 servers refuse it after the
        # handshake, at the client's first read: not to be mistaken for another service)
        assert_one_line_config_error(serve_once(env), target.link, "client certificate")
        # With one signed by the CA the server trusts: published
        client = pki.leaf(f"client-{scheme}", "outbox-relay")
        env["OUTBOX_RELAY_BROKER_CERT_FILE"] = str(client.cert)
        env["OUTBOX_RELAY_BROKER_KEY_FILE"] = str(client.key)
        publishes(target, env, relay_factory)
    finally:
        target.stop()
