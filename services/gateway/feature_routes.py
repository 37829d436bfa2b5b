"""`PUT /v1/features/{entity_type}/{entity_id}` and `POST /v1/features/{entity_type}:bulk`: the
REST adapter of the FeatureWriter. Errors are answered by app.py's error middleware."""

from __future__ import annotations

from aiohttp import web

from services.gateway.features import FeatureWriter
from services.mesh.transport.rest import json_response, parse_json_object, read_body

FEATURES = web.AppKey("features", FeatureWriter)
MAX_PUT_BYTES = 64 << 10
"""One entity's features: a few hundred numbers at most."""
MAX_BULK_BYTES = 16 << 20
"""A bulk upsert; a larger body is refused (413) before it is read."""


async def put_features(request: web.Request) -> web.Response:
    writer = request.app[FEATURES]
    tenant = writer.authenticate(request.headers.get)  # 401/403 before the body is read
    body = parse_json_object(await read_body(request, limit=MAX_PUT_BYTES))
    stored = await writer.put(tenant, request.match_info["entity_type"],
                              request.match_info["entity_id"], body)
    return json_response({"stored": stored})


async def bulk_features(request: web.Request) -> web.Response:
    writer = request.app[FEATURES]
    tenant = writer.authenticate(request.headers.get)
    body = parse_json_object(await read_body(request, limit=MAX_BULK_BYTES))
    stored = await writer.bulk(tenant, request.match_info["entity_type"], body)
    return json_response({"stored": stored})


def add_feature_routes(app: web.Application, writer: FeatureWriter) -> None:
    """Serve the feature writes through `writer`."""
    app[FEATURES] = writer
    app.router.add_post("/v1/features/{entity_type:[^/:]+}:bulk", bulk_features)
    app.router.add_put("/v1/features/{entity_type}/{entity_id}", put_features)
