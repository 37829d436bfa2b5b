"""The Triton backend against a real `tritonserver` (pytriton's, on CPU) serving the demo mlp.

The server (`triton_fixture.py`) runs a numpy replica of the demo mlp with the TorchScript
artifact's weights, so its outputs are compared with the TorchScript backend's: equal within
`ATOL` (float32 matmuls summed in another order). The last test serves a `triton` version
through the mesh: a real worker process, found through real etcd, behind a real batcher core
over real links.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from deploy.supervisor import Supervised
from services.batcher.core import Batcher
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import BatchingPolicy, InferRequest, ModelVersion, Signature
from services.mesh.infra.credentials import MeshCredential
from services.mesh.infra.digests import sha256_of
from services.mesh.infra.etcd import ConfigCache, connect_client
from services.mesh.transport.linked import LinkedWorkerPool
from services.mesh.transport.peers import LinkPool
from services.worker.backends.base import BackendError, InputRejected
from services.worker.backends.torchscript import TorchScriptBackend
from services.worker.backends.triton import TritonBackend
from services.worker.demo_models import DemoModel
from tests.waiting import wait_for
from tests.worker.triton_fixture import TritonServer, export_mlp_weights, free_port, running_triton

pytestmark = [
    pytest.mark.timeout(300),  # the first run on a machine makes the pytriton venv
    pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning"),
]

ATOL = 1e-5
"""Largest difference allowed between Triton's and TorchScript's probabilities."""
START = 90.0
"""Seconds a worker process may take to start, load and warm up on a busy 2-core machine."""


@pytest.fixture(scope="module")
def mlp(demo_models: dict[str, DemoModel]) -> DemoModel:
    return demo_models["mlp"]


@pytest.fixture(scope="module")
def triton(mlp: DemoModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    workdir = tmp_path_factory.mktemp("triton")
    weights = export_mlp_weights(mlp.artifact, workdir / "mlp.npz")
    with running_triton(weights, workdir) as server:
        yield server


def reference(directory: Path, url: str, **fields: Any) -> Path:
    """A Triton reference file (the `triton` version's artifact) naming model mlp version 1."""
    path = directory / "mlp.triton.json"
    path.write_text(json.dumps({"url": url, "model": "mlp", "version": "1", **fields}))
    return path


def backend(mlp: DemoModel, url: str, *, signature: dict[str, Any] | None = None,
            timeout: float = 30.0) -> TritonBackend:
    return TritonBackend(Signature.from_json(signature or mlp.signature), triton_urls=(url,),
                         timeout=timeout)


def torchscript_probs(mlp: DemoModel, features: np.ndarray) -> np.ndarray:
    reference_backend = TorchScriptBackend(mlp.signature, device_policy="cpu")
    reference_backend.load(mlp.artifact)
    probs: np.ndarray = reference_backend.run_batch({"features": features})["probs"]
    return probs


def test_outputs_equal_the_torchscript_reference(
    mlp: DemoModel, triton: TritonServer, tmp_path: Path
) -> None:
    served = backend(mlp, triton.url)
    served.load(reference(tmp_path, triton.url))
    try:
        timings = served.warm_up(8)
        features = np.random.default_rng(7).normal(size=(16, 32)).astype(np.float32)
        probs = served.run_batch({"features": features})["probs"]
    finally:
        served.unload()
    assert sorted(timings) == [1, 2, 3, 4, 7, 8] and served.device == "triton"
    assert probs.shape == (16, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, torchscript_probs(mlp, features), rtol=0, atol=ATOL)


@pytest.mark.parametrize(("change", "named"), [
    ({"inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 16]}]},
     "input 'features': shape [-1, 32] at Triton, [-1, 16] in the signature"),
    ({"inputs": [{"name": "features", "datatype": "FP64", "shape": [-1, 32]}]},
     "input 'features': datatype FP32 at Triton, FP64 in the signature"),
    ({"outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]},
     "output 'logits': model 'mlp' version '1' at Triton has no such output"),
])
def test_a_metadata_mismatch_is_refused_naming_the_field(
    mlp: DemoModel, triton: TritonServer, tmp_path: Path, change: dict[str, Any], named: str
) -> None:
    served = backend(mlp, triton.url, signature={**mlp.signature, **change})
    with pytest.raises(BackendError) as caught:
        served.load(reference(tmp_path, triton.url))
    assert named in str(caught.value)


def test_bad_input_unknown_models_and_timeouts_are_clear_errors(
    mlp: DemoModel, triton: TritonServer, tmp_path: Path
) -> None:
    served = backend(mlp, triton.url)
    with pytest.raises(BackendError, match="model 'mlp' version '7' is not ready"):
        served.load(reference(tmp_path, triton.url, version="7"))
    served.load(reference(tmp_path, triton.url))
    try:
        with pytest.raises(InputRejected, match="unexpected shape for input 'features'") as bad:
            served.run_batch({"features": np.ones((3, 31), dtype=np.float32)})
        with pytest.raises(BackendError, match="max_batch_size: 65 is more than"):
            served.warm_up(65)
    finally:
        served.unload()
    assert "/" not in str(bad.value).split("model 'mlp'")[0]  # one line, no paths

    # A server that takes the connection and never speaks: the call can only end at its
    # deadline. (A 1 µs deadline against the real server was not deterministic: under two CPU
    # hogs one load went through.)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        mute = f"127.0.0.1:{silent.getsockname()[1]}"
        hurried = TritonBackend(Signature.from_json(mlp.signature), triton_urls=(mute,),
                                timeout=0.3)
        with pytest.raises(BackendError, match=f"Triton server {mute} did not answer within"):
            hurried.load(reference(tmp_path, mute))


def test_a_server_that_is_down_is_a_clear_error(mlp: DemoModel, tmp_path: Path) -> None:
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(BackendError, match=f"Triton server {down} is unavailable"):
        backend(mlp, down, timeout=10).load(reference(tmp_path, down))


def test_a_server_not_configured_is_refused(mlp: DemoModel, tmp_path: Path) -> None:
    served = TritonBackend(Signature.from_json(mlp.signature), triton_urls=("10.0.0.1:8001",))
    with pytest.raises(BackendError, match="url: Triton server 'evil.example:8001' is not one"):
        served.load(reference(tmp_path, "grpc://evil.example:8001"))
    with pytest.raises(BackendError, match="model: must be"):
        served.load(reference(tmp_path, "10.0.0.1:8001", model="../etc"))


@contextlib.asynccontextmanager
async def mesh(
    etcd_url: str, etcd_prefix: str, credential_file: Path, record: ModelVersion,
    env: dict[str, str], log_dir: Path,
) -> AsyncIterator[tuple[Batcher, ConfigCache]]:
    """`record` in etcd, one worker process serving it, a batcher core linked to it."""
    etcd = connect_client(etcd_url)
    await etcd.put(f"{etcd_prefix}models/mlp/1".encode(), orjson.dumps(record.to_json()))
    worker = Supervised("worker-triton", ["-m", "services.worker"], log_dir=log_dir, env={
        **os.environ, **env, "INFERMESH_ETCD_URL": etcd_url, "INFERMESH_ETCD_PREFIX": etcd_prefix,
        "INFERMESH_MESH_CREDENTIAL_FILE": str(credential_file),
        "INFERMESH_WORKER_MODELS": "mlp/1",
    })
    config = ConfigCache(etcd, etcd_prefix)
    credential = await asyncio.to_thread(MeshCredential.load, credential_file)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(etcd.close)
        worker.start()
        stack.push_async_callback(worker.stop, now=True)
        await config.start()
        stack.push_async_callback(config.aclose)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        links = LinkPool(session, config, "worker", credential=credential)
        links.start()
        stack.push_async_callback(links.aclose)
        batcher = Batcher(ModelCatalog(config), LinkedWorkerPool(links))
        batcher.start()
        stack.push_async_callback(batcher.aclose)
        yield batcher, config


async def test_a_triton_version_serves_through_the_mesh(
    mlp: DemoModel, triton: TritonServer, etcd_url: str, etcd_prefix: str,
    mesh_credential_file: Path, tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    artifact = await asyncio.to_thread(reference, store, f"grpc://{triton.url}")
    record = ModelVersion(
        "mlp", "1", Signature.from_json(mlp.signature), artifact.as_uri(),
        await asyncio.to_thread(sha256_of, artifact), platform="triton",
        batching=BatchingPolicy.from_json(mlp.batching),
    )
    env = {"INFERMESH_WORKER_ARTIFACT_STORES": store.as_uri(),
           "INFERMESH_WORKER_CACHE_DIR": str(tmp_path / "cache"),
           "INFERMESH_WORKER_TRITON_URLS": triton.url}
    features = np.random.default_rng(11).normal(size=(4, 32)).astype(np.float32)
    expected = await asyncio.to_thread(torchscript_probs, mlp, features)
    async with mesh(etcd_url, etcd_prefix, mesh_credential_file, record, env, tmp_path) as (
        batcher, config
    ):
        await wait_for(lambda: [r for r in config.items("endpoints/worker/").values()
                                if "mlp/1" in r.get("models", ())],
                       timeout=START, what="a worker serving mlp/1 through Triton")
        answers = await asyncio.gather(*(batcher.infer(InferRequest(
            "mlp", [Tensor.from_array("features", features[i:i + 1])], request_id=f"r{i}",
            version="1", deadline=time.time() + 30)) for i in range(len(features))))
    probs = np.concatenate([answer.outputs[0].array() for answer in answers])
    assert [answer.version for answer in answers] == ["1"] * len(features)
    np.testing.assert_allclose(probs, expected, rtol=0, atol=ATOL)
