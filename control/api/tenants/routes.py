"""REST routes for tenants, API keys and model limits: decode, one TenantStore call, encode."""

from __future__ import annotations

from aiohttp import web

from control.api.auth import AUTHOR
from control.api.tenants.store import TenantStore
from control.api.tenants.validation import parse_key_request
from services.mesh.transport.rest import json_response, read_json_object

TENANTS = web.AppKey("tenant_store", TenantStore)
NO_STORE = {"Cache-Control": "no-store"}
"""A response carrying a secret must not be kept by any cache on the way."""

tenants = web.RouteTableDef()
keys = web.RouteTableDef()
limits = web.RouteTableDef()


@tenants.post("/v1/tenants")
async def create_tenant(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    tenant = await request.app[TENANTS].create_tenant(body, author=request[AUTHOR])
    return json_response(tenant.to_json(), 201)


@tenants.get("/v1/tenants")
async def list_tenants(request: web.Request) -> web.Response:
    found = await request.app[TENANTS].list_tenants()
    return json_response({"tenants": [t.to_json() for t in found]})


@tenants.get("/v1/tenants/{tenant}")
async def get_tenant(request: web.Request) -> web.Response:
    state = await request.app[TENANTS].get_tenant(request.match_info["tenant"])
    return json_response(state.to_json())


@tenants.patch("/v1/tenants/{tenant}")
async def update_tenant(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    tenant = await request.app[TENANTS].update_tenant(
        request.match_info["tenant"], body, author=request[AUTHOR]
    )
    return json_response(tenant.to_json())


@tenants.delete("/v1/tenants/{tenant}")
async def disable_tenant(request: web.Request) -> web.Response:
    tenant = await request.app[TENANTS].disable_tenant(
        request.match_info["tenant"], author=request[AUTHOR]
    )
    return json_response(tenant.to_json())


@keys.post("/v1/tenants/{tenant}/keys")
async def issue_key(request: web.Request) -> web.Response:
    note = parse_key_request(await read_json_object(request, optional=True))
    key, info = await request.app[TENANTS].issue_key(
        request.match_info["tenant"], note=note, author=request[AUTHOR]
    )
    return json_response({"key": key, **info.to_json()}, 201, NO_STORE)


@keys.get("/v1/tenants/{tenant}/keys")
async def list_keys(request: web.Request) -> web.Response:
    found = await request.app[TENANTS].list_keys(request.match_info["tenant"])
    return json_response({"keys": [k.to_json() for k in found]})


@keys.delete("/v1/keys/{key_id}")
async def revoke_key(request: web.Request) -> web.Response:
    info = await request.app[TENANTS].revoke_key(
        request.match_info["key_id"], author=request[AUTHOR]
    )
    return json_response(info.to_json())


@limits.put("/v1/models/{model}/limits")
async def set_limits(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    found = await request.app[TENANTS].set_model_limits(
        request.match_info["model"], body, author=request[AUTHOR]
    )
    return json_response(found.to_json())


@limits.get("/v1/models/{model}/limits")
async def get_limits(request: web.Request) -> web.Response:
    found = await request.app[TENANTS].get_model_limits(request.match_info["model"])
    return json_response(found.to_json())


@limits.delete("/v1/models/{model}/limits")
async def clear_limits(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    await request.app[TENANTS].clear_model_limits(model, author=request[AUTHOR])
    return json_response({"model": model, "max_concurrency": None})


ROUTE_TABLES = (tenants, keys, limits)
