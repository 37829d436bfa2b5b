"""schemathesis against the gateway's own OpenAPI document (GET /openapi.json): generated
requests, valid and not, to every operation of a real gateway app (auth on, a fake router
behind it, async jobs over a real Postgres) never get a 5xx, always get an answer within the
timeout, and get a status the document lists.

Bounded and deterministic: `derandomize` fixes the examples, `max_examples` bounds them.
"""

from __future__ import annotations

import copy
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.specs.openapi.schemas import OpenApiSchema

from deploy.localdeps import LocalPostgres
from services.gateway.access import Access
from services.gateway.app import create_app
from services.gateway.core import Gateway
from services.gateway.feedback import Feedback, FeedbackRecorder
from services.gateway.jobs import JobService
from services.gateway.jobs_inputs import JobInputs
from services.gateway.jobs_inputs_store import PostgresJobInputStore
from services.gateway.jobs_store import open_job_store
from services.gateway.openapi import openapi_document
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.types import Signature, TensorSpec
from services.mesh.infra.db import create_pool, migrate
from services.webhooks.endpoints import DisabledEndpoints
from services.webhooks.signing import new_secret
from services.webhooks.targets import check_target_async
from tests.fakes import model_records
from tests.fuzz.serving import serve_in_thread
from tests.gateway.echo import EchoRouter
from tests.gateway.tenancy import add_tenant, bearer

pytestmark = pytest.mark.timeout(300)

SIGNATURES = {
    "mlp": Signature(inputs=(TensorSpec("features", "FP32", (-1, 4)),),
                     outputs=(TensorSpec("probs", "FP32", (-1, 2)),)),
    "text": Signature(inputs=(TensorSpec("text", "BYTES", (-1,)),),
                      outputs=(TensorSpec("label", "BYTES", (-1,)),)),
}
RESPONSE_TIMEOUT = 20.0
"""Seconds any one answer may take: generous for a busy machine; a hang takes forever."""
# The edge's gRPC bridge takes raw bytes (a length-prefixed message): fuzz it as binary.
schemathesis.serializer.alias("application/grpc", "application/octet-stream")

CHECKS: list[schemathesis.CheckFunction] = [
    schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance, schemathesis.checks.response_schema_conformance,
]


class MemoryFeedbackStore:
    async def put(self, tenant: str, feedback: Feedback) -> None:
        pass


@asynccontextmanager
async def gateway_app(config: StaticConfig, database_url: str) -> AsyncIterator[web.Application]:
    """The app with feedback (in memory) and jobs (no runner: they stay queued)."""
    pool = await create_pool(database_url)
    await migrate(pool)
    await pool.close()
    access = Access(config)
    gateway = Gateway(ModelCatalog(config), EchoRouter(), access=access)
    recorder = FeedbackRecorder(access, MemoryFeedbackStore(), metrics=gateway.metrics)
    async with open_job_store(database_url) as store:
        inputs = JobInputs(PostgresJobInputStore(store.pool))
        jobs = JobService(gateway, access, store, webhook_targets=check_target_async,
                          new_secret=new_secret, inputs=inputs,
                          webhook_endpoints=DisabledEndpoints(store.pool))
        yield create_app(gateway, feedback=recorder, jobs=jobs)


@pytest.fixture(scope="module")
def jobs_database(local_postgres: LocalPostgres) -> str:
    return local_postgres.create_database(f"test_{uuid.uuid4().hex}")


@pytest.fixture(scope="module")
def api_key() -> Iterator[tuple[str, StaticConfig]]:
    values: dict[str, object] = {"endpoints/worker/w1": {"models": ["mlp/1", "text/1"]}}
    for model, signature in SIGNATURES.items():
        values |= model_records(model, signature, max_batch_size=8)
    config = StaticConfig(values)
    yield add_tenant(config, "acme"), config


@pytest.fixture(scope="module")
def gateway_url(api_key: tuple[str, StaticConfig], jobs_database: str) -> Iterator[str]:
    with serve_in_thread(lambda: gateway_app(api_key[1], jobs_database)) as url:
        yield url


def gateway_schema() -> OpenApiSchema:
    """The served document, with the model and version paths narrowed to the real ones so
    that requests reach decoding and validation, not only the 404 of an unknown model."""
    document: dict[str, Any] = copy.deepcopy(openapi_document())
    for item in document["paths"].values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "model":
                    parameter["schema"] = {"enum": sorted(SIGNATURES)}
                elif parameter["name"] == "version":
                    parameter["schema"] = {"enum": ["1", "2"]}
    return schemathesis.openapi.from_dict(document)


# Built at collection (pytest 9 breaks schemathesis' lazy `from_fixture`).
schema = gateway_schema()


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_5xx_or_hangs(
    case: Case[Any], gateway_url: str, api_key: tuple[str, StaticConfig]
) -> None:
    response = case.call(base_url=gateway_url, headers=bearer(api_key[0]),
                         timeout=RESPONSE_TIMEOUT)
    case.validate_response(response, checks=CHECKS)


async def test_the_document_lists_every_route_the_app_serves(
    api_key: tuple[str, StaticConfig], jobs_database: str,
) -> None:
    async with gateway_app(api_key[1], jobs_database) as app:
        pass  # its routes are all this test reads
    served = {(route.method, route.resource.canonical) for route in app.router.routes()
              if route.method != "HEAD" and route.resource is not None}
    document = openapi_document()
    documented = {(method.upper(), path) for path, item in document["paths"].items()
                  for method in item}
    assert served == documented
    assert document["openapi"].startswith("3.1")


def test_the_document_is_served(gateway_url: str) -> None:
    with urllib.request.urlopen(f"{gateway_url}/openapi.json", timeout=RESPONSE_TIMEOUT) as got:
        assert got.status == 200
        assert orjson.loads(got.read()) == orjson.loads(orjson.dumps(openapi_document()))
