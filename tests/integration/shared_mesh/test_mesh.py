"""The full mesh as processes: predictions, batching, bad input, live registration."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile

import aiohttp
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from services.mesh.infra.etcd import connect_client
from tests.integration.conftest import RunningMesh
from tests.integration.oip import (
    encoder_input,
    infer_body,
    mlp_input,
    output_array,
    post_infer,
    reference,
)
from tests.waiting import wait_for


async def test_mlp_matches_the_model_called_in_process(mesh: RunningMesh) -> None:
    features = mlp_input(3)
    async with aiohttp.ClientSession() as session:
        status, body, headers = await post_infer(
            session, f"{mesh.gateway}/v2/models/mlp/infer",
            infer_body("features", features, id="client-7"),
        )
    assert status == 200, body
    assert (body["model_name"], body["model_version"], body["id"]) == ("mlp", "1", "client-7")
    assert headers["x-request-id"] == "client-7"
    expected = reference(mesh.state_dir, "mlp", features)
    np.testing.assert_allclose(output_array(body), expected, rtol=1e-5, atol=1e-6)


async def test_encoder_matches_the_model_called_in_process(mesh: RunningMesh) -> None:
    ids = encoder_input(2)
    async with aiohttp.ClientSession() as session:
        status, body, headers = await post_infer(
            session, f"{mesh.gateway}/v2/models/encoder/versions/1/infer",
            infer_body("input_ids", ids),
        )
    assert status == 200, body
    assert body["model_version"] == "1" and body["id"] == headers["x-request-id"]
    expected = reference(mesh.state_dir, "encoder", ids)
    np.testing.assert_allclose(output_array(body), expected, rtol=1e-5, atol=1e-5)


async def _endpoint(mesh: RunningMesh, service: str) -> str:
    client = connect_client(mesh.env["INFERMESH_ETCD_URL"])
    async with client:
        found = await client.get_prefix(f"{mesh.prefix}endpoints/{service}/".encode())
    return str(orjson.loads(next(iter(found)).value)["http"])


def _sample(metrics: str, name: str, model: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name) and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {model} not in /metrics")


async def test_concurrent_single_rows_are_served_in_batches(mesh: RunningMesh) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # a few rounds of 64 concurrent single-row requests
            results = await asyncio.gather(*(
                post_infer(session, f"{mesh.gateway}/v2/models/mlp/infer",
                           infer_body("features", mlp_input(1, seed=i)))
                for i in range(64)
            ))
            assert all(status == 200 for status, _, _ in results)
            for i, (_, body, _) in enumerate(results):
                expected = reference(mesh.state_dir, "mlp", mlp_input(1, seed=i))
                np.testing.assert_allclose(output_array(body), expected, rtol=1e-5, atol=1e-6)
        worker = await _endpoint(mesh, "worker")
        metrics_urls = [await _endpoint(mesh, "batcher"), worker]
        for url in metrics_urls:
            async with session.get(f"{url}/metrics") as response:
                text = await response.text()
            prefix = "infermesh_batcher" if url != worker else "infermesh_worker"
            rows = _sample(text, f"{prefix}_batch_rows_sum", "mlp")
            batches = _sample(text, f"{prefix}_batch_rows_count", "mlp")
            if batches:
                assert rows / batches > 1.0


def _families(text: str) -> dict[str, list[Sample]]:
    """Samples by metric family name; prometheus-client's parser refuses malformed text."""
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def _total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_every_service_serves_metrics_whose_counters_agree(mesh: RunningMesh) -> None:
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(
            post_infer(session, f"{mesh.gateway}/v2/models/mlp/infer",
                       infer_body("features", mlp_input(1, seed=i)))
            for i in range(64)
        ))
        assert all(status == 200 for status, _, _ in results)
        scraped = {}
        for service in ("gateway", "router", "batcher", "worker", "registry", "control"):
            async with session.get(f"{await _endpoint(mesh, service)}/metrics") as response:
                assert response.status == 200, service
                scraped[service] = _families(await response.text())
    assert all(scraped.values())
    batcher = [s for samples in scraped["batcher"].values() for s in samples]
    inferences = _total(batcher, "infermesh_inference_count_total", model="mlp")
    executions = _total(batcher, "infermesh_inference_exec_count_total", model="mlp")
    rows = _total(batcher, "infermesh_batcher_batch_rows_sum", model="mlp")
    batches = _total(batcher, "infermesh_batcher_batch_rows_count", model="mlp")
    assert executions and inferences / executions == pytest.approx(rows / batches)
    assert _total(batcher, "infermesh_inference_request_success_total", model="mlp") >= 64
    gateway = [s for samples in scraped["gateway"].values() for s in samples]
    assert _total(gateway, "infermesh_gateway_requests_total", model="mlp", code="200") >= 64
    router = [s for samples in scraped["router"].values() for s in samples]
    assert _total(router, "infermesh_router_requests_total", model="mlp", outcome="success") >= 64
    for service, families in scraped.items():  # dependency health, read at scrape time
        assert _total(families["infermesh_etcd_up"], "infermesh_etcd_up") == 1, service
    for service, peer in (("gateway", "router"), ("router", "batcher"), ("batcher", "worker")):
        links = scraped[service]["infermesh_link_up"]
        assert _total(links, "infermesh_link_up", service=peer) >= 1, service
    for service in ("registry", "control"):
        assert _total(scraped[service]["infermesh_postgres_up"], "infermesh_postgres_up") == 1


