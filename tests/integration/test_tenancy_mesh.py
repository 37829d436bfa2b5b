"""Tenancy against the running mesh (auth on, as `infermesh up` runs by default): API keys over
REST and gRPC, revocation, a tenant's rate quota, the quota shared by two gateway replicas, and
a noisy neighbour on a saturated model.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
import tritonclient.grpc.aio as aioclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from bench.rawhttp import RawClient
from deploy.localdeps import LocalEtcd, LocalPostgres, free_port
from services.mesh.infra.etcd import connect_client
from tests.integration.conftest import RunningMesh, mesh_on_session_deps
from tests.integration.oip import encoder_input, infer_body, mlp_input

pytestmark = pytest.mark.timeout(300)

MLP_BODY = infer_body("features", mlp_input(1))
ENCODER_BODY = infer_body("input_ids", encoder_input(4))


@pytest.fixture(scope="module")
def tenancy_mesh(
    local_etcd: LocalEtcd, local_postgres: LocalPostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningMesh]:
    with mesh_on_session_deps("tenancy", local_etcd, local_postgres, tmp_path_factory,
                              INFERMESH_EDGE="0") as mesh:
        yield mesh


class Admin:
    """The control API, as an operator drives it."""

    def __init__(self, session: aiohttp.ClientSession, mesh: RunningMesh) -> None:
        self.session = session
        self.base = mesh.control
        self.headers = {"Authorization": f"Bearer {mesh.control_token()}"}

    async def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        async with self.session.request(method, f"{self.base}{path}", json=body,
                                        headers=self.headers) as response:
            answer: dict[str, Any] = await response.json()
            assert response.status in (200, 201), answer
            return answer

    async def tenant(self, **fields: Any) -> tuple[str, str]:
        """A fresh tenant with `fields` as its quotas: (its name, a key for it)."""
        name = f"t{uuid.uuid4().hex[:10]}"
        await self.call("POST", "/v1/tenants", {"name": name, **fields})
        issued = await self.call("POST", f"/v1/tenants/{name}/keys", {"note": "test"})
        return name, str(issued["key"])


@pytest.fixture
async def admin(tenancy_mesh: RunningMesh) -> AsyncIterator[Admin]:
    async with aiohttp.ClientSession() as session:
        yield Admin(session, tenancy_mesh)


async def infer(session: aiohttp.ClientSession, mesh: RunningMesh, key: str | None, *,
                model: str = "mlp") -> tuple[int, dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    body = MLP_BODY if model == "mlp" else ENCODER_BODY
    async with session.post(f"{mesh.gateway}/v2/models/{model}/infer", data=body,
                            headers=headers) as response:
        await response.read()
        return response.status, dict(response.headers)


async def test_keys_decide_who_may_call_what_over_rest(
    admin: Admin, tenancy_mesh: RunningMesh
) -> None:
    _, key = await admin.tenant(rate=1000, allowed_models=["mlp"])
    async with aiohttp.ClientSession() as session:
        assert (await infer(session, tenancy_mesh, key))[0] == 200
        assert (await infer(session, tenancy_mesh, None))[0] == 401
        assert (await infer(session, tenancy_mesh, "imk_000000000000_nope"))[0] == 401
        assert (await infer(session, tenancy_mesh, key[:-2] + "xx"))[0] == 401
        assert (await infer(session, tenancy_mesh, key, model="encoder"))[0] == 403

        key_id = key.split("_")[1]
        await admin.call("DELETE", f"/v1/keys/{key_id}")
        revoked = time.monotonic()
        while (await infer(session, tenancy_mesh, key))[0] != 401:
            assert time.monotonic() - revoked < 1.0, "revocation took over a second"
            await asyncio.sleep(0.02)


async def test_keys_decide_who_may_call_what_over_grpc(
    admin: Admin, tenancy_mesh: RunningMesh
) -> None:
    _, key = await admin.tenant(rate=1000, allowed_models=["mlp"])
    client = aioclient.InferenceServerClient(url=tenancy_mesh.grpc)
    tensor = aioclient.InferInput("features", [1, 32], "FP32")
    tensor.set_data_from_numpy(mlp_input(1))

    async def status(model: str, presented: str | None) -> grpc.StatusCode:
        headers = {} if presented is None else {"authorization": f"Bearer {presented}"}
        try:
            await client.infer(model, [tensor] if model == "mlp" else [], headers=headers)
        except InferenceServerException as exc:
            return {"StatusCode.UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
                    "StatusCode.PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
                    }.get(str(exc.status()), grpc.StatusCode.UNKNOWN)
        return grpc.StatusCode.OK

    try:
        assert await status("mlp", key) == grpc.StatusCode.OK
        assert await status("mlp", None) == grpc.StatusCode.UNAUTHENTICATED
        assert await status("mlp", key + "x") == grpc.StatusCode.UNAUTHENTICATED
        assert await status("encoder", key) == grpc.StatusCode.PERMISSION_DENIED
        await admin.call("DELETE", f"/v1/keys/{key.split('_')[1]}")
        revoked = time.monotonic()
        while await status("mlp", key) != grpc.StatusCode.UNAUTHENTICATED:
            assert time.monotonic() - revoked < 1.0, "revocation took over a second"
            await asyncio.sleep(0.02)
    finally:
        await client.close()


async def send(url: str, key: str, *, rate: float, seconds: float, statuses: Counter[int],
               body: bytes = MLP_BODY) -> list[asyncio.Task[None]]:
    """Open loop: `rate` requests a second for `seconds`; returns the requests still in flight
    once the last is sent. Statuses are counted into `statuses` as answers arrive."""
    client = RawClient(url, body, headers={"Authorization": f"Bearer {key}"})
    started = time.monotonic()

    async def one() -> None:
        status, _ = await client.post()
        statuses[status] += 1

    tasks = []
    for i in range(int(rate * seconds)):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    return tasks


async def drive(url: str, key: str, *, rate: float, seconds: float) -> Counter[int]:
    """`send`, then wait for every answer."""
    statuses: Counter[int] = Counter()
    await asyncio.gather(*await send(url, key, rate=rate, seconds=seconds, statuses=statuses))
    return statuses


async def test_a_tenant_driven_at_ten_times_its_rate_gets_its_rate(
    admin: Admin, tenancy_mesh: RunningMesh
) -> None:
    _, key = await admin.tenant(rate=100, burst=10, max_concurrency=256)
    load = asyncio.create_task(drive(f"{tenancy_mesh.gateway}/v2/models/mlp/infer", key,
                                     rate=1000, seconds=5))
    await asyncio.sleep(2.5)
    probes = []
    async with aiohttp.ClientSession() as session:  # mid-flood: the bucket is empty
        for _ in range(10):  # a probe arriving just as a token refills gets it (~1 in 10)
            probes.append(await infer(session, tenancy_mesh, key))
    statuses = await load
    refused = [headers for status, headers in probes if status == 429]
    assert len(refused) >= 6, [status for status, _ in probes]
    assert all(int(headers["Retry-After"]) >= 1 for headers in refused)
    assert set(statuses) <= {200, 429}, statuses
    assert 85 <= statuses[200] / 5 <= 115 + 10 / 5, statuses


@pytest.fixture
def second_gateway(tenancy_mesh: RunningMesh) -> Iterator[str]:
    """Another gateway replica on the mesh (its own ports); its base URL."""
    port, grpc_port = free_port(), free_port()
    env = {**tenancy_mesh.env, "INFERMESH_GATEWAY_HTTP_PORT": str(port),
           "INFERMESH_GATEWAY_GRPC_PORT": str(grpc_port)}
    process = subprocess.Popen([sys.executable, "-m", "services.gateway"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


async def test_two_gateway_replicas_share_a_tenants_rate(
    admin: Admin, tenancy_mesh: RunningMesh, second_gateway: str
) -> None:
    await _wait_gateways(tenancy_mesh, 2)
    _, key = await admin.tenant(rate=100, burst=10, max_concurrency=256)
    urls = [f"{tenancy_mesh.gateway}/v2/models/mlp/infer",
            f"{second_gateway}/v2/models/mlp/infer"]
    first, other = await asyncio.gather(*(drive(u, key, rate=500, seconds=5) for u in urls))
    accepted = (first[200] + other[200]) / 5
    assert 80 <= accepted <= 120 + 10 / 5, (first, other)


async def _wait_gateways(mesh: RunningMesh, count: int) -> None:
    etcd = connect_client(mesh.env["INFERMESH_ETCD_URL"])
    try:
        async with asyncio.timeout(60):
            while True:
                found = await etcd.get_prefix(f"{mesh.prefix}endpoints/gateway/".encode())
                if len(found) >= count:
                    break
                await asyncio.sleep(0.1)
    finally:
        await etcd.close()
    await asyncio.sleep(0.5)  # each gateway rebalances its share on the watch event


async def batcher_rows(mesh: RunningMesh) -> Counter[str]:
    etcd = connect_client(mesh.env["INFERMESH_ETCD_URL"])
    try:
        records = await etcd.get_prefix(f"{mesh.prefix}endpoints/batcher/".encode())
        urls = [orjson.loads(kv.value)["http"] for kv in records]
    finally:
        await etcd.close()
    rows: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        for url in urls:
            async with session.get(f"{url}/metrics") as response:
                text = await response.text()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if (sample.name == "infermesh_batcher_rows_total"
                            and sample.labels["model"] == "encoder"):
                        rows[sample.labels["tenant"]] += int(sample.value)
    return rows


async def test_a_noisy_neighbour_does_not_take_a_quiet_tenants_share(
    admin: Admin, tenancy_mesh: RunningMesh
) -> None:
    """On the encoder (about 100 rows/s here), A floods at 10x its quota (50 requests/s of 4
    rows, more than the model can do) while B sends at half of its own (10 requests/s).

    B gets only 200s, and while A's backlog stands the batcher gives B its weighted fair
    share of rows, min(B's demand, capacity / 2), rather than its share of the admitted
    traffic (a sixth, which is what first-come-first-served would give it).
    """
    noisy_name, noisy = await admin.tenant(rate=50, burst=5, max_concurrency=512)
    quiet_name, quiet = await admin.tenant(rate=20, burst=5, max_concurrency=64)
    url = f"{tenancy_mesh.gateway}/v2/models/encoder/infer"
    loud, calm = Counter[int](), Counter[int]()
    before = await batcher_rows(tenancy_mesh)
    seconds = 10.0
    loud_tasks, calm_tasks = await asyncio.gather(
        send(url, noisy, rate=500, seconds=seconds, statuses=loud, body=ENCODER_BODY),
        send(url, quiet, rate=10, seconds=seconds, statuses=calm, body=ENCODER_BODY),
    )
    await asyncio.sleep(1.0)  # B's last requests are served; A's backlog still stands
    during = await batcher_rows(tenancy_mesh)
    await asyncio.gather(*loud_tasks, *calm_tasks)

    assert set(calm) == {200}, calm
    # The flooder's backlog outlives some of its deadlines (504): that is its own queue.
    assert loud[429] > 0 and set(loud) <= {200, 429, 504}, loud
    quiet_rows = during[quiet_name] - before[quiet_name]
    total = quiet_rows + during[noisy_name] - before[noisy_name]
    fair = min(4 * 10 * seconds, total / 2)
    assert abs(quiet_rows - fair) <= 0.1 * total, (quiet_rows, total)
