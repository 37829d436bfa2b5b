"""Unary gRPC `ModelInfer` over HTTP/1.1: the edge's way into the gateway for the hottest RPC.

nginx speaks HTTP/2 to the client and hands each `ModelInfer` call to the gateway's aiohttp
port as one POST (deploy/nginx/edge.conf): the request body is the call's length-prefixed
message, the response body the answer's, and the status travels as `grpc-status` and
`grpc-message` response headers that nginx sends on as HTTP/2 trailers (`add_trailer`), with
the served-version metadata. Why: grpc.aio spends about twice REST's CPU per call on the
gateway's one loop (its compiled call handling and poller thread wake-ups, docs/PERFORMANCE.md),
while nginx already parses the HTTP/2 for every REST request. Streaming RPCs and the metadata
RPCs still go to grpc.aio (`grpc_app`), and so does a client that calls the gateway's gRPC port
directly. The call itself runs through `grpc_app.infer_call`, as grpc.aio's servicer runs it:
the same access, deadline, tracing, metrics (`protocol="grpc"`) and error table.

Only nginx is expected to call this route; any HTTP/1.1 client may, and gets a well-formed
answer: HTTP 200 with the gRPC status in headers, or HTTP 415 when the body is not gRPC.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import time
import zlib
from urllib.parse import quote

import grpc
from aiohttp import web
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from services.gateway import grpc_app, grpc_messages, rest
from services.gateway.core import Gateway
from services.gateway.grpc_app import Remaining
from services.mesh.domain import errors

log = logging.getLogger(__name__)

PATH = "/inference.GRPCInferenceService/ModelInfer"
CONTENT_TYPES = frozenset({"application/grpc", "application/grpc+proto"})
PREFIX = struct.Struct(">BI")
"""A gRPC message's prefix: compressed flag (0 or 1), then the message's length."""
STATUS, MESSAGE = "grpc-status", "grpc-message"
TRAILERS = tuple(dict.fromkeys((
    STATUS, MESSAGE, "retry-after", "infermesh-trace-id", "infermesh-model-version",
    *(name.lower() for _, name in rest.SERVED_PARAMETERS), "infermesh-fallback",
)))
"""Every header this route answers with that grpc.aio sends as trailing metadata: the edge
moves each into the HTTP/2 trailers (`deploy.edge` renders one `add_trailer` per name)."""
_TIMEOUT = re.compile(r"(\d{1,8})([HMSmun])")
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_DECOMPRESS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# grpc-message is percent-encoded: every printable ASCII character but '%' stays as it is.
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def add_bridge_route(app: web.Application, core: Gateway) -> None:
    async def handler(request: web.Request) -> web.Response:
        return await model_infer(core, request)

    app.router.add_post(PATH, handler)


async def model_infer(core: Gateway, request: web.Request) -> web.Response:
    """One unary ModelInfer call carried over HTTP/1.1 (see the module's docstring)."""
    kind = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if kind not in CONTENT_TYPES:  # what the gRPC spec answers a non-gRPC request with
        raise web.HTTPUnsupportedMediaType(text=f"Content-Type header: {kind!r} is not "
                                           "application/grpc")
    try:
        message = decode_message(await _read(request), request.headers.get("grpc-encoding"))
        remaining = remaining_of(request.headers.get("grpc-timeout"))
        answer = await grpc_app.infer_call(core, message, request.headers.get, remaining,
                                           unary=True)
    except errors.InfermeshError as exc:
        return failed(grpc_app.status_of(exc), exc.message, exc)
    except Exception:
        log.exception("unhandled error serving bridged gRPC ModelInfer")
        return failed(grpc.StatusCode.INTERNAL, "internal error")
    body = answer.encoded.SerializeToString()
    headers = {"Content-Type": "application/grpc", STATUS: "0"}
    for name, value in grpc_messages.served_metadata(answer.response):
        headers[name] = value
    return web.Response(body=PREFIX.pack(0, len(body)) + body, headers=headers)


async def _read(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:  # grpc.aio's code for an oversized message
        raise errors.QuotaExceeded(f"message: {exc.text}") from None


def decode_message(body: bytes, encoding: str | None) -> pb.ModelInferRequest:
    """The one `ModelInferRequest` in a unary call's body; InvalidInput naming what is wrong."""
    if len(body) < PREFIX.size:
        raise errors.InvalidInput(f"body: {len(body)} bytes, shorter than a gRPC message's "
                                  f"{PREFIX.size}-byte prefix")
    compressed, length = PREFIX.unpack_from(body)
    if length != len(body) - PREFIX.size:
        raise errors.InvalidInput(f"body: the prefix says {length} bytes of message, "
                                  f"{len(body) - PREFIX.size} follow (one message per call)")
    payload = memoryview(body)[PREFIX.size:]
    if compressed:
        name = (encoding or "identity").strip().lower()
        if name not in _DECOMPRESS:
            raise errors.InvalidInput(f"grpc-encoding header: {name[:40]!r} is not supported "
                                      "(gzip or deflate)")
        try:
            payload = memoryview(zlib.decompress(payload, _DECOMPRESS[name]))
        except zlib.error as exc:
            raise errors.InvalidInput(f"body: not {name} data ({exc})") from None
    elif compressed not in (0, 1):
        raise errors.InvalidInput(f"body: compressed flag {compressed} (0 or 1)")
    try:
        return pb.ModelInferRequest.FromString(payload)
    except DecodeError as exc:
        raise errors.InvalidInput(f"body: not a ModelInferRequest ({exc})") from None


def remaining_of(value: str | None) -> Remaining:
    """Seconds left of a `grpc-timeout` header (`100m`, `5S`: digits and a unit), dated from
    now; InvalidInput naming the header when it is malformed."""
    if value is None:
        return _no_deadline
    found = _TIMEOUT.fullmatch(value.strip())
    if found is None:
        raise errors.InvalidInput(f"grpc-timeout header: {value[:40]!r} is not 1-8 digits "
                                  "and a unit (H, M, S, m, u, n)")
    expires = time.monotonic() + int(found.group(1)) * _UNITS[found.group(2)]
    return lambda: expires - time.monotonic()


def _no_deadline() -> float | None:
    return None


def failed(code: grpc.StatusCode, message: str,
           error: errors.InfermeshError | None = None) -> web.Response:
    """A call that ended in `code`: HTTP 200, no message, the status in headers."""
    headers = {"Content-Type": "application/grpc", STATUS: str(code.value[0]),
               MESSAGE: quote(message, safe=_MESSAGE_SAFE)}
    if error is not None and error.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after)))
    if error is not None and error.trace_id is not None:
        headers["infermesh-trace-id"] = error.trace_id
    return web.Response(headers=headers)
