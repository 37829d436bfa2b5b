"""The HTTP/2 edge: real nginx in front of a real aiohttp app, spoken to by an HTTP/2 client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from aiohttp import web
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from deploy.edge import EdgeConfig, render, start_edge
from deploy.localdeps import free_port
from services.gateway import grpc_bridge, rest
from services.gateway.app import create_app
from tests.gateway.echo import EchoRouter, echo_gateway
from tests.waiting import wait_for


@pytest.fixture
def prefix() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="infermesh-edge-"))
    root.chmod(0o755)  # nginx workers run as an unprivileged user and must reach it
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def rest_upstream() -> AsyncIterator[str]:
    """An aiohttp app that echoes what the edge passed on."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({
            "request_id": request.headers.get("X-Request-Id"),
            "forwarded_for": request.headers.get("X-Forwarded-For"),
            "request_start": request.headers.get("X-Request-Start"),
            "body": (await request.read()).decode(),
        })

    async with _serving(echo) as upstream:
        yield upstream


@contextlib.asynccontextmanager
async def _serving(
    handler: Callable[[web.Request], Awaitable[web.Response]],
) -> AsyncIterator[str]:
    """An aiohttp app answering every path with `handler`, on a free port: its host:port."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class _Holding:
    """An upstream handler that holds the requests whose path `holds` picks until `release`
    is set (`two_in` once two are held) and answers the others at once."""

    def __init__(self, holds: Callable[[str], bool] = lambda path: True) -> None:
        self._holds = holds
        self.release, self.two_in = asyncio.Event(), asyncio.Event()
        self._entered = 0

    async def held(self, count: int) -> None:
        """Until `count` requests have been held (in all)."""
        await wait_for(lambda: self._entered, lambda n: n >= count, timeout=20,
                       what=f"{count} requests held at the upstream", interval=0.01)

    async def handle(self, request: web.Request) -> web.Response:
        if self._holds(request.path):
            self._entered += 1
            if self._entered == 2:
                self.two_in.set()
            async with asyncio.timeout(30):
                await self.release.wait()
        return web.Response(text="done")


def _certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "edge.crt", folder / "edge.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_listener_only_with_a_certificate_and_key(prefix: Path) -> None:
    plain = render(EdgeConfig(8080, "127.0.0.1:8000", "127.0.0.1:8001"), prefix)
    assert "ssl http2" not in plain and "listen 127.0.0.1:8080 http2;" in plain
    tls = render(EdgeConfig(8080, "a:1", "b:2", tls_port=8443, certificate=Path("/c"),
                            key=Path("/k")), prefix)  # fmt: skip
    assert "listen 127.0.0.1:8443 ssl http2;" in tls and "ssl_certificate_key /k;" in tls


async def test_rest_over_h2c_and_tls_h2_reaches_the_gateway_port(
    prefix: Path, rest_upstream: str
) -> None:
    cert, key = await asyncio.to_thread(_certificate, prefix)
    config = EdgeConfig(free_port(), rest_upstream, "127.0.0.1:9", tls_port=free_port(),
                        certificate=cert, key=key)  # fmt: skip
    edge = await asyncio.to_thread(start_edge, config, prefix / "run")
    try:
        async with httpx.AsyncClient(http1=False, http2=True) as client:
            url = f"http://127.0.0.1:{config.h2c_port}/v2/x"
            sent = time.time()
            # A client's own X-Request-Start is replaced: only the edge's time is passed on.
            answer = await client.post(url, content=b"hi", headers={
                "X-Request-Id": "req-7", "X-Request-Start": "t=1"})
        assert answer.http_version == "HTTP/2"
        echoed = answer.json()
        start = rest.request_start(echoed.pop("request_start"))
        assert start is not None and sent - 1.0 <= start <= time.time() + 0.01
        assert echoed == {"request_id": "req-7", "forwarded_for": "127.0.0.1", "body": "hi"}
        async with httpx.AsyncClient(http2=True, verify=False) as client:
            answer = await client.get(f"https://127.0.0.1:{config.tls_port}/v2/x")
        assert answer.http_version == "HTTP/2"
        assert len(answer.json()["request_id"]) == 32  # nginx's own id when none is sent
    finally:
        await asyncio.to_thread(edge.stop)
    assert edge.process.poll() is not None


async def test_past_max_conns_the_edge_answers_503_with_retry_after_itself(prefix: Path) -> None:
    """The edge keeps at most `max_conns` requests in flight at the gateway; the next one is
    refused by nginx at once (503 + Retry-After), never queued behind them."""
    upstream = _Holding()
    async with _serving(upstream.handle) as address:
        await _past_max_conns(prefix, address, upstream)


async def _past_max_conns(prefix: Path, address: str, upstream: _Holding) -> None:
    config = EdgeConfig(free_port(), address, "127.0.0.1:9", max_conns=2)
    assert "max_conns=2;" in await asyncio.to_thread(render, config, prefix)
    edge = await asyncio.to_thread(start_edge, config, prefix / "run")
    try:
        url = f"http://127.0.0.1:{config.h2c_port}/v2/models/m/infer"
        # One client (one HTTP/2 connection) per request.
        async with contextlib.AsyncExitStack() as clients:
            first, second, third = [
                await clients.enter_async_context(
                    httpx.AsyncClient(http1=False, http2=True, timeout=30))
                for _ in range(3)
            ]
            held = [asyncio.create_task(c.post(url, content=b"x")) for c in (first, second)]
            async with asyncio.timeout(20):  # both at the upstream
                await upstream.two_in.wait()
            refused = await third.post(url, content=b"x")
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1" and "overloaded" in refused.text
            upstream.release.set()
            assert [(await task).status_code for task in held] == [200, 200]
    finally:
        await asyncio.to_thread(edge.stop)


async def test_past_model_conns_the_edge_refuses_that_models_inference_only(
    prefix: Path,
) -> None:
    """The edge keeps at most `model_conns` inference requests of one model in flight (a
    bound per model, below `max_conns`): the next one for that model is refused by nginx at
    once; another model's inference, and the same model's metadata, still go through."""
    upstream = _Holding(lambda path: path.startswith("/v2/models/m/") and path.endswith("/infer"))
    async with _serving(upstream.handle) as address:
        await _past_model_conns(prefix, address, upstream)


async def _past_model_conns(prefix: Path, address: str, upstream: _Holding) -> None:
    config = EdgeConfig(free_port(), address, "127.0.0.1:9", model_conns=2)
    assert "limit_conn infermesh_models 2;" in await asyncio.to_thread(render, config, prefix)
    assert "limit_conn" not in await asyncio.to_thread(
        render, dataclasses.replace(config, model_conns=0), prefix)
    edge = await asyncio.to_thread(start_edge, config, prefix / "run")
    try:
        base = f"http://127.0.0.1:{config.h2c_port}/v2/models"
        # One client (one HTTP/2 connection) per request, as above: with streams held open on
        # a connection, httpx got a later stream's answer only at its read timeout.
        async with contextlib.AsyncExitStack() as stack:
            first, second, third, fourth, fifth, sixth = [
                await stack.enter_async_context(
                    httpx.AsyncClient(http1=False, http2=True, timeout=30))
                for _ in range(6)
            ]
            held = [asyncio.create_task(first.post(f"{base}/m/infer", content=b"x")),
                    asyncio.create_task(second.post(f"{base}/m/versions/2/infer", content=b"x"))]
            async with asyncio.timeout(20):  # both at the upstream
                await upstream.two_in.wait()
            refused = await third.post(f"{base}/m/infer", content=b"x")
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            assert "requests for this model in flight" in refused.text
            assert (await fourth.post(f"{base}/n/infer", content=b"x")).status_code == 200
            assert (await fifth.get(f"{base}/m")).status_code == 200
            upstream.release.set()
            assert [(await task).status_code for task in held] == [200, 200]
            assert (await sixth.post(f"{base}/m/infer", content=b"x")).status_code == 200
    finally:
        await asyncio.to_thread(edge.stop)


def test_a_model_with_its_own_bound_gets_a_zone_of_its_own(prefix: Path) -> None:
    """Models named in `model_bounds` are counted in a zone of their own (named after the
    model, so a reload keeps its count) and left out of the default's; names alike but for
    case share the larger bound (nginx's map ignores case)."""
    config = EdgeConfig(8080, "a:1", "b:2", model_conns=128,
                        model_bounds=(("mlp", 64), ("MLP", 32), ("enc.v-2", 256), ("same", 128)))
    text = render(config, prefix)
    assert "limit_conn infermesh_models 128;" in text
    assert "limit_conn infermesh_model_mlp 64;" in text
    assert "limit_conn infermesh_model_enc.v-2 256;" in text
    assert "infermesh_model_same" not in text and "MLP" not in text  # the default / merged
    assert '"mlp" "";' in text and '"enc.v-2" "";' in text  # not in the default zone
    alone = render(dataclasses.replace(config, model_conns=0), prefix)
    assert "limit_conn infermesh_models " not in alone  # the others unbounded
    assert "limit_conn infermesh_model_mlp 64;" in alone
    assert "limit_conn" not in render(
        dataclasses.replace(config, model_conns=0, model_bounds=()), prefix)


async def test_a_reload_changes_a_models_bound_and_keeps_its_requests_in_flight_counted(
    prefix: Path,
) -> None:
    """A model bounded on its own (1 here, the others not at all) is refused past it; a reload
    to 2 lets one more in, not two (the one in flight still counts); a configuration nginx
    rejects leaves the running one serving. The requests held across the reload go through
    curl: nginx's old worker sends their HTTP/2 connections GOAWAY naming the stream as still
    served, which httpcore fails anyway (a client's bug; curl, h2load and grpc wait)."""
    upstream = _Holding(lambda path: path.endswith("/infer"))
    async with _serving(upstream.handle) as address:
        await _reloaded_bound(prefix, address, upstream)


async def _reloaded_bound(prefix: Path, address: str, upstream: _Holding) -> None:
    config = EdgeConfig(free_port(), address, "127.0.0.1:9", model_conns=0,
                        model_bounds=(("m", 1),))
    edge = await asyncio.to_thread(start_edge, config, prefix / "run")
    try:
        base = f"http://127.0.0.1:{config.h2c_port}/v2/models"
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(
                httpx.AsyncClient(http1=False, http2=True, timeout=30)) for _ in range(6)]
            held = [asyncio.create_task(_curl_post(f"{base}/m/infer"))]
            await upstream.held(1)
            refused = await clients[1].post(f"{base}/m/infer", content=b"x")
            assert refused.status_code == 503
            assert "the edge has 1 requests for this model in flight" in refused.text
            held.append(asyncio.create_task(_curl_post(f"{base}/n/infer")))
            await upstream.held(2)  # another model: no bound

            await asyncio.to_thread(
                edge.reload, dataclasses.replace(config, model_bounds=(("m", 2),)))
            held.append(asyncio.create_task(_curl_post(f"{base}/m/infer")))
            await upstream.held(3)
            refused = await clients[4].post(f"{base}/m/infer", content=b"x")
            assert refused.status_code == 503
            assert "the edge has 2 requests for this model in flight" in refused.text

            with pytest.raises(RuntimeError, match="nginx rejected"):
                await asyncio.to_thread(
                    edge.reload, dataclasses.replace(config, max_body="not a size"))
            upstream.release.set()
            assert [await task for task in held] == [200, 200, 200]
            assert (await clients[5].post(f"{base}/m/infer", content=b"x")).status_code == 200
    finally:
        await asyncio.to_thread(edge.stop)


