"""Outputs nobody asked for are dropped at the worker, not copied back through every hop; and
the batcher hands each member only the outputs it asked for."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import orjson
import pytest

from services.batcher.batches import build_batch, wanted_outputs
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import InferRequest, ModelVersion, Rollout, Signature, TensorSpec
from services.mesh.transport.frames import decode_batch, encode_batch
from services.worker.artifacts import ArtifactCache
from services.worker.core import Worker

SIGNATURE = Signature(
    (TensorSpec("x", "FP32", (-1, 2)),),
    (TensorSpec("sum", "FP32", (-1, 1)), TensorSpec("double", "FP32", (-1, 2))),
)


class TwoOutputs:
    """A backend answering `sum` (per row) and `double` of its input."""

    device = "cpu"

    def load(self, artifact: Path) -> None:
        pass

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        return {}

    def unload(self) -> None:
        pass

    def run_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        x = inputs["x"]
        return {"sum": x.sum(axis=1, keepdims=True), "double": x * 2}


@pytest.fixture
def record(tmp_path: Path) -> ModelVersion:
    artifact = tmp_path / "model.pt"
    artifact.write_bytes(b"two outputs")
    sha256 = hashlib.sha256(b"two outputs").hexdigest()
    return ModelVersion("m", "1", SIGNATURE, f"file://{artifact}", sha256, device="cpu")


@pytest.fixture
async def worker(record: ModelVersion, tmp_path: Path) -> AsyncIterator[Worker]:
    config = StaticConfig({"rollouts/m": Rollout.stable("m", "1").to_json(),
                           "models/m/1": record.to_json()})
    async with aiohttp.ClientSession() as session:
        worker = Worker(ModelCatalog(config), models=("m",),
                        artifacts=ArtifactCache(session, tmp_path / "cache",
                                                stores=[tmp_path.as_uri()]),
                        backend_factory=lambda spec: TwoOutputs())
        ready = asyncio.Event()
        worker.subscribe(ready.set)
        worker.start()
        async with asyncio.timeout(10):
            while not worker.is_ready("m", "1"):
                await ready.wait()
                ready.clear()
        yield worker
        await worker.aclose()


def request(request_id: str, outputs: list[str] | None) -> InferRequest:
    tensor = Tensor.from_array("x", np.array([[1.0, 2.0]], dtype=np.float32))
    return InferRequest("m", [tensor], request_id=request_id, outputs=outputs)


def test_a_batch_asks_for_the_union_of_its_members_outputs() -> None:
    assert wanted_outputs([request("a", ["sum"]), request("b", ["double", "sum"])]) == [
        "sum", "double"
    ]
    assert wanted_outputs([request("a", ["sum"]), request("b", None)]) is None


async def test_the_worker_returns_only_the_outputs_a_batch_asks_for(worker: Worker) -> None:
    only_sum = build_batch("m", "1", [request("a", ["sum"]), request("b", ["sum"])])
    result = await worker.run_batch(only_sum)
    assert [t.name for t in result.outputs] == ["sum"]
    assert result.outputs[0].array().tolist() == [[3.0], [3.0]]
    every = build_batch("m", "1", [request("a", ["sum"]), request("b", None)])
    assert [t.name for t in (await worker.run_batch(every)).outputs] == ["sum", "double"]


def test_the_wanted_outputs_cross_the_link_with_the_batch() -> None:
    batch = build_batch("m", "1", [request("a", ["sum"])])
    meta, buffers = encode_batch(batch)
    received = decode_batch(orjson.loads(orjson.dumps(meta)), memoryview(b"".join(buffers)))
    assert received.outputs == ["sum"]
