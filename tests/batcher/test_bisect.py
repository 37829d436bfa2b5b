"""A batch the model fails on is re-run in halves, so that only the requests at fault fail:
first against a fake worker that fails any batch holding a marked request, then with the real
demo encoder on a real worker core, fed a token id past its vocabulary."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.batcher.core import Batcher
from services.batcher.metrics import BatcherMetrics
from services.batcher.workers import LocalWorkerPool
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import (
    DeadlineExceeded,
    InfermeshError,
    InvalidInput,
    ModelFailed,
    Unavailable,
)
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    BatchingPolicy,
    InferRequest,
    InferResponse,
    ModelVersion,
    Rollout,
    Signature,
)
from services.mesh.infra.digests import sha256_of
from services.mesh.transport.rest import status_of
from services.worker.artifacts import ArtifactCache
from services.worker.core import Worker
from services.worker.demo_models import DemoModel, build_demo_models
from services.worker.factory import backend_factory
from tests.batcher.fakes import (
    MODEL,
    VERSION,
    BatcherFactory,
    FakePool,
    RejectingWorker,
    request,
    submit_all,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

OFFENDER = -1000.0
"""`request(OFFENDER)` holds negative values: `RejectingWorker` fails any batch holding it."""

Outcome = list[InferResponse | BaseException]


async def _as_one_batch(
    batcher: Batcher, worker: RejectingWorker, requests: list[InferRequest]
) -> Outcome:
    """Queue `requests` behind a held batch so that they leave together, and wait for all."""
    worker.hold()
    blocker = asyncio.create_task(batcher.infer(request(100.0)))
    await worker.next_batch()
    tasks = await submit_all(batcher, requests)
    worker.release()
    async with asyncio.timeout(30):
        await asyncio.gather(blocker, return_exceptions=True)
        return list(await asyncio.gather(*tasks, return_exceptions=True))


def _splits(metrics: BatcherMetrics) -> float:
    value = metrics.registry.get_sample_value(
        "infermesh_batcher_batch_splits_total", {"model": MODEL, "version": VERSION}
    )
    return value or 0.0


REJECTED = "the model rejected the input: RuntimeError: index out of range in self"


@pytest.mark.parametrize(("error", "named"), [
    # The model names the input's fault: the offender is told just that, as the worker said it.
    (lambda: InvalidInput(REJECTED), REJECTED),
    # The model fails without blaming the input, but runs every other request: the input is at
    # fault, and the error names the request.
    (lambda: ModelFailed("the model failed: RuntimeError: boom"),
     "model rejected the input of request 'r-1000.0': the model failed: RuntimeError: boom"),
])
async def test_one_rejected_request_fails_alone_and_the_others_get_their_outputs(
    make_batcher: BatcherFactory, metrics: BatcherMetrics, recorded_spans: InMemorySpanExporter,
    error: Callable[[], InfermeshError], named: str,
) -> None:
    worker = RejectingWorker(error=error)
    batcher = make_batcher(FakePool(worker), pipeline_depth=1)
    good = [request(float(i)) for i in range(1, 9)]
    outcome = await _as_one_batch(batcher, worker, [*good[:4], request(OFFENDER), *good[4:]])

    assert worker.batches[1].rows == [1] * 9  # all nine left as one batch
    for sent, answer in zip(good, outcome[:4] + outcome[5:], strict=True):
        assert isinstance(answer, InferResponse), answer
        np.testing.assert_array_equal(answer.outputs[0].array(), sent.inputs[0].array())
    rejected = outcome[4]
    assert type(rejected) is InvalidInput and status_of(rejected) == 400
    assert rejected.message == named
    # Each split adds two runs; a binary tree over 9 members has at most 2 * 9 - 1 nodes.
    runs = len(worker.batches) - 1
    splits = _splits(metrics)
    assert splits >= 1 and runs == 1 + 2 * splits <= 2 * 9 - 1
    assert [b.rows for b in worker.batches[1:] if worker.rejects(b)][-1] == [1]  # ran alone
    batch_span = next(s for s in recorded_spans.get_finished_spans()
                      if s.name == "batcher.batch"
                      and (s.attributes or {}).get("infermesh.batch_requests") == 9)
    assert (batch_span.attributes or {})["infermesh.batch_splits"] == splits


@pytest.mark.parametrize(("error", "expected", "status"), [
    # No request ran: the model is broken, not the inputs.
    (lambda: ModelFailed("the model failed: RuntimeError: broken"), ModelFailed, 500),
    # The model itself blames every input: each request is told its input was rejected.
    (lambda: InvalidInput(REJECTED), InvalidInput, 400),
])
async def test_a_model_failing_on_every_input_fails_every_request_in_bounded_runs(
    make_batcher: BatcherFactory, metrics: BatcherMetrics,
    error: Callable[[], InfermeshError], expected: type[InfermeshError], status: int,
) -> None:
    worker = RejectingWorker(everything=True, error=error)
    batcher = make_batcher(FakePool(worker), pipeline_depth=1)
    outcome = await _as_one_batch(batcher, worker, [request(float(i)) for i in range(1, 10)])

    assert worker.batches[1].rows == [1] * 9
    for answer in outcome:
        assert type(answer) is expected and status_of(answer) == status
    # Every member ends alone: the full tree, 2n - 1 runs and n - 1 splits for n = 9.
    assert len(worker.batches) - 1 == 2 * 9 - 1
    assert _splits(metrics) == 9 - 1


@pytest.mark.parametrize(("error", "runs"), [
    (lambda: DeadlineExceeded("deadline exceeded waiting for worker w1"), 1),
    (lambda: Unavailable("worker w1 went away"), 2),  # re-dispatched once, as before
])
async def test_a_batch_failing_for_another_reason_than_its_inputs_is_not_split(
    make_batcher: BatcherFactory, metrics: BatcherMetrics,
    error: Callable[[], InfermeshError], runs: int,
) -> None:
    worker = RejectingWorker(everything=True, error=error)
    batcher = make_batcher(FakePool(worker), pipeline_depth=1)
    outcome = await _as_one_batch(batcher, worker, [request(float(i)) for i in range(1, 10)])

    assert all(type(answer) is type(error()) for answer in outcome)
    # Whole batches only (the blocker, failed and re-queued too, may join the second one).
    assert [len(b.rows) >= 9 for b in worker.batches[1:]] == [True] * runs
    assert _splits(metrics) == 0


async def test_a_member_whose_deadline_passed_is_not_run_again(
    make_batcher: BatcherFactory,
) -> None:
    worker = RejectingWorker()
    batcher = make_batcher(FakePool(worker), pipeline_depth=1)
    deadline = time.time() + 0.5
    late = request(3.0, deadline=deadline)
    requests = [request(1.0), request(2.0), late, request(OFFENDER)]
    worker.hold()
    blocker = asyncio.create_task(batcher.infer(request(100.0)))
    await worker.next_batch()
    tasks = await submit_all(batcher, requests)
    worker.step()  # the blocker answers; the four leave as one batch and wait at the gate
    assert (await worker.next_batch()).rows == [1] * 4
    passed = asyncio.Event()  # hold the failing batch until `late`'s deadline has passed
    asyncio.get_running_loop().call_later(max(deadline - time.time(), 0.0) + 0.01, passed.set)
    async with asyncio.timeout(30):
        await passed.wait()
    assert time.time() > deadline
    worker.release()
    async with asyncio.timeout(30):
        await blocker
        outcome = await asyncio.gather(*tasks, return_exceptions=True)

    assert isinstance(outcome[0], InferResponse) and isinstance(outcome[1], InferResponse)
    assert isinstance(outcome[2], DeadlineExceeded)
    assert isinstance(outcome[3], InvalidInput)
    late_rows = [b for b in worker.batches[2:] if (b.inputs[0].array()[:, 0] == 3.0).any()]
    assert late_rows == []  # never re-run past its deadline


# --- the real demo encoder on a real worker core -------------------------------------------

ENCODER_BATCH = 9


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoModel, str]:
    """The demo encoder and its artifact's sha256 (built and hashed off the event loop)."""
    models = build_demo_models(tmp_path_factory.mktemp("bisect_models"))
    model = next(m for m in models if m.name == "encoder")
    return model, sha256_of(model.artifact)


