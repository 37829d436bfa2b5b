"""The OpenAPI paths and schemas of models and rollouts (routes.py).

`control.api.openapi.openapi_document()` merges these into the document it serves.
"""

from __future__ import annotations

from typing import Any

JSON = "application/json"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    meaning = {
        400: "Invalid input; the message names the field", 401: "Missing or unknown token",
        404: "Unknown model, or epoch", 412: "If-Match names a stale epoch",
        503: "Saved in Postgres but not yet published to etcd",
    }
    schemas = {412: _ref("StaleEpoch")}
    return {str(c): _json(meaning[c], schemas.get(c, _ref("Error"))) for c in codes}


_MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
_ETAG = {"ETag": {"description": "The epoch, quoted: \"5\"", "schema": {"type": "string"}}}
_IF_MATCH = {
    "name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"},
    "description": "Write only if the current epoch is this one: \"5\", 5 or W/\"5\"; * = any",
}
_LIMIT = {
    "name": "limit", "in": "query", "required": False,
    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
}


def _rollout_response(description: str) -> dict[str, Any]:
    return {**_json(description, _ref("Rollout")), "headers": _ETAG}


ROLLOUT_PATHS: dict[str, Any] = {
    "/v1/models": {"get": {
        "summary": "Every model (as the registry lists them)",
        "responses": {"200": _json("Models by name", _ref("ModelList")), **_errors(401)},
    }},
    "/v1/models/{model}": {"get": {
        "summary": "A model with its versions and rollout", "parameters": [_MODEL],
        "responses": {"200": _json("The model", _ref("ModelDetail")), **_errors(401, 404)},
    }},
    "/v1/rollouts/{model}": {
        "get": {
            "summary": "The current rollout", "parameters": [_MODEL],
            "responses": {"200": _rollout_response("The rollout, with updated_at"),
                          **_errors(401, 404)},
        },
        "put": {
            "summary": "Write the next epoch of the rollout", "parameters": [_MODEL, _IF_MATCH],
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("RolloutWrite")}}},
            "responses": {"200": _rollout_response("The new rollout"),
                          **_errors(400, 401, 404, 412, 503)},
        },
    },
    "/v1/rollouts/{model}/rollback": {"post": {
        "summary": "Restore an earlier epoch's record (without its guard) as a new epoch",
        "parameters": [_MODEL],
        "requestBody": {"required": False, "content": {JSON: {"schema": _ref("Rollback")}}},
        "responses": {"200": _rollout_response("The new rollout"),
                      **_errors(400, 401, 404, 503)},
    }},
    "/v1/rollouts/{model}/history": {"get": {
        "summary": "Rollouts written for the model, newest first", "parameters": [_MODEL, _LIMIT],
        "responses": {"200": _json("The history", _ref("History")), **_errors(400, 401, 404)},
    }},
}

_ROUTE = {"type": "object", "required": ["version", "weight"], "additionalProperties": False,
          "properties": {"version": {"type": "string"}, "weight": {"type": "number", "minimum": 0}}}
_SHADOW = {"type": "object", "required": ["version", "fraction"], "additionalProperties": False,
           "properties": {"version": {"type": "string"},
                          "fraction": {"type": "number", "minimum": 0, "maximum": 1}}}
_WRITE_FIELDS: dict[str, Any] = {
    "routes": {"type": "array", "minItems": 1, "items": _ref("Route"),
               "description": "Weights sum to 100; versions exist and appear once"},
    "sticky_key": {"type": ["string", "null"], "description": "Default: the current one"},
    "salt": {"type": "string", "description": "Default: the current one, else the model name"},
    "shadow": {"type": "array", "items": _ref("ShadowRoute"), "default": []},
    "fallback": {"type": "string", "description": "Default: the route with the largest weight"},
    "guard": {"oneOf": [_ref("Guard"), {"type": "null"}]},
}
_GUARD = {"type": "object", "additionalProperties": False, "properties": {
    "canary": {"type": "string"}, "baseline": {"type": "string"},
    "window_s": {"type": "number", "minimum": 0.1},
    "min_samples": {"type": "integer", "minimum": 1},
    "max_error_rate_delta": {"type": "number", "minimum": 0, "maximum": 1},
    "max_p99_ratio": {"type": "number", "minimum": 1},
    "steps": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 100}},
    "step_interval_s": {"type": "number", "minimum": 0},
}}
_ROLLOUT = {"type": "object", "required": ["model", "routes", "epoch"], "properties": {
    "model": {"type": "string"}, **_WRITE_FIELDS, "epoch": {"type": "integer"},
    "updated_at": {"type": "string", "format": "date-time", "description": "GET only"},
}}
_HISTORY_ENTRY = {"type": "object", "properties": {
    "epoch": {"type": "integer"}, "author": {"type": "string"}, "reason": {"type": "string"},
    "created_at": {"type": "string", "format": "date-time"}, "record": _ref("Rollout"),
}}
_MODEL_FIELDS: dict[str, Any] = {
    "name": {"type": "string"}, "description": {"type": "string"},
    "created_at": {"type": "string", "format": "date-time"},
    "latest": {"type": ["string", "null"]}, "serving": {"type": ["string", "null"]},
}
_SUMMARY = {"type": "object", "properties": {**_MODEL_FIELDS, "versions": {"type": "integer"}}}

ROLLOUT_SCHEMAS: dict[str, Any] = {
    "StaleEpoch": {"type": "object", "required": ["error", "epoch"], "properties": {
        "error": {"type": "string"}, "epoch": {"type": "integer", "description": "Current"}}},
    "Route": _ROUTE,
    "ShadowRoute": _SHADOW,
    "Guard": _GUARD,
    "RolloutWrite": {"type": "object", "required": ["routes"], "additionalProperties": False,
                     "properties": {**_WRITE_FIELDS, "reason": {"type": "string"}}},
    "Rollout": _ROLLOUT,
    "Rollback": {"type": "object", "additionalProperties": False, "properties": {
        "epoch": {"type": "integer", "minimum": 1,
                  "description": "Default: the latest epoch before the current one"},
        "reason": {"type": "string"}}},
    "History": {"type": "object", "properties": {
        "model": {"type": "string"}, "history": {"type": "array", "items": _HISTORY_ENTRY}}},
    "ModelSummary": _SUMMARY,
    "ModelList": {"type": "object", "properties": {
        "models": {"type": "array", "items": _ref("ModelSummary")}}},
    # Not allOf ModelSummary: there `versions` counts them, here it lists them.
    "ModelDetail": {"type": "object", "properties": {
        **_MODEL_FIELDS,
        "versions": {"type": "array", "items": {"type": "object"}},
        "rollout": {"oneOf": [_ref("Rollout"), {"type": "null"}]}}},
}

