"""The mesh across hosts, for real: three network namespaces on one bridge (issue 17, point 5).

`data` runs etcd, Postgres and the registry; `front` the gateway, the router and a worker;
`back` the batcher and a worker. Every service binds its namespace's address and finds its
peers only through their endpoint records in etcd, so each request crosses the bridge at
every hop (gateway and router in front, batcher in back, a worker in either), the workers
fetch the artifact from the registry across it and the router's prediction log crosses it to
Postgres. Killing back's worker must be survived by front's.

No control API: the registry writes a model's first rollout, and the gateway runs with auth
off, so no tenant or key is needed. Skipped only where the kernel (or a missing CAP_NET_ADMIN)
refuses namespaces, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from control.registry_client import RegistryClient, register_file
from deploy.child_env import BindHosts, ChildSecrets, child_env
from deploy.localdeps import LocalEtcd, LocalPostgres, start_etcd, start_postgres
from services.mesh.infra.credentials import MeshCredential
from services.mesh.infra.db import create_pool, migrate
from services.mesh.infra.etcd import connect_client
from tests.integration.canary_models import build_mlp_variant
from tests.integration.netns import SUBNET, Fabric, namespaces_refused, remove_stale
from tests.waiting import wait_for_sync

T = TypeVar("T")

HOSTS = ("data", "front", "back")
PLACEMENT = {"registry": "data", "batcher": "back", "router": "front", "gateway": "front",
             "worker-back": "back", "worker-front": "front"}
"""Where each service instance runs (its instance id is its name here)."""
GATEWAY_PORT, REGISTRY_PORT = 8000, 8200
PREFIX = "/infermesh/"
SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 32]}],
    "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 2]}],
}
INFER_BODY = orjson.dumps({"inputs": [
    {"name": "features", "datatype": "FP32", "shape": [1, 32], "data": [0.25] * 32}]})
REQUESTS = 20


@dataclass
class NetnsMesh:
    """The fabric, its data stores and the service processes, by instance name."""

    fabric: Fabric
    etcd: LocalEtcd
    postgres: LocalPostgres
    state: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def url(self, host: str, port: int) -> str:
        return f"http://{self.fabric.address[host]}:{port}"

    def in_front(self, function: Callable[[], T]) -> T:
        """`function()` run as a client on the front host (where the gateway is)."""
        return self.fabric.call_in("front", function)

    def start(self, credential_file: Path) -> None:
        """Every service of `PLACEMENT` in its namespace, bound to that namespace's address,
        with the environment `infermesh up` would give it (its own etcd user, its secrets)."""
        secrets = ChildSecrets(
            etcd_url=self.etcd.url_for("launcher"), database_url=self.postgres.dsn,
            admin_tokens="", etcd_urls={user: self.etcd.url_for(user)
                                        for user in self.etcd.passwords})
        common = {
            **os.environ, "INFERMESH_ETCD_PREFIX": PREFIX, "INFERMESH_GATEWAY_AUTH": "0",
            "INFERMESH_MESH_CREDENTIAL_FILE": str(credential_file),
            "INFERMESH_PARENT_PID": str(os.getpid()),  # a killed test run stops them too
            "INFERMESH_REGISTRY_ARTIFACT_DIR": str(self.state / "artifacts"),
            "INFERMESH_WORKER_ARTIFACT_STORES": self.url("data", REGISTRY_PORT),
            "INFERMESH_WORKER_THREADS": "1",
            "INFERMESH_ROUTER_PREDICTION_LOG_SPOOL": str(self.state / "spool"),
        }
        for name, host in PLACEMENT.items():
            address = self.fabric.address[host]
            service = name.split("-", 1)[0]
            env = child_env(service, common, secrets, BindHosts(address, address, address))
            env["INFERMESH_INSTANCE"] = name
            env["INFERMESH_WORKER_CACHE_DIR"] = str(self.state / f"{name}-cache")
            with (self.state / f"{name}.log").open("ab") as log:
                self.processes[name] = self.fabric.spawn(host, f"services.{service}",
                                                         env=env, log=log)

    def logs(self) -> str:
        """The last lines of every service's log, for a failure message."""
        tails = [f"--- {name}\n" + "\n".join(
            (self.state / f"{name}.log").read_text(errors="replace").splitlines()[-15:])
            for name in self.processes]
        return "\n".join(tails)

    def stop(self) -> None:
        """SIGINT every service (stop now: no handoff), SIGKILL what is left after 15 s."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def netns_mesh(tmp_path: Path, mesh_credential_file: Path) -> Iterator[NetnsMesh]:
    remove_stale()
    refused = namespaces_refused()
    if refused is not None:
        pytest.skip(refused)
    with contextlib.ExitStack() as stack:
        fabric = Fabric.build(HOSTS)
        stack.callback(fabric.close)
        # Postgres's data dir must be traversable by the postgres user (see local_postgres).
        pg_root = Path(tempfile.mkdtemp(prefix="infermesh-netns-pg-"))
        pg_root.chmod(0o755)
        stack.callback(shutil.rmtree, pg_root, True)
        data = fabric.address["data"]
        etcd = stack.enter_context(fabric.call_in("data", lambda: start_etcd(
            tmp_path / "etcd", fast=True, prefix=PREFIX, host=data)))
        postgres = stack.enter_context(fabric.call_in("data", lambda: start_postgres(
            pg_root / "data", fast=True, host=data)))
        fabric.call_in("data", lambda: asyncio.run(_migrate(postgres.dsn)))
        mesh = NetnsMesh(fabric, etcd, postgres, tmp_path)
        stack.callback(mesh.stop)
        mesh.start(mesh_credential_file)
        yield mesh


async def _migrate(dsn: str) -> None:
    pool = await create_pool(dsn)
    try:
        await migrate(pool)
    finally:
        await pool.close()


@pytest.mark.timeout(240)
def test_the_mesh_serves_across_namespaces_and_survives_losing_a_worker(
    netns_mesh: NetnsMesh, tmp_path: Path, mesh_credential_file: Path,
) -> None:
    mesh = netns_mesh
    artifact = build_mlp_variant(tmp_path / "mlp.pt", seed=1)
    mesh.in_front(lambda: asyncio.run(
        _register(mesh.url("data", REGISTRY_PORT), artifact, mesh_credential_file)))
    _wait_for_workers(mesh, {"worker-back", "worker-front"})

    assert mesh.in_front(lambda: _infer(mesh, REQUESTS)) == [200] * REQUESTS, mesh.logs()
    records = mesh.in_front(lambda: asyncio.run(_endpoints(mesh)))
    published = {instance: _hosts(record) for (_, instance), record in records.items()}
    assert published == {name: {mesh.fabric.address[host]} for name, host in PLACEMENT.items()}
    before = mesh.in_front(lambda: _served(records))
    assert before["worker-back"] > 0 and before["worker-front"] > 0, before  # both took turns

    mesh.processes["worker-back"].kill()
    mesh.processes["worker-back"].wait(10)
    assert mesh.in_front(lambda: _infer(mesh, REQUESTS)) == [200] * REQUESTS, mesh.logs()
    del records["worker", "worker-back"]
    after = mesh.in_front(lambda: _served(records))
    assert after["worker-front"] - before["worker-front"] == REQUESTS

    logged = mesh.in_front(lambda: wait_for_sync(
        lambda: asyncio.run(_predictions(mesh.postgres.dsn)), lambda rows: rows >= 2 * REQUESTS,
        timeout=60, what="the router (front) to log every prediction in Postgres (data)"))
    assert logged == 2 * REQUESTS


def _hosts(record: dict[str, Any]) -> set[str]:
    """The hosts an endpoint record tells peers to dial (its HTTP, link and gRPC addresses),
    checked to lie on the fabric's subnet (never loopback, never a wildcard)."""
    urls = [record["http"], record.get("link"), record.get("grpc") and f"//{record['grpc']}"]
    hosts = {str(urlsplit(url).hostname) for url in urls if url}
    subnet = ipaddress.ip_network(f"{SUBNET}.0/24")
    assert all(ipaddress.ip_address(host) in subnet for host in hosts), record
    return hosts


