"""The OpenAPI path and schemas of model reports (routes.py).

`control.api.openapi.openapi_document()` merges these into the document it serves.
"""

from __future__ import annotations

from typing import Any

JSON = "application/json"
_KIND = {"type": "string", "pattern": "^[a-z][a-z0-9_.-]{0,63}$"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


_PARAMETERS = [
    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}},
    _query("since", {"type": "string", "pattern": "^[0-9]{1,6}[smhdw]$", "default": "24h"},
           "How far back: 90s, 30m, 24h, 7d, 2w (at most 366d)"),
    _query("buckets", {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
           "Bands the bucket space [0, 10000) is cut into"),
    _query("include_shadow", {"type": "boolean", "default": False},
           "Also report shadow (mirrored) predictions, as rows of their own"),
    _query("label_kind", {**_KIND, "default": "label"}, "Feedback kind compared for accuracy"),
    _query("score_kind", {**_KIND, "default": "score"}, "Feedback kind averaged as mean_score"),
]
_ERROR = _ref("Error")

REPORT_PATHS: dict[str, Any] = {
    "/v1/models/{model}/report": {"get": {
        "summary": "Predictions joined with feedback, per version and bucket band",
        "parameters": _PARAMETERS,
        "responses": {
            "200": _json("The report", _ref("Report")),
            "400": _json("A bad query parameter; the message names it", _ERROR),
            "401": _json("Missing or unknown token", _ERROR),
            "404": _json("Unknown model", _ERROR),
        },
    }},
}

_COUNT = {"type": "integer", "minimum": 0}
_RATIO = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
_ROW = {"type": "object", "properties": {
    "version": {"type": "string"},
    "bucket_range": {"type": ["array", "null"], "items": {"type": "integer"}, "minItems": 2,
                     "maxItems": 2, "description": "[lo, hi] inclusive; null: pinned requests"},
    "shadow": {"type": "boolean"},
    "predictions": _COUNT,
    "with_feedback": {**_COUNT, "description": "Predictions with label or score feedback"},
    "with_label_feedback": _COUNT,
    "accuracy": {**_RATIO, "description": "Predicted label == feedback label, over the "
                 "predictions with both; null when none"},
    "with_score_feedback": _COUNT,
    "mean_score": {"type": ["number", "null"]},
    "latency_ms": {"type": "object", "properties": {
        "p50": {"type": "number"}, "p90": {"type": "number"}, "p99": {"type": "number"}}},
}}

REPORT_SCHEMAS: dict[str, Any] = {
    "ReportRow": _ROW,
    "Report": {"type": "object", "properties": {
        "model": {"type": "string"}, "since": {"type": "string"},
        "buckets": {"type": "integer"}, "include_shadow": {"type": "boolean"},
        "label_kind": {"type": "string"}, "score_kind": {"type": "string"},
        "rows": {"type": "array", "items": _ref("ReportRow")}}},
}
