"""REST routes for models and rollouts: decode, one RolloutStore call (core.py), encode.

A rollout answers with its epoch as the `ETag`; a write may name the epoch it read in
`If-Match`, and loses (412) when another write came first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from control.api.auth import AUTHOR
from control.api.core import RolloutStore
from services.mesh.domain import errors
from services.mesh.transport.rest import json_response, read_json_object

STORE = web.AppKey("rollout_store", RolloutStore)
MAX_HISTORY = 1000

_IF_MATCH = re.compile(r'(?:W/)?"(\d+)"|(\d+)')


def parse_if_match(value: str | None) -> int | None:
    """The epoch an `If-Match` header names: `"5"`, `5` or `W/"5"`; None for absent or `*`."""
    if value is None or value.strip() == "*":
        return None
    match = _IF_MATCH.fullmatch(value.strip())
    if match is None:
        raise errors.InvalidInput(f'If-Match: expected an epoch such as "5" (or *), got {value!r}')
    return int(match.group(1) or match.group(2))


def _limit(raw: str | None) -> int:
    if raw is None:
        return 50
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_HISTORY:
        raise errors.InvalidInput(f"limit: must be an integer in [1, {MAX_HISTORY}], got {raw!r}")
    return int(raw)


def _rollback_args(body: Mapping[str, Any]) -> tuple[int | None, str]:
    unknown = sorted(set(body) - {"epoch", "reason"})
    if unknown:
        raise errors.InvalidInput(f"{unknown[0]}: unknown field (allowed: epoch, reason)")
    epoch, reason = body.get("epoch"), body.get("reason", "")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1):
        raise errors.InvalidInput("epoch: must be a positive integer")
    if not isinstance(reason, str):
        raise errors.InvalidInput("reason: must be a string")
    return epoch, reason


def _with_etag(record: dict[str, Any], epoch: int) -> web.Response:
    return json_response(record, headers={"ETag": f'"{epoch}"'})


models = web.RouteTableDef()
rollouts = web.RouteTableDef()


@models.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    found = await request.app[STORE].list_models()
    return json_response({"models": [m.to_json() for m in found]})


@models.get("/v1/models/{model}")
async def get_model(request: web.Request) -> web.Response:
    detail = await request.app[STORE].get_model(request.match_info["model"])
    return json_response(detail.to_json())


@rollouts.get("/v1/rollouts/{model}")
async def get_rollout(request: web.Request) -> web.Response:
    state = await request.app[STORE].get(request.match_info["model"])
    return _with_etag(state.to_json(), state.rollout.epoch)


@rollouts.put("/v1/rollouts/{model}")
async def put_rollout(request: web.Request) -> web.Response:
    if_match = parse_if_match(request.headers.get("If-Match"))
    body = await read_json_object(request)
    rollout = await request.app[STORE].apply(
        request.match_info["model"], body, author=request[AUTHOR], if_match=if_match
    )
    return _with_etag(rollout.to_json(), rollout.epoch)


@rollouts.post("/v1/rollouts/{model}/rollback")
async def rollback(request: web.Request) -> web.Response:
    epoch, reason = _rollback_args(await read_json_object(request, optional=True))
    rollout = await request.app[STORE].rollback(
        request.match_info["model"], to_epoch=epoch, author=request[AUTHOR], reason=reason
    )
    return _with_etag(rollout.to_json(), rollout.epoch)


@rollouts.get("/v1/rollouts/{model}/history")
async def history(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    limit = _limit(request.query.get("limit"))
    entries = await request.app[STORE].history(model, limit=limit)
    return json_response({"model": model, "history": [e.to_json() for e in entries]})


ROUTE_TABLES = (models, rollouts)
