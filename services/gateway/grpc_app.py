"""The gateway's gRPC adapter: `inference.GRPCInferenceService` over grpc.aio. Thin handlers.

We use tritonclient's generated code (`tritonclient.grpc.service_pb2` and `service_pb2_grpc`,
pinned with tritonclient 2.73) rather than vendoring the Open Inference Protocol `.proto`:
the server speaks byte-for-byte what stock Triton clients send. Every RPC calls the same
`Gateway` core as the REST adapter; message conversion lives in `grpc_messages`.

Errors from the core map to gRPC status codes in `STATUS`, the one table of this adapter.
Unary RPCs fail with that status; a stream reports a failed request in its response's
`error_message` and keeps going.

Credentials travel as metadata `authorization: Bearer <key>` (or `x-api-key: <key>`); every
RPC but ServerLive, ServerReady and ServerMetadata needs them when the core's access does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from services.gateway import grpc_messages, rest
from services.gateway.auth import HeaderLookup
from services.gateway.core import SERVER_NAME, SERVER_VERSION, Gateway
from services.gateway.metrics import UNKNOWN_MODEL, GatewayMetrics
from services.mesh.domain import errors
from services.mesh.domain.ids import check_request_id
from services.mesh.domain.types import InferResponse

log = logging.getLogger(__name__)

# The one table from the error tree to gRPC status codes (subclasses first by MRO lookup).
STATUS: dict[type[errors.InfermeshError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Overloaded: grpc.StatusCode.UNAVAILABLE,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ModelFailed: grpc.StatusCode.INTERNAL,
    errors.InternalError: grpc.StatusCode.INTERNAL,
}
COMPRESSION = {
    "": grpc.Compression.NoCompression,
    "gzip": grpc.Compression.Gzip,
    "deflate": grpc.Compression.Deflate,
}


def status_of(error: errors.InfermeshError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


HIDDEN_MODEL_CODES = frozenset({
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
})
"""Codes of requests refused before their model was known to be real and theirs to use."""


class track:  # noqa: N801 - used as `with track(...)`, like the function it replaced
    """Count one inference request by model and gRPC code, and time it.

    A class rather than a `@contextmanager` generator: it runs on every call, and a generator
    context manager costs a generator, its frame and two `next` calls more."""

    __slots__ = ("_metrics", "_model", "_started")

    def __init__(self, metrics: GatewayMetrics, model: str) -> None:
        self._metrics, self._model = metrics, model
        self._started = time.perf_counter()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: Any) -> None:
        if kind is None:
            code = grpc.StatusCode.OK
        elif isinstance(exc, errors.InfermeshError):
            code = status_of(exc)
        elif isinstance(exc, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.INTERNAL
        label = UNKNOWN_MODEL if code in HIDDEN_MODEL_CODES else self._model
        self._metrics.observe(label, code.name, protocol="grpc",
                              seconds=time.perf_counter() - self._started)


Handler = Callable[[Any, Any, Any], Awaitable[Any]]


def mapped(handler: Handler) -> Handler:
    """End a unary RPC with the status of the error it raised (retry-after in the trailer)."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await handler(self, request, context)
        except errors.InfermeshError as exc:
            trailer: tuple[tuple[str, str], ...] = () if exc.retry_after is None else (
                ("retry-after", str(max(1, math.ceil(exc.retry_after)))),
            )
            if exc.trace_id is not None:
                trailer += (("infermesh-trace-id", exc.trace_id),)
            await context.abort(status_of(exc), exc.message, trailing_metadata=trailer)
        except Exception:
            log.exception("unhandled error serving gRPC %s", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return wrapper


def metadata_lookup(context: Any) -> HeaderLookup:
    """Look up a value of the call's invocation metadata by (lower-cased) name.

    grpc.aio converts the whole metadata to Python tuples on every `invocation_metadata()`
    call, and a request looks up several names (credentials, sticky keys, traceparent): the
    metadata is converted once, on the first lookup, into a dict (the first value of a key
    wins, binary `-bin` values are left out)."""
    found: dict[str, str] | None = None

    def lookup(name: str) -> str | None:
        nonlocal found
        if found is None:
            found = {}
            for key, value in context.invocation_metadata() or ():
                if isinstance(value, str) and key not in found:
                    found[key] = value
        return found.get(name.lower())

    return lookup


Remaining = Callable[[], float | None]
"""Seconds left of a call's `grpc-timeout` now, None when it has none."""


def deadline_of(remaining: Remaining, waited: float = 0.0) -> float | None:
    """The call's gRPC deadline (`grpc-timeout`) as wall-clock time, None when it has none;
    the core takes the earliest of it and the request's `timeout` parameter (see
    `Gateway._stamp_deadline` for the whole precedence). `grpc-timeout` is dated from when
    the gateway's server got the call; `waited` (seconds the call spent in front of it, from the
    edge's `X-Request-Start`) comes off it."""
    left = remaining()
    return None if left is None else time.time() + left - waited


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The OIP gRPC service over a gateway core."""

    def __init__(self, core: Gateway) -> None:
        self._core = core

    @mapped
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=self._core.live())

    @mapped
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self._core.ready())

    @mapped
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION)

    @mapped
    async def ModelReady(self, request: Any, context: Any) -> Any:
        ready = self._core.model_ready(request.name, request.version or None,
                                       header=metadata_lookup(context))
        return pb.ModelReadyResponse(ready=ready)

    @mapped
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        spec = self._core.model_metadata(request.name, request.version or None,
                                         header=metadata_lookup(context))
        return grpc_messages.model_metadata(spec, self._core.model_versions(request.name))

    @mapped
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        answer = await self._infer(request, context, unary=True)
        context.set_trailing_metadata(grpc_messages.served_metadata(answer.response))
        return answer.encoded

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        """Answer each request of the stream as it completes, many in flight at once."""
        stream = _Stream(self._infer, context, self._core)
        async for response in stream.responses(request_iterator):
            yield response

    async def _infer(self, request: Any, context: Any, *, unary: bool = False) -> _Answer:
        return await infer_call(self._core, request, metadata_lookup(context),
                                context.time_remaining, unary=unary)


async def infer_call(
    core: Gateway, request: Any, header: HeaderLookup, remaining: Remaining, *,
    unary: bool = False,
) -> _Answer:
    """One `ModelInferRequest` through the core, with the call's metadata (`header`) and
    deadline (`remaining`); `unary`: a ModelInfer call, whose `x-request-start` (set by the
    edge) dates its deadline. A stream's would date the stream, not each of its requests.
    Shared by grpc.aio's servicer and the edge's HTTP/1.1 bridge (`grpc_bridge`)."""
    model = request.model_name
    arrived = core.arrival(rest.request_start(header("x-request-start"))) if unary else None
    waited = 0.0 if arrived is None else max(0.0, core.arrival(None) - arrived)
    version = request.model_version or None
    # Access (auth, model, quotas) is settled before the tensors are decoded.
    with track(core.metrics, model), core.admit(model, version, header=header) as admission:
        if request.id:
            check_request_id(request.id, field="id")
        request_id = request.id or core.new_request_id()
        try:
            infer_request = grpc_messages.decode_infer(
                request, request_id=request_id, deadline=deadline_of(remaining, waited),
            )
        except errors.InfermeshError as exc:
            core.trace_refusal(exc, model=model, request_id=request_id,
                               admission=admission, header=header)
            raise
        response = await core.infer(infer_request, admission=admission, header=header,
                                    arrived=arrived)
        encoded = grpc_messages.encode_infer(response)
        core.ensure_on_time(infer_request.deadline)  # encoding a large answer takes time
        return _Answer(response, encoded, infer_request.deadline)


@dataclass(slots=True)
class _Answer:
    """A request's answer, encoded, and the deadline past which it must not be sent."""

    response: InferResponse
    encoded: Any
    deadline: float | None


class _Stream:
    """One ModelStreamInfer call: a task per request, one writer (the response generator).

    The writer sends an answer only while its deadline holds (answers wait their turn in the
    queue); a late one goes out as that request's deadline error instead. A stream that ends
    (the client closed or cancelled it) cancels its requests still running, at every hop.
    """

    def __init__(
        self, infer: Callable[[Any, Any], Awaitable[_Answer]], context: Any, core: Gateway
    ) -> None:
        self._infer = infer
        self._context = context
        self._core = core
        self._answers: asyncio.Queue[tuple[Any, Any, float | None] | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()

    async def responses(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while (queued := await self._answers.get()) is not None:
                request, response, deadline = queued
                try:
                    self._core.ensure_on_time(deadline)
                except errors.DeadlineExceeded as exc:
                    response = _stream_error(request, exc.message)
                yield response
            await reader  # surfaces a broken request stream
        finally:
            for task in (reader, *self._tasks):
                task.cancel()
            await asyncio.gather(reader, *self._tasks, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                task = asyncio.create_task(self._answer(request))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if self._tasks:
                await asyncio.wait(set(self._tasks))
        finally:
            self._answers.put_nowait(None)

    async def _answer(self, request: Any) -> None:
        deadline = None
        try:
            answer = await self._infer(request, self._context)
            response = pb.ModelStreamInferResponse(infer_response=answer.encoded)
            deadline = answer.deadline
        except errors.InfermeshError as exc:
            response = _stream_error(request, exc.message)
        except Exception:
            log.exception("unhandled error serving a gRPC stream request")
            response = _stream_error(request, "internal error")
        self._answers.put_nowait((request, response, deadline))


def _stream_error(request: Any, message: str) -> Any:
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id,
        ),
    )


def create_grpc_server(
    core: Gateway, *, host: str, port: int, compression: str | None = None,
    max_message_bytes: int = 64 << 20,
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server (not started) bound to host:port, and the port it bound (0 picks one).

    Requests compressed with gzip or deflate are always accepted; `compression` ("gzip",
    "deflate") compresses responses too.
    """
    if (compression or "") not in COMPRESSION:
        raise ValueError(f"unknown gRPC compression {compression!r} (gzip, deflate or none)")
    server = grpc.aio.server(
        compression=COMPRESSION[compression or ""],
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes)],
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(core), server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    return server, bound
