"""bench.grpc_load: the body h2load replays is a valid ModelInfer call, and a run counts as
succeeded only the calls that got an answer (gRPC reports failures in trailers, under HTTP 200)."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2

from bench import cpu_per_request, grpc_load
from bench.h2load import H2LOAD
from deploy.localdeps import free_port

needs_h2load = pytest.mark.skipif(shutil.which(H2LOAD) is None,
                                  reason="h2load (nghttp2-client) not installed")  # fmt: skip
ANSWER = service_pb2.ModelInferResponse(model_name="mlp", model_version="1", id="x")
ANSWER.raw_output_contents.append(b"\0" * 8)


@pytest.fixture
def flaky_server() -> Iterator[str]:
    """A gRPC server whose ModelInfer answers odd calls and fails even ones (UNAVAILABLE);
    it checks that each call's message is the mlp's one-row request."""
    calls = itertools.count(1)
    expected = grpc_load.request_message("mlp")

    def model_infer(request: bytes, context: grpc.ServicerContext) -> bytes:
        assert request == expected
        if next(calls) % 2 == 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, "every other call fails")
        return bytes(ANSWER.SerializeToString())

    handler = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_the_message_is_one_row_of_the_demo_input() -> None:
    message = service_pb2.ModelInferRequest.FromString(grpc_load.request_message("mlp"))
    assert message.model_name == "mlp"
    assert [(t.name, t.datatype, list(t.shape)) for t in message.inputs] == [
        ("features", "FP32", [1, 32])]
    assert len(message.raw_input_contents[0]) == 32 * 4
    assert grpc_load.framed(b"abc") == b"\0\0\0\0\x03abc"


def test_succeeded_calls_are_data_bytes_over_one_answer() -> None:
    summary = ("traffic: 336.81KB (344889) total, 4.10KB (4200) headers (space savings 94.81%), "
               "156.24KB (160000) data\n")
    assert grpc_load.data_bytes(summary) == 160_000
    assert grpc_load.succeeded(summary, 160, done=1000) == 1000
    assert grpc_load.succeeded(summary, 320, done=1000) == 500
    with pytest.raises(RuntimeError, match="no traffic line"):
        grpc_load.data_bytes("finished in 1s")


def test_a_bad_protocol_is_refused_naming_the_option() -> None:
    with pytest.raises(SystemExit, match="--protocols: choose from rest, grpc"):
        cpu_per_request.main(["--protocols", "rest,http3", "--systems", "plain"])


@needs_h2load
def test_h2load_counts_only_the_calls_that_were_answered(
    flaky_server: str, tmp_path: Path
) -> None:
    message = grpc_load.request_message("mlp")
    answer_bytes = grpc_load.probe(flaky_server, message, {})  # call 1: answered
    assert answer_bytes == len(ANSWER.SerializeToString()) + 5
    body = tmp_path / "body.bin"
    body.write_bytes(grpc_load.framed(message))
    command = grpc_load.h2load_command(flaky_server, str(body), {"Authorization": "Bearer k"},
                                       requests=200, connections=2, streams=4)
    assert "authorization: Bearer k" in command
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    completed, status_ok, _ = cpu_per_request.parse_summary(done.stdout)
    assert completed == status_ok == 200  # HTTP 200 for every call, failed or not
    # Calls 2..201 alternate fail/answer: exactly half answered.
    assert grpc_load.succeeded(done.stdout, answer_bytes, completed) == 100
