"""Traces from the running mesh, received by a real OTLP/HTTP endpoint that decodes the protobuf:
one trace across gateway, router, batcher and worker; a client's `traceparent` honoured; batch
spans linking their requests; failed requests traced even when not sampled."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from deploy.localdeps import LocalEtcd, LocalPostgres, free_port
from tests.integration.conftest import RunningMesh, mesh_on_session_deps
from tests.integration.oip import infer_body, mlp_input, post_infer
from tests.waiting import wait_for

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@dataclass(frozen=True)
class Received:
    """One span as the collector decoded it."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    error: bool


@dataclass
class Collector:
    """An OTLP/HTTP traces endpoint (POST /v1/traces, protobuf) keeping what it is sent."""

    port: int
    spans: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    found.append(Received(
                        resource["service.name"], span.name, span.trace_id.hex(),
                        span.span_id.hex(), span.parent_span_id.hex(),
                        {a.key: _value(a.value) for a in span.attributes},
                        [(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        span.status.code == 2,
                    ))
        with self.lock:
            self.spans.extend(found)

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.spans)

    async def wait_for(
        self, check: Callable[[list[Received]], bool], timeout: float = 20, *,
        what: str = "the spans the test needs",
    ) -> list[Received]:
        """The spans received, once `check` holds for them; AssertionError after `timeout`."""
        return await wait_for(self.received, check, timeout=timeout, what=what, interval=0.1)


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    sink = Collector(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = 200 if self.path == "/v1/traces" else 404
            if status == 200:
                sink.add(body)
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", sink.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def traced_mesh(
    collector: Collector, local_etcd: LocalEtcd, local_postgres: LocalPostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningMesh]:
    """The mesh exporting every service's spans to `collector` (auth off)."""
    with mesh_on_session_deps(
        "tracing", local_etcd, local_postgres, tmp_path_factory, INFERMESH_GATEWAY_AUTH="0",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.port}",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf", OTEL_BSP_SCHEDULE_DELAY="200",
        INFERMESH_TRACE_SAMPLE_RATIO="1",
    ) as running:
        yield running


def _in_trace(trace_id: str) -> Callable[[list[Received]], bool]:
    wanted = {"infermesh-gateway", "infermesh-router", "infermesh-batcher", "infermesh-worker"}
    return lambda spans: wanted <= {s.service for s in spans if s.trace_id == trace_id}


async def test_one_request_is_one_trace_across_every_hop_under_the_clients_span(
    traced_mesh: RunningMesh, collector: Collector
) -> None:
    async with aiohttp.ClientSession() as session:
        status, body, headers = await post_infer(
            session, f"{traced_mesh.gateway}/v2/models/mlp/infer",
            infer_body("features", mlp_input(1)),
            headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
        )
    assert status == 200, body
    assert headers["infermesh-trace-id"] == CLIENT_TRACE == body["parameters"]["trace_id"]
    spans = await collector.wait_for(_in_trace(CLIENT_TRACE), what="spans of every hop")
    mine = {s.name: s for s in spans if s.trace_id == CLIENT_TRACE}
    assert {"gateway.infer", "router.route", "batcher.queue", "batcher.batch",
            "worker.compute"} <= set(mine), sorted(mine)
    assert mine["gateway.infer"].parent_id == CLIENT_SPAN
    assert mine["router.route"].parent_id == mine["gateway.infer"].span_id
    assert mine["batcher.queue"].parent_id == mine["router.route"].span_id
    assert mine["batcher.batch"].parent_id == mine["batcher.queue"].span_id
    assert mine["worker.compute"].parent_id == mine["batcher.batch"].span_id
    gateway, queue = mine["gateway.infer"].attributes, mine["batcher.queue"].attributes
    assert (gateway["infermesh.model"], gateway["infermesh.version"]) == ("mlp", "1")
    assert gateway["infermesh.request_id"] == body["id"] and "infermesh.bucket" in gateway
    assert {"infermesh.queue_wait_ms", "infermesh.batch_size", "infermesh.batch_position",
            "infermesh.tenant", "infermesh.version"} <= set(queue)
    assert queue["infermesh.bucket"] == gateway["infermesh.bucket"] == body["parameters"]["bucket"]


async def test_a_batch_span_links_to_each_of_its_requests(
    traced_mesh: RunningMesh, collector: Collector
) -> None:
    url = f"{traced_mesh.gateway}/v2/models/mlp/infer"

    def batched(spans: list[Received]) -> bool:
        return any(s.name == "batcher.batch" and len(s.links) >= 2 for s in spans)

    shared = "a batcher.batch span linking two or more requests"
    async with aiohttp.ClientSession() as session:
        for _ in range(5):  # rounds of 32 concurrent rows, until two of them share a batch
            answers = await asyncio.gather(*(
                post_infer(session, url, infer_body("features", mlp_input(1, seed)))
                for seed in range(32)
            ))
            assert {status for status, _, _ in answers} == {200}
            with contextlib.suppress(AssertionError):  # none yet: another round
                await collector.wait_for(batched, timeout=3, what=shared)
                break
    spans = await collector.wait_for(batched, what=shared)  # a last round's, exported late
    batch = next(s for s in spans if s.name == "batcher.batch" and len(s.links) >= 2)
    spans = await collector.wait_for(lambda s: {x.span_id for x in s} >= {
        span_id for _, span_id in batch.links
    }, what="the queue span of every request the batch links")
    queued = {(s.trace_id, s.span_id): s for s in spans if s.name == "batcher.queue"}
    members = [queued[link] for link in batch.links]  # every link names a request's span
    assert len({m.attributes["infermesh.request_id"] for m in members}) == len(batch.links)
    assert sorted(m.attributes["infermesh.batch_position"] for m in members) == list(
        range(len(members))
    )
    assert batch.attributes["infermesh.batch_requests"] == len(members)


async def test_a_failed_request_is_traced_even_when_its_trace_is_not_sampled(
    traced_mesh: RunningMesh, collector: Collector
) -> None:
    trace_id = "5" * 32
    async with aiohttp.ClientSession() as session:
        status, body, headers = await post_infer(
            session, f"{traced_mesh.gateway}/v2/models/mlp/infer",
            infer_body("features", mlp_input(1)[:, :3]),  # the wrong shape
            headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-00"},
        )
    assert status == 400, body
    assert headers["infermesh-trace-id"] == trace_id  # the error names its trace too
    spans = await collector.wait_for(lambda s: any(x.trace_id == trace_id for x in s),
                                     what="the failed request's span")
    (failed,) = [s for s in spans if s.trace_id == trace_id]
    assert (failed.name, failed.error, failed.parent_id) == ("gateway.infer", True, CLIENT_SPAN)
    assert failed.attributes["error.type"] == "invalid_input"
