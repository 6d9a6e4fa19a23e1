"""Every option of every command, given a bad value, is refused before anything connects: exit
code 3 (2 for an option that does not exist), exactly one line on stderr naming the option, no
traceback, at once.

The cases are generated from the settings models each command reads (``settings_models`` of the
command, ``cli_fields`` of each model), so a new option, or a new command, is covered without
touching this file: numbers get values out of their declared range plus NaN, infinities, huge
and malformed numbers; choices get a value that is none of them; a variable-only value like a
flag's ``maybe`` goes through its variable; text options need an entry in ``BAD_TEXT`` (or
``FREE_TEXT``, saying why any text is fine), which a test enforces.

Most cases run in this process through ``outbox_relay.cli.main`` (what the console script
calls), with every URL pointing at a trap that counts connections; a sample runs through the
installed CLI. The second half checks URLs that point at the wrong kind of server, and that the
same bad credentials give the same exit code from every command.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import annotated_types
import pytest
import typer.main
from pydantic.fields import FieldInfo

from outbox_relay.cli import main
from outbox_relay.cli.app import app
from outbox_relay.cli.options import cli_fields, settings_models
from outbox_relay.publishers import broker_options
from outbox_relay.settings import Settings, env_name, flag_of, option_name
from tests.acceptance.cli_batch import run_all
from tests.acceptance.conftest import RelayProcess, cli_env, relay_command
from tests.faults import Trap

pytestmark = pytest.mark.acceptance

EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNAVAILABLE = 5
CONNECT_TIMEOUT = 10.0  # seconds, PostgreSQL's and RabbitMQ's (outbox_relay.db.connect, .amqp)
QUICK = 5.0  # seconds: validation only, nothing to wait for (generous for a loaded CI machine)
HANDLER = "tests.acceptance.consumer_app:consumer"


# -- every command and the settings it reads -----------------------------------------------------


def _commands() -> dict[tuple[str, ...], tuple[type[Settings], ...]]:
    found: dict[tuple[str, ...], tuple[type[Settings], ...]] = {}

    def walk(command: Any, path: tuple[str, ...]) -> None:
        if hasattr(command, "commands"):  # a group
            # A group that is also a command (replay; replay list) has options of its own.
            models = settings_models(command.callback) if command.callback else ()
            if models:
                found[path] = models
            for name, sub in command.commands.items():
                walk(sub, (*path, name))
        else:
            found[path] = settings_models(command.callback)

    walk(typer.main.get_command(app), ())
    return found


COMMANDS = _commands()

# What each command needs to get as far as validating the option under test; a case replaces
# the entry for its own option.
REQUIRED: dict[tuple[str, ...], dict[str, list[str]]] = {
    ("emit",): {"event_type": ["order.created"]},
    ("dead", "retry"): {"all": ["--all"]},
    ("replay",): {"all": ["--all"]},
    ("consume",): {"handler": ["--handler", HANDLER], "queue": ["--queue", "q.options"]},
    ("topology", "apply"): {"queue": ["--queue", "q.options"]},
    ("dlq", "list"): {"queue": ["--queue", "q.options"]},
    ("dlq", "replay"): {"queue": ["--queue", "q.options"]},
    ("dlq", "purge"): {"queue": ["--queue", "q.options"], "yes": ["--yes"]},
    ("consumer-status",): {"queue": ["--queue", "q.options"]},
}


def test_every_command_reads_settings_models() -> None:
    assert len(COMMANDS) >= 14
    bare = [" ".join(path) for path, models in COMMANDS.items() if not models]
    assert not bare, f"commands whose options this suite cannot see: {bare}"


# -- bad values, by type ----------------------------------------------------------------------------


def _walk(annotation: Any) -> Iterator[tuple[Any, list[Any]]]:
    """(bare type, metadata) through Annotated and Optional layers."""
    metadata: list[Any] = []
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *extra = get_args(annotation)
            for item in extra:
                metadata += item.metadata if isinstance(item, FieldInfo) else [item]
            continue
        if get_origin(annotation) in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) == 1:
                annotation = members[0]
                continue
        yield annotation, metadata
        return


def kind_and_bounds(info: FieldInfo) -> tuple[Any, Any, bool, Any]:
    """(type, lower bound, whether the lower bound is excluded, upper bound) of a field; the
    bounds as declared (ints stay exact)."""
    kind, nested = next(_walk(info.annotation))
    lower: Any = None
    excluded = False
    upper: Any = None
    for item in [*info.metadata, *nested]:
        if isinstance(item, annotated_types.Gt) and (lower is None or item.gt >= lower):
            lower, excluded = item.gt, True
        elif isinstance(item, annotated_types.Ge) and (lower is None or item.ge > lower):
            lower, excluded = item.ge, False
        elif isinstance(item, annotated_types.Lt | annotated_types.Le):
            bound = item.lt if isinstance(item, annotated_types.Lt) else item.le
            upper = bound if upper is None else min(upper, bound)
    return kind, lower, excluded, upper


def _number(value: Any, kind: Any) -> str:
    return str(int(value)) if kind is int else f"{float(value):g}"


def numeric_bad_values(info: FieldInfo) -> list[str]:
    kind, lower, excluded, upper = kind_and_bounds(info)
    bad = ["nan", "inf", "-inf", "twelve", "9" * 40, ""]
    bad += ["1.5"] if kind is int else ["1e400", "5 fortnights"]
    if lower is not None:
        bad.append(_number(lower if excluded else lower - 1, kind))
        bad.append(_number(lower - 1000, kind))
    if upper is not None:
        bad.append(_number(upper + 1 if kind is int else upper * 2 + 1, kind))
    return list(dict.fromkeys(bad))


# Text options: values each must refuse. A new text option needs an entry here or in FREE_TEXT.
BAD_TEXT: dict[str, list[str]] = {
    "ce_source": ["", "a b", "/shop\tx"],
    "database_url": [
        "not-a-url",
        "mysql://app@db/orders",
        "postgresql://db:70000/orders",
        "postgresql://db:0/orders",
        "postgresql://app:pw@[::1/orders",
        "postgresql://db/orders?sslmode=bogus",
        "host=db port=abc",
        # A CA file with libpq's default sslmode (prefer), which falls back to plaintext.
        "postgresql://db/orders?sslrootcert=/etc/ssl/ca.pem",
    ],
    "broker_url": [
        "not-a-url",
        "amqp://guest:guest@rabbit:70000/%2F",
        "amqp://guest:guest@rabbit:0/%2F",
        "amqp://guest:guest@[rabbit/%2F",
        "amqp://guest:pass/word@rabbit:5672/%2F",
    ],
    # Empty; any other file name is checked when connecting (unreadable: one line, exit 3).
    "broker_ca_file": [""],
    "broker_cert_file": [""],
    "broker_key_file": [""],
    "schema": ["pg_temp", "pg_catalog", "information_schema", "Orders", "a b", "a" * 41, ""],
    # A glob of schema names; any non-blank text is one (matching nothing is reported).
    "schemas": ["", " "],
    "exchange": ["a b", "", "x" * 256, "a/b"],
    "topic_prefix": ["a..b", "a b", "a.#", "", "x" * 101],
    # With the default amqp:// broker the destination is an exchange.
    "route": ["order.*", "=orders", "order..x=orders", "order.*=a b", "header.x=y"],
    "nats_stream": ["a.b", "a b", "a*", "a>", ""],
    "slot_name": ["Bad-Name", "a" * 64, ""],
    "publication": ["Bad-Name", "a" * 64, ""],
    "wal_message_prefix": ["", "a\tb", "x" * 201],
    "relay_name": ["-leading-dash", "a b", "x" * 49],
    "metrics_host": ["not a host!", "-bad", ""],
    "health_host": ["not a host!", "-bad", ""],
    "webhook_secret": [""],
    "app_role": ["pg_app", "public", "x" * 64, ""],
    "relay_role": ["pg_relay", "public", "x" * 64, ""],
    "event_type": ["bad type", "", "order..created"],
    "payload": ["{not json", ""],
    "header": ["no-equals-sign", "=value"],
    "event_ids": ["not-a-uuid"],  # dead retry; dlq replay takes any message id (FREE_TEXT)
    "queue": ["amq.reserved", "", "x" * 201, "a\nb"],
    "binding": ["a..b", "", "x" * 256],
    "consumer_name": ["", "x" * 201],
    "handler": ["no-colon", "no_such_module_x:consumer", f"{HANDLER}_missing"],
    "management_url": ["not-a-url", "ftp://rabbit:15672"],
    "since": ["yesterday", "2026-13-01", "-2h", ""],
    "until": ["tomorrow", "2026-12-01T25:00", ""],
    "name": ["-leading-dash", "a b", "x" * 64, ""],
    "config": ["/nonexistent/relay.toml", "/", ""],
    "outbox": ["a b", "-x", ""],
}
# Text options that take any text, and why.
FREE_TEXT: dict[str, str] = {
    "aggregate_id": "any text is an aggregate id (the producer API checks only its type)",
    "aggregate_type": "any text is an aggregate type",
}
# Per command, a key whose values differ (dlq replay's ids are broker message ids).
FREE_TEXT_IN = {(("dlq", "replay"), "event_ids")}


@dataclass(frozen=True)
class Case:
    command: tuple[str, ...]
    key: str
    value: str
    via: str  # "flag" or "env"
    names: str  # what the error line must name

    @property
    def id(self) -> str:
        shown = repr(self.value) if len(self.value) < 30 else repr(self.value[:12] + "...")
        return f"{' '.join(self.command)} {self.names}={shown} [{self.via}]"


def bad_values(command: tuple[str, ...], key: str, info: FieldInfo) -> list[str]:
    kind = kind_and_bounds(info)[0]
    if get_origin(kind) in (list, tuple):
        kind = str
    if kind is bool:
        return ["maybe"]  # through the variable only: a flag takes no value
    if kind in (int, float):
        return numeric_bad_values(info)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return ["bogus", ""]
    if (command, key) in FREE_TEXT_IN or key in FREE_TEXT:
        return []
    return BAD_TEXT[key]


def cases() -> list[Case]:
    found = []
    for command, models in COMMANDS.items():
        seen: set[str] = set()
        for model in models:
            for key, info in cli_fields(model):
                if key in seen:
                    continue
                seen.add(key)
                flag = flag_of(info)
                is_bool = kind_and_bounds(info)[0] is bool
                for value in bad_values(command, key, info):
                    name = option_name(key, info)
                    if not is_bool:
                        found.append(Case(command, key, value, "flag", name))
                    # An empty variable counts as unset (click's rule, and the shell's habit).
                    if flag.env and not flag.argument and value:
                        found.append(Case(command, key, value, "env", name))
    return found


CASES = cases()


def test_every_text_option_has_bad_values_or_is_free_text() -> None:
    for command, models in COMMANDS.items():
        for model in models:
            for key, info in cli_fields(model):
                bad_values(command, key, info)  # KeyError: add the option to BAD_TEXT


# -- running the CLI in this process, with every URL pointing at a trap ----------------------------


@pytest.fixture(scope="module")
def trap() -> Iterator[Trap]:
    made = Trap()
    yield made
    made.close()


def trap_env(trap: Trap, command: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """Every URL at the trap (consumer-status's database is optional: left unset)."""
    env = {
        "OUTBOX_RELAY_DATABASE_URL": f"postgresql://app@127.0.0.1:{trap.port}/orders",
        "OUTBOX_RELAY_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{trap.port}/%2F",
        "OUTBOX_RELAY_MANAGEMENT_URL": f"http://127.0.0.1:{trap.port}",
    }
    if list(command[:1]) == ["consumer-status"]:
        del env["OUTBOX_RELAY_DATABASE_URL"]
    return env


class Hung(BaseException):
    """The command did not return: it connected, or waited for something."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (and give pytest-timeout its own timer back)."""

    def hung(_signum: int, _frame: Any) -> None:
        raise Hung(f"no exit within {seconds}s")

    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, hung)
    remaining, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if remaining:
            left = max(0.01, remaining - (time.monotonic() - started))
            signal.setitimer(signal.ITIMER_REAL, left, interval)


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float


