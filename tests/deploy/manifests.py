"""Reading Kubernetes manifests for the deployment tests: documents, pods, containers, env.

Shared by the plain manifests (deploy/kubernetes) and the Helm chart's rendered output, so both
are held to the same checks.
"""

from __future__ import annotations

import base64
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import typer.main
import yaml

from outbox_relay.cli import app, config_file
from outbox_relay.cli.config_file import RelayConfig
from outbox_relay.settings import ENV_PREFIX

# The oldest Kubernetes the manifests promise to work on (the chart's kubeVersion allows 1.25+,
# but policy/v1, batch/v1 ttlSecondsAfterFinished and seccompProfile are all older than this).
KUBERNETES_VERSION = "1.30"
RELAY_IMAGE = "ghcr.io/outbox-relay/outbox-relay"
# The image's ENTRYPOINT is `outbox-relay`, its CMD `serve`.
IMAGE_DEFAULT_ARGS = ["serve"]
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def load_documents(text: str) -> list[dict[str, Any]]:
    """The non-empty documents of a multi-document YAML text."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def load_file(path: Path) -> list[dict[str, Any]]:
    return load_documents(path.read_text(encoding="utf-8"))


def kn(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def schema_errors(doc: dict[str, Any]) -> str | None:
    """Why ``doc`` is not a valid object of KUBERNETES_VERSION in strict mode, or None.

    Strict mode rejects unknown fields (a misspelt ``readinesProbe`` would otherwise be ignored by
    the API server); a kind without a schema is an error too, not a silent pass.
    """
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(item) for item in exc.path)
        return f"{kn(doc)}: {path}: {exc.message}"
    except kubernetes_validate.SchemaNotFoundError as exc:
        return f"{kn(doc)}: {exc.message}"
    return None


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in by_kind(docs, kind)}


@dataclass(frozen=True)
class Container:
    """One container of a workload, with the pod it runs in."""

    workload: dict[str, Any]
    pod: dict[str, Any]  # the pod template (metadata + spec)
    spec: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{kn(self.workload)} container {self.spec['name']}"

    @property
    def is_relay(self) -> bool:
        return str(self.spec.get("image", "")).startswith(RELAY_IMAGE + ":")

    @property
    def args(self) -> list[str]:
        """The command line after the image's entrypoint."""
        assert "command" not in self.spec, (
            f"{self.where}: overrides the image's entrypoint; use args so it stays outbox-relay"
        )
        return [str(arg) for arg in self.spec.get("args", IMAGE_DEFAULT_ARGS)]

    def env_names(self, docs: list[dict[str, Any]]) -> set[str]:
        """Every variable the container gets: env entries and the keys of envFrom ConfigMaps."""
        return set(self.env(docs))

    def env(self, docs: list[dict[str, Any]]) -> dict[str, str | None]:
        """Variables and their literal values (None when they come from a Secret or a field).

        ``env`` wins over ``envFrom``, as in Kubernetes. A ConfigMap named by envFrom or a
        configMapKeyRef must be in ``docs`` (otherwise its keys could not be checked).
        """
        config_maps = named(docs, "ConfigMap")
        values: dict[str, str | None] = {}
        for source in self.spec.get("envFrom", []):
            assert "configMapRef" in source, (
                f"{self.where}: envFrom {source} hides which variables it sets; use env entries"
            )
            name = source["configMapRef"]["name"]
            assert name in config_maps, f"{self.where}: envFrom ConfigMap {name!r} is not rendered"
            prefix = source.get("prefix", "")
            for key, value in config_maps[name].get("data", {}).items():
                values[prefix + key] = str(value)
        for entry in self.spec.get("env", []):
            value_from = entry.get("valueFrom")
            if value_from is None:
                values[entry["name"]] = str(entry.get("value", ""))
            elif "configMapKeyRef" in value_from:
                ref = value_from["configMapKeyRef"]
                data = config_maps.get(ref["name"], {}).get("data", {})
                assert ref["key"] in data or ref.get("optional"), (
                    f"{self.where}: {entry['name']} reads ConfigMap key {ref['name']}/{ref['key']}, "
                    "which does not exist"
                )
                values[entry["name"]] = data.get(ref["key"])
            else:
                values[entry["name"]] = None
        return values

    def secret_key_ref(self, variable: str) -> tuple[str, str]:
        """(Secret name, key) of a variable set with secretKeyRef."""
        for entry in self.spec.get("env", []):
            if entry["name"] == variable:
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                assert ref, f"{self.where}: {variable} must come from a Secret (secretKeyRef)"
                return ref["name"], ref["key"]
        raise AssertionError(f"{self.where}: {variable} is not set")

    def port(self, name: str) -> int:
        ports = {port.get("name"): port["containerPort"] for port in self.spec.get("ports", [])}
        assert name in ports, f"{self.where}: no port named {name!r}"
        return int(ports[name])


