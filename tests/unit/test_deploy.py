"""deploy/kubernetes/ is valid, and agrees with the worker: setting names, metric names,
the shutdown timeouts, the consumer group and the partition count."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest

import worker.metrics  # noqa: F401  (registers the worker's series)
from tests.support import exported_series, queried_series
from worker.config import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def load_validator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_validate", DEPLOY / "validate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validator = load_validator()


def resource(kind: str, name: str) -> dict[str, Any]:
    for _, found in validator.resources():
        if found["kind"] == kind and found["metadata"]["name"] == name:
            return found  # type: ignore[no-any-return]
    raise AssertionError(f"no {kind}/{name} in deploy/kubernetes")


def config() -> dict[str, str]:
    data: dict[str, str] = resource("ConfigMap", "release-worker-config")["data"]
    return data


def container(deployment: str) -> dict[str, Any]:
    spec = resource("Deployment", deployment)["spec"]["template"]["spec"]
    (main,) = spec["containers"]
    return main  # type: ignore[no-any-return]


def test_every_manifest_is_valid() -> None:
    assert validator.problems() == []
    kinds = {r["kind"] for _, r in validator.resources()}
    assert {"ServiceMonitor", "PrometheusRule", "ScaledObject", "Job", "Secret"} <= kinds


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        ("worker.yaml", "terminationGracePeriodSeconds", "terminationGracePeriod"),
        ("keda.yaml", "cooldownPeriod", "cooldownPerod"),
        ("monitoring.yaml", "alert: ReleaseWorkerStalled", "alerts: ReleaseWorkerStalled"),
        ("monitoring.yaml", "kind: ServiceMonitor", "kind: PodMonitor"),
    ],
)
def test_a_misspelt_field_or_an_unknown_kind_fails_validation(
    tmp_path: Path, file: str, old: str, new: str
) -> None:
    copy = tmp_path / "kubernetes"
    shutil.copytree(validator.MANIFESTS, copy)
    text = (copy / file).read_text()
    assert old in text
    (copy / file).write_text(text.replace(old, new, 1))
    assert validator.problems(copy) != []


def test_settings_in_the_manifests_are_the_workers() -> None:
    known = {f"WORKER_{name.upper()}" for name in Settings.model_fields}
    named = set(config())
    for _, found in validator.resources():
        if found["kind"] == "Secret":
            named |= set(found["stringData"])
    for deployment in ("release-worker", "release-worker-api"):
        named |= {e["name"] for e in container(deployment).get("env", [])}
    assert named - known == set()
    # Every value parses as the worker would parse it.
    Settings.model_validate({k.removeprefix("WORKER_").lower(): v for k, v in config().items()})


def test_every_alert_queries_a_series_the_worker_exports() -> None:
    exported = exported_series(generate_latest(REGISTRY).decode())
    rules = resource("PrometheusRule", "release-worker")["spec"]["groups"][0]["rules"]
    queried = set().union(*(queried_series(rule["expr"]) for rule in rules))
    assert queried, "no release_worker_* series in the alerts"
    assert queried - exported == set()
    alerts = {rule["alert"] for rule in rules}
    for wanted in ("LagGrowing", "DeadLetters", "OutboxBacklog", "NotReady", "Stalled"):
        assert f"ReleaseWorker{wanted}" in alerts


def test_grace_periods_outlast_the_shutdown_timeouts() -> None:
    values = config()
    worker_spec = resource("Deployment", "release-worker")["spec"]["template"]["spec"]
    api_spec = resource("Deployment", "release-worker-api")["spec"]["template"]["spec"]
    assert worker_spec["terminationGracePeriodSeconds"] > float(values["WORKER_SHUTDOWN_TIMEOUT_S"])
    assert api_spec["terminationGracePeriodSeconds"] > float(values["WORKER_API_TIMEOUT_S"])


def test_probes_reach_the_ports_the_processes_listen_on() -> None:
    values = config()
    for deployment, port in (
        ("release-worker", values["WORKER_METRICS_PORT"]),
        ("release-worker-api", values["WORKER_API_PORT"]),
    ):
        main = container(deployment)
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            assert main[probe]["httpGet"]["path"] == path
            assert ports[main[probe]["httpGet"]["port"]] == int(port)
    instance = {e["name"]: e for e in container("release-worker")["env"]}
    assert instance["WORKER_GROUP_INSTANCE_ID"]["valueFrom"]["fieldRef"] == {
        "fieldPath": "metadata.name"
    }


def test_the_scaler_follows_the_workers_group_within_the_partitions() -> None:
    values = config()
    scaled = resource("ScaledObject", "release-worker")
    spec = scaled["spec"]
    partitions = int(scaled["metadata"]["annotations"]["cart-release-worker/input-partitions"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == values["WORKER_GROUP_ID"]
    assert trigger["metadata"]["topic"] == values["WORKER_INPUT_TOPIC"]
    assert trigger["metadata"]["bootstrapServers"] == values["WORKER_KAFKA_BOOTSTRAP"]
    # A scale step waits out the rebalance drain and a removed member's session timeout.
    settle_s = float(values["WORKER_REBALANCE_DRAIN_TIMEOUT_S"]) + (
        int(values["WORKER_SESSION_TIMEOUT_MS"]) / 1000
    )
    assert spec["cooldownPeriod"] > settle_s
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    for direction in ("scaleUp", "scaleDown"):
        for policy in behavior[direction]["policies"]:
            assert policy["periodSeconds"] > settle_s
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > settle_s


def test_the_migrate_job_runs_migrate_with_the_owners_secret() -> None:
    job = resource("Job", "release-worker-migrate")["spec"]["template"]["spec"]
    (main,) = job["containers"]
    assert main["args"] == ["migrate"]
    assert {"secretRef": {"name": "release-worker-migrate"}} in main["envFrom"]


def test_the_dockerfile_installs_as_the_wheel_test_does_and_runs_as_a_user() -> None:
    stages = (DEPLOY.parent / "Dockerfile").read_text().split("\nFROM ")
    build, final = stages[-2], stages[-1]
    # The same two steps tests/integration/test_wheel.py runs.
    assert "deploy/wheel.sh build" in build
    # The build context test_wheel.build_context copies, and nothing else.
    copies = [line.split()[1:-1] for line in build.splitlines() if line.startswith("COPY ")]
    copied = {source for sources in copies for source in sources}
    assert copied == {"pyproject.toml", "README.md", "worker/", "migrations/", "deploy/wheel.sh"}
    assert "deploy/wheel.sh install /opt/release-worker" in build
    assert "COPY --from=build /opt/release-worker /opt/release-worker" in final
    assert "USER 10001:10001" in final
    assert 'ENTRYPOINT ["release-worker"]' in final
    assert 'CMD ["run"]' in final
    for compiler_step in ("apt-get", "gcc", "build-essential", "pip install"):
        assert compiler_step not in final
    # Kubernetes runs the image as that user.
    for _, found in validator.resources():
        if found["kind"] in ("Deployment", "Job"):
            assert found["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