BAD_REQUESTS = [
    ("nope", b'{"inputs": []}', 404, "unknown model 'nope'"),
    ("mlp", b'{"inputs": [{"name": "features", "datatype": "INT64", "shape": [1, 32], '
            b'"data": [' + b",".join([b"1"] * 32) + b"]}]}", 400, "datatype INT64"),
    ("mlp", b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 16], '
            b'"data": [' + b",".join([b"1"] * 16) + b"]}]}", 400, "shape [1, 16]"),
    ("mlp", b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 32], '
            b'"data": [1, 2, 3]}]}', 400, "3 elements"),
    ("mlp", b'{"inputs": [{"name": "feature", "datatype": "FP32", "shape": [1, 32], '
            b'"data": [' + b",".join([b"1"] * 32) + b"]}]}", 400, "unexpected input 'feature'"),
    ("mlp", b'{"inputs": [{"name": ', 400, "body: malformed JSON"),
]


@pytest.mark.parametrize(("model", "body", "status", "message"), BAD_REQUESTS)
async def test_bad_input_gets_a_4xx_naming_the_problem(
    mesh: RunningMesh, model: str, body: bytes, status: int, message: str
) -> None:
    async with aiohttp.ClientSession() as session:
        got, answer, _ = await post_infer(session, f"{mesh.gateway}/v2/models/{model}/infer", body)
        assert (got, message in answer["error"]) == (status, True), answer
        async with session.get(f"{mesh.gateway}/v2/health/ready") as ready:
            assert ready.status == 200


async def test_oversize_body_is_rejected_with_413(mesh: RunningMesh) -> None:
    huge = b'{"inputs": [{"name": "features", "data": "' + b"x" * (65 << 20) + b'"}]}'
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{mesh.gateway}/v2/models/mlp/infer", data=huge) as response:
            assert response.status == 413
            assert "exceeded" in orjson.loads(await response.read())["error"]
        async with session.get(f"{mesh.gateway}/v2/health/live") as live:
            assert live.status == 200


def _register(mesh: RunningMesh, name: str, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", "models", "register", name, "--version", version,
         "--artifact", str(mesh.state_dir / "demo-models" / "mlp.pt"),
         "--input", "features:FP32:-1,32", "--output", "probs:FP32:-1,2",
         "--registry", mesh.registry],
        capture_output=True, text=True, timeout=60, env=mesh.env,
    )


async def _infer_until_served(mesh: RunningMesh, path: str, timeout: float = 60) -> dict:  # type: ignore[type-arg]
    features = mlp_input(1)
    async with aiohttp.ClientSession() as session:
        status, body, _ = await wait_for(
            lambda: post_infer(session, f"{mesh.gateway}{path}", infer_body("features", features)),
            lambda answer: answer[0] == 200, timeout=timeout, what=f"a 200 from POST {path}",
        )
    return body


async def test_a_version_registered_by_the_cli_becomes_servable(mesh: RunningMesh) -> None:
    done = await asyncio.to_thread(_register, mesh, "mlp", "2")
    assert done.returncode == 0, done.stderr
    body = await _infer_until_served(mesh, "/v2/models/mlp/versions/2/infer")
    assert body["model_version"] == "2"