def pod_template(workload: dict[str, Any]) -> dict[str, Any]:
    template: dict[str, Any] = workload["spec"]["template"]
    return template


def containers(docs: list[dict[str, Any]]) -> Iterator[Container]:
    """Every container (init containers too) of every workload in ``docs``."""
    for workload in docs:
        if workload["kind"] not in POD_KINDS:
            continue
        pod = pod_template(workload)
        for spec in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            yield Container(workload, pod, spec)


def relay_containers(docs: list[dict[str, Any]]) -> list[Container]:
    return [container for container in containers(docs) if container.is_relay]


def serving(docs: list[dict[str, Any]]) -> list[Container]:
    """The relay containers that run ``outbox-relay serve``."""
    return [c for c in relay_containers(docs) if c.args[:1] == ["serve"]]


def secret_strings(docs: list[dict[str, Any]], name: str, key: str) -> str:
    """A value of a Secret in ``docs`` (stringData or base64 data)."""
    secrets = named(docs, "Secret")
    assert name in secrets, f"Secret {name!r} is not in the manifests"
    secret = secrets[name]
    if key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    assert key in secret.get("data", {}), f"Secret {name!r} has no key {key!r}"
    return base64.b64decode(secret["data"][key]).decode()


def invalid_values(args: list[str], env: dict[str, str | None]) -> dict[str, str]:
    """Variables of ``env`` whose literal value ``outbox-relay <args>`` would refuse, with why.

    Each value goes through the option's own parameter type, as when the relay reads it from
    the environment: ``OUTBOX_RELAY_BATCH_SIZE=1.5e+03`` or ``OUTBOX_RELAY_MODE=Notify`` fail.
    """
    command: Any = typer.main.get_command(app)
    for word in (arg for arg in args if not arg.startswith("-")):
        if word not in getattr(command, "commands", {}):
            break
        command = command.commands[word]
    context = command.make_context(command.name, [], resilient_parsing=True)
    params = {}
    for param in command.params:
        names = [param.envvar] if isinstance(param.envvar, str) else param.envvar or []
        for name in names:
            params[name] = param
    refused = {}
    for name, value in env.items():
        if value is None or name not in params:
            continue
        param = params[name]
        # A repeatable option's variable holds its values separated by spaces (click's split).
        given: Any = value.split() if getattr(param, "multiple", False) else value
        try:
            param.process_value(context, given)
        except Exception as exc:  # click.BadParameter and whatever a callback raises
            refused[name] = f"{value!r}: {exc}"
    return refused


# -- checks shared by the manifests and the chart: each returns the problems it found ----------

# Seconds between the end of the relay's shutdown timeout and SIGKILL, to close its connections.
GRACE_MARGIN = 5
CREDENTIALS = ("OUTBOX_RELAY_DATABASE_URL", "OUTBOX_RELAY_BROKER_URL")


def env_contract_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Variables a relay container gets but its command does not read, or would refuse. With a
    config file, the variables the file references (``${NAME}``) are read too."""
    from tests.deploy.env_contract import unknown_variables

    problems = []
    for container in relay_containers(docs):
        env = container.env(docs)
        unknown = unknown_variables(container.args, set(env))
        mounted = config_file_of(container, docs)
        if mounted is not None:
            # A ConfigMap the user manages: any variable may be one the file references.
            unknown = {
                name
                for name in unknown
                if name not in mounted.referenced
                and (mounted.text is not None or name.startswith(ENV_PREFIX))
            }
        if unknown:
            problems.append(
                f"{container.where}: `outbox-relay {' '.join(container.args)}` does not read "
                f"{sorted(unknown)}"
            )
        for name, why in invalid_values(container.args, env).items():
            problems.append(f"{container.where}: {name}={why}")
    return problems


def probe_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Each serving relay has /livez and /readyz probes on its port named health, which is the
    port OUTBOX_RELAY_HEALTH_PORT makes it listen on."""
    problems = []
    for container in serving(docs):
        env = container.env(docs)
        port = env.get("OUTBOX_RELAY_HEALTH_PORT")
        if port is None:
            problems.append(f"{container.where}: OUTBOX_RELAY_HEALTH_PORT is not set")
            continue
        if container.port("health") != int(port):
            problems.append(
                f"{container.where}: port health is {container.port('health')} but the relay "
                f"listens on OUTBOX_RELAY_HEALTH_PORT={port}"
            )
        for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
            get = container.spec.get(probe, {}).get("httpGet")
            if get != {"path": path, "port": "health"}:
                problems.append(
                    f"{container.where}: {probe} should be httpGet {path} on port health, "
                    f"is {container.spec.get(probe)}"
                )
    return problems


