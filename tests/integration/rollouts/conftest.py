"""One mesh for every rollout test (two router replicas), started once for this package.

mlp versions: 1 (the demo), 2 (other weights; in workers of its own, killed on purpose), 3
(fails every real request), 4 (other weights again, max_batch_size 4 where version 1 has 64)
and 5 (declares `features` [-1, 16] where version 1 has [-1, 32]: its worker cannot load it,
and no rollout may route to it). All but 2 share the model's worker. Each test writes the
rollout it needs. Sharing one mesh saves a mesh start (about a minute on a busy 2-core
machine) per module.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from control.registry_client import RegistryClient, register_file
from deploy.localdeps import LocalEtcd, LocalPostgres
from services.mesh.infra.credentials import MeshCredential
from services.worker.demo_models import build_demo_models
from tests.integration.canary_models import build_failing_mlp, build_mlp_variant
from tests.integration.conftest import RunningMesh, mesh_on_session_deps
from tests.waiting import wait_for

FEATURES = [0.25] * 32
SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 32]}],
    "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 2]}],
}


@pytest.fixture(scope="package")
def mlp_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The artifact of each mlp version the mesh serves (5 shares 4's)."""
    root = tmp_path_factory.mktemp("canaries")
    [mlp] = [m for m in build_demo_models(root / "demo") if m.name == "mlp"]
    return {"1": mlp.artifact, "2": build_mlp_variant(root / "mlp-2.pt", seed=1),
            "3": build_failing_mlp(root / "mlp-3.pt"),
            "4": build_mlp_variant(root / "mlp-4.pt", seed=4)}


@pytest.fixture(scope="package")
def rollout_mesh(
    local_etcd: LocalEtcd, local_postgres: LocalPostgres,
    tmp_path_factory: pytest.TempPathFactory, mlp_artifacts: dict[str, Path],
) -> Iterator[RunningMesh]:
    with mesh_on_session_deps("rollouts", local_etcd, local_postgres, tmp_path_factory,
                              INFERMESH_ROUTER_REPLICAS="2", INFERMESH_EDGE="0") as mesh:
        asyncio.run(_register_canaries(mesh, mlp_artifacts))
        yield mesh


async def _register_canaries(mesh: RunningMesh, artifacts: dict[str, Path]) -> None:
    narrow = {**SIGNATURE,
              "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 16]}]}
    demo = {"max_batch_size": 64, "max_queue_delay_ms": 2}
    versions = {"2": (SIGNATURE, demo), "3": (SIGNATURE, demo),
                "4": (SIGNATURE, {"max_batch_size": 4, "max_queue_delay_ms": 2})}
    async with aiohttp.ClientSession() as session:
        credential = await asyncio.to_thread(
            MeshCredential.load, mesh.env["INFERMESH_MESH_CREDENTIAL_FILE"])
        registry = RegistryClient(session, mesh.registry, credential=credential)
        for version, (signature, batching) in versions.items():
            # mlp/2's worker is killed on purpose (fallback, crash loop): a worker of its own,
            # so mlp/1 and the others (in the model's shared worker) serve on meanwhile.
            await register_file(registry, "mlp", version, artifacts[version], signature,
                                batching=batching, device="cpu",
                                worker="dedicated" if version == "2" else "shared")
        await register_file(registry, "mlp", "5", artifacts["4"], narrow, device="cpu")
        for version in versions:
            await wait_status(session, f"{mesh.gateway}/v2/models/mlp/versions/{version}/ready",
                              headers=mesh.auth())


async def wait_status(session: aiohttp.ClientSession, url: str, timeout: float = 120, *,
                      headers: dict[str, str] | None = None) -> None:
    async def status() -> int:
        async with session.get(url, headers=headers) as response:
            return response.status

    await wait_for(status, lambda got: got == 200, timeout=timeout, what=f"200 from GET {url}")


@dataclass
class Answer:
    """One client-visible outcome."""

    sent: float
    done: float
    """When the answer had arrived (time.monotonic(), as `sent`)."""
    status: int
    version: str
    parameters: dict[str, Any]
    body: dict[str, Any]


class Client:
    """The gateway and the control API, as a test drives them."""

    def __init__(self, session: aiohttp.ClientSession, mesh: RunningMesh) -> None:
        self.session = session
        self.mesh = mesh
        self.admin = {"Authorization": f"Bearer {mesh.control_token()}"}

    async def infer(
        self, *, user: str | None = None, header: bool | str = False, version: str | None = None,
        features: list[float] | None = None,
    ) -> Answer:
        """One request for mlp; `user` as the `user` parameter, or as a header (`header=True`:
        the `user` header; a string: that header)."""
        body: dict[str, Any] = {"inputs": [
            {"name": "features", "datatype": "FP32", "shape": [1, 32],
             "data": FEATURES if features is None else features}
        ]}
        headers = self.mesh.auth()
        if user is not None and header:
            headers["user" if header is True else header] = user
        elif user is not None:
            body["parameters"] = {"user": user}
        path = f"/versions/{version}" if version else ""
        sent = time.monotonic()
        async with self.session.post(
            f"{self.mesh.gateway}/v2/models/mlp{path}/infer", data=orjson.dumps(body),
            headers={"Content-Type": "application/json", **headers},
        ) as response:
            answer = orjson.loads(await response.read())
        return Answer(sent, time.monotonic(), response.status, answer.get("model_version", ""),
                      answer.get("parameters", {}), answer)

    async def try_rollout(self, record: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """PUT the rollout of mlp: (status, body)."""
        async with self.session.put(f"{self.mesh.control}/v1/rollouts/mlp", json=record,
                                    headers=self.admin) as response:
            body: dict[str, Any] = await response.json()
            return response.status, body

    async def put_rollout(self, record: dict[str, Any]) -> dict[str, Any]:
        status, body = await self.try_rollout(record)
        assert status == 200, body
        return body

    async def control(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        async with self.session.request(method, f"{self.mesh.control}{path}",
                                        headers=self.admin, **kwargs) as response:
            body: dict[str, Any] = await response.json()
            assert response.status == 200, body
            return body

    async def wait_for_epoch(self, epoch: int, *, in_a_row: int = 1, **request: Any) -> None:
        """Until `in_a_row` consecutive answers carry the rollout `epoch` (30 s at most)."""
        seen = 0

        async def probe() -> int:
            nonlocal seen
            served = (await self.infer(**request)).parameters.get("rollout_epoch")
            seen = seen + 1 if served == epoch else 0
            return seen

        await wait_for(probe, lambda count: count >= in_a_row, timeout=30, interval=0,
                       what=f"{in_a_row} answers in a row carrying rollout epoch {epoch}")


@pytest.fixture
async def client(rollout_mesh: RunningMesh) -> AsyncIterator[Client]:
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield Client(session, rollout_mesh)
