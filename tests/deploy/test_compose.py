"""compose.yaml: a valid Compose file that comes up in order, with only variables its commands read.

Nothing here needs Docker: the file is checked against the Compose specification's JSON schema
(check-jsonschema's vendored copy) and against what the relay's CLI, deploy/Dockerfile and the
example scripts actually accept.
"""

from __future__ import annotations

import ast
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import typer.main
import yaml

import examples.order_service
from outbox_relay.cli import app, config_file
from outbox_relay.cli.config_file import RelayConfig
from tests.deploy.dockerfile import Dockerfile, parse_dockerfile
from tests.deploy.env_contract import OTEL_VARIABLES, unknown_variables

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text("utf-8"))
    assert isinstance(loaded, dict), "compose.yaml is not a mapping"
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose.get("services")
    assert isinstance(found, dict), "compose.yaml has no services"
    assert found, "compose.yaml has no services"
    return found


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(key): str(value) for key, value in env.items()}


def built_from_dockerfile(service: dict[str, Any]) -> bool:
    build = service.get("build")
    if not isinstance(build, dict):
        return False
    context = ROOT / build.get("context", ".")
    return (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def relay_arguments(service: dict[str, Any], dockerfile: Dockerfile) -> list[str] | None:
    """The ``outbox-relay`` arguments this service runs, or None when it runs something else."""
    if not built_from_dockerfile(service) or "entrypoint" in service:
        return None
    stage = dockerfile.stage(service["build"]["target"])
    entrypoint = dockerfile.effective(stage, "ENTRYPOINT")
    assert entrypoint is not None
    assert entrypoint.exec_form() == ["outbox-relay"]
    command = service.get("command")
    if command is None:
        cmd = dockerfile.effective(stage, "CMD")
        assert cmd is not None
        command = cmd.exec_form()
    assert isinstance(command, list), "use the exec (list) form for command"
    return [str(word) for word in command]


def python_module(service: dict[str, Any]) -> str | None:
    """The module of an ``entrypoint: ["python", "-m", MODULE]`` service."""
    entrypoint = service.get("entrypoint")
    if isinstance(entrypoint, list) and entrypoint[:2] == ["python", "-m"]:
        assert len(entrypoint) == 3, f"unexpected entrypoint {entrypoint!r}"
        return str(entrypoint[2])
    return None


def variables_read_by(path: Path) -> set[str]:
    """Names a script reads with ``os.environ.get("X")``, ``environ.get("X")``,
    ``os.environ["X"]`` or ``os.getenv("X")`` (string literals only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        target: ast.expr | None = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if (node.func.attr == "get" and owner in {"os.environ", "environ"}) or (
                node.func.attr == "getenv" and owner == "os"
            ):
                target = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            target = node.slice
        if isinstance(target, ast.Constant) and isinstance(target.value, str):
            names.add(target.value)
    return names


CONFIG_VARIABLE = "OUTBOX_RELAY_CONFIG"


def mounted_config(service: dict[str, Any], args: list[str]) -> Path | None:
    """The host file behind the config file a relay service reads (OUTBOX_RELAY_CONFIG or
    ``--config``), mounted read-only; None when it reads none."""
    path = environment(service).get(CONFIG_VARIABLE)
    if "--config" in args:
        path = args[args.index("--config") + 1]
    if path is None:
        return None
    for volume in service.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        target, _, mode = rest.partition(":")
        if target == path:
            assert mode == "ro", f"{volume}: mount the config file read-only"
            host = (ROOT / source).resolve()
            assert host.is_file(), f"{volume}: {host} is missing"
            return host
    raise AssertionError(f"no volume mounts {path}")


def load_service_config(service: dict[str, Any], args: list[str]) -> RelayConfig:
    """The service's config file validated as ``outbox-relay <args>`` in it would: its
    ``${NAME}``s from the service's environment, its OUTBOX_RELAY_* variables as given options."""
    host = mounted_config(service, args)
    assert host is not None, f"outbox-relay {' '.join(args)} reads no config file"
    env = environment(service)
    given = {
        name.removeprefix("OUTBOX_RELAY_").lower(): value
        for name, value in env.items()
        if name.startswith("OUTBOX_RELAY_") and name != CONFIG_VARIABLE
    }
    return config_file.load(str(host), given, env, observability=args[:1] == ["serve"])


def healthcheck_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list), "healthchecks use the exec form"
    assert test[0] == "CMD", "healthchecks use the exec form"
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(test))
    assert len(urls) == 1, f"expected one URL in {test!r}"
    return str(urls[0])