@pytest.fixture
def run_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Outcome]:
    """``outbox-relay ARGS`` as the console script runs it, in this process."""

    def run(args: list[str], env: dict[str, str], within: float = QUICK) -> Outcome:
        for name in [n for n in os.environ if n.startswith("OUTBOX_RELAY_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(sys, "argv", ["outbox-relay", *args])
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        capsys.readouterr()
        started = time.monotonic()
        try:
            with deadline(within), pytest.raises(SystemExit) as exited:
                main()
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        seconds = time.monotonic() - started
        out = capsys.readouterr()
        code = exited.value.code
        return Outcome(code if isinstance(code, int) else 1, out.out, out.err, seconds)

    return run


def _broker_schemes() -> dict[str, str]:
    """Option key -> a scheme of the broker it belongs to (so its value, not the broker, is
    what gets refused)."""
    found = {"topic_prefix": "nats"}
    for schemes, options in broker_options():
        for key, _info in cli_fields(options):
            found[key] = schemes[0]
    return found


BROKER_OF = _broker_schemes()


def arguments(case: Case, trap: Trap) -> tuple[list[str], dict[str, str]]:
    """The command line and the variables of ``case`` (every URL at the trap)."""
    required = dict(REQUIRED.get(case.command, {}))
    required.pop(case.key, None)
    args = [*case.command, *(arg for given in required.values() for arg in given)]
    env = trap_env(trap, case.command)
    if case.key in BROKER_OF:
        env["OUTBOX_RELAY_BROKER_URL"] = f"{BROKER_OF[case.key]}://127.0.0.1:{trap.port}/x"
    if case.via == "env":
        env[env_name(case.key)] = case.value
    elif case.names.startswith("--"):
        args.append(f"{case.names}={case.value}")
    else:  # a positional argument
        args += ["--", case.value]
    return args, env


def assert_one_line_naming(outcome: Outcome, names: str, code: int = EXIT_CONFIG) -> None:
    lines = outcome.stderr.splitlines()
    assert "Traceback" not in outcome.stderr + outcome.stdout, outcome.stderr
    assert outcome.code == code, f"exit {outcome.code}, not {code}: {outcome.stderr}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{outcome.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert names in lines[0], f"the error does not name {names}: {lines[0]}"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_bad_value_is_one_line_naming_the_option_before_anything_connects(
    case: Case, trap: Trap, run_in_process: Callable[..., Outcome]
) -> None:
    args, env = arguments(case, trap)
    before = trap.connections

    outcome = run_in_process(args, env)

    assert_one_line_naming(outcome, case.names)
    assert trap.connections == before, "it connected before refusing the value"
    assert outcome.seconds < QUICK


# -- combinations that cannot take effect, and options that do not exist ---------------------------

AMQP = "--broker-url=amqp://guest:guest@rabbit:5672/%2F"
NATS = "--broker-url=nats://nats:4222"


# Refused when they cannot take effect: options of the command itself. Not refused: a variable
# another command shares (OUTBOX_RELAY_SLOT_NAME set for `serve --mode cdc` must not stop
# `migrate` or `slot drop` run in the same environment without --cdc or --with-publication).
COMBINATIONS = [
    pytest.param(["serve", "--slot-name=s"], "--slot-name", id="serve slot-name without cdc"),
    pytest.param(["serve", "--publication=p"], "--publication", id="serve publication w/o cdc"),
    pytest.param(["serve", "--heartbeat-interval=5"], "--heartbeat-interval", id="heartbeat"),
    pytest.param(["serve", "--wal-message-prefix=p"], "--wal-message-prefix", id="wal prefix"),
    pytest.param(["serve", "--retention=1d"], "--retention", id="retention with on-sent delete"),
    pytest.param(
        ["serve", "--retry-backoff=10", "--retry-backoff-max=5"],
        "--retry-backoff",
        id="retry-backoff above its max",
    ),
    pytest.param(["serve", NATS, "--exchange=x"], "--exchange", id="exchange for nats"),
    pytest.param(["serve", "--ce-source=/shop"], "--ce-source", id="ce-source with native"),
    pytest.param(
        ["serve", "--broker-url=mqtt://mq?version=3.1.1", "--message-format=cloudevents-binary"],
        "--message-format",
        id="cloudevents binary over mqtt 3.1.1",
    ),
    pytest.param(
        [
            "serve",
            "--broker-url=http://hooks:8080/in",
            "--webhook-batch",
            "--message-format=cloudevents-binary",
        ],
        "--message-format",
        id="cloudevents binary webhook batches",
    ),
    pytest.param(["serve", AMQP, "--nats-stream=S"], "--nats-stream", id="nats-stream for amqp"),
    pytest.param(["serve", AMQP, "--redis-maxlen=5"], "--redis-maxlen", id="redis-maxlen amqp"),
    pytest.param(["serve", NATS, "--mqtt-qos=2"], "--mqtt-qos", id="mqtt-qos for nats"),
    pytest.param(["serve", AMQP, "--webhook-secret=s"], "--webhook-secret", id="webhook-secret"),
    pytest.param(["serve", AMQP, "--topic-prefix=p"], "--topic-prefix", id="topic-prefix amqp"),
    pytest.param(
        ["serve", "--metrics-host=0.0.0.0"],
        "--metrics-host",
        id="metrics-host without metrics-port",
    ),
    pytest.param(
        ["serve", "--health-host=0.0.0.0"],
        "--health-host",
        id="health-host without health-port",
    ),
    pytest.param(
        ["consume", f"--handler={HANDLER}", "--queue=q", "--health-host=0.0.0.0"],
        "--health-port",
        id="consume health-host without health-port",
    ),
    pytest.param(
        ["topology", "apply", "--queue=q", "--partition-queues=4"],
        "--partition-queues",
        id="topology partition-queues without ordered",
    ),
    pytest.param(
        ["consume", f"--handler={HANDLER}", "--queue=q", "--partition-queues=4"],
        "--partition-queues",
        id="consume partition-queues without ordered",
    ),
    pytest.param(
        ["consume", f"--handler={HANDLER}", "--queue=q", "--rebalance-interval=5"],
        "--rebalance-interval",
        id="consume rebalance-interval without ordered",
    ),
    pytest.param(["migrate", "--cdc-shards=2"], "--cdc-shards", id="migrate shards without cdc"),
    pytest.param(
        ["dead", "retry", str(uuid.uuid4()), "--all"], "--all", id="dead retry ids and all"
    ),
    pytest.param(
        ["consumer-status", "--queue=q", "--consumer-name=c"],
        "--consumer-name",
        id="consumer-status consumer-name without database-url",
    ),
]


@pytest.mark.parametrize(("args", "names"), COMBINATIONS)
def test_a_combination_that_cannot_take_effect_is_named(
    args: list[str],
    names: str,
    trap: Trap,
    run_in_process: Callable[..., Outcome],
) -> None:
    before = trap.connections

    # Validation takes milliseconds: a command still running after 3 s went on to connect.
    outcome = run_in_process(args, trap_env(trap, args), within=3.0)

    assert_one_line_naming(outcome, names)
    assert trap.connections == before


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["serve", "--bogus=1"], "--bogus"),
        (["status", "--batch-size=5"], "--batch-size"),  # serve's, not status's
        (["dlq", "list", "--queue=q", "--exchange=x"], "--exchange"),
        (["migrate", "--mode=cdc"], "--mode"),
    ],
)
def test_an_option_that_does_not_exist_is_a_usage_error(
    args: list[str],
    names: str,
    trap: Trap,
    run_in_process: Callable[..., Outcome],
) -> None:
    outcome = run_in_process(args, trap_env(trap, args))

    assert_one_line_naming(outcome, names, code=EXIT_USAGE)


