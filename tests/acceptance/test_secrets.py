"""No secret is ever printed. Every URL carries credentials (passwords holding ``/ # @ :`` and
spaces, query tokens, a bare NATS token) and every log line (debug and info, text and JSON), every
error and every ``status`` / ``dead list`` / ``migrate`` / ``emit`` output is searched for them in
each form a secret could take: as given, percent-encoded, and each piece of it between the
characters a URL parser splits at (a parser that stops at an unencoded ``/`` quotes the part
before it).

Each password is six random words joined by ``/ # @ :`` and a space, so a fragment quoted by any
parser is itself a unique string the search finds. Nothing here imports the relay.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
import redis

from tests.acceptance.cli_batch import run_all
from tests.acceptance.conftest import RelayProcess, cli_env, run_cli
from tests.brokers import MqttSubscriber, nats_cleanup, redis_cleanup, unique
from tests.conftest import RabbitQueue, wait_until
from tests.contract.http_sink import HttpSink, Request

pytestmark = pytest.mark.acceptance

EXIT_CONFIG = 3
# What ends a URL's user info, or one of its parts, when left unencoded.
DELIMITERS = "/#@: "


# -- secrets, and the forms they must not appear in -------------------------------------------------


def forms_of(secret: str) -> list[str]:
    """The secret as given, percent-encoded (fully, keeping '/', lower-case hex) and each piece
    of it between delimiters."""
    pieces = [piece for piece in re.split(f"[{re.escape(DELIMITERS)}]", secret) if piece]
    encoded = quote(secret, safe="")
    return list(dict.fromkeys([secret, encoded, encoded.lower(), quote(secret), *pieces]))


@dataclass
class Secrets:
    """Every secret a test hands out, by the forms it could be printed in."""

    forms: dict[str, str] = field(default_factory=dict)  # form -> the secret's name

    def add(self, name: str, secret: str) -> str:
        for form in forms_of(secret):
            self.forms[form] = name
        return secret

    def password(self, name: str) -> str:
        """Six random words joined by '/', '#', '@', ':' and ' ' (raw, not encoded)."""
        return self.add(name, new_password(name))

    def token(self, name: str) -> str:
        """A token as query strings and NATS URLs carry them (URL-safe characters)."""
        return self.add(name, f"tok{uuid.uuid4().hex}")

    def found_in(self, text: str) -> list[str]:
        return [
            f"{name} ({form!r}) in: {line[:400]}"
            for line in text.splitlines()
            for form, name in self.forms.items()
            if form in line
        ]

    def assert_absent(self, text: str, where: str) -> None:
        found = self.found_in(text)
        assert not found, f"secrets printed by {where}:\n" + "\n".join(found[:10])


def at_colon_space() -> str:
    """A password whose unencoded characters still parse: '@', ':' and ' '."""
    return "{}@{}:{} {}".format(*(uuid.uuid4().hex[:12] for _ in range(4)))


def new_password(name: str) -> str:
    words = [f"{name[:3]}{uuid.uuid4().hex[:10]}" for _ in range(6)]
    return "".join(w + d for w, d in zip(words, [*DELIMITERS, ""], strict=True))


@pytest.fixture
def secrets() -> Secrets:
    return Secrets()


def with_password(url: str, user: str, password: str, *, encode: bool = True) -> str:
    """``url`` with ``user:password@`` as its user info, percent-encoded as a user must (or not,
    as a user might)."""
    parts = urlsplit(url)
    secret = quote(password, safe="") if encode else password
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{secret}@{host}"))


def assert_clean(secrets: Secrets, text: str, where: str) -> None:
    secrets.assert_absent(text, where)
    assert "Traceback" not in text, f"traceback from {where}:\n{text[-3000:]}"


def checked_cli(
    secrets: Secrets, *args: str, env: dict[str, str], code: int = 0
) -> subprocess.CompletedProcess[str]:
    """Run the CLI: no secret and no traceback in its output, and the expected exit code."""
    done = run_cli(*args, env=env, timeout=60)
    where = f"`outbox-relay {' '.join(args)}`"
    assert_clean(secrets, done.stdout + done.stderr, where)
    assert done.returncode == code, (
        f"{where} exited {done.returncode}, not {code}:\n{done.stdout}{done.stderr}"
    )
    return done


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bytes(response.read()).decode()


# -- a RabbitMQ user and a Redis user whose passwords hold every awkward character -------------------


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"rabbitmqctl {args[0]} failed: {done.stdout}{done.stderr}"
    return done.stdout


def rabbit_users() -> list[str]:
    return sorted(rabbitmqctl("list_users").splitlines())


@dataclass(frozen=True)
class Account:
    user: str
    password: str


@pytest.fixture(scope="module")
def rabbit_account() -> Iterator[Account]:
    """A RabbitMQ user with rights on vhost / (rabbitmqctl add_user, delete_user afterwards: the
    broker's users are then exactly what they were)."""
    before = rabbit_users()
    account = Account(f"t_secret_{uuid.uuid4().hex[:8]}", new_password("rabbit"))
    rabbitmqctl("add_user", account.user, account.password)
    try:
        rabbitmqctl("set_permissions", "-p", "/", account.user, ".*", ".*", ".*")
        yield account
    finally:
        rabbitmqctl("delete_user", account.user)
        assert rabbit_users() == before


@pytest.fixture(scope="module")
def redis_account() -> Iterator[Account]:
    """A Redis ACL user with such a password (ACL DELUSER afterwards)."""
    client = redis.Redis(host="127.0.0.1", port=6379)
    before = client.acl_list()
    account = Account(f"t_secret_{uuid.uuid4().hex[:8]}", new_password("redis"))
    client.execute_command(
        "ACL", "SETUSER", account.user, "on", f">{account.password}", "~*", "&*", "+@all"
    )
    try:
        yield account
    finally:
        client.execute_command("ACL", "DELUSER", account.user)
        assert client.acl_list() == before
        client.close()


def close_rabbit_connections(user: str) -> None:
    """Close the connections ``user`` holds (only those: other tests share the broker)."""

    def mine() -> list[str]:
        rows = rabbitmqctl("list_connections", "user", "pid").splitlines()
        return [row.split("\t")[1] for row in rows if row.startswith(f"{user}\t")]

    for pid in wait_until(mine, timeout=10):
        rabbitmqctl("close_connection", pid, "test: a dropped link")


# -- the database ----------------------------------------------------------------------------------


def secret_database_url(database_url: str, secrets: Secrets) -> str:
    """The test database through a URL with a password. Local PostgreSQL trusts local
    connections and ignores it: the point is what the relay prints."""
    user = urlsplit(database_url).username or "postgres"
    return with_password(database_url, user, secrets.password("database"))


def insert_events(database_url: str, *event_types: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for event_type in event_types:
            conn.execute(
                "INSERT INTO outbox (event_type, aggregate_type, aggregate_id, payload)"
                " VALUES (%s, 'order', %s, '{}')",
                (event_type, uuid.uuid4().hex[:8]),
            )


def outbox_counts(database_url: str) -> tuple[int, int]:
    """(pending, dead)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE dead_at IS NULL), count(*) FILTER (WHERE dead_at IS"
            " NOT NULL) FROM outbox"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# -- one broker per serve run --------------------------------------------------------------------------


@dataclass
class Target:
    """A broker reached through a URL full of secrets, and what to do around the run."""

    url: str
    options: dict[str, str] = field(default_factory=dict)
    # An event type the broker refuses (dead-lettered, so `dead list` shows its reason).
    refused: str | None = None
    # Breaks the relay's connection while an event waits (the relay's reconnect lines name the
    # URL), then mends it: disrupt(relay, write_an_event).
    disrupt: Callable[[RelayProcess, Callable[[], None]], None] | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)


def rabbitmq_target(request: pytest.FixtureRequest, secrets: Secrets) -> Target:
    account: Account = request.getfixturevalue("rabbit_account")
    secrets.add("rabbitmq password", account.password)
    exchange: str = request.getfixturevalue("exchange")
    bind_queue: Callable[..., RabbitQueue] = request.getfixturevalue("bind_queue")
    bind_queue("order.*")  # audit.* is unroutable: retried, then dead
    return Target(
        with_password("amqp://127.0.0.1:5672/%2F", account.user, account.password),
        {"exchange": exchange},
        refused="audit.unroutable",
        disrupt=lambda relay, write: (close_rabbit_connections(account.user), write()),
    )


def nats_target(request: pytest.FixtureRequest, secrets: Secrets) -> Target:
    stream, prefix = unique("SEC").upper(), unique("sec")
    target = Target(
        f"nats://{secrets.token('nats token')}@127.0.0.1:4222",
        {"nats_stream": stream, "topic_prefix": prefix},
    )
    target.cleanups.append(lambda: nats_cleanup(stream))
    return target


def redis_target(request: pytest.FixtureRequest, secrets: Secrets) -> Target:
    account: Account = request.getfixturevalue("redis_account")
    secrets.add("redis password", account.password)
    prefix = unique("sec")
    target = Target(
        with_password("redis://127.0.0.1:6379/0", account.user, account.password),
        {"topic_prefix": prefix},
    )
    target.cleanups.append(lambda: redis_cleanup(f"{prefix}*"))
    return target


def mqtt_target(request: pytest.FixtureRequest, secrets: Secrets) -> Target:
    prefix = unique("sec")
    subscriber = MqttSubscriber(f"{prefix}/#").start()  # MQTT 5 refuses topics nobody reads
    target = Target(
        with_password("mqtt://127.0.0.1:1883", "relay", secrets.password("mqtt")),
        {"topic_prefix": prefix},
    )
    target.cleanups.append(subscriber.stop)
    return target


def webhook_target(request: pytest.FixtureRequest, secrets: Secrets) -> Target:
    def respond(req: Request) -> int:
        return 400 if req.headers.get("x-outbox-event-type") == "order.rejected" else 200

    sink = HttpSink(respond).start()
    token, code = secrets.token("query token"), secrets.token("query code")

    def disrupt(relay: RelayProcess, write: Callable[[], None]) -> None:
        sink.stop()  # the endpoint is down while an event waits: the relay says it reconnects
        write()
        relay.wait_for_log("cannot connect, retrying", timeout=15)
        sink.start()

    target = Target(
        with_password(
            f"http://127.0.0.1:{sink.port}/hook?code={code}&token={token}",
            "relay",
            secrets.password("webhook"),
        ),
        {"webhook_secret": secrets.password("webhook secret")},
        refused="order.rejected",
        disrupt=disrupt,
    )
    target.cleanups.append(sink.stop)
    return target


TARGETS: dict[str, Callable[[pytest.FixtureRequest, Secrets], Target]] = {
    "rabbitmq": rabbitmq_target,
    "nats": nats_target,
    "redis": redis_target,
    "mqtt": mqtt_target,
    "webhook": webhook_target,
}


@pytest.fixture
def target(request: pytest.FixtureRequest, secrets: Secrets) -> Iterator[Target]:
    made = TARGETS[request.param](request, secrets)
    yield made
    for cleanup in reversed(made.cleanups):
        cleanup()


# Every broker at debug (all that info prints, and more), RabbitMQ and the webhook (the URLs with
# the most in them) in both formats and at info too.
RUNS = [
    pytest.param(broker, level, fmt, id=f"{broker}-{level}-{fmt}")
    for broker, level, fmt in [
        ("rabbitmq", "debug", "text"),
        ("rabbitmq", "debug", "json"),
        ("rabbitmq", "info", "text"),
        ("webhook", "debug", "text"),
        ("webhook", "debug", "json"),
        ("webhook", "info", "json"),
        ("nats", "debug", "json"),
        ("redis", "debug", "text"),
        ("mqtt", "debug", "json"),
    ]
]


@pytest.mark.parametrize(("target", "level", "fmt"), RUNS, indirect=["target"])
def test_serve_prints_no_secret_in_any_log_line(
    target: Target,
    level: str,
    fmt: str,
    secrets: Secrets,
    database_url: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    # Given: a relay whose every URL carries secrets, with metrics and health endpoints
    secret_db = secret_database_url(database_url, secrets)
    env = cli_env(database_url=secret_db, broker_url=target.url, **target.options)
    metrics, health = free_port(), free_port()
    relay = relay_factory(
        env,
        *("--log-level", level, "--log-format", fmt, "--poll-interval", "0.2"),
        *("--max-attempts", "2", "--retry-backoff", "0.1"),
        *("--metrics-port", str(metrics), "--health-port", str(health)),
    ).start()
    relay.wait_for_log("connected to broker")

    # When: events are written (one by `emit`), published, refused, and the link drops once
    checked_cli(secrets, "emit", "order.created", "--aggregate-id", "a-1", env=env)
    insert_events(database_url, "order.paid", *([target.refused] if target.refused else []))
    dead = 1 if target.refused else 0
    wait_until(lambda: outbox_counts(database_url) == (0, dead), timeout=30)
    disrupted = target.disrupt is not None and level == "debug"
    if target.disrupt is not None and disrupted:
        target.disrupt(relay, lambda: insert_events(database_url, "order.shipped"))
        wait_until(lambda: outbox_counts(database_url) == (0, dead), timeout=30)
    outputs = {
        "/metrics": fetch(f"http://127.0.0.1:{metrics}/metrics"),
        "/readyz": fetch(f"http://127.0.0.1:{health}/readyz"),
    }
    if target.refused:
        listed = checked_cli(secrets, "dead", "list", "--json", env=env)
        assert target.refused in listed.stdout
    assert relay.terminate() == 0

    # Then: not one secret, in any form, anywhere
    for where, text in outputs.items():
        assert_clean(secrets, text, where)
    log = relay.log()
    assert_clean(secrets, log, f"serve --log-level {level} --log-format {fmt}")
    assert "***" in log  # the URLs were logged, masked
    if disrupted:
        assert "disconnected" in log  # and so were the reconnects
    if fmt == "json":
        for line in relay.log_lines():
            json.loads(line)  # one object a line: nothing escaped the formatter


# -- errors ------------------------------------------------------------------------------------------


@dataclass
class Context:
    request: pytest.FixtureRequest
    secrets: Secrets
    secret_db: str  # the test database, through a URL with a password

    def password(self, name: str) -> str:
        return self.secrets.password(name)

    def account(self, fixture: str) -> Account:
        account: Account = self.request.getfixturevalue(fixture)
        self.secrets.add(fixture, account.password)
        return account

    def unencoded(self, url: str) -> str:
        return with_password(url, "relay", self.password("unencoded"), encode=False)


SERVE = ("serve", "--log-level", "debug", "--log-format", "text")
SERVE_JSON = ("serve", "--log-level", "debug", "--log-format", "json")
AMQP = "amqp://127.0.0.1:5672/%2F"
Case = tuple[tuple[str, ...], dict[str, str]]

# id -> (command line, URLs by setting); each must exit 3 with one error line and no secret.
ERRORS: dict[str, Callable[[Context], Case]] = {
    "rabbitmq-wrong-password": lambda c: (
        SERVE,
        {"broker_url": with_password(AMQP, c.account("rabbit_account").user, c.password("wrong"))},
    ),
    "rabbitmq-wrong-password-topology-apply": lambda c: (
        ("topology", "apply", "--queue", unique("q.secret.")),
        {"broker_url": with_password(AMQP, c.account("rabbit_account").user, c.password("wrong"))},
    ),
    "redis-wrong-password": lambda c: (
        SERVE_JSON,
        {
            "broker_url": with_password(
                "redis://127.0.0.1:6379/0", c.account("redis_account").user, c.password("wrong")
            )
        },
    ),
    "unknown-scheme": lambda c: (
        SERVE,
        {"broker_url": with_password("kafka://127.0.0.1:9092/x", "relay", c.password("kafka"))},
    ),
    "unparsable-broker-url": lambda c: (
        SERVE_JSON,
        {"broker_url": f"amqp://relay:{quote(c.password('broker'), safe='')}@[127.0.0.1/%2F"},
    ),
    "libpq-bad-percent-escape": lambda c: (
        ("status",),
        {"database_url": c.secret_db.replace("@", "%zz@", 1)},
    ),
    "libpq-unclosed-ipv6-host": lambda c: (
        ("status", "--json"),
        {"database_url": f"postgresql://app:{quote(c.password('db'), safe='')}@[::1/postgres"},
    ),
    "conninfo-bad-sslmode": lambda c: (
        ("migrate",),
        {"database_url": f"host=127.0.0.1 password='{c.password('db')}' sslmode=bogus"},
    ),
    "unencoded-postgresql-status": lambda c: (
        ("status",),
        {"database_url": c.unencoded("postgresql://127.0.0.1:5432/postgres")},
    ),
    "unencoded-postgresql-serve": lambda c: (
        SERVE,
        {"database_url": c.unencoded("postgresql://127.0.0.1:5432/postgres")},
    ),
    "unencoded-amqp": lambda c: (SERVE, {"broker_url": c.unencoded(AMQP)}),
    "unencoded-redis": lambda c: (SERVE, {"broker_url": c.unencoded("redis://127.0.0.1:6379/0")}),
    "unencoded-nats": lambda c: (SERVE_JSON, {"broker_url": c.unencoded("nats://127.0.0.1:4222")}),
    "unencoded-mqtt": lambda c: (SERVE, {"broker_url": c.unencoded("mqtt://127.0.0.1:1883")}),
    "unencoded-webhook": lambda c: (
        SERVE_JSON,
        {"broker_url": c.unencoded("http://127.0.0.1:9/hook?token=" + c.secrets.token("token"))},
    ),
    # '@', ':' and ' ' only: the URL still parses (the user info ends at the last '@'), and the
    # broker refuses a user that does not exist.
    "unencoded-at-colon-space-amqp": lambda c: (
        SERVE,
        {
            "broker_url": f"amqp://nobody:{c.secrets.add('amqp', at_colon_space())}@127.0.0.1:5672/%2F"
        },
    ),
    "nats-tls-to-a-server-without-tls": lambda c: (
        SERVE,
        {"broker_url": f"tls://{c.secrets.token('nats token')}@127.0.0.1:4222"},
    ),
}


def test_errors_print_no_secret(
    request: pytest.FixtureRequest, secrets: Secrets, database_url: str
) -> None:
    context = Context(request, secrets, secret_database_url(database_url, secrets))
    runs = {}
    for case, make in ERRORS.items():
        args, urls = make(context)
        runs[case] = (args, cli_env(**{"database_url": context.secret_db, **urls}))

    done = run_all(list(runs.values()), timeout=60)

    failures = []
    for (case, (args, _env)), result in zip(runs.items(), done, strict=True):
        output = result.stdout + result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        problems = [
            *secrets.found_in(output),
            *(["a traceback"] if "Traceback" in output else []),
            *([f"exit {result.returncode}, not 3"] if result.returncode != EXIT_CONFIG else []),
            *([f"{len(errors)} error lines"] if len(errors) != 1 else []),
        ]
        if problems:
            failures.append(f"{case} (outbox-relay {' '.join(args)}):\n  " + "\n  ".join(problems))
            failures.append("  output: " + output[-1500:].replace("\n", "\n    "))
    assert not failures, "\n".join(failures)


# -- one-shot commands -----------------------------------------------------------------------------


def test_one_shot_commands_print_no_secret(empty_database_url: str, secrets: Secrets) -> None:
    secret_db = secret_database_url(empty_database_url, secrets)
    env = cli_env(database_url=secret_db)

    checked_cli(secrets, "migrate", "--database-url", secret_db, env=cli_env())
    event_id = checked_cli(secrets, "emit", "order.created", env=env).stdout.strip()
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE outbox SET dead_at = now(), attempts = 3, last_error = 'refused'"
            " WHERE event_id = %s",
            (event_id,),
        )
    for args in (("status",), ("status", "--json"), ("dead", "list"), ("dead", "list", "--json")):
        shown = checked_cli(secrets, *args, env=env)
        assert shown.stdout.strip()
    checked_cli(secrets, "dead", "retry", event_id, env=env)


# -- tls:// must mean TLS -------------------------------------------------------------------------------


class PlainNats:
    """A fake NATS server without TLS: greets each connection with INFO and records every byte
    a client sends."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.connections = 0
        self.closed = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        info = {"server_id": "fake", "version": "2.10.0", "proto": 1, "headers": True,
                "max_payload": 1048576, "jetstream": True, "host": "127.0.0.1", "port": self.port}  # fmt: skip
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.sendall(b"INFO " + json.dumps(info).encode() + b"\r\n")
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    while chunk := conn.recv(65536):
                        self.received += chunk
            self.closed += 1

    def close(self) -> None:
        self._sock.close()


def test_tls_for_nats_refuses_a_server_without_tls_and_sends_nothing(
    database_url: str, secrets: Secrets
) -> None:
    server = PlainNats()
    try:
        url = f"tls://{secrets.token('nats token')}@127.0.0.1:{server.port}"

        done = checked_cli(
            secrets, "serve", env=cli_env(database_url=database_url, broker_url=url), code=3
        )

        assert "TLS" in done.stderr
        assert server.connections >= 1
        wait_until(lambda: server.closed == server.connections, timeout=10)
        assert bytes(server.received) == b""  # not a CONNECT, not the token: nothing
    finally:
        server.close()
