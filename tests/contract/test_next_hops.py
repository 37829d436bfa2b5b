"""One contract for both implementations of each next hop (services/mesh/domain/hops.py).

Every case runs against the in-process implementation and the link implementation of
`InferTarget` (a `Batcher` core called directly / `LinkedInferTarget` -> `LinkServer` ->
`infer_handler(batcher)`) and of `WorkerPool` (`LocalWorkerPool` / `LinkedWorkerPool` ->
`LinkServer` -> `batch_handler(worker core)`), built in `hops` and `conftest`. The contract:

success       the answer round-trips exactly: model, version, request id, tensor names,
              datatypes, shapes and bytes; the callee sees the caller's tensors byte for byte.
invalid input the callee's InvalidInput reaches the caller as InvalidInput (that very class,
              not InternalError) with the same message.
deadline      a call whose deadline has already passed (`InferRequest.deadline` in the past,
              `run_batch(timeout <= 0)`) fails with DeadlineExceeded and no batch is computed
              for it; a deadline that passes while the callee works fails the call with
              DeadlineExceeded at the deadline (not when the callee finishes) and the worker
              core's computation is cancelled.
peer gone     a callee that goes away with a call in flight (its process shuts down or dies)
              fails that call with Unavailable (LinkClosed over a link) promptly, never a hang;
              later calls fail with Unavailable at once. A WorkerPool stops listing a gone
              worker and tells its subscribers, and a handle taken earlier raises Unavailable.
cancellation  cancelling the caller's task mid-call raises CancelledError in it promptly, leaves
              no call in flight on the transport, and the next call succeeds. A WorkerPool
              cancels the worker core's computation; a batcher finishes the batch for its
              other members and drains cleanly with nothing left pending.

"Promptly" is well inside the 5 s every wait here is bounded by.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from services.mesh.domain.errors import DeadlineExceeded, InvalidInput, Unavailable
from services.mesh.domain.hops import WorkerHandle
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import Batch, InferRequest, InferResponse
from tests.contract.hops import (
    DEVICE,
    MODEL,
    REJECTION,
    VERSION,
    WARMUP,
    InferHop,
    WorkerHop,
    rows,
)

WAIT = 5.0
PROMPT = 2.0
"""Seconds within which a failure that the contract calls prompt must arrive."""


def infer_request(
    values: np.ndarray, *, request_id: str = "req-1", deadline: float | None = None,
    name: str = "x",
) -> InferRequest:
    return InferRequest(
        model=MODEL, version=VERSION, request_id=request_id, tenant="acme",
        inputs=[Tensor.from_array(name, values)], deadline=deadline,
    )


def batch(values: np.ndarray, *, name: str = "x") -> Batch:
    return Batch(MODEL, VERSION, [Tensor.from_array(name, values)], rows=[len(values)])


def assert_tensor(tensor: Tensor, name: str, values: np.ndarray) -> None:
    assert (tensor.name, tensor.datatype, tuple(tensor.shape)) == (name, "FP32", values.shape)
    assert bytes(tensor.data) == values.tobytes()


async def infer(hop: InferHop, request: InferRequest) -> InferResponse:
    return await asyncio.wait_for(hop.target.infer(request), WAIT)


# -- InferTarget ---------------------------------------------------------------------------


async def test_infer_round_trips_the_answer_exactly(infer_hop: InferHop) -> None:
    values = rows(1.0, 2.0, 3.0)
    response = await infer(infer_hop, infer_request(values, request_id="req-7"))

    assert (response.model, response.version, response.request_id) == (MODEL, VERSION, "req-7")
    [output] = response.outputs
    assert_tensor(output, "y", values * 2)
    [seen] = infer_hop.worker.batches
    assert_tensor(seen.inputs[0], "x", values)


async def test_infer_passes_invalid_input_through_as_itself(infer_hop: InferHop) -> None:
    with pytest.raises(InvalidInput) as caught:
        await infer(infer_hop, infer_request(rows(1.0), name="bad"))
    assert type(caught.value) is InvalidInput
    assert caught.value.message == REJECTION


async def test_infer_past_its_deadline_fails_without_computing(infer_hop: InferHop) -> None:
    with pytest.raises(DeadlineExceeded):
        await infer(infer_hop, infer_request(rows(1.0), deadline=time.time() - 1.0))
    assert infer_hop.worker.batches == []
    # The hop is still usable.
    response = await infer(infer_hop, infer_request(rows(2.0)))
    assert_tensor(response.outputs[0], "y", rows(2.0) * 2)


async def test_infer_fails_at_a_deadline_passing_while_the_callee_works(
    infer_hop: InferHop,
) -> None:
    infer_hop.worker.hold()
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await infer(infer_hop, infer_request(rows(1.0), deadline=time.time() + 0.2))
    assert time.monotonic() - started < PROMPT
    await asyncio.wait_for(infer_hop.worker.cancelled.wait(), WAIT)


async def test_infer_fails_with_unavailable_when_the_callee_goes_away(
    infer_hop: InferHop,
) -> None:
    infer_hop.worker.hold()
    call = asyncio.create_task(infer_hop.target.infer(infer_request(rows(1.0))))
    await asyncio.wait_for(infer_hop.worker.started.wait(), WAIT)
    await asyncio.wait_for(infer_hop.kill(), WAIT)

    with pytest.raises(Unavailable):
        await asyncio.wait_for(call, PROMPT)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(infer_hop.target.infer(infer_request(rows(2.0))), PROMPT)


async def test_infer_cancelled_by_its_caller_leaves_nothing_behind(infer_hop: InferHop) -> None:
    infer_hop.worker.hold()
    call = asyncio.create_task(infer_hop.target.infer(infer_request(rows(1.0))))
    await asyncio.wait_for(infer_hop.worker.started.wait(), WAIT)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, PROMPT)
    assert infer_hop.inflight() == 0

    infer_hop.worker.release()
    response = await infer(infer_hop, infer_request(rows(2.0), request_id="req-2"))
    assert response.request_id == "req-2"
    assert_tensor(response.outputs[0], "y", rows(2.0) * 2)
    # The batcher finishes and drains; nothing of the cancelled request stays pending.
    await asyncio.wait_for(infer_hop.batcher.aclose(), PROMPT)
    assert infer_hop.pending() == 0


# -- WorkerPool ----------------------------------------------------------------------------


def only_candidate(hop: WorkerHop) -> WorkerHandle:
    [handle] = hop.pool.candidates(MODEL, VERSION)
    return handle


async def test_worker_pool_lists_the_worker_and_round_trips_a_batch(
    worker_hop: WorkerHop,
) -> None:
    assert worker_hop.pool.candidates(MODEL, "2") == []
    handle = only_candidate(worker_hop)
    assert handle.key == worker_hop.worker.key
    values = rows(1.0, 2.0)

    result = await asyncio.wait_for(handle.run_batch(batch(values), timeout=WAIT), WAIT)

    assert result.device == DEVICE
    [output] = result.outputs
    assert_tensor(output, "y", values * 2)
    [seen] = worker_hop.worker.batches
    assert (seen.model, seen.version, seen.rows) == (MODEL, VERSION, [2])
    assert_tensor(seen.inputs[0], "x", values)


def test_a_worker_handle_gives_the_warm_up_timings_of_its_worker(
    worker_hop: WorkerHop,
) -> None:
    # In-process straight from the worker core; over a link from its endpoint record.
    handle = only_candidate(worker_hop)
    assert handle.warmup_timings(MODEL, VERSION) == WARMUP
    assert handle.warmup_timings(MODEL, "2") == {}


def test_a_worker_handle_says_whether_the_version_is_loaded_on_its_worker(
    worker_hop: WorkerHop,
) -> None:
    # In-process from the worker core; over a link from its endpoint record's `resident`.
    handle = only_candidate(worker_hop)
    assert handle.resident(MODEL, VERSION)
    assert not handle.resident(MODEL, "2")


async def test_worker_pool_passes_invalid_input_through_as_itself(
    worker_hop: WorkerHop,
) -> None:
    handle = only_candidate(worker_hop)
    with pytest.raises(InvalidInput) as caught:
        await asyncio.wait_for(handle.run_batch(batch(rows(1.0), name="bad"), timeout=WAIT), WAIT)
    assert type(caught.value) is InvalidInput
    assert caught.value.message == REJECTION


@pytest.mark.parametrize("timeout", [0.0, -1.0])
async def test_worker_pool_past_its_deadline_fails_without_computing(
    worker_hop: WorkerHop, timeout: float,
) -> None:
    handle = only_candidate(worker_hop)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(handle.run_batch(batch(rows(1.0)), timeout=timeout), WAIT)
    assert worker_hop.worker.batches == []


async def test_worker_pool_fails_at_a_deadline_passing_while_the_worker_computes(
    worker_hop: WorkerHop,
) -> None:
    worker_hop.worker.hold()
    handle = only_candidate(worker_hop)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(handle.run_batch(batch(rows(1.0)), timeout=0.2), WAIT)
    assert time.monotonic() - started < PROMPT
    await asyncio.wait_for(worker_hop.worker.cancelled.wait(), WAIT)
    assert worker_hop.inflight() == 0


async def test_worker_pool_fails_with_unavailable_and_forgets_a_worker_that_goes_away(
    worker_hop: WorkerHop,
) -> None:
    worker_hop.worker.hold()
    handle = only_candidate(worker_hop)
    changed = asyncio.Event()
    worker_hop.pool.subscribe(changed.set)
    call = asyncio.create_task(handle.run_batch(batch(rows(1.0)), timeout=None))
    await asyncio.wait_for(worker_hop.worker.started.wait(), WAIT)
    await asyncio.wait_for(worker_hop.kill(), WAIT)

    with pytest.raises(Unavailable):
        await asyncio.wait_for(call, PROMPT)
    await asyncio.wait_for(changed.wait(), PROMPT)
    assert worker_hop.pool.candidates(MODEL, VERSION) == []
    with pytest.raises(Unavailable):
        await asyncio.wait_for(handle.run_batch(batch(rows(2.0)), timeout=None), PROMPT)


async def test_worker_pool_cancelled_by_its_caller_cancels_the_computation(
    worker_hop: WorkerHop,
) -> None:
    worker_hop.worker.hold()
    handle = only_candidate(worker_hop)
    call = asyncio.create_task(handle.run_batch(batch(rows(1.0)), timeout=None))
    await asyncio.wait_for(worker_hop.worker.started.wait(), WAIT)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, PROMPT)
    assert worker_hop.inflight() == 0
    await asyncio.wait_for(worker_hop.worker.cancelled.wait(), WAIT)

    worker_hop.worker.release()
    result = await asyncio.wait_for(handle.run_batch(batch(rows(2.0)), timeout=WAIT), WAIT)
    assert_tensor(result.outputs[0], "y", rows(2.0) * 2)
    assert worker_hop.worker.running == 0
