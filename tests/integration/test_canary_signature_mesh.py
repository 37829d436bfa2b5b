"""Canaries and signatures on the running mesh: a compatible canary with its own max_batch_size
serves a 50/50 split under load with each version's own outputs, and a canary whose input
signature differs is refused by the control API, naming it.

mlp version 4 has other weights and max_batch_size 4 (version 1: 64); version 5 declares
`features` [-1, 16] where version 1 has [-1, 32].
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
import torch

from control.registry_client import RegistryClient, register_file
from deploy.localdeps import LocalEtcd, LocalPostgres
from services.worker.demo_models import build_demo_models
from tests.integration.canary_models import build_mlp_variant
from tests.integration.conftest import RunningMesh, mesh_on_session_deps

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning"),
]

REQUESTS = 300


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The artifact of each version of mlp this module serves."""
    root = tmp_path_factory.mktemp("canary-signature")
    [mlp] = [m for m in build_demo_models(root / "demo") if m.name == "mlp"]
    return {"1": mlp.artifact, "4": build_mlp_variant(root / "mlp-4.pt", seed=4)}


@pytest.fixture(scope="module")
def canary_mesh(
    local_etcd: LocalEtcd, local_postgres: LocalPostgres,
    tmp_path_factory: pytest.TempPathFactory, artifacts: dict[str, Path],
) -> Iterator[RunningMesh]:
    with mesh_on_session_deps("canary_signature", local_etcd, local_postgres,
                              tmp_path_factory, INFERMESH_EDGE="0") as mesh:
        asyncio.run(_register(mesh, artifacts["4"]))
        yield mesh


async def _register(mesh: RunningMesh, variant: Path) -> None:
    signature: dict[str, Any] = {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 32]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 2]}],
    }
    narrow = {**signature,
              "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 16]}]}
    async with aiohttp.ClientSession() as session:
        registry = RegistryClient(session, mesh.registry)
        await register_file(registry, "mlp", "4", variant, signature,
                            batching={"max_batch_size": 4, "max_queue_delay_ms": 2},
                            device="cpu")
        await register_file(registry, "mlp", "5", variant, narrow, device="cpu")
        async with asyncio.timeout(120):
            while True:
                async with session.get(f"{mesh.gateway}/v2/models/mlp/versions/4/ready",
                                       headers=mesh.auth()) as response:
                    if response.status == 200:
                        return
                await asyncio.sleep(0.2)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


async def put_rollout(
    session: aiohttp.ClientSession, mesh: RunningMesh, record: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with session.put(f"{mesh.control}/v1/rollouts/mlp", json=record,
                           headers={"Authorization": f"Bearer {mesh.control_token()}"}) as answer:
        body: dict[str, Any] = await answer.json()
        return answer.status, body


def expected_probs(artifacts: dict[str, Path], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Each version's outputs for `rows`, computed here with torch."""
    expected = {}
    for version, artifact in artifacts.items():
        module = torch.jit.load(str(artifact))  # type: ignore[no-untyped-call]
        with torch.inference_mode():
            expected[version] = module(torch.from_numpy(rows)).numpy()
    return expected


async def test_a_compatible_canary_with_its_own_max_batch_size_serves_a_split_under_load(
    canary_mesh: RunningMesh, session: aiohttp.ClientSession, artifacts: dict[str, Path]
) -> None:
    routes = [{"version": "1", "weight": 50}, {"version": "4", "weight": 50}]
    status, body = await put_rollout(session, canary_mesh, {"routes": routes})
    assert status == 200, body
    rows = np.random.default_rng(11).standard_normal((REQUESTS, 32), dtype=np.float32)
    expected = expected_probs(artifacts, rows)

    async def one(index: int) -> tuple[int, str, int, list[float]]:
        payload = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 32],
                               "data": rows[index].tolist()}]}
        async with session.post(f"{canary_mesh.gateway}/v2/models/mlp/infer",
                                data=orjson.dumps(payload),
                                headers={**canary_mesh.auth(),
                                         "Content-Type": "application/json"}) as response:
            answer = orjson.loads(await response.read())
        epoch = answer.get("parameters", {}).get("rollout_epoch", 0)
        data = answer["outputs"][0]["data"] if response.status == 200 else []
        return response.status, answer.get("model_version", ""), epoch, data

    async with asyncio.timeout(10):  # until the routers answer with the new split
        while (await one(0))[2] != body["epoch"]:
            pass
    answers = await asyncio.gather(*(one(i) for i in range(REQUESTS)))

    assert [status for status, *_ in answers] == [200] * REQUESTS
    versions = Counter(version for _, version, _, _ in answers)
    assert set(versions) == {"1", "4"} and min(versions.values()) > REQUESTS // 5
    for index, (_, version, _, data) in enumerate(answers):
        assert np.allclose(data, expected[version][index], rtol=1e-4, atol=1e-5), (index, version)


async def test_a_canary_with_another_input_signature_is_refused_naming_it(
    canary_mesh: RunningMesh, session: aiohttp.ClientSession
) -> None:
    routes = [{"version": "1", "weight": 90}, {"version": "5", "weight": 10}]
    status, body = await put_rollout(session, canary_mesh, {"routes": routes})
    assert status == 400
    assert body == {"error": "rollout for mlp: version 5 input 'features' has shape [-1,16], "
                             "primary version 1 has [-1,32]"}
