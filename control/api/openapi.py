"""The control API's OpenAPI 3.1 document, written by hand and served at `GET /openapi.json`.

A test checks that every route the app registers appears here, so a new resource adds its
paths and schemas in its own `openapi.py` (rollouts/, tenants/, reports/) and merges them in
below; this module holds what belongs to no resource.
"""

from __future__ import annotations

from typing import Any

from control.api.reports.openapi import REPORT_PATHS, REPORT_SCHEMAS
from control.api.rollouts.openapi import ROLLOUT_PATHS, ROLLOUT_SCHEMAS
from control.api.tenants.openapi import TENANCY_PATHS, TENANCY_SCHEMAS

JSON = "application/json"
_PUBLIC: list[dict[str, Any]] = []  # an empty security requirement: no token needed


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


PATHS: dict[str, Any] = {
    "/v1/health": {"get": {
        "summary": "Liveness", "security": _PUBLIC,
        "responses": {"200": _json("Serving", {"type": "object", "properties": {
            "status": {"const": "ok"}}})},
    }},
    "/metrics": {"get": {
        "summary": "Prometheus metrics", "security": _PUBLIC,
        "responses": {"200": {"description": "Text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}},
    }},
    "/openapi.json": {"get": {
        "summary": "This document", "security": _PUBLIC,
        "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})},
    }},
}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": {"type": "string"}}},
}


def openapi_document() -> dict[str, Any]:
    """The whole document."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "infermesh control API", "version": "1",
                 "description": "Rollouts (weights, shadow, guard, rollback, history), "
                                "tenants, API keys, model limits and model reports."},
        "servers": [{"url": "http://127.0.0.1:8100"}],
        "security": [{"bearer": []}],
        "paths": {**PATHS, **ROLLOUT_PATHS, **TENANCY_PATHS, **REPORT_PATHS},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "An admin token (name:secret)"}},
            "schemas": {**SCHEMAS, **ROLLOUT_SCHEMAS, **TENANCY_SCHEMAS, **REPORT_SCHEMAS},
        },
    }