@pytest.fixture
async def encoder_mesh(
    encoder: tuple[DemoModel, str], tmp_path: Path,
) -> AsyncIterator[tuple[Batcher, Worker, BatcherMetrics]]:
    """A batcher over a real worker core serving the encoder in one batch of up to 9."""
    model, sha256 = encoder
    spec = ModelVersion(
        "encoder", "1", Signature.from_json(model.signature), f"file://{model.artifact}",
        sha256, batching=BatchingPolicy(max_batch_size=ENCODER_BATCH, max_queue_delay_ms=10),
        device="cpu",
    )
    config = StaticConfig({"rollouts/encoder": Rollout.stable("encoder", "1").to_json(),
                           "models/encoder/1": spec.to_json()})
    catalog = ModelCatalog(config)
    metrics = BatcherMetrics()
    async with aiohttp.ClientSession() as session:
        worker = Worker(catalog, models=("encoder",),
                        artifacts=ArtifactCache(session, tmp_path / "artifacts",
                                                stores=[model.artifact.parent.as_uri()]),
                        backend_factory=backend_factory())
        # Requests queue until the worker is ready (a long grace), then leave as one batch.
        batcher = Batcher(catalog, LocalWorkerPool(worker), pipeline_depth=1,
                          no_worker_grace=120.0, metrics=metrics)
        batcher.start()
        try:
            yield batcher, worker, metrics
        finally:
            await batcher.aclose()
            await worker.aclose()