# -- a sample through the installed CLI ---------------------------------------------------------------

SAMPLE = [
    (["serve"], {"batch_size": "nan"}, "--batch-size"),
    (["serve", "--metrics-port=70000"], {}, "--metrics-port"),
    (["serve", "--broker-url=nats://nats:4222", "--nats-stream=a.b"], {}, "--nats-stream"),
    (["migrate", "--schema=pg_temp"], {}, "--schema"),
    (["status", "--fail-on-lag=inf"], {}, "--fail-on-lag"),
    (["emit", "--", "Order Created"], {}, "EVENT_TYPE"),
    (["dead", "retry", "not-a-uuid"], {}, "EVENT_IDS"),
    (["slot", "drop", "--slot-name=Bad-Name"], {}, "--slot-name"),
    ([], {"prefetch": "0"}, "--prefetch"),  # consume
    (["topology", "apply", "--queue=amq.x"], {}, "--queue"),
    (["dlq", "list", "--queue=q", "--limit=0"], {}, "--limit"),
    (["consumer-status", "--queue=q", "--window=nan"], {}, "--window"),
]


def test_the_installed_cli_refuses_a_bad_value_at_once(trap: Trap) -> None:
    runs = []
    for args, variables, _names in SAMPLE:
        args = args or ["consume", f"--handler={HANDLER}", "--queue=q"]
        runs.append((args, {**cli_env(**variables), **trap_env(trap, args)}))
    before = trap.connections
    started = time.monotonic()

    done = run_all(runs)

    seconds = time.monotonic() - started
    for (args, _env), (_args, _variables, names), result in zip(runs, SAMPLE, done, strict=True):
        outcome = Outcome(result.returncode, result.stdout, result.stderr, seconds)
        try:
            assert_one_line_naming(outcome, names)
        except AssertionError as exc:
            raise AssertionError(f"outbox-relay {' '.join(args)}: {exc}") from None
    assert trap.connections == before
    assert seconds < 30  # a dozen process starts; nothing waited for


