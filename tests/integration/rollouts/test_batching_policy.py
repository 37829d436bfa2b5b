"""A version's queue policy changed through the registry applies within a second, no restart.

Runs on the package's shared mesh, on a model of its own (`policy-mlp`, the demo mlp's
artifact), so no other test's batches change.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from control.registry_client import RegistryClient, register_file
from services.mesh.infra.credentials import MeshCredential
from services.mesh.infra.etcd import connect_client
from tests.integration.conftest import RunningMesh
from tests.integration.oip import infer_body, mlp_input, post_infer
from tests.integration.rollouts.conftest import SIGNATURE, wait_status
from tests.waiting import wait_for

MODEL = "policy-mlp"
BURST = 48
NEW_MAX = 4
APPLIED_WITHIN = 1.0
"""Seconds from the registry's answer to the PATCH to a batcher forming batches under it."""


async def _batcher_urls(mesh: RunningMesh) -> list[str]:
    async with connect_client(mesh.env["INFERMESH_ETCD_URL"]) as client:
        found = await client.get_prefix(f"{mesh.prefix}endpoints/batcher/".encode())
    return [str(orjson.loads(kv.value)["http"]) for kv in found]


async def _batches_over(session: aiohttp.ClientSession, mesh: RunningMesh) -> tuple[int, int]:
    """(batches of MODEL dispatched so far, those of them with more than NEW_MAX rows), summed
    over every batcher, from the batch rows histogram."""
    total = small = 0.0
    for url in await _batcher_urls(mesh):
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("model") != MODEL:
                    continue
                if sample.name == "infermesh_batcher_batch_rows_count":
                    total += sample.value
                elif (sample.name == "infermesh_batcher_batch_rows_bucket"
                      and float(sample.labels["le"]) == NEW_MAX):
                    small += sample.value
    return int(total), int(total - small)


async def _burst(session: aiohttp.ClientSession, mesh: RunningMesh) -> int:
    """BURST concurrent single-row requests; how many batches over NEW_MAX rows they made."""
    before = await _batches_over(session, mesh)
    url = f"{mesh.gateway}/v2/models/{MODEL}/infer"
    answers = await asyncio.gather(*(
        post_infer(session, url, infer_body("features", mlp_input(1, seed=i)),
                   headers=mesh.auth())
        for i in range(BURST)
    ))
    assert [status for status, _, _ in answers] == [200] * BURST, answers[0][1]
    after = await _batches_over(session, mesh)
    return after[1] - before[1]


async def test_a_smaller_max_batch_size_applies_within_a_second(
    rollout_mesh: RunningMesh, mlp_artifacts: dict[str, Path],
) -> None:
    mesh = rollout_mesh
    connector = aiohttp.TCPConnector(limit=BURST)
    async with aiohttp.ClientSession(connector=connector) as session:
        credential = await asyncio.to_thread(
            MeshCredential.load, mesh.env["INFERMESH_MESH_CREDENTIAL_FILE"])
        registry = RegistryClient(session, mesh.registry, credential=credential)
        # A long queue delay: a burst waits to leave in batches of up to 64 rows.
        await register_file(registry, MODEL, "1", mlp_artifacts["1"], SIGNATURE, device="cpu",
                            batching={"max_batch_size": 64, "max_queue_delay_ms": 20})
        await wait_status(session, f"{mesh.gateway}/v2/models/{MODEL}/versions/1/ready",
                          headers=mesh.auth())
        # Before: bursts do make batches over NEW_MAX rows (else the check below proves nothing).
        await wait_for(lambda: _burst(session, mesh), lambda over: over > 0, timeout=60,
                       interval=0, what=f"a burst batched into more than {NEW_MAX} rows")

        record = await registry.change_batching(MODEL, "1", {"max_batch_size": NEW_MAX})
        acknowledged = time.monotonic()
        assert record["batching"]["max_batch_size"] == NEW_MAX

        # Bursts back to back from the acknowledgement on; every one that starts after
        # APPLIED_WITHIN must stay within the new maximum (a busy machine slows the bursts,
        # not the watch: the check is on when each burst started).
        late: list[tuple[float, int]] = []
        while len(late) < 2:
            started = time.monotonic() - acknowledged
            over = await _burst(session, mesh)
            if started >= APPLIED_WITHIN:
                late.append((started, over))
        assert all(over == 0 for _, over in late), late