def _encoder_request(request_id: str, ids: np.ndarray) -> InferRequest:
    return InferRequest(model="encoder", version="1", request_id=request_id,
                        inputs=[Tensor.from_array("input_ids", ids)])


@pytest.mark.parametrize("bad_id", [1_000_000, -1])
async def test_the_encoder_fails_only_the_request_with_a_token_id_past_its_vocabulary(
    encoder_mesh: tuple[Batcher, Worker, BatcherMetrics], bad_id: int,
) -> None:
    batcher, worker, metrics = encoder_mesh
    rng = np.random.default_rng(13)
    good = [rng.integers(0, 30_522, size=(1, 64), dtype=np.int64) for _ in range(8)]
    bad = rng.integers(0, 30_522, size=(1, 64), dtype=np.int64)
    bad[0, 17] = bad_id
    requests = [_encoder_request(f"good-{i}", ids) for i, ids in enumerate(good[:5])]
    requests += [_encoder_request("bad", bad)]
    requests += [_encoder_request(f"good-{i}", ids) for i, ids in enumerate(good[5:], 5)]
    tasks = [asyncio.create_task(batcher.infer(r)) for r in requests]
    worker.start()
    async with asyncio.timeout(90):
        outcome = await asyncio.gather(*tasks, return_exceptions=True)

    # The first batch held all nine: one observation above 8 rows (buckets ... 8, 16 ...).
    def bucket(le: str) -> float:
        labels = {"model": "encoder", "version": "1", "le": le}
        return metrics.registry.get_sample_value(
            "infermesh_batcher_batch_rows_bucket", labels) or 0.0
    assert bucket("16.0") - bucket("8.0") == 1
    error = outcome[5]
    assert isinstance(error, InvalidInput) and status_of(error) == 400, error
    assert error.message == REJECTED
    for leak in ("Traceback", "/", ".py", "TorchScript", "File "):
        assert leak not in error.message
    answers = outcome[:5] + outcome[6:]
    async with asyncio.timeout(60):
        alone = [await batcher.infer(_encoder_request(f"alone-{i}", ids))
                 for i, ids in enumerate(good)]
    for answer, reference in zip(answers, alone, strict=True):
        assert isinstance(answer, InferResponse), answer
        # A row's embedding does not depend on its batch mates, up to float reassociation.
        np.testing.assert_allclose(answer.outputs[0].array(), reference.outputs[0].array(),
                                   rtol=1e-4, atol=1e-5)