# -- the wrong kind of server at a URL ------------------------------------------------------------------

POSTGRES_AT_RABBITMQ = "postgresql://postgres@127.0.0.1:5672/postgres"


def test_a_database_url_pointing_at_rabbitmq_is_named_at_once() -> None:
    env = cli_env(database_url=POSTGRES_AT_RABBITMQ)
    commands = [["status"], ["migrate"], ["serve"]]
    started = time.monotonic()

    done = run_all([(command, env) for command in commands])

    assert time.monotonic() - started < CONNECT_TIMEOUT
    for command, result in zip(commands, done, strict=True):
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode == EXIT_CONFIG, (command, result.stderr)
        assert len(errors) == 1, result.stderr
        assert "--database-url" in errors[0]
        assert "did not answer like a PostgreSQL server" in errors[0]
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "broker_url", "says"),
    [
        (["serve"], "amqp://guest:guest@127.0.0.1:5432/%2F", "did not answer like an AMQP"),
        (
            ["topology", "apply", "--queue=q.wrong-server"],
            "amqp://guest:guest@127.0.0.1:5432/%2F",
            "did not answer like an AMQP",
        ),
        (["serve"], "redis://127.0.0.1:4222/0", "did not answer like a Redis server"),
        (["serve"], "http://127.0.0.1:5672/hook", "did not answer like an HTTP server"),
        # RabbitMQ answers an MQTT CONNECT with its AMQP header, NATS with its INFO line;
        # PostgreSQL hangs up on it.
        (["serve"], "mqtt://127.0.0.1:5672", "did not answer like an MQTT"),
        (["serve"], "mqtt://127.0.0.1:4222", "did not answer like an MQTT"),
        (["serve"], "mqtt://127.0.0.1:5432?version=3.1.1", "did not answer like an MQTT"),
        # RabbitMQ resets the connection after Redis's first command, Mosquitto and PostgreSQL
        # hang up on it: before any reply.
        (["serve"], "redis://127.0.0.1:5672/0", "did not answer like a Redis server"),
        (["serve"], "redis://127.0.0.1:1883/0", "did not answer like a Redis server"),
        (["serve"], "redis://127.0.0.1:5432/0", "did not answer like a Redis server"),
    ],
    ids=[
        "serve-amqp-at-postgresql",
        "topology-amqp-at-postgresql",
        "serve-redis-at-nats",
        "serve-http-at-rabbitmq",
        "serve-mqtt-at-rabbitmq",
        "serve-mqtt-at-nats",
        "serve-mqtt-at-postgresql",
        "serve-redis-at-rabbitmq",
        "serve-redis-at-mosquitto",
        "serve-redis-at-postgresql",
    ],
)
def test_a_broker_url_pointing_at_another_service_exits_3_naming_it(
    command: list[str], broker_url: str, says: str, database_url: str, tmp_path: Path
) -> None:
    env = cli_env(database_url=database_url, broker_url=broker_url)

    code, stderr = run_until_exit_or_retry(command, env, tmp_path / "stderr.log")

    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == EXIT_CONFIG, stderr
    assert len(errors) == 1, stderr
    assert "--broker-url" in errors[0], errors[0]
    assert says in errors[0], errors[0]
    assert "Traceback" not in stderr


