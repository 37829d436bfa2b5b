"""The OpenAPI paths and schemas of tenants, API keys and model limits (routes.py).

`control.api.openapi.openapi_document()` merges these into the document it serves.
"""

from __future__ import annotations

from typing import Any

JSON = "application/json"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _body(schema: str, *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": _ref(schema)}}}


def _errors(*codes: int) -> dict[str, Any]:
    meaning = {
        400: "Invalid input; the message names the field", 401: "Missing or unknown token",
        404: "Unknown tenant, key or model (or a model without limits)",
        409: "A tenant of that name exists",
        503: "Saved in Postgres but not yet published to etcd",
    }
    return {str(c): _json(meaning[c], _ref("Error")) for c in codes}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_TENANT, _KEY_ID, _MODEL = _path("tenant"), _path("key_id"), _path("model")
_NO_STORE = {"Cache-Control": {"description": "no-store: the key is in the body",
                               "schema": {"const": "no-store"}}}

TENANCY_PATHS: dict[str, Any] = {
    "/v1/tenants": {
        "get": {"summary": "Every tenant, by name",
                "responses": {"200": _json("Tenants", _ref("TenantList")), **_errors(401)}},
        "post": {"summary": "Create a tenant", "requestBody": _body("TenantCreate"),
                 "responses": {"201": _json("The tenant", _ref("Tenant")),
                               **_errors(400, 401, 409, 503)}},
    },
    "/v1/tenants/{tenant}": {
        "get": {"summary": "A tenant", "parameters": [_TENANT],
                "responses": {"200": _json("The tenant", _ref("Tenant")), **_errors(401, 404)}},
        "patch": {"summary": "Change some of a tenant's fields (not its name)",
                  "parameters": [_TENANT], "requestBody": _body("TenantUpdate"),
                  "responses": {"200": _json("The tenant", _ref("Tenant")),
                                **_errors(400, 401, 404, 503)}},
        "delete": {"summary": "Disable a tenant: its keys stay, gateways refuse it",
                   "parameters": [_TENANT],
                   "responses": {"200": _json("The tenant", _ref("Tenant")),
                                 **_errors(401, 404, 503)}},
    },
    "/v1/tenants/{tenant}/keys": {
        "get": {"summary": "The tenant's API keys, oldest first (never a secret or hash)",
                "parameters": [_TENANT],
                "responses": {"200": _json("Keys", _ref("KeyList")), **_errors(401, 404)}},
        "post": {"summary": "Issue an API key; the response is the only place the key appears",
                 "parameters": [_TENANT], "requestBody": _body("KeyRequest", required=False),
                 "responses": {"201": {**_json("The key", _ref("IssuedKey")),
                                       "headers": _NO_STORE},
                               **_errors(400, 401, 404, 503)}},
    },
    "/v1/keys/{key_id}": {"delete": {
        "summary": "Revoke an API key (idempotent); gateways stop accepting it at once",
        "parameters": [_KEY_ID],
        "responses": {"200": _json("The revoked key", _ref("KeyInfo")), **_errors(401, 404, 503)},
    }},
    "/v1/models/{model}/limits": {
        "get": {"summary": "The model's limits", "parameters": [_MODEL],
                "responses": {"200": _json("Limits", _ref("ModelLimits")), **_errors(401, 404)}},
        "put": {"summary": "Set the model's limits (across every tenant and gateway)",
                "parameters": [_MODEL], "requestBody": _body("ModelLimitsWrite"),
                "responses": {"200": _json("Limits", _ref("ModelLimits")),
                              **_errors(400, 401, 404, 503)}},
        "delete": {"summary": "Remove the model's limits", "parameters": [_MODEL],
                   "responses": {"200": _json("No limit", _ref("ModelLimits")),
                                 **_errors(401, 404, 503)}},
    },
}

_TENANT_FIELDS: dict[str, Any] = {
    "rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1_000_000,
             "description": "Requests per second"},
    "burst": {"type": "integer", "minimum": 1, "maximum": 1_000_000,
              "description": "Default: ceil(rate)"},
    "max_concurrency": {"type": "integer", "minimum": 1, "maximum": 1_000_000, "default": 64},
    "allowed_models": {"type": ["array", "null"], "items": {"type": "string"},
                       "description": "Existing models; null (the default) for every model"},
    "priority_class": {"enum": ["realtime", "bulk"], "default": "realtime"},
    "weight": {"type": "number", "exclusiveMinimum": 0, "maximum": 1_000, "default": 1},
    "disabled": {"type": "boolean", "default": False},
    "webhook_allowlist": {"type": "array", "items": {"type": "string"}, "maxItems": 50,
                          "description": "Hosts webhooks may target: exact hosts (which may be "
                          "internal), '*.domain' or '*' (public addresses only)"},
}
_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"}
_TIME = {"type": "string", "format": "date-time"}
_KEY_INFO = {"type": "object", "properties": {
    "key_id": {"type": "string"}, "tenant": {"type": "string"},
    "prefix": {"type": "string", "description": "imk_<key_id>: safe to show"},
    "note": {"type": "string"}, "created_by": {"type": "string"}, "created_at": _TIME,
    "revoked_at": {"type": ["string", "null"], "format": "date-time"},
    "revoked_by": {"type": ["string", "null"]},
}}

TENANCY_SCHEMAS: dict[str, Any] = {
    "TenantCreate": {"type": "object", "required": ["name", "rate"], "additionalProperties": False,
                     "properties": {"name": _NAME, **_TENANT_FIELDS}},
    "TenantUpdate": {"type": "object", "additionalProperties": False, "properties": {
        "name": {"type": "string", "description": "Must be the path's"}, **_TENANT_FIELDS,
        "created_at": {"description": "Ignored"}, "updated_at": {"description": "Ignored"}}},
    "Tenant": {"type": "object", "properties": {
        "name": _NAME, **_TENANT_FIELDS,
        "created_at": {**_TIME, "description": "GET only"},
        "updated_at": {**_TIME, "description": "GET only"}}},
    "TenantList": {"type": "object", "properties": {
        "tenants": {"type": "array", "items": _ref("Tenant")}}},
    "KeyRequest": {"type": "object", "additionalProperties": False, "properties": {
        "note": {"type": "string", "maxLength": 200}}},
    "KeyInfo": _KEY_INFO,
    "IssuedKey": {"allOf": [_KEY_INFO, {"type": "object", "required": ["key"], "properties": {
        "key": {"type": "string", "description": "imk_<key_id>_<secret>: shown only here"}}}]},
    "KeyList": {"type": "object", "properties": {"keys": {"type": "array",
                                                          "items": _ref("KeyInfo")}}},
    "ModelLimitsWrite": {"type": "object", "required": ["max_concurrency"],
                         "additionalProperties": False, "properties": {
                             "max_concurrency": {"type": "integer", "minimum": 1,
                                                 "maximum": 1_000_000},
                             "model": {"type": "string", "description": "Must be the path's"}}},
    "ModelLimits": {"type": "object", "properties": {
        "model": {"type": "string"},
        "max_concurrency": {"type": ["integer", "null"], "description": "null: no limit"}}},
}