async def _curl_post(url: str) -> int:
    """The status of a POST over HTTP/2 (prior knowledge) by curl."""
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--http2-prior-knowledge", "--max-time", "30", "-o", "/dev/null",
        "-w", "%{http_code}", "--data", "x", url, stdout=asyncio.subprocess.PIPE)
    out, _ = await curl.communicate()
    return int(out or b"0")


async def test_unary_grpc_goes_to_the_rest_port_with_its_status_and_metadata_as_trailers(
    prefix: Path,
) -> None:
    """ModelInfer through the edge reaches the gateway's aiohttp port (the gRPC upstream here
    is a closed port); a stock gRPC client gets the answer, the served version as trailing
    metadata and an error's status and message."""
    router = EchoRouter()
    router.parameters = {"bucket": 3}
    runner = web.AppRunner(create_app(echo_gateway(router)))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    config = EdgeConfig(free_port(), f"127.0.0.1:{port}", "127.0.0.1:9")
    edge = await asyncio.to_thread(start_edge, config, prefix / "run")

    def calls() -> tuple[Any, Any, grpc.RpcError]:
        request = pb.ModelInferRequest(
            model_name="echo", id="via-edge",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="features", datatype="FP32",
                                                          shape=[1, 2])],
            raw_input_contents=[np.array([[1.5, 2.5]], np.float32).tobytes()],
        )
        with grpc.insecure_channel(f"127.0.0.1:{config.h2c_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            reply, call = stub.ModelInfer.with_call(request, timeout=30)
            request.model_name = "nope"
            try:
                stub.ModelInfer(request, timeout=30)
            except grpc.RpcError as exc:
                return reply, call.trailing_metadata(), exc
        raise AssertionError("an unknown model was served")

    try:
        reply, trailers, refused = await asyncio.to_thread(calls)
        assert reply.id == "via-edge" and reply.outputs[0].name == "features_echo"
        assert reply.raw_output_contents[0] == np.array([[1.5, 2.5]], np.float32).tobytes()
        assert ("infermesh-model-version", "1") in trailers
        assert ("infermesh-bucket", "3") in trailers
        assert refused.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in refused.details()
        assert [request.request_id for request in router.seen] == ["via-edge"]
    finally:
        await asyncio.to_thread(edge.stop)
        await runner.cleanup()


def test_without_the_bridge_every_grpc_call_goes_to_grpc_aio(prefix: Path) -> None:
    bridged = render(EdgeConfig(8080, "a:1", "b:2"), prefix)
    assert f"location = {grpc_bridge.PATH}" in bridged
    assert all(f"add_trailer {name} " in bridged for name in grpc_bridge.TRAILERS)
    direct = render(EdgeConfig(8080, "a:1", "b:2", grpc_bridge=False), prefix)
    assert grpc_bridge.PATH not in direct and "grpc_pass grpc://infermesh_grpc;" in direct