def run_until_exit_or_retry(
    args: list[str], env: dict[str, str], log: Path, timeout: float = CONNECT_TIMEOUT
) -> tuple[int | None, str]:
    """Run the CLI until it exits, says it retries (then it is stopped: None), or ``timeout``
    passes (a failure: no clear answer within the connect timeout)."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*relay_command(), *args], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None:
            if "retrying" in log.read_text(errors="replace"):
                return None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, f"no answer within {timeout}s: {log.read_text()}"
            time.sleep(0.05)
        return process.returncode, log.read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_against_a_silent_peer_logs_a_clear_line_per_retry(
    database_url: str, relay_factory: Callable[..., RelayProcess]
) -> None:
    # RabbitMQ says nothing to a NATS client (it waits for an AMQP header): no error to give
    # but a timeout, so serve keeps retrying (the broker may be starting) and says why each time,
    # within the connect timeout (here min(--confirm-timeout, 10 s)).
    env = cli_env(database_url=database_url, broker_url="nats://127.0.0.1:5672")
    relay = relay_factory(env, "--confirm-timeout=1", "--log-level=warning").start()

    relay.wait_for_log("no NATS greeting from nats://127.0.0.1:5672 within 1s", count=2)

    assert relay.terminate(deadline=10) == 0
    assert "Traceback" not in relay.log()
    assert all("is it a NATS server?" in line for line in relay.log_lines() if "retrying" in line)


# -- the same bad credentials, the same exit code --------------------------------------------------------

WRONG_PASSWORD = "amqp://guest:not-the-password@127.0.0.1:5672/%2F"
NO_SUCH_VHOST = "amqp://guest:guest@127.0.0.1:5672/no-such-vhost"
RABBITMQ_COMMANDS = [
    ["serve"],
    ["consume", f"--handler={HANDLER}", "--queue=q.credentials"],
    ["topology", "apply", "--queue=q.credentials"],
    ["dlq", "list", "--queue=q.credentials"],
    ["consumer-status", "--queue=q.credentials"],
]


@pytest.mark.parametrize("broker_url", [WRONG_PASSWORD, NO_SUCH_VHOST], ids=["password", "vhost"])
def test_rabbitmq_refusing_the_credentials_is_exit_3_from_every_command(
    broker_url: str, database_url: str
) -> None:
    env = cli_env(database_url=database_url, broker_url=broker_url)

    done = run_all([(command, env) for command in RABBITMQ_COMMANDS])

    codes = {c[0]: r.returncode for c, r in zip(RABBITMQ_COMMANDS, done, strict=True)}
    assert set(codes.values()) == {EXIT_CONFIG}, codes
    for result in done:
        assert "Traceback" not in result.stderr
        assert "not-the-password" not in result.stdout + result.stderr


def test_postgresql_refusing_the_role_is_exit_3_from_every_command(database_url: str) -> None:
    role = f"nobody_{uuid.uuid4().hex[:8]}"
    url = database_url.replace("://postgres@", f"://{role}:secret@", 1)
    assert role in url
    env = cli_env(database_url=url)
    commands = [
        ["serve"],
        ["status"],
        ["migrate"],
        ["emit", "order.created"],
        ["dead", "list"],
        ["slot", "status"],
        ["consume", f"--handler={HANDLER}", "--queue=q.credentials"],
    ]

    done = run_all([(command, env) for command in commands])

    codes = {c[0]: r.returncode for c, r in zip(commands, done, strict=True)}
    assert set(codes.values()) == {EXIT_CONFIG}, codes
    for result in done:
        assert "Traceback" not in result.stderr
        assert f'role "{role}" does not exist' in result.stderr
