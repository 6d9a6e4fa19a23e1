"""deploy/kubernetes: the sidecar and standalone manifests are valid Kubernetes objects, and what
they configure is what the relay reads, probes, waits for and is allowed to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.deploy.manifests import (
    by_kind,
    config_file_of,
    credential_problems,
    env_contract_problems,
    grace_problems,
    load_file,
    load_mounted_config,
    named,
    pod_template,
    probe_problems,
    relay_containers,
    resource_problems,
    schema_errors,
    secret_strings,
    security_problems,
    serving,
)

DIRECTORY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
FILES = ["config-file.yaml", "sidecar.yaml", "standalone.yaml"]
# Manifests of one outbox, configured by OUTBOX_RELAY_* variables (not a config file).
SINGLE = ["sidecar.yaml", "standalone.yaml"]
# The role `outbox-relay migrate --grants` creates for the relay.
RELAY_ROLE = "outbox_relay"


def documents(name: str) -> list[dict[str, Any]]:
    path = DIRECTORY / name
    assert path.is_file(), f"{path} is missing"
    return load_file(path)


def test_every_manifest_in_the_directory_is_checked() -> None:
    assert DIRECTORY.is_dir(), f"{DIRECTORY} is missing"
    found = sorted(path.name for path in DIRECTORY.iterdir() if path.suffix in {".yaml", ".yml"})
    assert found == FILES, "add new manifests to FILES so the tests below check them"


@pytest.mark.parametrize("name", FILES)
def test_every_document_is_a_valid_kubernetes_object(name: str) -> None:
    docs = documents(name)
    assert docs, f"{name} has no documents"
    errors = [error for doc in docs if (error := schema_errors(doc))]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", FILES)
def test_relay_containers_get_only_variables_their_command_reads(name: str) -> None:
    docs = documents(name)
    assert serving(docs), f"{name}: no container runs `outbox-relay serve`"
    problems = env_contract_problems(docs)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", FILES)
def test_probes_target_the_port_the_relay_serves_them_on(name: str) -> None:
    problems = probe_problems(documents(name))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", FILES)
def test_grace_period_outlasts_the_relays_shutdown_timeout(name: str) -> None:
    problems = grace_problems(documents(name))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", FILES)
def test_every_container_has_resource_requests_and_limits(name: str) -> None:
    problems = resource_problems(documents(name))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", FILES)
def test_pods_run_with_a_restricted_security_context(name: str) -> None:
    problems = security_problems(documents(name))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", FILES)
def test_credentials_come_from_secrets(name: str) -> None:
    problems = credential_problems(documents(name))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", SINGLE)
def test_credentials_come_from_secrets_in_the_file(name: str) -> None:
    docs = documents(name)
    problems = credential_problems(docs)
    assert not problems, "\n".join(problems)
    for container in relay_containers(docs):
        for variable in ("OUTBOX_RELAY_DATABASE_URL", "OUTBOX_RELAY_BROKER_URL")[
            : 2 if container.args[0] == "serve" else 1
        ]:
            secret, key = container.secret_key_ref(variable)
            assert secret_strings(docs, secret, key), f"{container.where}: {variable} is empty"


@pytest.mark.parametrize("name", SINGLE)
def test_the_relay_connects_as_the_least_privilege_role(name: str) -> None:
    docs = documents(name)
    for container in serving(docs):
        url = secret_strings(docs, *container.secret_key_ref("OUTBOX_RELAY_DATABASE_URL"))
        assert urlsplit(url).username == RELAY_ROLE, f"{container.where}: connects as {url}"


def test_sidecar_runs_next_to_the_application() -> None:
    docs = documents("sidecar.yaml")
    (deployment,) = by_kind(docs, "Deployment")
    names = [c["name"] for c in pod_template(deployment)["spec"]["containers"]]
    relays = [c.spec["name"] for c in serving(docs)]
    assert relays == ["outbox-relay"]
    assert len(names) == 2, f"the application and the relay, got {names}"


def test_standalone_runs_a_leader_and_a_standby_spread_by_a_disruption_budget() -> None:
    docs = documents("standalone.yaml")
    (deployment,) = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] >= 2
    pod_labels = pod_template(deployment)["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (budget,) = by_kind(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"].get("maxUnavailable") == 1 or budget["spec"].get("minAvailable") == 1


def test_standalone_service_exposes_the_metrics_port_to_prometheus() -> None:
    docs = documents("standalone.yaml")
    (relay,) = serving(docs)
    metrics_port = relay.env(docs).get("OUTBOX_RELAY_METRICS_PORT")
    assert metrics_port is not None, "OUTBOX_RELAY_METRICS_PORT is not set"
    assert relay.port("metrics") == int(metrics_port)
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["selector"].items() <= relay.pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in ("metrics", int(metrics_port))
    assert port["port"] == int(metrics_port)


def test_standalone_migrate_job_runs_grants_as_the_owner_from_its_own_secret() -> None:
    docs = documents("standalone.yaml")
    (job,) = by_kind(docs, "Job")
    (migrate,) = (c for c in relay_containers(docs) if c.workload is job)
    assert migrate.args == ["migrate", "--grants"]
    assert pod_template(job)["spec"]["restartPolicy"] in ("Never", "OnFailure")
    (relay,) = serving(docs)
    owner_ref = migrate.secret_key_ref("OUTBOX_RELAY_DATABASE_URL")
    relay_ref = relay.secret_key_ref("OUTBOX_RELAY_DATABASE_URL")
    assert owner_ref != relay_ref, "the migration needs the owner's URL, not the relay's"
    owner = urlsplit(secret_strings(docs, *owner_ref)).username
    assert owner
    assert owner != RELAY_ROLE
    # Both work on the same schema: the Job reads the relay's OUTBOX_RELAY_SCHEMA.
    schema = named(docs, "ConfigMap")[relay.spec["envFrom"][0]["configMapRef"]["name"]]
    assert migrate.env(docs).get("OUTBOX_RELAY_SCHEMA") == schema["data"]["OUTBOX_RELAY_SCHEMA"]


def test_config_file_relays_every_outbox_of_a_mounted_file_as_the_least_privilege_role(
    tmp_path: Path,
) -> None:
    docs = documents("config-file.yaml")
    (relay,) = serving(docs)
    assert relay.env(docs)["OUTBOX_RELAY_CONFIG"] == "/etc/outbox-relay/relay.toml"
    mounted = config_file_of(relay, docs)
    assert mounted is not None
    assert mounted.text is not None

    # `outbox-relay serve` in that pod: the file, its ${NAME}s from the Secret
    config = load_mounted_config(mounted, docs, {}, tmp_path)

    assert [o.name for o in config.outboxes] == ["orders", "billing", "tenants"]
    assert [o.schemas for o in config.outboxes] == [None, None, "tenant_*"]
    for outbox in config.outboxes:
        assert urlsplit(outbox.settings.database_url).username == RELAY_ROLE


def test_config_file_migrate_job_migrates_every_outbox_of_the_file_as_the_owner(
    tmp_path: Path,
) -> None:
    docs = documents("config-file.yaml")
    (job,) = by_kind(docs, "Job")
    (migrate,) = (c for c in relay_containers(docs) if c.workload is job)
    assert migrate.args == ["migrate", "--config", "/etc/outbox-relay/relay.toml", "--grants"]
    mounted = config_file_of(migrate, docs)
    (relay,) = serving(docs)
    relay_file = config_file_of(relay, docs)
    assert mounted is not None
    assert relay_file is not None
    assert mounted.config_map == relay_file.config_map, "both must work on the same outboxes"

    config = load_mounted_config(mounted, docs, {}, tmp_path)

    owners = {urlsplit(o.settings.database_url).username for o in config.outboxes}
    assert owners
    assert RELAY_ROLE not in owners