def _served(records: dict[tuple[str, str], dict[str, Any]]) -> dict[str, float]:
    """Requests each worker in `records` has executed, from its /metrics."""
    served = {}
    for (service, instance), record in records.items():
        if service == "worker":
            with urllib.request.urlopen(f"{record['http']}/metrics", timeout=10) as response:
                lines = response.read().decode().splitlines()
            served[instance] = sum(float(line.rsplit(" ", 1)[1]) for line in lines
                                   if line.startswith("infermesh_worker_requests_total"))
    return served


async def _register(registry: str, artifact: Path, credential_file: Path) -> None:
    credential = await asyncio.to_thread(MeshCredential.load, credential_file)
    async with aiohttp.ClientSession() as session:
        client = RegistryClient(session, registry, credential=credential)
        await _until_live(session, f"{registry}/v2/health/live")
        await register_file(client, "mlp", "1", artifact, SIGNATURE, device="cpu",
                            batching={"max_batch_size": 8, "max_queue_delay_ms": 2})


async def _until_live(session: aiohttp.ClientSession, url: str) -> None:
    async with asyncio.timeout(120):
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)


async def _endpoints(mesh: NetnsMesh) -> dict[tuple[str, str], dict[str, Any]]:
    """Every endpoint record in etcd, by (service, instance)."""
    async with connect_client(mesh.etcd.url) as client:
        found = await client.get_prefix(f"{PREFIX}endpoints/".encode())
    records = {}
    for kv in found:
        service, instance = kv.key.decode().removeprefix(f"{PREFIX}endpoints/").split("/", 1)
        records[service, instance] = orjson.loads(kv.value)
    return records


def _wait_for_workers(mesh: NetnsMesh, names: set[str]) -> None:
    def ready() -> set[str]:
        for name, process in mesh.processes.items():
            assert process.poll() is None, f"{name} exited:\n{mesh.logs()}"
        records = asyncio.run(_endpoints(mesh))
        return {instance for (service, instance), record in records.items()
                if service == "worker" and "mlp/1" in record.get("models", ())}

    mesh.in_front(lambda: wait_for_sync(
        ready, lambda found: found == names, timeout=180, interval=0.2,
        what=f"workers {sorted(names)} to publish mlp/1 ready"))


def _infer(mesh: NetnsMesh, count: int) -> list[int]:
    """`count` requests to the gateway, one after another; the status of each."""
    url = f"{mesh.url('front', GATEWAY_PORT)}/v2/models/mlp/infer"
    statuses = []
    for _ in range(count):
        request = urllib.request.Request(url, data=INFER_BODY, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                statuses.append(response.status)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
    return statuses


async def _predictions(dsn: str) -> int:
    pool = await create_pool(dsn)
    try:
        rows: int = await pool.fetchval("SELECT count(*) FROM predictions")
    finally:
        await pool.close()
    return rows
