"""deploy/k8s renders with `kubectl kustomize` into objects the Kubernetes API would accept, and
those objects run the services the way they are built to run (issue 17, point 4).

Every rendered object is loaded into the typed models of the `kubernetes` client, and a field
the model does not know fails the test (a misspelt field is silently dropped by the API server
and the setting it meant never applies). The services' own settings classes check the
environment: a variable no service reads is a typo, and each container listens on the port its
manifest opens.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from kubernetes import client  # type: ignore[import-untyped]

from control.api.auth import PUBLIC_PATHS
from control.api.settings import ControlSettings
from control.autoscaler.actuators import deployment_name
from services.batcher.settings import BatcherSettings
from services.gateway.settings import GatewaySettings
from services.mesh.infra import telemetry
from services.mesh.infra.settings import ServiceSettings, load_settings
from services.registry.settings import RegistrySettings
from services.router.settings import RouterSettings
from services.worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBECTL = os.environ.get("INFERMESH_KUBECTL") or shutil.which("kubectl")
OVERLAYS = ("cpu", "gpu")

SERVICES: dict[str, tuple[str, type[ServiceSettings]]] = {
    "services.gateway": ("gateway", GatewaySettings),
    "services.router": ("router", RouterSettings),
    "services.batcher": ("batcher", BatcherSettings),
    "services.registry": ("registry", RegistrySettings),
    "services.worker": ("worker", WorkerSettings),
    "control.api": ("control", ControlSettings),
}
"""What each container's arguments (`python -m <module>`) run, and the settings it reads."""

OPEN_HEALTH_PATHS = {
    "gateway": {"/v2/health/live", "/v2/health/ready"},
    "registry": {"/v2/health/live"},  # its credential middleware's open paths
    "control": set(PUBLIC_PATHS),
    **{service: {"/healthz"} for service in ("router", "batcher", "worker")},  # link apps
}
"""Health routes each app serves without credentials (a probe presents none)."""

DOCKERFILE_INSTRUCTIONS = {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "EXPOSE",
                           "ENTRYPOINT", "CMD"}

SCALE_RULES = {("apps", "deployments/scale", ("get", "patch")), ("apps", "deployments", ("get",))}


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    if KUBECTL is None:
        pytest.skip("kubectl not found (Debian: apt-get install kubernetes-client)")
    done = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def of_kind(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in rendered(overlay) if doc["kind"] == kind]


def unknown_fields(data: Any, kind: str, where: str) -> list[str]:
    """Paths in `data` that the model named by the OpenAPI type `kind` has no field for."""
    if kind.startswith("list[") and isinstance(data, list):
        return [p for i, item in enumerate(data) for p in unknown_fields(item, kind[5:-1],
                                                                          f"{where}[{i}]")]
    if kind.startswith("dict(") and isinstance(data, dict):
        value_kind = kind[5:-1].split(", ", 1)[1]
        return [p for key, item in data.items()
                for p in unknown_fields(item, value_kind, f"{where}.{key}")]
    model = getattr(client, kind, None)
    if model is None or not isinstance(data, dict):
        return []  # a primitive, or `object` (int-or-string, quantities)
    fields = {json_name: model.openapi_types[attr] for attr, json_name in
              model.attribute_map.items()}
    unknown: list[str] = []
    for key, item in data.items():
        path = f"{where}.{key}"
        unknown += unknown_fields(item, fields[key], path) if key in fields else [path]
    return unknown


def typed(doc: dict[str, Any]) -> Any:
    """`doc` as its `kubernetes` client model, failing on a field the model lacks."""
    version = doc["apiVersion"].rsplit("/", 1)[-1]
    kind = f"{version.capitalize()}{doc['kind']}"
    assert hasattr(client, kind), f"no model {kind} for {doc['apiVersion']} {doc['kind']}"
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    assert unknown_fields(doc, kind, name) == []
    return client.ApiClient()._ApiClient__deserialize(doc, kind)


