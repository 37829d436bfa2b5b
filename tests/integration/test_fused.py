"""`infermesh up --fused --processes 2|3` on its own private etcd and Postgres, as `make up`
runs it: with 2, a core process (gateway, router, batcher, worker) and a front (gateway,
router) sharing the gateway's ports; with 3, two fronts sharing them and a core that only
batches and runs the model; with 2 and `--layout replicas`, two whole fused processes sharing
them, each batching for itself. Everything below passes through every process that serves;
`build_fused` itself (the one-process mode's wiring) is covered by
tests/deploy/test_fused_settings.py."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest
import tritonclient.grpc.aio as aioclient

from deploy.worker_counts import replica_threads
from services.mesh.infra.settings import available_cores
from tests.integration.conftest import RunningMesh, start_mesh, stop_and_check
from tests.integration.oip import (
    encoder_input,
    infer_body,
    mlp_input,
    output_array,
    post_infer,
    reference,
)

LAYOUTS = {
    "processes-2": {"INFERMESH_FUSED_PROCESSES": "2"},
    "processes-3": {"INFERMESH_FUSED_PROCESSES": "3"},
    "replicas-2": {"INFERMESH_FUSED_PROCESSES": "2", "INFERMESH_FUSED_LAYOUT": "replicas"},
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def fused(request: pytest.FixtureRequest) -> Iterator[RunningMesh]:
    """The launcher with no URLs given: it starts its own etcd and Postgres."""
    root = Path(tempfile.mkdtemp(prefix="infermesh-fused-"))
    root.chmod(0o755)
    running = start_mesh(root / "state", fused=True, env=LAYOUTS[request.param])
    try:
        yield running
        stop_and_check(running)
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_the_printed_curl_line_returns_a_prediction(fused: RunningMesh) -> None:
    done = subprocess.run(["bash", "-c", fused.curl_line()], capture_output=True, text=True,
                          timeout=30, check=True)
    body = orjson.loads(done.stdout)
    assert body["model_name"] == "mlp" and body["outputs"][0]["shape"] == [1, 2]


@pytest.mark.parametrize(("model", "name", "make"), [
    ("mlp", "features", mlp_input), ("encoder", "input_ids", encoder_input),
])
async def test_fused_outputs_match_the_model_called_in_process(
    fused: RunningMesh, model: str, name: str, make: object
) -> None:
    array = make(2)  # type: ignore[operator]
    async with aiohttp.ClientSession() as session:
        status, body, _ = await post_infer(
            session, f"{fused.gateway}/v2/models/{model}/infer", infer_body(name, array),
            headers=fused.auth(),
        )
    assert status == 200, body
    expected = reference(fused.state_dir, model, array)
    np.testing.assert_allclose(output_array(body), expected, rtol=1e-5, atol=1e-5)


async def test_fused_serves_grpc(fused: RunningMesh) -> None:
    array = mlp_input(2)
    client = aioclient.InferenceServerClient(url=fused.grpc)
    try:
        tensor = aioclient.InferInput("features", list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        result = await client.infer(
            "mlp", [tensor], headers={"authorization": f"Bearer {fused.api_key()}"}
        )
    finally:
        await client.close()
    output = result.as_numpy(result.get_response().outputs[0].name)
    expected = reference(fused.state_dir, "mlp", array)
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)


async def test_two_processes_serve_and_a_front_reaches_the_cores_batcher(
    fused: RunningMesh,
) -> None:
    """Each process stamps its own random prefix on request ids, and exactly two take public
    connections: the core and its front, the two fronts (the core then only batches), or the
    two replicas (each with a batcher and worker of its own: no link between them). New
    connections are spread by the kernel (SO_REUSEPORT hashes the 4-tuple): 64 of them all
    landing on one of two processes has probability 2**-63, so both prefixes are seen; were
    the third process serving too, 64 connections would miss it with probability
    3 * (2/3)**64 < 1e-10. A front has no batcher or worker: its 200s crossed the link to the
    core's batcher."""
    prefixes: set[str] = set()
    body = infer_body("features", mlp_input(1))
    for _ in range(64):
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            status, answer, _ = await post_infer(
                session, f"{fused.gateway}/v2/models/mlp/infer", body, headers=fused.auth())
        assert status == 200, answer
        prefixes.add(str(answer["id"])[:16])
    assert len(prefixes) == 2, prefixes


PROCESS_LOGS = {
    "processes-2": {"fused.log", "fused-front-1.log"},
    "processes-3": {"fused.log", "fused-front-1.log", "fused-front-2.log"},
    "replicas-2": {"fused.log", "fused-1.log"},
}


def test_each_layout_starts_its_processes_and_replicas_run_the_models_on_a_share_of_the_cores(
    fused: RunningMesh, request: pytest.FixtureRequest,
) -> None:
    """The launcher's plan, read from the log file each process writes: fronts, or replicas
    that each load every demo model themselves, within their share of the cores' threads (the
    worker logs its load once its warm-up chose them; a replica may finish after the mesh
    reports ready, so each line is waited for)."""
    layout = request.node.callspec.params["fused"]
    logs = fused.state_dir / "logs"
    assert {p.name for p in logs.glob("fused*.log")} == PROCESS_LOGS[layout]
    if layout != "replicas-2":
        return
    share = replica_threads({}, 2, available_cores())["INFERMESH_WORKER_MAX_THREADS"]
    # The mlp is quick enough for one thread wherever it runs; the encoder takes its share.
    for name in PROCESS_LOGS[layout]:
        for model, threads in (("mlp", "1"), ("encoder", share)):
            line = wait_for_line(logs / name, f"loaded {model}/1 on cpu", timeout=180)
            assert f"; {threads} intra-op threads" in line, line


def wait_for_line(path: Path, needle: str, *, timeout: float) -> str:
    """The first line of `path` holding `needle`, once it is there (AssertionError after
    `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        found = next((line for line in path.read_text().splitlines() if needle in line), None)
        if found is not None:
            return found
        assert time.monotonic() < deadline, f"no {needle!r} in {path} after {timeout} s"
        time.sleep(0.2)
