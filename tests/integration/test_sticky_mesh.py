"""Sticky assignment from one view: right after a rollout change sets a header as the sticky key,
every user stays on one version, because the router that picks the version also picks the
sticky value (the gateway forwards the candidate headers whatever its own rollout copy says).

The mesh runs two router replicas and mlp versions 1 and 2 (other weights).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from control.registry_client import RegistryClient, register_file
from deploy.localdeps import LocalEtcd, LocalPostgres
from services.worker.demo_models import build_demo_models
from tests.integration.canary_models import build_mlp_variant
from tests.integration.conftest import RunningMesh, mesh_on_session_deps

pytestmark = pytest.mark.timeout(300)

BODY = orjson.dumps({"inputs": [
    {"name": "features", "datatype": "FP32", "shape": [1, 32], "data": [0.25] * 32}
]})
USERS = [f"user-{i}" for i in range(500)]
REQUESTS = 2_000


@pytest.fixture(scope="module")
def sticky_mesh(
    local_etcd: LocalEtcd, local_postgres: LocalPostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningMesh]:
    with mesh_on_session_deps("sticky", local_etcd, local_postgres, tmp_path_factory,
                              INFERMESH_ROUTER_REPLICAS="2", INFERMESH_EDGE="0") as mesh:
        asyncio.run(_register_version_2(mesh, tmp_path_factory.mktemp("sticky-canary")))
        yield mesh


async def _register_version_2(mesh: RunningMesh, artifacts: Path) -> None:
    [mlp] = [m for m in build_demo_models(artifacts / "demo") if m.name == "mlp"]
    async with aiohttp.ClientSession() as session:
        registry = RegistryClient(session, mesh.registry)
        await register_file(registry, "mlp", "2", build_mlp_variant(artifacts / "mlp-2.pt", seed=1),
                            mlp.signature, batching=mlp.batching, device="cpu")
        async with asyncio.timeout(120):
            while True:
                async with session.get(f"{mesh.gateway}/v2/models/mlp/versions/2/ready",
                                       headers=mesh.auth()) as response:
                    if response.status == 200:
                        return
                await asyncio.sleep(0.2)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        yield session


async def put_rollout(
    session: aiohttp.ClientSession, mesh: RunningMesh, record: dict[str, Any]
) -> int:
    async with session.put(f"{mesh.control}/v1/rollouts/mlp", json=record,
                           headers={"Authorization": f"Bearer {mesh.control_token()}"}) as answer:
        body = await answer.json()
        assert answer.status == 200, body
        epoch: int = body["epoch"]
        return epoch


async def infer(
    session: aiohttp.ClientSession, mesh: RunningMesh, user: str
) -> tuple[int, str, int | None]:
    """(status, version served, rollout epoch) of one request from `user`."""
    headers = {**mesh.auth(), "Content-Type": "application/json", "X-User-Id": user}
    async with session.post(f"{mesh.gateway}/v2/models/mlp/infer", data=BODY,
                            headers=headers) as response:
        answer = orjson.loads(await response.read())
    return (response.status, answer.get("model_version", ""),
            answer.get("parameters", {}).get("rollout_epoch"))


async def wait_for_epoch(
    session: aiohttp.ClientSession, mesh: RunningMesh, epoch: int, *, in_a_row: int = 1
) -> None:
    """Until `in_a_row` consecutive responses carry `epoch` (10 s at most)."""
    seen = 0
    async with asyncio.timeout(10):
        for probe in itertools.count():
            _, _, served = await infer(session, mesh, f"probe-{probe}")
            seen = seen + 1 if served == epoch else 0
            if seen >= in_a_row:
                return


async def test_no_user_moves_between_versions_right_after_a_header_becomes_the_sticky_key(
    sticky_mesh: RunningMesh, session: aiohttp.ClientSession
) -> None:
    routes = [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]
    unsticky = await put_rollout(session, sticky_mesh,
                                 {"routes": routes, "sticky_key": None, "salt": "one-view"})
    await wait_for_epoch(session, sticky_mesh, unsticky, in_a_row=8)
    sticky = await put_rollout(session, sticky_mesh, {"routes": routes, "sticky_key": "x-user-id"})
    await wait_for_epoch(session, sticky_mesh, sticky)

    users = iter(USERS[i % len(USERS)] for i in range(REQUESTS))
    served: dict[str, set[str]] = defaultdict(set)
    statuses: list[int] = []

    async def loop() -> None:
        for user in users:
            status, version, _ = await infer(session, sticky_mesh, user)
            statuses.append(status)
            served[user].add(version)

    await asyncio.gather(*(loop() for _ in range(32)))
    assert statuses == [200] * REQUESTS
    assert set(served) == set(USERS)
    moved = {user: versions for user, versions in served.items() if len(versions) > 1}
    assert moved == {}
    assert {version for versions in served.values() for version in versions} == {"1", "2"}
