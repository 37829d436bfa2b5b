"""Stopping a worker under load strands nothing: SIGTERM hands off, SIGHUP rolls every worker.

The real launcher runs the mesh; a client sends a steady 20 mlp requests/s throughout.
SIGTERM of the mlp worker (the model's shared one, serving each of its versions): the worker
marks itself draining, the launcher starts its replacement at once, the old one leaves once
the new one is ready (exit code 0) and is not restarted. SIGHUP to the launcher: each worker
is replaced in turn. No request fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from deploy.localdeps import LocalEtcd, LocalPostgres
from tests.integration.conftest import RunningMesh, mesh_on_session_deps, mesh_processes
from tests.integration.oip import infer_body, mlp_input
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)

RATE = 20.0
"""Requests per second, sent open-loop (a request does not wait for the previous answer)."""


@pytest.fixture(scope="module")
def mesh(
    local_etcd: LocalEtcd, local_postgres: LocalPostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningMesh]:
    """A mesh of its own (auth off): SIGHUP replaces every worker, and on the shared mesh
    (tests/integration/shared_mesh) the versions other modules add would each be replaced
    too (66 s instead of 25 beside two CPU hogs)."""
    with mesh_on_session_deps("handoff", local_etcd, local_postgres, tmp_path_factory,
                              INFERMESH_GATEWAY_AUTH="0") as running:
        yield running


def worker_pids(mesh: RunningMesh) -> dict[str, int]:
    """The live worker processes of `mesh`, by what each serves (`INFERMESH_WORKER_MODELS`:
    a model for its shared workers, `model/version` for a dedicated version's)."""
    found = {}
    for pid in mesh_processes(mesh.prefix):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"services.worker" not in cmdline:
                continue
            for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                if entry.startswith(b"INFERMESH_WORKER_MODELS="):
                    found[entry.split(b"=", 1)[1].decode()] = pid
    return found


def alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


class SteadyClient:
    """Sends mlp requests at RATE per second and counts the answers by status."""

    def __init__(self, mesh: RunningMesh, session: aiohttp.ClientSession) -> None:
        self._url = f"{mesh.gateway}/v2/models/mlp/infer"
        self._session = session
        self._body = infer_body("features", mlp_input(1))
        self.statuses: Counter[str] = Counter()
        self._requests: set[asyncio.Task[None]] = set()

    def ok_count(self) -> int:
        return self.statuses["200"]

    async def run(self) -> None:
        started = time.monotonic()
        sent = 0
        while True:
            task = asyncio.create_task(self._one())
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)
            sent += 1
            # Open loop: pace by the schedule, not by the answers.
            await asyncio.sleep(max(0.0, started + sent / RATE - time.monotonic()))

    async def _one(self) -> None:
        try:
            async with self._session.post(
                self._url, data=self._body, headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=20),
            ) as response:
                await response.read()
                self.statuses[str(response.status)] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.statuses[type(exc).__name__] += 1

    async def finish(self) -> None:
        """Wait for every request sent to be answered (each is bounded by its timeout)."""
        if self._requests:
            await asyncio.wait(set(self._requests))


@contextlib.asynccontextmanager
async def steady_load(mesh: RunningMesh) -> AsyncIterator[SteadyClient]:
    async with aiohttp.ClientSession() as session:
        client = SteadyClient(mesh, session)
        sender = asyncio.create_task(client.run())
        try:
            yield client
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            await client.finish()


async def serves_on(client: SteadyClient, more: int) -> None:
    """Wait until `more` further requests have been answered 200."""
    target = client.ok_count() + more
    await wait_for(client.ok_count, lambda ok: ok >= target, timeout=60,
                   what=f"{target} requests answered 200 (statuses: {client.statuses})")


async def test_sigterm_of_a_worker_hands_off_without_a_failed_request(
    mesh: RunningMesh,
) -> None:
    old = worker_pids(mesh)["mlp"]
    async with steady_load(mesh) as client:
        await serves_on(client, 10)
        os.kill(old, signal.SIGTERM)
        new = await wait_for(lambda: worker_pids(mesh).get("mlp"),
                             lambda pid: pid is not None and pid != old, timeout=60,
                             what="a replacement mlp worker process")
        await wait_for(lambda: alive(old), lambda running: not running, timeout=60,
                       what=f"the old worker {old} to exit")
        await serves_on(client, 20)  # served by the replacement: the old one is gone
    assert set(client.statuses) == {"200"}, client.statuses
    assert worker_pids(mesh)["mlp"] == new, "the replacement was itself replaced"
    output = "".join(mesh.output)
    assert f"worker-mlp pid {old} exited with 0" in output, "the drained worker's exit"
    assert "worker-mlp exited with" not in output, "restarted as if it had crashed"


async def test_sighup_to_the_launcher_replaces_every_worker_without_a_failed_request(
    mesh: RunningMesh,
) -> None:
    before = worker_pids(mesh)
    assert before, "no worker processes found"
    async with steady_load(mesh) as client:
        await serves_on(client, 10)
        mesh.process.send_signal(signal.SIGHUP)
        await wait_for(lambda: "".join(mesh.output),
                       lambda out: "rolling restart done" in out, timeout=240,
                       what="the launcher to report the rolling restart done")
        after = worker_pids(mesh)
        await serves_on(client, 20)
    assert set(after) == set(before)
    assert not set(after.values()) & set(before.values()), (before, after)
    assert not any(alive(pid) for pid in before.values())
    assert set(client.statuses) == {"200"}, client.statuses