async def test_a_new_model_is_served_by_a_worker_started_later(mesh: RunningMesh) -> None:
    done = await asyncio.to_thread(_register, mesh, "mlp-copy", "1")
    assert done.returncode == 0, done.stderr
    body = await _infer_until_served(mesh, "/v2/models/mlp-copy/infer")
    assert (body["model_name"], body["model_version"]) == ("mlp-copy", "1")
    client = connect_client(mesh.env["INFERMESH_ETCD_URL"])
    async with client:
        workers = await client.get_prefix(f"{mesh.prefix}endpoints/worker/".encode())
    serving = [orjson.loads(kv.value)["models"] for kv in workers]
    assert ["mlp-copy/1"] in serving  # its own worker process, found through etcd


def _edge_reloads(mesh: RunningMesh) -> list[str]:
    """The launcher's lines saying which bounds per model the edge now runs with (each
    logged once nginx's old workers stopped taking connections)."""
    return [line for line in list(mesh.output) if "edge: bounds per model now" in line]


async def test_an_edge_bound_set_through_the_registry_reaches_the_running_edge(
    mesh: RunningMesh,
) -> None:
    """`infermesh models batching M V --edge-inflight N` reloads the edge: past N, nginx
    refuses the model's requests itself. The demo mlp's own 64 is in force from the start.
    On the model of the test above (re-registering it is a no-op)."""
    await wait_for(lambda: _edge_reloads(mesh), lambda lines: "'mlp': 64" in lines[0],
                   timeout=30, what="the demo mlp's bound applied at the edge")
    assert (await asyncio.to_thread(_register, mesh, "mlp-copy", "1")).returncode == 0
    await _infer_until_served(mesh, "/v2/models/mlp-copy/infer")
    assert (await asyncio.to_thread(_edge_inflight, mesh, "2")).returncode == 0
    try:
        await wait_for(lambda: _edge_reloads(mesh), lambda lines: "'mlp-copy': 2" in lines[-1],
                       timeout=30, what="the new bound applied at the edge")
        # One HTTP/2 connection, 48 streams at once (h2load: httpx fails a stream that nginx
        # answers before it has sent the body): nginx lets 2 through at a time.
        codes = await asyncio.to_thread(_h2_burst, mesh, "/v2/models/mlp-copy/infer", 48)
        assert codes["2xx"] > 0 and codes["5xx"] > 0, codes
        assert codes["2xx"] + codes["5xx"] == 48, codes
    finally:
        assert (await asyncio.to_thread(_edge_inflight, mesh, "default")).returncode == 0
    await wait_for(lambda: _edge_reloads(mesh), lambda lines: "mlp-copy" not in lines[-1],
                   timeout=30, what="the bound gone at the edge")


def _h2_burst(mesh: RunningMesh, path: str, streams: int) -> dict[str, int]:
    """h2load's count of answers by status class for `streams` POSTs at once on one HTTP/2
    connection to the edge."""
    with tempfile.NamedTemporaryFile(suffix=".json") as body:
        body.write(infer_body("features", mlp_input(1)))
        body.flush()
        done = subprocess.run(
            ["h2load", "-n", str(streams), "-c", "1", "-m", str(streams), "-d", body.name,
             "-H", "content-type: application/json",
             f"http://127.0.0.1:{mesh.edge_port}{path}"],
            capture_output=True, text=True, timeout=60,
        )
    line = next(line for line in done.stdout.splitlines() if line.startswith("status codes:"))
    # "status codes: 46 2xx, 0 3xx, 0 4xx, 2 5xx"
    return {part.split()[1]: int(part.split()[0]) for part in line[13:].split(",")}


def _edge_inflight(mesh: RunningMesh, bound: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", "models", "batching", "mlp-copy", "1",
         "--edge-inflight", bound, "--registry", mesh.registry],
        capture_output=True, text=True, timeout=60, env=mesh.env,
    )


async def _router_pids(mesh: RunningMesh) -> set[int]:
    client = connect_client(mesh.env["INFERMESH_ETCD_URL"])
    async with client:
        found = await client.get_prefix(f"{mesh.prefix}endpoints/router/".encode())
    return {int(orjson.loads(kv.value)["instance"].rsplit("-", 1)[1]) for kv in found}


