"""A request's deadline at the gateway: where it comes from, and that nothing is late.

The deadline is the earliest the client gives (`X-Request-Timeout`, `grpc-timeout`, the OIP
`timeout` parameter); a request that gives none gets its version's `default_timeout_ms`, else
the gateway's default. At the deadline the gateway answers 504 even while the router still
works, and an answer that comes back after it is never sent as a success.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.grpc_app import create_grpc_server
from services.mesh.domain import tracing
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    BatchingPolicy,
    InferRequest,
    InferResponse,
    ModelVersion,
    Signature,
    TensorSpec,
)
from tests.fakes import model_records
from tests.gateway.tenancy import FakeClock

SIGNATURE = Signature(
    inputs=(TensorSpec("features", "FP32", (-1, 2)),),
    outputs=(TensorSpec("probs", "FP32", (-1, 2)),),
)
BODY = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
URL = "/v2/models/m/infer"
GATEWAY_DEFAULT = 30.0
LATE = "infermesh_gateway_late_responses_avoided_total"
MISSED = "infermesh_deadline_exceeded_total"
# The 504 is due at the deadline. Past it, only scheduling delay on a loaded two-core machine
# may pass before the client reads it; without the gateway's own timer it never comes (the
# router here hangs), so any bound well under the test's timeout tells the two apart.
MARGIN = 1.0


class Router:
    """Echoes `features` as `probs`; hangs while `hang`; may move the gateway's clock first
    (`late_by`: to that many seconds past the request's deadline, as if it answered late)."""

    def __init__(self) -> None:
        self.seen: list[InferRequest] = []
        self.hang = False
        self.entered = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.clock: FakeClock | None = None
        self.late_by: float | None = None

    async def infer(self, request: InferRequest) -> InferResponse:
        self.seen.append(request)
        self.entered.set()
        if self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if self.late_by is not None and self.clock is not None:
            assert request.deadline is not None
            self.clock.now = request.deadline + self.late_by
        outputs = [Tensor("probs", t.datatype, t.shape, t.data) for t in request.inputs]
        return InferResponse(request.model, request.version or "1", "router-id", outputs)


def config_with(default_timeout_ms: float | None) -> StaticConfig:
    records = model_records("m", SIGNATURE, max_batch_size=4)
    records["models/m/1"] = ModelVersion(
        "m", "1", SIGNATURE, "file:///dev/null", "0" * 64,
        batching=BatchingPolicy(max_batch_size=4, default_timeout_ms=default_timeout_ms),
    ).to_json()
    return StaticConfig(records)


@pytest.fixture
def router() -> Router:
    return Router()


@pytest.fixture
def clock(router: Router) -> FakeClock:
    router.clock = FakeClock()
    return router.clock


Factory = Callable[..., Awaitable[tuple[Gateway, TestClient[Any, Any]]]]


@pytest.fixture
async def make_client(router: Router) -> AsyncIterator[Factory]:
    clients: list[TestClient[Any, Any]] = []

    async def make(
        *, default_timeout_ms: float | None = None, clock: Callable[[], float] = time.time
    ) -> tuple[Gateway, TestClient[Any, Any]]:
        config = config_with(default_timeout_ms)
        core = Gateway(ModelCatalog(config), router, access=Access(config, auth=False),
                       default_timeout=GATEWAY_DEFAULT, clock=clock)
        client = TestClient(TestServer(create_app(core)))
        await client.start_server()
        clients.append(client)
        return core, client

    yield make
    for client in clients:
        await client.close()


def body(timeout: Any = None) -> dict[str, Any]:
    return BODY if timeout is None else {**BODY, "parameters": {"timeout": timeout}}


def sample(core: Gateway, name: str, labels: dict[str, str] | None = None) -> float:
    return core.metrics.registry.get_sample_value(name, labels or {}) or 0.0


@pytest.mark.parametrize(
    ("header", "parameter", "version_default_ms", "expected"),
    [
        (None, None, None, GATEWAY_DEFAULT),  # nothing given: the gateway's default
        (None, None, 500, 0.5),  # the version's default beats the gateway's
        (None, 2, 500, 2.0),  # a client's timeout beats any default, even a shorter one
        ("0.25", None, 500, 0.25),
        ("1.5", 2, None, 1.5),  # the client's earliest wins
        ("3", 2, None, 2.0),
        ("120", None, 500, 120.0),
    ],
)
async def test_rest_deadline_precedence(
    make_client: Factory, router: Router, clock: FakeClock, header: str | None,
    parameter: float | None, version_default_ms: float | None, expected: float,
) -> None:
    _, client = await make_client(default_timeout_ms=version_default_ms, clock=clock)
    headers = {} if header is None else {"X-Request-Timeout": header}
    response = await client.post(URL, json=body(parameter), headers=headers)
    assert response.status == 200, await response.text()
    assert router.seen[0].deadline == pytest.approx(clock.now + expected)


@pytest.mark.parametrize(
    ("start_ago", "timeout", "parameter", "dated_from_ago"),
    [
        (0.4, "1", None, 0.4),  # the edge's receive time, 0.4 s ago: the deadline counts it
        (0.4, None, 2, 0.4),  # the OIP timeout too
        (-5.0, "1", None, 0.0),  # a start in the future never lengthens a deadline
        (120.0, "1", None, 0.0),  # one from a clock far off is not believed
        (None, "1", None, 0.0),
    ],
)
async def test_deadlines_are_dated_from_the_edges_request_start(
    make_client: Factory, router: Router, clock: FakeClock, start_ago: float | None,
    timeout: str | None, parameter: float | None, dated_from_ago: float,
) -> None:
    _, client = await make_client(clock=clock)
    headers = {} if timeout is None else {"X-Request-Timeout": timeout}
    if start_ago is not None:
        headers["X-Request-Start"] = f"t={clock.now - start_ago:.3f}"
    response = await client.post(URL, json=body(parameter), headers=headers)
    assert response.status == 200, await response.text()
    given = float(timeout) if timeout is not None else float(parameter or 0)
    assert router.seen[0].deadline == pytest.approx(clock.now - dated_from_ago + given, abs=1e-3)


@pytest.mark.parametrize("value", ["abc", "t=", "t=nan", "t=-1", "", "t=1e400"])
async def test_a_malformed_request_start_is_ignored(
    make_client: Factory, router: Router, clock: FakeClock, value: str
) -> None:
    _, client = await make_client(clock=clock)
    response = await client.post(URL, json=BODY, headers={"X-Request-Start": value,
                                                          "X-Request-Timeout": "1"})
    assert response.status == 200, await response.text()
    assert router.seen[0].deadline == pytest.approx(clock.now + 1.0)


async def test_a_request_that_waited_past_its_deadline_in_front_of_the_gateway_is_504_unrun(
    make_client: Factory, router: Router
) -> None:
    """The edge got it 0.5 s ago with 0.3 s to live: answered 504 at once, never forwarded
    (without the edge's start the gateway would date it from now and serve it late)."""
    core, client = await make_client()
    headers = {"X-Request-Start": f"t={time.time() - 0.5:.3f}", "X-Request-Timeout": "0.3"}
    response = await client.post(URL, json=BODY, headers=headers)
    assert response.status == 504, await response.text()
    assert not router.seen
    assert sample(core, MISSED, {"hop": "gateway"}) == 1


async def test_a_transport_deadline_refuses_before_the_body_is_read(
    make_client: Factory, router: Router, clock: FakeClock
) -> None:
    """With the deadline in a header, a request that cannot make it is refused before its body
    is read or decoded: a body that would be a 400 comes back 504 (expired in front of the
    gateway) or 503 (answers take longer than it has left)."""
    core, client = await make_client(clock=clock)
    garbage = b"{not json"
    expired = {"X-Request-Start": f"t={clock.now - 2:.3f}", "X-Request-Timeout": "1"}
    response = await client.post(URL, data=garbage, headers=expired)
    assert response.status == 504, await response.text()
    # The mesh is stuck: a request in flight for 5 s and no answer since.
    core.overload.started("m")
    clock.advance(5.0)
    response = await client.post(URL, data=garbage, headers={"X-Request-Timeout": "1"})
    assert response.status == 503, await response.text()
    assert "retry-after" in response.headers
    assert sample(core, "infermesh_gateway_overload_refusals_total") == 1
    # Without a transport deadline the body is read first (its timeout may be inside it).
    response = await client.post(URL, data=garbage)
    assert response.status == 400
    assert not router.seen


async def test_a_refusal_storm_is_traced_within_the_budget_and_counted_past_it(
    make_client: Factory, router: Router, clock: FakeClock
) -> None:
    exported: list[str] = []
    tracing.configure(0.0, lambda span, error, end_ns: exported.append(span.trace_id),
                      shed_per_second=1, clock=clock)
    try:
        core, client = await make_client(clock=clock)
        expired = {"X-Request-Start": f"t={clock.now - 2:.3f}", "X-Request-Timeout": "1"}
        answers = [await client.post(URL, json=BODY, headers=expired) for _ in range(3)]
    finally:
        tracing.configure(tracing.DEFAULT_SAMPLE_RATIO, None)
    assert [a.status for a in answers] == [504, 504, 504]
    named = [a.headers.get("Infermesh-Trace-Id") for a in answers]
    assert named[0] == exported[0] and named[1:] == [None, None]  # no id of an unexported trace
    assert sample(core, "infermesh_gateway_untraced_refusals_total") == 2


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1e3", "nan", "inf", "", "1_000"])
async def test_a_bad_request_timeout_header_is_400_naming_it(
    make_client: Factory, router: Router, value: str
) -> None:
    _, client = await make_client()
    response = await client.post(URL, json=BODY, headers={"X-Request-Timeout": value})
    assert response.status == 400
    assert "X-Request-Timeout" in (await response.json())["error"]
    assert not router.seen


@pytest.mark.parametrize("value", [0, -1, True, "1"])
async def test_a_bad_timeout_parameter_is_400(
    make_client: Factory, router: Router, value: Any
) -> None:
    _, client = await make_client()
    response = await client.post(URL, json=body(value))
    assert response.status == 400
    assert "'timeout'" in (await response.json())["error"]
    assert not router.seen


async def test_rest_answers_504_at_the_deadline_while_the_router_hangs(
    make_client: Factory, router: Router
) -> None:
    core, client = await make_client()
    router.hang = True
    response = await client.post(URL, json=BODY, headers={"X-Request-Timeout": "0.3"})
    answered = time.time()
    assert response.status == 504
    deadline = router.seen[0].deadline
    assert deadline is not None and deadline <= answered < deadline + MARGIN
    assert router.cancelled.is_set(), "the work behind the request must be cancelled"
    assert sample(core, MISSED, {"hop": "gateway"}) == 1


async def test_rest_never_sends_a_200_after_the_deadline(
    make_client: Factory, router: Router, clock: FakeClock
) -> None:
    core, client = await make_client(clock=clock)
    router.late_by = 0.001  # the router's answer comes back 1 ms after the deadline
    response = await client.post(URL, json=BODY, headers={"X-Request-Timeout": "5"})
    assert response.status == 504
    assert sample(core, LATE) == 1
    assert sample(core, MISSED, {"hop": "gateway"}) == 1


# gRPC: unary and streaming.


@pytest.fixture
async def stub_for(router: Router) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    servers: list[Any] = []
    channels: list[grpc.aio.Channel] = []

    async def make(*, clock: Callable[[], float] = time.time) -> tuple[Gateway, Any]:
        config = config_with(None)
        core = Gateway(ModelCatalog(config), router, access=Access(config, auth=False),
                       default_timeout=GATEWAY_DEFAULT, clock=clock)
        server, port = create_grpc_server(core, host="127.0.0.1", port=0)
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return core, service_pb2_grpc.GRPCInferenceServiceStub(channel)

    yield make
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(grace=None)


def grpc_request(timeout: float | None = None, request_id: str = "g") -> Any:
    message = pb.ModelInferRequest(model_name="m", id=request_id)
    message.inputs.add(name="features", datatype="FP32", shape=[1, 2])
    message.raw_input_contents.append(np.zeros(2, dtype="<f4").tobytes())
    if timeout is not None:
        message.parameters["timeout"].double_param = timeout
    return message


@pytest.mark.parametrize(("grpc_timeout", "parameter", "expected"),
                         [(5.0, None, 5.0), (5.0, 1.0, 1.0), (1.0, 5.0, 1.0),
                          (None, 2.0, 2.0), (None, None, GATEWAY_DEFAULT)])
async def test_grpc_deadline_precedence(
    stub_for: Callable[..., Awaitable[Any]], router: Router, grpc_timeout: float | None,
    parameter: float | None, expected: float,
) -> None:
    _, stub = await stub_for()
    sent = time.time()
    await stub.ModelInfer(grpc_request(parameter), timeout=grpc_timeout)
    deadline = router.seen[0].deadline
    # `expected` seconds after the call started, give or take the call's own time and gRPC's
    # rounding of the timeout on the wire; the other candidates lie seconds away.
    assert deadline is not None and deadline == pytest.approx(sent + expected, abs=MARGIN / 2)


async def test_a_nan_grpc_timeout_is_invalid(
    stub_for: Callable[..., Awaitable[Any]], router: Router
) -> None:
    _, stub = await stub_for()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(grpc_request(float("nan")))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not router.seen


async def test_grpc_answers_deadline_exceeded_at_the_deadline_while_the_router_hangs(
    stub_for: Callable[..., Awaitable[Any]], router: Router
) -> None:
    core, stub = await stub_for()
    router.hang = True
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(grpc_request(0.3))  # no grpc-timeout: the gateway's own timer
    answered = time.time()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = router.seen[0].deadline
    assert deadline is not None and deadline <= answered < deadline + MARGIN
    assert router.cancelled.is_set()


async def test_grpc_never_sends_an_answer_after_the_deadline(
    stub_for: Callable[..., Awaitable[Any]], router: Router, clock: FakeClock
) -> None:
    core, stub = await stub_for(clock=clock)
    router.late_by = 0.001
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(grpc_request(5.0))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert sample(core, LATE) == 1


async def test_a_stream_answers_late_requests_with_their_deadline_error(
    stub_for: Callable[..., Awaitable[Any]], router: Router, clock: FakeClock
) -> None:
    core, stub = await stub_for(clock=clock)
    router.late_by = 0.001

    async def requests() -> AsyncIterator[Any]:
        yield grpc_request(5.0, request_id="late")

    answers = [answer async for answer in stub.ModelStreamInfer(requests())]
    assert [a.infer_response.id for a in answers] == ["late"]
    assert "deadline exceeded" in answers[0].error_message
    assert not answers[0].infer_response.outputs
    assert sample(core, LATE) == 1


async def test_a_closed_stream_cancels_its_requests(
    stub_for: Callable[..., Awaitable[Any]], router: Router
) -> None:
    _, stub = await stub_for()
    router.hang = True
    more = asyncio.Event()

    async def requests() -> AsyncIterator[Any]:
        yield grpc_request(request_id="queued")
        await more.wait()  # the client keeps its side open

    call = stub.ModelStreamInfer(requests())
    reading = asyncio.ensure_future(call.read())
    async with asyncio.timeout(10):
        await router.entered.wait()
        call.cancel()
        await router.cancelled.wait()
    reading.cancel()
    more.set()


async def test_a_grpc_call_dates_its_deadline_from_the_edges_request_start(
    stub_for: Callable[..., Awaitable[Any]], router: Router
) -> None:
    """Through the edge a unary call carries `x-request-start`: a call that waited 0.4 s in
    front of the gateway has 0.4 s less of its grpc-timeout; one that waited past it all is
    DEADLINE_EXCEEDED unrun."""
    _, stub = await stub_for()
    waited = [("x-request-start", f"t={time.time() - 0.4:.3f}")]
    await stub.ModelInfer(grpc_request(), timeout=10.0, metadata=waited)
    assert router.seen[0].deadline is not None
    assert router.seen[0].deadline == pytest.approx(time.time() + 10.0 - 0.4, abs=0.3)
    expired = [("x-request-start", f"t={time.time() - 2:.3f}")]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(grpc_request(), timeout=1.0, metadata=expired)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(router.seen) == 1