def grace_problems(docs: list[dict[str, Any]]) -> list[str]:
    """The kubelet waits longer than the relay's shutdown timeout (plus a margin) for it."""
    problems = []
    for container in serving(docs):
        timeout = container.env(docs).get("OUTBOX_RELAY_SHUTDOWN_TIMEOUT")
        if timeout is None:
            problems.append(f"{container.where}: set OUTBOX_RELAY_SHUTDOWN_TIMEOUT explicitly")
            continue
        # 30 s is the Kubernetes default when the field is missing.
        grace = container.pod["spec"].get("terminationGracePeriodSeconds", 30)
        if not grace >= float(timeout) + GRACE_MARGIN:
            problems.append(
                f"{container.where}: terminationGracePeriodSeconds {grace} does not outlast "
                f"OUTBOX_RELAY_SHUTDOWN_TIMEOUT={timeout} by {GRACE_MARGIN} s"
            )
    return problems


def resource_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for container in containers(docs):
        resources = container.spec.get("resources", {})
        for bound in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(bound, {}))
            if missing:
                problems.append(f"{container.where}: no {bound} for {sorted(missing)}")
    return problems


def security_problems(docs: list[dict[str, Any]]) -> list[str]:
    """The restricted Pod Security Standard, plus a read-only root filesystem for the relay."""
    problems = []
    for container in containers(docs):
        pod_context = container.pod["spec"].get("securityContext", {})
        context = container.spec.get("securityContext", {})

        def effective(key: str, pod_context: Any = pod_context, context: Any = context) -> Any:
            return context.get(key, pod_context.get(key))

        expected = {
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        for key, value in expected.items():
            if effective(key) != value:
                problems.append(f"{container.where}: {key} is {effective(key)!r}, not {value!r}")
        if effective("runAsUser") == 0:
            problems.append(f"{container.where}: runs as uid 0")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{container.where}: allowPrivilegeEscalation is not false")
        if "ALL" not in context.get("capabilities", {}).get("drop", []):
            problems.append(f"{container.where}: capabilities do not drop ALL")
        if context.get("capabilities", {}).get("add"):
            problems.append(f"{container.where}: adds capabilities")
        if context.get("privileged"):
            problems.append(f"{container.where}: privileged")
        if container.is_relay and context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{container.where}: root filesystem is writable")
        if (
            container.is_relay
            and container.pod["spec"].get("automountServiceAccountToken") is not False
        ):
            problems.append(f"{container.where}: mounts a service account token it never uses")
    return problems


def credential_problems(docs: list[dict[str, Any]]) -> list[str]:
    """URLs (they carry passwords) come from Secrets, never from a ConfigMap or a literal: with
    a config file, the file references them as ``${NAME}`` and NAME comes from a Secret."""
    problems = []
    for container in relay_containers(docs):
        env_entries = {entry["name"]: entry for entry in container.spec.get("env", [])}
        mounted = config_file_of(container, docs)
        if mounted is not None:
            problems += mounted.credential_problems(env_entries)
            continue
        wanted = CREDENTIALS if container.args[:1] == ["serve"] else CREDENTIALS[:1]
        for name in wanted:
            ref = env_entries.get(name, {}).get("valueFrom", {}).get("secretKeyRef")
            if not ref:
                problems.append(f"{container.where}: {name} does not come from a secretKeyRef")
    for config_map in by_kind(docs, "ConfigMap"):
        for key in config_map.get("data", {}):
            if key.endswith("_URL") or key.endswith("_SECRET"):
                problems.append(f"{kn(config_map)}: {key} belongs in a Secret")
    return problems


# -- a config file (docs/config-file.md) mounted into a relay container ---------------------------

CONFIG_VARIABLE = "OUTBOX_RELAY_CONFIG"
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Keys of a config file whose values carry passwords: only ever a whole ${NAME}.
SECRET_KEYS = ("database_url", "broker_url", "webhook_secret")


@dataclass(frozen=True)
class MountedConfig:
    """The config file a relay container reads: its path, and its text when the ConfigMap it is
    mounted from is in the manifests (None for a ConfigMap the user manages)."""

    container: Container
    path: str
    config_map: str
    text: str | None

    @property
    def referenced(self) -> set[str]:
        return set(_REFERENCE.findall(self.text or ""))

    def tables(self) -> Iterator[tuple[str, dict[str, Any]]]:
        document = tomllib.loads(self.text or "")
        yield "[defaults]", document.get("defaults", {})
        for number, table in enumerate(document.get("outbox", []), start=1):
            yield f"outbox[{number}]", table

    def credential_problems(self, env_entries: dict[str, dict[str, Any]]) -> list[str]:
        where = f"{self.container.where} ({self.path})"
        problems = [
            f"{where}: {name} is set, but it names one outbox and is refused with a config file"
            for name in ("OUTBOX_RELAY_DATABASE_URL", "OUTBOX_RELAY_SCHEMA")
            if name in env_entries
        ]
        if self.text is None:
            return problems
        for table, values in self.tables():
            for key in SECRET_KEYS:
                value = values.get(key)
                if value is not None and not _REFERENCE.fullmatch(str(value)):
                    problems.append(f"{where}: {table} {key} is a literal; use ${{NAME}}")
        for name in sorted(self.referenced):
            ref = env_entries.get(name, {}).get("valueFrom", {}).get("secretKeyRef")
            if not ref:
                problems.append(f"{where}: ${{{name}}} does not come from a secretKeyRef")
        return problems


def config_file_of(container: Container, docs: list[dict[str, Any]]) -> MountedConfig | None:
    """The config file ``container`` reads (OUTBOX_RELAY_CONFIG or ``--config``), found through
    its volume mounts; None when it reads none. A path no ConfigMap volume provides fails."""
    path = container.env(docs).get(CONFIG_VARIABLE)
    if "--config" in container.args:
        path = container.args[container.args.index("--config") + 1]
    if path is None:
        return None
    volumes = {volume["name"]: volume for volume in container.pod["spec"].get("volumes", [])}
    for mount in container.spec.get("volumeMounts", []):
        source = volumes.get(mount["name"], {}).get("configMap")
        if source is None:
            continue
        if mount.get("subPath"):
            if mount["mountPath"] != path:
                continue
            key = mount["subPath"]
        else:
            if str(PurePosixPath(path).parent) != mount["mountPath"].rstrip("/"):
                continue
            file_name = PurePosixPath(path).name
            items = {item["path"]: item["key"] for item in source.get("items", [])}
            key = items.get(file_name, file_name if not items else "")
        assert mount.get("readOnly"), f"{container.where}: mount {mount['name']} is writable"
        config_map = named(docs, "ConfigMap").get(source["name"])
        text = None if config_map is None else config_map.get("data", {}).get(key)
        assert config_map is None or text is not None, (
            f"{container.where}: ConfigMap {source['name']} has no key {key!r} for {path}"
        )
        return MountedConfig(container, path, source["name"], text)
    raise AssertionError(f"{container.where}: no ConfigMap volume provides {path}")


def load_mounted_config(
    mounted: MountedConfig, docs: list[dict[str, Any]], secrets: Mapping[str, str], directory: Path
) -> RelayConfig:
    """The file validated as ``outbox-relay <command> --config`` does in that container: its
    ``${NAME}``s from the container's Secrets (``secrets`` for those not in ``docs``), and the
    container's OUTBOX_RELAY_* variables as given options (refused if they name one outbox)."""
    assert mounted.text is not None, f"{mounted.container.where}: the file is not in the manifests"
    environ = {}
    for entry in mounted.container.spec.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            continue
        kept = named(docs, "Secret").get(ref["name"])
        environ[entry["name"]] = (
            secret_strings(docs, ref["name"], ref["key"])
            if kept is not None
            else secrets[entry["name"]]
        )
    given = {
        name.removeprefix(ENV_PREFIX).lower(): value if value is not None else "pod-0"
        for name, value in mounted.container.env(docs).items()
        if name.startswith(ENV_PREFIX) and name != CONFIG_VARIABLE
    }
    path = directory / PurePosixPath(mounted.path).name
    path.write_text(mounted.text, encoding="utf-8")
    serve = mounted.container.args[:1] == ["serve"]
    return config_file.load(str(path), given, environ, observability=serve)
