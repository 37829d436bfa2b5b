"""What every route table of the control API shares: JSON bodies in and out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from services.mesh.domain.errors import InvalidInput


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """`body` as an orjson-encoded `application/json` response."""
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


async def read_object(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object body; with `optional`, `{}` for an empty body."""
    raw = await request.read()
    if optional and not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body: malformed JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidInput("body: must be a JSON object")
    return body