def service_of(deployment: Any) -> tuple[str, type[ServiceSettings]]:
    return SERVICES[deployment.spec.template.spec.containers[0].args[0]]


def environment(overlay: str, container: Any) -> dict[str, str]:
    """A container's literal environment: its config maps, then its own values."""
    maps = {doc["metadata"]["name"]: doc["data"] for doc in of_kind(overlay, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.env_from or ():
        env.update(maps[source.config_map_ref.name])
    env.update({var.name: var.value for var in container.env if var.value is not None})
    return env


def secret_keys() -> set[tuple[str, str]]:
    docs = yaml.safe_load_all((K8S / "base" / "secrets.example.yaml").read_text())
    return {(doc["metadata"]["name"], key) for doc in docs for key in doc["stringData"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_loads_into_its_typed_model(overlay: str) -> None:
    kinds = {doc["kind"] for doc in rendered(overlay)}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Role"} <= kinds
    for doc in rendered(overlay):
        typed(doc)
    for doc in yaml.safe_load_all((K8S / "base" / "secrets.example.yaml").read_text()):
        typed(doc)


def test_an_unknown_field_is_caught() -> None:
    deployment = of_kind("cpu", "Deployment")[0]
    misspelt = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(AssertionError):
        typed(misspelt)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_runs_probed_bounded_unprivileged_and_drains(overlay: str) -> None:
    deployments = [typed(doc) for doc in of_kind(overlay, "Deployment")]
    assert {service_of(d)[0] for d in deployments} == {name for name, _ in SERVICES.values()}
    for deployment in deployments:
        pod, (service, _) = deployment.spec.template.spec, service_of(deployment)
        assert pod.security_context.run_as_non_root and pod.security_context.run_as_user > 0
        for container in pod.containers + (pod.init_containers or []):
            context = container.security_context
            assert context.allow_privilege_escalation is False, container.name
            assert context.read_only_root_filesystem and context.capabilities.drop == ["ALL"]
            assert {"cpu", "memory"} <= set(container.resources.requests)
            assert "memory" in container.resources.limits
        main = pod.containers[0]
        for probe in (main.startup_probe, main.liveness_probe, main.readiness_probe):
            assert probe.http_get.path in OPEN_HEALTH_PATHS[service], deployment.metadata.name
        if "/v2/health/live" in OPEN_HEALTH_PATHS[service]:
            assert main.liveness_probe.http_get.path == "/v2/health/live"
        sleep = main.lifecycle.pre_stop._exec.command
        assert sleep[0] == "sleep" and int(sleep[1]) + 10 < pod.termination_grace_period_seconds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_container_reads_its_settings_and_listens_where_its_manifest_says(
        overlay: str) -> None:
    known = {"INFERMESH_LOG_LEVEL", "NVIDIA_DRIVER_CAPABILITIES", *telemetry.SETTINGS}
    for service, settings_class in SERVICES.values():
        for field in dataclasses.fields(settings_class):
            name = field.name.upper()
            known |= {f"INFERMESH_{service.upper()}_{name}", f"INFERMESH_{name}"}
    for deployment in (typed(doc) for doc in of_kind(overlay, "Deployment")):
        container, (service, settings_class) = deployment.spec.template.spec.containers[0], \
            service_of(deployment)
        env = environment(overlay, container)
        assert set(env) | {var.name for var in container.env} <= known
        settings = load_settings(settings_class, service, env)
        port = getattr(settings, "http_port", settings.port)
        assert {p.name: p.container_port for p in container.ports}["http"] == port
        for var in container.env:
            ref = var.value_from and var.value_from.secret_key_ref
            assert not ref or (ref.name, ref.key) in secret_keys()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_disruption_budgets_select_one_deployment_each(overlay: str) -> None:
    pods = {d.metadata.name: d.spec.template for d in map(typed, of_kind(overlay, "Deployment"))}

    def selected(selector: dict[str, str]) -> set[str]:
        return {name for name, pod in pods.items()
                if selector.items() <= pod.metadata.labels.items()}

    budgets = [typed(doc) for doc in of_kind(overlay, "PodDisruptionBudget")]
    assert sorted(n for b in budgets for n in selected(b.spec.selector.match_labels)) == \
        sorted(pods)
    for service in map(typed, of_kind(overlay, "Service")):
        (name,) = selected(service.spec.selector)
        ports = {p.name for p in pods[name].spec.containers[0].ports}
        assert {p.target_port for p in service.spec.ports} <= ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_control_api_may_scale_worker_deployments(overlay: str) -> None:
    kinds = {doc["kind"] for doc in rendered(overlay)}
    assert not {"ClusterRole", "ClusterRoleBinding"} & kinds
    (role,) = map(typed, of_kind(overlay, "Role"))
    assert {(group, resource, tuple(rule.verbs)) for rule in role.rules
            for group in rule.api_groups for resource in rule.resources} == SCALE_RULES
    (binding,) = map(typed, of_kind(overlay, "RoleBinding"))
    assert binding.role_ref.name == role.metadata.name
    accounts = {s.name for s in binding.subjects}
    for deployment in map(typed, of_kind(overlay, "Deployment")):
        pod = deployment.spec.template.spec
        may_scale = service_of(deployment)[0] == "control"
        assert (pod.service_account_name in accounts) is may_scale
        assert bool(pod.automount_service_account_token) is may_scale


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_worker_deployment_is_named_and_configured_for_its_model_version(overlay: str) -> None:
    deployments = list(map(typed, of_kind(overlay, "Deployment")))
    (control,) = [d for d in deployments if service_of(d)[0] == "control"]
    control_env = environment(overlay, control.spec.template.spec.containers[0])
    scaler = load_settings(ControlSettings, "control", control_env)
    assert scaler.autoscaler_actuator == "kubernetes"
    workers = [d for d in deployments if service_of(d)[0] == "worker"]
    assert workers
    for worker in workers:
        labels = worker.metadata.labels
        model, version = labels["infermesh.io/model"], labels["infermesh.io/version"]
        # The name the control API's Kubernetes actuator patches for this version.
        assert worker.metadata.name == deployment_name(model, version, scaler.kube_deployment)
        assert worker.spec.selector.match_labels["infermesh.io/version"] == version
        container = worker.spec.template.spec.containers[0]
        assert environment(overlay, container)["INFERMESH_WORKER_MODELS"] == f"{model}/{version}"
        gpus = (container.resources.limits or {}).get("nvidia.com/gpu")
        assert (gpus is not None) is (overlay == "gpu")
        if overlay == "gpu":
            assert worker.spec.template.spec.tolerations and worker.spec.template.spec.node_selector
            assert container.image != worker.spec.template.spec.init_containers[0].image


def test_the_dockerfile_builds_one_non_root_image_with_the_pinned_cpu_torch() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.replace("\\\n", " ").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    instructions = [line.split()[0] for line in lines]
    assert set(instructions) <= DOCKERFILE_INSTRUCTIONS, instructions
    assert instructions.count("FROM") >= 2 and "ADD" not in instructions
    final = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM")):]
    (user,) = [line.split()[1] for line in final if line.startswith("USER")]
    assert user.split(":")[0] not in ("root", "0")
    assert any(line.startswith("ENTRYPOINT") for line in final)
    pins = re.findall(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert f"torch=={pins[0]}" in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile
    # The context is what the image installs, each COPY source re-included, and no secrets.
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    copied = {line.split()[1] for line in lines if line.startswith("COPY") and "--from" not in line}
    assert "*" in ignored and copied == {entry[1:] for entry in ignored if entry[:1] == "!"}
    assert {"**/.infermesh", "**/secrets", "**/*.pem", "**/*.key"} <= set(ignored)