async def test_a_crashed_service_is_restarted_and_serving_resumes(mesh: RunningMesh) -> None:
    (old,) = await _router_pids(mesh)
    os.kill(old, signal.SIGKILL)
    body = await _infer_until_served(mesh, "/v2/models/mlp/infer", timeout=60)
    assert body["model_name"] == "mlp"
    # Served through a live router, so the supervisor's new one is registered (the dead one's
    # key may linger until its lease expires).
    assert (await _router_pids(mesh)) - {old}


async def test_infermesh_trace_prints_a_served_requests_waterfall(mesh: RunningMesh) -> None:
    """No collector configured: `infermesh up` keeps spans under its state dir."""
    sampled = "00-" + "7" * 32 + "-" + "1" * 16 + "-01"
    async with aiohttp.ClientSession() as session:
        status, body, _ = await post_infer(
            session, f"{mesh.gateway}/v2/models/mlp/infer", infer_body("features", mlp_input(1)),
            headers={"traceparent": sampled},
        )
    assert status == 200, body
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cli", "trace", body["id"],
         "--state-dir", str(mesh.state_dir), "--wait", "15"],
        capture_output=True, text=True, timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"trace {'7' * 32}" in shown.stdout
    for hop in ("gateway.infer", "router.route", "batcher.queue", "batcher.batch",
                "worker.compute"):
        assert hop in shown.stdout, shown.stdout
    assert "queue_wait_ms=" in shown.stdout and "tenant=" in shown.stdout


async def test_a_burst_past_the_deadline_is_refused_at_once_not_answered_late(
    mesh: RunningMesh,
) -> None:
    """Issue 14: 160 single-row encoder requests at once with a 1 s deadline. The encoder runs
    about a hundred rows a second on two idle cores (fewer on a busy one), so most of the burst
    cannot be met: those are refused with 503 + Retry-After when they arrive, not answered 504
    after waiting for their deadline; what is admitted is answered in time."""
    deadline_s, burst = 1.0, 160
    url = f"{mesh.gateway}/v2/models/encoder/versions/1/infer"

    async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, float, dict[str, str]]:
        body = infer_body("input_ids", encoder_input(1, seed=i),
                          parameters={"timeout": deadline_s})
        sent = asyncio.get_running_loop().time()
        status, _, headers = await post_infer(session, url, body)
        return status, asyncio.get_running_loop().time() - sent, headers

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        outcomes = await asyncio.gather(*(one(session, i) for i in range(burst)))
    by_status: dict[int, list[float]] = {}
    for status, took, _ in outcomes:
        by_status.setdefault(status, []).append(took)
    assert set(by_status) <= {200, 503, 504}, {s: len(t) for s, t in by_status.items()}
    refused = sorted(by_status.get(503, []))
    assert refused, f"nothing refused: {({s: len(t) for s, t in by_status.items()})}"
    assert all("retry-after" in h for s, _, h in outcomes if s == 503)
    # Refused on arrival: the first quarter of the refusals comes back well before the
    # deadline (a request left to wait for it would come back at 1 s). Not the median, and
    # not within half the deadline: beside two CPU hogs the refusals came in two clusters,
    # 0.11-0.13 s and 0.56-0.57 s once, 5 at 0.14 s and 115 at 0.62-0.64 s another time (a
    # stall of the machine mid-burst, the second cluster the larger), and the client's own
    # 160 connections take a while on a busy machine.
    assert refused[len(refused) // 4] < deadline_s * 0.75, f"first-quarter refusal {refused}"
    # Not answered late: a 504 means an admitted request missed; the latency model and the
    # gateway's sojourn refuse most of those up front. The prediction is made before the
    # burst runs, so a machine that stalls mid-burst turns admitted requests into 504s: none
    # of 160 did in four idle runs; beside two CPU hogs (tests/README.md, "Under load") 21
    # did once, the encoder's two intra-op threads falling far behind its warm-up timings. A
    # quarter of the burst bounds that; the refusals above are the behaviour under test.
    assert len(by_status.get(504, [])) <= burst // 4, {s: len(t) for s, t in by_status.items()}
    assert by_status.get(200), "nothing admitted"
