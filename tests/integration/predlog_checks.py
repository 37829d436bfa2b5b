"""Every prediction served lands in `predictions`: the check, run against the shared mesh
(services as processes, `shared_mesh/test_predlog_mesh.py`) and `--fused`
(`test_predlog_fused.py`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from services.mesh.infra.db import create_pool
from tests.integration.conftest import RunningMesh
from tests.integration.oip import infer_body, mlp_input, output_array, post_infer
from tests.waiting import wait_for

TRACE = "0af7651916cd43dd8448eb211c80319c"


async def check_each_prediction_is_logged(mesh: RunningMesh) -> None:
    """20 mlp predictions (auth off) each logged with its version, tenant, bucket, label,
    input digests and the client's trace."""
    sent: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(
            post_infer(
                session, f"{mesh.gateway}/v2/models/mlp/infer",
                infer_body("features", mlp_input(2, seed=i), id=f"logged-{i}"),
                headers={"traceparent": f"00-{TRACE}-{i + 1:016x}-01"},
            )
            for i in range(20)
        ))
    for status, body, headers in results:
        assert status == 200, body
        labels = output_array(body).argmax(axis=-1)
        sent[body["id"]] = {"version": body["model_version"], "headers": headers,
                            "label": ",".join(str(v) for v in labels.tolist())}

    rows = await logged_rows(mesh, list(sent), timeout=30.0)
    assert sorted(row["request_id"] for row in rows) == sorted(sent)
    for row in rows:
        expected = sent[row["request_id"]]
        assert (row["model"], row["version"], row["tenant"]) == (
            "mlp", expected["version"], "anonymous"
        )
        assert row["shadow"] is False and row["latency_ms"] > 0
        assert row["bucket"] == int(expected["headers"]["infermesh-bucket"])
        assert row["label"] == expected["label"]
        assert set(row["inputs"]) == {"features"}  # the default policy: digests
        assert row["inputs"]["features"].startswith("sha256:")
        # The client's trace, as the response named it.
        assert row["trace_id"] == expected["headers"]["infermesh-trace-id"] == TRACE
        assert abs(row["ts"].timestamp() - time.time()) < 300
    assert await spool_dirs(mesh)  # the routers spill under the mesh's state dir


async def logged_rows(mesh: RunningMesh, ids: list[str], *, timeout: float) -> list[Any]:
    """The rows of `ids` once all are there (the log flushes every half second)."""
    pool = await create_pool(mesh.env["INFERMESH_DATABASE_URL"])
    try:
        rows = await wait_for(
            lambda: pool.fetch("SELECT * FROM predictions WHERE request_id = ANY($1::text[])",
                               ids),
            lambda found: len(found) >= len(ids), timeout=timeout,
            what=f"{len(ids)} rows in predictions",
        )
        return list(rows)
    finally:
        await pool.close()


async def spool_dirs(mesh: RunningMesh) -> list[str]:
    root = mesh.state_dir / "spool"
    return await asyncio.to_thread(lambda: [p.name for p in root.iterdir() if p.is_dir()])
