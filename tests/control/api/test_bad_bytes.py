"""The control API answers bodies it cannot use with a 400 naming the problem, never a 500:
an undecodable or unsupported Content-Encoding, and tenant numbers no quota can use."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from control.api.app import create_app
from tests.control.api.conftest import ControlHarness

Client = TestClient[web.Request, web.Application]
ALICE = {"Authorization": "Bearer alice-secret"}
TENANT = orjson.dumps({"name": "acme", "rate": 10})


@pytest.fixture
async def client(control: ControlHarness) -> AsyncIterator[Client]:
    app = create_app(control.store, {"alice-secret": "alice"}, tenants=control.tenants)
    async with TestClient(TestServer(app)) as client:
        yield client


async def post_tenant(client: Client, body: bytes, **headers: str) -> tuple[int, Any]:
    response = await client.post("/v1/tenants", data=body, headers={
        **ALICE, "Content-Type": "application/json", **headers})
    return response.status, await response.json()


@pytest.mark.parametrize(("encoding", "body", "error"), [
    ("br", b"\xde\xad garbage", "body: Can not decode content-encoding: br"),
    ("gzip", gzip.compress(TENANT)[:10] + b"\xff" * 16,
     "body: Can not decode content-encoding: gzip"),
    ("bogus", TENANT, "Content-Encoding header: 'bogus' is not supported"),
], ids=["br", "gzip", "unknown"])
async def test_a_body_that_does_not_decode_is_400(
    client: Client, encoding: str, body: bytes, error: str
) -> None:
    status, answer = await post_tenant(client, body, **{"Content-Encoding": encoding})
    assert status == 400
    assert answer["error"].startswith(error)
    assert (await post_tenant(client, gzip.compress(TENANT), **{"Content-Encoding": "gzip"}))[0] \
        == 201


@pytest.mark.parametrize(("fields", "error"), [
    ({"rate": 1e308}, "rate: must be a number > 0 and <= 1e+06, got 1e+308"),
    ({"rate": 10, "burst": 2**62}, "burst: must be an integer from 1 to 1000000"),
    ({"rate": 10, "max_concurrency": 10**7}, "max_concurrency: must be an integer from 1 to"),
    ({"rate": 10, "weight": 1e300}, "weight: must be a number > 0 and <= 1000, got 1e+300"),
    ({"rate": -1}, "rate: must be a number > 0 and <= 1e+06, got -1"),
])
async def test_tenant_numbers_out_of_range_are_400_naming_the_field(
    client: Client, fields: dict[str, Any], error: str
) -> None:
    status, answer = await post_tenant(client, orjson.dumps({"name": "acme", **fields}))
    assert status == 400 and answer["error"].startswith(error), answer


async def test_a_rate_past_float_range_in_the_text_is_400(client: Client) -> None:
    status, answer = await post_tenant(client, b'{"name": "acme", "rate": 1e999}')
    assert status == 400 and answer["error"].startswith("body: malformed JSON")
