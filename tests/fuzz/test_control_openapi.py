"""schemathesis against the control API's OpenAPI document (GET /openapi.json): generated
requests, valid and not, to every operation of the real control API (real Postgres and etcd,
an admin token) never get a 5xx and always get an answer within the timeout.

Bounded and deterministic: `derandomize` fixes the examples, `max_examples` bounds them.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.specs.openapi.schemas import OpenApiSchema

from control.api.app import create_app
from control.api.core import RolloutStore
from control.api.openapi import openapi_document
from control.api.reports.store import ReportStore
from control.api.tenants.store import TenantStore
from deploy.localdeps import LocalEtcd, LocalPostgres
from tests.fuzz.serving import serve_in_thread
from tests.registry.harness import SIGNATURE, chunks_of, open_registry

pytestmark = pytest.mark.timeout(300)

TOKEN = "fuzz-secret"
MODELS = ("iris",)
TENANTS = ("acme", "globex")
RESPONSE_TIMEOUT = 20.0
"""Seconds any one answer may take: generous for a busy machine; a hang takes forever."""
CHECKS: list[schemathesis.CheckFunction] = [
    schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance, schemathesis.checks.response_schema_conformance,
]


@asynccontextmanager
async def control_app(
    database_url: str, etcd_url: str, etcd_prefix: str, artifacts: Path
) -> AsyncIterator[web.Application]:
    async with open_registry(database_url, etcd_url, etcd_prefix, artifacts) as harness:
        info = await harness.registry.put_artifact(chunks_of(b"torchscript bytes"))
        for version in ("1", "2"):
            await harness.registry.register_version(
                "iris", version, artifact_sha256=info.sha256, signature=SIGNATURE)
        tenants = TenantStore(harness.pool, harness.etcd, etcd_prefix=etcd_prefix)
        await tenants.create_tenant({"name": "acme", "rate": 10}, author="fuzz")
        yield create_app(
            RolloutStore(harness.pool, harness.etcd, etcd_prefix=etcd_prefix),
            {TOKEN: "fuzz"}, tenants=tenants, reports=ReportStore(harness.pool),
        )


@pytest.fixture(scope="module")
def control_url(
    local_postgres: LocalPostgres, local_etcd: LocalEtcd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    database_url = local_postgres.create_database(f"fuzz_{uuid.uuid4().hex}")
    prefix = f"/infermesh-fuzz-{uuid.uuid4().hex}/"
    artifacts = tmp_path_factory.mktemp("fuzz-artifacts")
    with serve_in_thread(
        lambda: control_app(database_url, local_etcd.url, prefix, artifacts)
    ) as url:
        yield url


def control_schema() -> OpenApiSchema:
    """The served document, with model and tenant paths narrowed to ones that exist (and one
    that does not) so that requests reach validation and the stores, not only a 404."""
    narrowed = {"model": [*MODELS, "nope"], "tenant": [*TENANTS, "nope"]}
    document: dict[str, Any] = copy.deepcopy(openapi_document())
    for item in document["paths"].values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter["name"] in narrowed:
                    parameter["schema"] = {"enum": narrowed[parameter["name"]]}
    return schemathesis.openapi.from_dict(document)


# Built at collection (pytest 9 breaks schemathesis' lazy `from_fixture`).
schema = control_schema()


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_5xx_or_hangs(case: Case[Any], control_url: str) -> None:
    response = case.call(base_url=control_url, headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=RESPONSE_TIMEOUT)
    case.validate_response(response, checks=CHECKS)
