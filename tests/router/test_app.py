"""The router's `/metrics`, as the rollout guard scrapes it, through aiohttp's test client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import InternalError, InvalidInput, NotFound
from services.mesh.domain.types import InferRequest, InferResponse, Rollout, Route
from services.router.app import create_app
from services.router.core import Router
from tests.credentials import CREDENTIAL
from tests.router.fakes import make_config, request

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class FailingBatcher:
    """Answers with the version it was given (or `serve_as`), or raises the error named by
    `fail`."""

    async def infer(self, request: InferRequest) -> InferResponse:
        assert request.version is not None
        fail = request.parameters.get("fail")
        if fail == "internal":
            raise InternalError("the model crashed")
        if fail == "input":
            raise InvalidInput("input 'x': wrong shape")
        version = str(request.parameters.get("serve_as", request.version))
        return InferResponse(request.model, version, request.request_id, [])


@pytest.fixture
def config() -> StaticConfig:
    canary = Rollout("m", (Route("1", 50.0), Route("2", 50.0)), sticky_key="user",
                     salt="pepper", fallback="1")
    return make_config(canary)


@pytest.fixture
async def router(config: StaticConfig) -> AsyncIterator[Router]:
    router = Router(ModelCatalog(config), FailingBatcher())
    yield router
    await router.aclose()


@pytest.fixture
async def client(router: Router) -> AsyncIterator[TestClient[Any, Any]]:
    client = TestClient(TestServer(create_app(router, credential=CREDENTIAL)))
    await client.start_server()
    yield client
    await client.close()


async def scrape(client: TestClient[Any, Any]) -> Samples:
    response = await client.get("/metrics")
    assert response.status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(await response.text())
        for sample in family.samples
    }


def requests_of(samples: Samples, version: str, outcome: str) -> float:
    labels = frozenset({"model": "m", "version": version, "outcome": outcome}.items())
    return samples.get(("infermesh_router_requests_total", labels), 0.0)


async def call(router: Router, req: InferRequest) -> None:
    try:
        await router.infer(req)
    except (InternalError, InvalidInput, NotFound):
        pass


async def test_outcomes_are_counted_by_version(
    router: Router, client: TestClient[Any, Any]
) -> None:
    for fail, count in ((None, 3), ("internal", 2), ("input", 1)):
        for i in range(count):
            req = request(f"{fail}-{i}", version="2")
            if fail:
                req.parameters["fail"] = fail
            await call(router, req)
    await call(router, request("ok", version="1"))
    samples = await scrape(client)
    assert requests_of(samples, "2", "success") == 3
    assert requests_of(samples, "2", "failure") == 2
    assert requests_of(samples, "2", "client_error") == 1
    assert requests_of(samples, "1", "success") == 1
    duration = ("infermesh_router_request_duration_seconds_count",
                frozenset({"model": "m", "version": "2"}.items()))
    assert samples[duration] == 6


async def test_routed_requests_count_under_the_version_that_served(
    router: Router, client: TestClient[Any, Any]
) -> None:
    served = [(await router.infer(request(f"r{i}", user=f"u{i}"))).version for i in range(20)]
    samples = await scrape(client)
    for version in ("1", "2"):
        assert requests_of(samples, version, "success") == served.count(version) > 0


async def test_a_success_counts_under_the_version_that_answered(
    router: Router, client: TestClient[Any, Any]
) -> None:
    await router.infer(request("r", version="2", serve_as="1"))
    samples = await scrape(client)
    assert requests_of(samples, "1", "success") == 1
    assert requests_of(samples, "2", "success") == 0


async def test_unknown_names_share_one_label(router: Router, client: TestClient[Any, Any]) -> None:
    await call(router, request("a", version="9"))
    unknown_model = request("b")
    unknown_model.model = "scan-me"
    await call(router, unknown_model)
    samples = await scrape(client)
    labels = frozenset({"model": "_unknown", "version": "_unknown",
                        "outcome": "client_error"}.items())
    assert samples[("infermesh_router_requests_total", labels)] == 2
    assert not any("scan-me" in dict(labels).values() or dict(labels).get("version") == "9"
                   for _, labels in samples)


async def test_fallbacks_are_counted(
    config: StaticConfig, router: Router, client: TestClient[Any, Any]
) -> None:
    config.delete("endpoints/worker/w2")
    served = [await router.infer(request(f"r{i}", user=f"u{i}")) for i in range(20)]
    fell_back = sum(bool(r.parameters.get("fallback")) for r in served)
    samples = await scrape(client)
    labels = frozenset({"model": "m", "routed": "2", "served": "1"}.items())
    assert samples[("infermesh_router_fallback_total", labels)] == fell_back > 0