# -- the file itself -----------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas").joinpath(
        "vendor/compose-spec.json"
    )
    schema = json.loads(schema_file.read_text("utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(
        validator_class(schema).iter_errors(compose), key=lambda e: list(e.absolute_path)
    )
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


def test_every_dependency_exists_and_waits_on_a_condition(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), (
            f"{name}: depends_on must be a mapping with a condition for each service"
        )
        for dependency, how in depends_on.items():
            assert dependency in services, f"{name} depends on unknown service {dependency!r}"
            assert dependency != name, f"{name} depends on itself"
            assert isinstance(how, dict), f"{name} -> {dependency}: no condition"
            assert how.get("condition"), f"{name} -> {dependency}: no condition"
            # A service without a profile must not wait for one that only a profile starts.
            if not service.get("profiles"):
                assert not services[dependency].get("profiles"), (
                    f"{name} waits for {dependency}, which runs only with a profile"
                )


def test_dependencies_form_no_cycle(services: dict[str, dict[str, Any]]) -> None:
    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle: {' -> '.join((*path, name))}"
        for dependency in services[name].get("depends_on", {}):
            visit(dependency, (*path, name))

    for name in services:
        visit(name, ())


def test_services_waited_on_as_healthy_have_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            if how.get("condition") != "service_healthy":
                continue
            check = services[dependency].get("healthcheck")
            problem = f"{name} waits for {dependency} to be healthy, but it has no healthcheck"
            assert check, problem
            assert check.get("test"), problem
            assert not check.get("disable"), problem
            assert check["test"][0] in {"CMD", "CMD-SHELL"}, f"{dependency}: bad healthcheck"


def test_one_shot_services_are_waited_on_until_they_complete(
    services: dict[str, dict[str, Any]],
) -> None:
    for one_shot in ("migrate", "consumer-setup"):
        assert one_shot in services
        waiting = [
            name
            for name, service in services.items()
            if service.get("depends_on", {}).get(one_shot, {}).get("condition")
            == "service_completed_successfully"
        ]
        assert waiting, f"nothing waits for {one_shot} to complete"
        assert "restart" not in services[one_shot], f"{one_shot} runs once: no restart policy"


def test_extra_brokers_run_only_with_the_brokers_profile(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in ("nats", "redis", "mosquitto"):
        assert services[name].get("profiles") == ["brokers"], name
    for name in ("postgres", "rabbitmq", "migrate", "relay", "orders", "consumer", "jaeger"):
        assert not services[name].get("profiles"), f"{name} must run with plain `compose up`"
    assert not services["otel-collector"].get("profiles")


# -- images --------------------------------------------------------------------------------------


def test_images_built_from_the_dockerfile_use_existing_targets(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    built = {name: s for name, s in services.items() if "build" in s}
    assert {"migrate", "relay", "consumer-setup", "consumer", "orders"} <= set(built)
    for name, service in built.items():
        assert built_from_dockerfile(service), f"{name}: builds from something else"
        target = service["build"].get("target")
        assert target in dockerfile.stage_names, (
            f"{name}: target {target!r} is not a stage of deploy/Dockerfile "
            f"({sorted(dockerfile.stage_names)})"
        )
    for name in ("migrate", "relay"):
        assert services[name]["build"]["target"] == "runtime", f"{name} runs the release image"
    for name in ("consumer-setup", "consumer", "orders"):
        assert services[name]["build"]["target"] == "demo", f"{name} needs examples/"


def test_services_on_the_image_run_the_relay_or_an_example_module(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    for name, service in services.items():
        if not built_from_dockerfile(service):
            continue
        module = python_module(service)
        if module is None:
            assert relay_arguments(service, dockerfile), name
            continue
        assert module.startswith("examples."), f"{name}: runs {module}"
        path = ROOT / Path(*module.split(".")).with_suffix(".py")
        assert path.is_file(), f"{name}: {path} does not exist"
        assert service["build"]["target"] == "demo", f"{name}: examples/ is in the demo image only"


# -- environment contract --------------------------------------------------------------------------


def test_relay_services_set_only_variables_their_command_reads(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    checked = set()
    for name, service in services.items():
        args = relay_arguments(service, dockerfile)
        if args is None:
            continue
        checked.add(name)
        unknown = unknown_variables(args, set(environment(service)))
        host = mounted_config(service, args)
        if host is not None:  # the variables the file references are read too
            unknown -= set(re.findall(r"\$\{(\w+)\}", host.read_text("utf-8")))
        assert not unknown, f"{name} (outbox-relay {' '.join(args)}) ignores {sorted(unknown)}"
    assert checked == {"migrate", "relay", "consumer"}


def test_relay_service_options_exist(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    """``--grants``, ``--declare``, ...: each option in a command line is one that command has."""
    for name, service in services.items():
        args = relay_arguments(service, dockerfile)
        if args is None:
            continue
        command: Any = typer.main.get_command(app)
        words = list(args)
        while words and words[0] in getattr(command, "commands", {}):
            command = command.commands[words.pop(0)]
        options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for word in words:
            if word.startswith("--"):
                assert word.partition("=")[0] in options, (
                    f"{name}: outbox-relay {' '.join(args)}: no option {word}"
                )


def test_order_service_sets_only_variables_the_script_reads(
    services: dict[str, dict[str, Any]],
) -> None:
    orders = services["orders"]
    assert python_module(orders) == "examples.order_service"
    # The script configures tracing only: metrics variables would be silently ignored.
    tracing_variables = {
        name for name in OTEL_VARIABLES if "METRIC" not in name and "PROMETHEUS" not in name
    }
    allowed = set(examples.order_service.ENVIRONMENT) | tracing_variables
    unknown = set(environment(orders)) - allowed
    assert not unknown, f"orders sets {sorted(unknown)}, which examples/order_service.py ignores"
    assert "OUTBOX_RELAY_DATABASE_URL" in environment(orders)


def test_consumer_setup_sets_only_variables_the_script_reads(
    services: dict[str, dict[str, Any]],
) -> None:
    setup = services["consumer-setup"]
    assert python_module(setup) == "examples.order_consumer"
    read = variables_read_by(ROOT / "examples" / "order_consumer.py")
    unknown = set(environment(setup)) - read
    assert not unknown, f"consumer-setup sets {sorted(unknown)}; the script reads {sorted(read)}"


def test_consumer_setup_prepares_the_database_the_consumer_uses(
    services: dict[str, dict[str, Any]],
) -> None:
    assert (
        environment(services["consumer-setup"])["OUTBOX_RELAY_DATABASE_URL"]
        == environment(services["consumer"])["OUTBOX_RELAY_DATABASE_URL"]
    )
    assert services["consumer"]["depends_on"]["consumer-setup"] == {
        "condition": "service_completed_successfully"
    }


# -- the relay -----------------------------------------------------------------------------------


def test_one_relay_serves_two_outboxes_that_migrate_prepares_from_the_same_file(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    relay_args = relay_arguments(services["relay"], dockerfile)
    migrate_args = relay_arguments(services["migrate"], dockerfile)
    assert relay_args == ["serve"]
    assert migrate_args is not None
    assert migrate_args[:1] == ["migrate"]
    assert "--config" in migrate_args
    assert mounted_config(services["relay"], relay_args) == mounted_config(
        services["migrate"], migrate_args
    )

    served = load_service_config(services["relay"], relay_args)
    migrated = load_service_config(services["migrate"], migrate_args)

    outboxes = [(o.name, o.settings.schema_name) for o in served.outboxes]
    assert outboxes == [("orders", "public"), ("billing", "billing")]
    assert [(o.name, o.settings.schema_name) for o in migrated.outboxes] == outboxes
    exchanges = {o.settings.publisher.exchange for o in served.outboxes}
    assert len(exchanges) == 2, "each outbox to its own exchange"


def test_relay_logs_in_as_the_least_privilege_role_that_migrate_creates(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    relay_args = relay_arguments(services["relay"], dockerfile)
    migrate_args = relay_arguments(services["migrate"], dockerfile)
    assert relay_args is not None
    assert migrate_args is not None
    served = load_service_config(services["relay"], relay_args).outboxes
    migrated = load_service_config(services["migrate"], migrate_args).outboxes
    assert "--grants" in migrate_args
    for relay_outbox, migrate_outbox in zip(served, migrated, strict=True):
        relay_url = urlsplit(relay_outbox.settings.database_url)
        migrate_url = urlsplit(migrate_outbox.settings.database_url)
        assert relay_url.username == "outbox_relay"
        assert migrate_url.username != "outbox_relay", "migrate runs as the owner"
        assert (relay_url.hostname, relay_url.port, relay_url.path) == (
            migrate_url.hostname,
            migrate_url.port,
            migrate_url.path,
        ), "the relay must use the database migrate prepared"
    assert services["relay"]["depends_on"]["migrate"] == {
        "condition": "service_completed_successfully"
    }
    assert services["relay"]["depends_on"]["rabbitmq"] == {"condition": "service_healthy"}


@pytest.mark.parametrize("name", ["relay", "consumer"])
def test_healthcheck_probes_the_health_port_the_service_serves(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    port = environment(service)["OUTBOX_RELAY_HEALTH_PORT"]
    url = urlsplit(healthcheck_url(service))
    assert url.hostname in {"127.0.0.1", "localhost"}
    assert str(url.port) == port, f"{name}: healthcheck hits {url.port}, health port is {port}"
    assert url.path == "/readyz"
    assert service["healthcheck"]["test"][1] == "python", "the image has python, not curl"


@pytest.mark.parametrize("name", ["relay", "consumer"])
def test_health_and_metrics_ports_are_published(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    env = environment(services[name])
    container_ports = {str(p).rsplit(":", 1)[-1] for p in services[name].get("ports", [])}
    for variable in ("OUTBOX_RELAY_HEALTH_PORT", "OUTBOX_RELAY_METRICS_PORT"):
        assert env[variable] in container_ports, f"{name}: {variable}={env[variable]} not published"


def test_relay_image_exposes_the_health_and_metrics_ports(
    services: dict[str, dict[str, Any]], dockerfile: Dockerfile
) -> None:
    env = environment(services["relay"])
    exposed = {
        word.split("/")[0]
        for expose in dockerfile.stage("runtime").all("EXPOSE")
        for word in expose.arguments.split()
    }
    assert {env["OUTBOX_RELAY_HEALTH_PORT"], env["OUTBOX_RELAY_METRICS_PORT"]} <= exposed


def test_otel_services_send_to_the_collector(services: dict[str, dict[str, Any]]) -> None:
    for name in ("relay", "consumer", "orders"):
        env = environment(services[name])
        endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.hostname == "otel-collector", name
        assert str(endpoint.port) in {
            str(p).rsplit(":", 1)[-1] for p in services["otel-collector"]["ports"]
        }
        assert env.get("OTEL_SERVICE_NAME"), f"{name}: name the service in its traces"
        assert services[name]["depends_on"]["otel-collector"]["condition"] == "service_started"
