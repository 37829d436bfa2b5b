"""The Kubernetes actuator against a local server speaking the apps/v1 Deployment scale JSON."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from control.autoscaler.actuators import (
    MERGE_PATCH,
    ActuationFailed,
    KubeActuator,
    deployment_name,
    open_kube_api,
)
from deploy.localdeps import free_port

SCALE_PATH = "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale"


@dataclass
class FakeApiServer:
    """Deployments by (namespace, name) -> replicas; every PATCH as (path, content type, body,
    query). `refuse` answers every request with that status and a Kubernetes Status body."""

    replicas: dict[tuple[str, str], int] = field(default_factory=dict)
    patches: list[tuple[str, str, Any, dict[str, str]]] = field(default_factory=list)
    refuse: int | None = None

    def scale(self, namespace: str, name: str) -> dict[str, Any]:
        count = self.replicas[(namespace, name)]
        return {
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": count}, "status": {"replicas": count, "selector": f"app={name}"},
        }

    async def handle(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        if request.method == "PATCH":
            self.patches.append((request.path, request.content_type, await request.json(),
                                 dict(request.query)))
        if self.refuse is not None or (namespace, name) not in self.replicas:
            status = self.refuse or 404
            message = (f'deployments.apps "{name}" not found' if status == 404 else
                       f'deployments.apps "{name}" is forbidden: User "system:serviceaccount:'
                       f'{namespace}:infermesh-control" cannot patch resource "deployments/scale"')
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "message": message, "code": status}, status=status)
        if request.method == "PATCH":
            body = await request.json()
            self.replicas[(namespace, name)] = body["spec"]["replicas"]
        return web.json_response(self.scale(namespace, name))


@contextlib.asynccontextmanager
async def serving(fake: FakeApiServer) -> AsyncIterator[str]:
    app = web.Application()
    path = "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale"
    app.router.add_route("GET", path, fake.handle)
    app.router.add_route("PATCH", path, fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def fake_api() -> AsyncIterator[tuple[FakeApiServer, KubeActuator]]:
    fake = FakeApiServer({("serving", "infermesh-worker-iris-net-1-2"): 1})
    async with serving(fake) as url:
        api = await open_kube_api(url)
        try:
            yield fake, KubeActuator(api, namespace="serving")
        finally:
            await api.close()


async def test_apply_patches_the_deployment_scale_with_a_merge_patch(
    fake_api: tuple[FakeApiServer, KubeActuator],
) -> None:
    fake, actuator = fake_api
    await actuator.apply("Iris_Net", "1.2", 3)

    [(path, content_type, body, query)] = fake.patches
    assert path == SCALE_PATH.format(namespace="serving", name="infermesh-worker-iris-net-1-2")
    assert content_type == MERGE_PATCH
    assert body == {"spec": {"replicas": 3}}
    assert query == {"fieldManager": "infermesh-autoscaler"}
    assert fake.replicas[("serving", "infermesh-worker-iris-net-1-2")] == 3


@pytest.mark.parametrize(("status", "hint"), [
    (404, "no such Deployment"),
    (403, "needs patch on deployments/scale"),
])
async def test_a_refused_patch_is_a_clear_error_not_a_crash(
    fake_api: tuple[FakeApiServer, KubeActuator], status: int, hint: str,
) -> None:
    fake, actuator = fake_api
    fake.refuse = status
    with pytest.raises(ActuationFailed) as failed:
        await actuator.apply("iris-net", "1-2", 2)

    message = str(failed.value)
    assert message.startswith("kubernetes: scaling deployment serving/infermesh-worker-iris-net-1-2"
                              f" to 2 failed: HTTP {status}; ")
    assert hint in message and 'deployments.apps "infermesh-worker-iris-net-1-2"' in message


async def test_an_unreachable_api_server_is_a_clear_error() -> None:
    api = await open_kube_api(f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(ActuationFailed, match="the API server did not answer while scaling "
                                                  "deployment default/infermesh-worker-m-v"):
            await KubeActuator(api, namespace="default", request_timeout=2).apply("m", "v", 1)
    finally:
        await api.close()


def test_deployment_names_are_dns_1123_labels() -> None:
    assert deployment_name("ResNet50", "v1.0_rc") == "infermesh-worker-resnet50-v1-0-rc"
    long_a = deployment_name("m" * 80, "1")
    long_b = deployment_name("m" * 80, "2")
    assert len(long_a) <= 63 and len(long_b) <= 63 and long_a != long_b
    assert long_a[0].isalnum() and long_a[-1].isalnum()
    with pytest.raises(ValueError, match="gives an empty name"):
        deployment_name("m", "v", template="--")
