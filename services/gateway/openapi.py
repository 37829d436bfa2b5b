"""The gateway's OpenAPI 3.1 document, written by hand and served at `GET /openapi.json`.

It describes the Open Inference Protocol v2 REST routes the gateway serves (app.py),
`POST /v1/feedback` (feedback_routes.py) and async jobs with their uploads and disabled webhook
URLs (jobs_openapi.py), in the style of the control API's
(control/api/openapi.py). A test checks that every route the app registers appears here. The
binary tensor extension (a JSON header, then raw bytes, with `Inference-Header-Content-Length`)
is a body no JSON schema describes; it is named in the inference operation's description.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from services.gateway import jobs_openapi
from services.mesh.domain.tensors import DATATYPES

JSON = "application/json"
_PUBLIC: list[dict[str, Any]] = []  # an empty security requirement: no key needed
OPENAPI = web.AppKey("gateway_openapi_json", bytes)


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    meaning = {
        400: "Invalid input; the message names the field",
        401: "Missing, malformed or unknown API key",
        403: "The tenant is disabled, or may not use this model",
        404: "Unknown model or version (or a model the key may not see)",
        413: "The body is larger than any valid request for the model needs",
        429: "Over the tenant's rate or concurrency quota (see Retry-After)",
        503: "No live replica can serve the request now",
        504: "The request's deadline passed",
    }
    return {str(c): _json(meaning[c], _ref("Error")) for c in codes}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "minLength": 1}}


_STATUS_ONLY = {"description": "No body; the status says it"}
_MODEL, _VERSION = _path("model"), _path("version")
_REQUEST_ID = {"name": "X-Request-Id", "in": "header", "required": False,
               "description": "The request's id (printable ASCII, at most 128 characters); "
                              "one is made up when absent",
               "schema": {"type": "string", "maxLength": 128, "pattern": "^[!-~]+$"}}


def _model_paths(base: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    served = "the version named" if "{version}" in base else "the model's stable version"
    return {
        base: {"get": {
            "summary": f"Model metadata of {served}", "parameters": parameters,
            "responses": {"200": _json("Model metadata", _ref("ModelMetadata")),
                          **_errors(401, 403, 404)},
        }},
        f"{base}/ready": {"get": {
            "summary": f"Whether {served} has a ready worker", "parameters": parameters,
            "responses": {"200": _STATUS_ONLY, "503": _STATUS_ONLY, **_errors(401, 403, 404)},
        }},
        f"{base}/infer": {"post": {
            "summary": f"Run inference on {served}",
            "description": "JSON tensor data, or the binary tensor extension: a JSON header "
                           "of Inference-Header-Content-Length bytes, then each input's raw "
                           "bytes in input order (`binary_data_size` in its parameters). "
                           "Content-Encoding gzip, deflate or br is undone first.",
            "parameters": [*parameters, _REQUEST_ID],
            "requestBody": {"required": True,
                            "content": {JSON: {"schema": _ref("InferenceRequest")}}},
            "responses": {"200": _json("Inference response", _ref("InferenceResponse")),
                          **_errors(400, 401, 403, 404, 413, 429, 503, 504)},
        }},
    }


PATHS: dict[str, Any] = {
    "/v2": {"get": {
        "summary": "Server metadata", "security": _PUBLIC,
        "responses": {"200": _json("Server metadata", _ref("ServerMetadata"))},
    }},
    "/v2/health/live": {"get": {"summary": "Liveness", "security": _PUBLIC,
                                "responses": {"200": _STATUS_ONLY, "503": _STATUS_ONLY}}},
    "/v2/health/ready": {"get": {"summary": "Readiness: every rolled-out model has a worker",
                                 "security": _PUBLIC,
                                 "responses": {"200": _STATUS_ONLY, "503": _STATUS_ONLY}}},
    **_model_paths("/v2/models/{model}", [_MODEL]),
    **_model_paths("/v2/models/{model}/versions/{version}", [_MODEL, _VERSION]),
    "/v1/feedback": {"post": {
        "summary": "A label or score for a request id the tenant was served",
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref("Feedback")}}},
        "responses": {"200": _json("Stored", _ref("FeedbackStored")),
                      **_errors(400, 401, 403, 413, 503),
                      "404": _json("This gateway takes no feedback", _ref("Error"))},
    }},
    **jobs_openapi.PATHS,
    "/metrics": {"get": {
        "summary": "Prometheus metrics", "security": _PUBLIC,
        "responses": {"200": {"description": "Text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}},
    }},
    "/inference.GRPCInferenceService/ModelInfer": {"post": {
        "summary": "Unary gRPC ModelInfer carried over HTTP/1.1 (the edge's bridge)",
        "description": "What nginx sends for a unary ModelInfer call (deploy/nginx/edge.conf): "
                       "the call's length-prefixed ModelInferRequest as the body. The answer is "
                       "HTTP 200 with the gRPC status in `grpc-status` / `grpc-message` headers, "
                       "which the edge turns into HTTP/2 trailers. gRPC clients use the edge's "
                       "port or the gateway's gRPC port, not this route.",
        "requestBody": {"required": True, "content": {"application/grpc": {
            "schema": {"type": "string", "format": "binary"}}}},
        "responses": {
            "200": {"description": "The call's answer (an empty body when grpc-status is not 0)",
                    "headers": {"grpc-status": {"schema": {"type": "string"}}},
                    "content": {"application/grpc": {
                        "schema": {"type": "string", "format": "binary"}}}},
            "415": _json("The body is not application/grpc", _ref("Error")),
        },
    }},
    "/openapi.json": {"get": {
        "summary": "This document", "security": _PUBLIC,
        "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})},
    }},
}

_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_TENSOR_SPEC = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string"}, "datatype": {"enum": list(DATATYPES)},
    "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}},
}}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": {"type": "string"},
                             "retry_after": {"type": "number"}}},
    "ServerMetadata": {"type": "object", "required": ["name", "version", "extensions"],
                       "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                      "extensions": {"type": "array",
                                                     "items": {"type": "string"}}}},
    "ModelMetadata": {"type": "object", "required": ["name", "versions", "platform", "inputs",
                                                     "outputs"],
                      "properties": {"name": {"type": "string"},
                                     "versions": {"type": "array", "items": {"type": "string"}},
                                     "platform": {"type": "string"},
                                     "inputs": {"type": "array", "items": _TENSOR_SPEC},
                                     "outputs": {"type": "array", "items": _TENSOR_SPEC}}},
    "InferenceRequest": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string", "maxLength": 128},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "minItems": 1, "items": _ref("RequestInput")},
        "outputs": {"type": "array", "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}}}},
    }},
    "RequestInput": {"type": "object", "required": ["name", "datatype", "shape"],
                     "properties": {
                         "name": {"type": "string", "minLength": 1},
                         "datatype": {"enum": list(DATATYPES)},
                         "shape": _SHAPE,
                         "parameters": {"type": "object", "properties": {
                             "binary_data_size": {"type": "integer", "minimum": 0}}},
                         "data": {"description": "Flat or nested (row-major) elements: numbers "
                                                 "for FP, integers for INT/UINT, true/false "
                                                 "for BOOL, strings for BYTES",
                                  "type": "array"},
                     }},
    "InferenceResponse": {"type": "object", "required": ["model_name", "outputs"],
                          "properties": {
                              "model_name": {"type": "string"},
                              "model_version": {"type": "string"},
                              "id": {"type": "string"},
                              "parameters": {"type": "object"},
                              "outputs": {"type": "array", "items": {
                                  "type": "object", "required": ["name", "datatype", "shape"],
                                  "properties": {"name": {"type": "string"},
                                                 "datatype": {"enum": list(DATATYPES)},
                                                 "shape": _SHAPE,
                                                 "parameters": {"type": "object"},
                                                 "data": {"type": "array"}}}},
                          }},
    "Feedback": {"type": "object", "required": ["request_id"], "additionalProperties": False,
                 "properties": {
                     "request_id": {"type": "string", "minLength": 1, "maxLength": 128},
                     "label": {"type": ["string", "integer", "boolean"]},
                     "score": {"type": "number"},
                     "kind": {"type": "string", "pattern": "^[a-z][a-z0-9_.-]{0,63}$"}}},
    "FeedbackStored": {"type": "object", "required": ["request_id", "kind", "stored"],
                       "properties": {"request_id": {"type": "string"},
                                      "kind": {"type": "string"},
                                      "stored": {"const": True}}},
    **jobs_openapi.SCHEMAS,
}


def openapi_document() -> dict[str, Any]:
    """The whole document."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "infermesh gateway", "version": "1",
                 "description": "Open Inference Protocol v2 (KServe v2) over REST, with the "
                                "binary tensor extension, feedback on predictions, and "
                                "async jobs with signed webhooks."},
        "servers": [{"url": "http://127.0.0.1:8000"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": PATHS,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "An API key (imk_<id>_<secret>)"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                           "description": "The same API key, without a scheme"},
            },
            "schemas": SCHEMAS,
        },
    }


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type=JSON)


def add_openapi_route(app: web.Application) -> None:
    """Serve the document at GET /openapi.json (open, like server metadata)."""
    app[OPENAPI] = orjson.dumps(openapi_document())
    app.router.add_get("/openapi.json", _openapi)
