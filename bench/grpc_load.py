"""Unary gRPC ``ModelInfer`` load with h2load, for ``bench.cpu_per_request --protocols grpc``.

h2load speaks HTTP/2 with prior knowledge (h2c), which is what a gRPC server accepts on a
cleartext port. A gRPC call is a POST to ``/inference.GRPCInferenceService/ModelInfer`` with
``content-type: application/grpc``, ``te: trailers`` and a body of one length-prefixed
message: a zero byte (not compressed), the message's length as 4 big-endian bytes, then the
serialized ``ModelInferRequest`` (the tensor in ``raw_input_contents``, as the gateway's
stock-client tests send it). The body is built once; h2load replays it.

h2load counts a response by its HTTP status, and gRPC answers every call with HTTP 200, the
outcome in its ``grpc-status`` trailer. A failed call is trailers-only: no DATA bytes. So a run
is checked by what it received: a successful answer's length-prefixed bytes are measured once
with a real call (``probe``), and the calls that succeeded are the DATA bytes h2load reports
divided by that size (rounded; the answers of one model are all the same size). The probe also
fails loudly when the gateway refuses the body, before any load is sent.
"""

from __future__ import annotations

import re
import struct

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from bench.h2load import H2LOAD
from bench.payloads import PAYLOAD_SPECS

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def request_message(model: str) -> bytes:
    """One row of ``model``'s demo input as a serialized ModelInferRequest."""
    spec = PAYLOAD_SPECS[model]
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = spec.input.name, spec.input.datatype
    tensor.shape.extend([1, spec.input.width])
    request.outputs.add().name = spec.output.name
    dtype = np.int64 if spec.input.datatype == "INT64" else np.float32
    request.raw_input_contents.append(np.full((1, spec.input.width), 1, dtype=dtype).tobytes())
    return bytes(request.SerializeToString())


def framed(message: bytes) -> bytes:
    """``message`` as gRPC puts it on the wire: uncompressed flag, length, bytes."""
    return struct.pack(">BI", 0, len(message)) + message


def probe(target: str, message: bytes, metadata: dict[str, str], timeout: float = 30.0) -> int:
    """Call ModelInfer once at ``target`` (host:port); the length-prefixed size of its answer.
    Raises grpc.RpcError when the call fails."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None,
                                   response_deserializer=None)  # bytes in, bytes out
        answer = call(message, timeout=timeout,
                      metadata=[(name.lower(), value) for name, value in metadata.items()])
    return len(framed(answer))


def h2load_command(
    target: str, body_path: str, metadata: dict[str, str], *, requests: int, connections: int,
    streams: int,
) -> list[str]:
    """h2load, one thread, h2c: ``requests`` calls over ``connections`` × ``streams``."""
    command = [H2LOAD, "-t", "1", "-n", str(requests), "-c", str(connections),
               "-m", str(streams), "-d", body_path,
               "-H", "content-type: application/grpc", "-H", "te: trailers"]  # fmt: skip
    for name, value in metadata.items():
        command += ["-H", f"{name.lower()}: {value}"]
    return [*command, f"http://{target}{METHOD}"]


def data_bytes(summary: str) -> int:
    """The DATA bytes h2load received, from its ``traffic:`` line."""
    # traffic: 336.81KB (344889) total, 4.10KB (4200) headers (space savings 94.81%),
    # 156.24KB (159994) data
    found = re.search(r"traffic: .*\((\d+)\) data", summary)
    if found is None:
        raise RuntimeError(f"no traffic line in h2load's summary:\n{summary[-2000:]}")
    return int(found.group(1))


def succeeded(summary: str, answer_bytes: int, done: int) -> int:
    """Calls that got an answer (not a trailers-only error): DATA bytes ÷ one answer's size."""
    return min(done, round(data_bytes(summary) / answer_bytes))
