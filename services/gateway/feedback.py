"""Feedback on predictions: a label or a score a client sends for a request id it was served.
No HTTP in here (the REST route is in feedback_routes.py).

A post goes: `authenticate` (the API key → an enabled tenant; no model check, as feedback
names a request, not a model), then `record` (decode and validate the JSON body → write it
through the `FeedbackStore`). The body is one of

    {"request_id": "r-1", "label": "cat"}          label: string, integer or boolean
    {"request_id": "r-1", "score": 0.8}            score: a finite number

with an optional `"kind"` (`[a-z][a-z0-9_.-]{0,63}`; default "label" or "score"). Feedback is
keyed by (tenant, request id, kind): posting the same kind again replaces the value, so a
retried post is harmless. Labels are stored as text (integers in decimal, booleans as
`true`/`false`), the form the prediction log uses for the predicted label.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from services.gateway.access import Access
from services.gateway.auth import AuthFailure, HeaderLookup
from services.gateway.metrics import GatewayMetrics
from services.mesh.domain.errors import InfermeshError, InvalidInput
from services.mesh.domain.ids import MAX_REQUEST_ID, check_request_id
from services.mesh.domain.tenancy import Tenant

KIND = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
MAX_LABEL = 1024
FIELDS = ("request_id", "label", "score", "kind")
STORED = "stored"
"""The feedback metric's outcome for a post written to the store."""


@dataclass(frozen=True, slots=True)
class Feedback:
    """One piece of feedback: exactly one of `label` and `score` is set."""

    request_id: str
    kind: str
    label: str | None = None
    score: float | None = None


class FeedbackStore(Protocol):
    """Where feedback is kept (Postgres, or a fake in tests)."""

    async def put(self, tenant: str, feedback: Feedback) -> None:
        """Insert, or replace the tenant's feedback of the same kind for the same request.

        Raises Unavailable (with retry_after) when the store cannot take it now.
        """
        ...


def parse_feedback(raw: bytes) -> Feedback:
    """The feedback a JSON body describes; InvalidInput names the field at fault."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body: malformed JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidInput("body: must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise InvalidInput(f"{unknown[0]}: unknown field (allowed: {', '.join(FIELDS)})")
    request_id = _request_id(body.get("request_id"))
    if ("label" in body) == ("score" in body):
        raise InvalidInput("label, score: give exactly one of them")
    if "label" in body:
        label, default_kind = _label(body["label"]), "label"
        score = None
    else:
        label, score, default_kind = None, _score(body["score"]), "score"
    return Feedback(request_id, _kind(body.get("kind", default_kind)), label, score)


def _request_id(value: Any) -> str:
    # The same rule as the ids the gateway serves: anything else was never served.
    if value is None:
        raise InvalidInput("request_id: required")
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_REQUEST_ID:
        raise InvalidInput(f"request_id: must be a string of 1 to {MAX_REQUEST_ID} characters")
    return check_request_id(value, field="request_id")


def _label(value: Any) -> str:
    if isinstance(value, bool):  # before int: a bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise InvalidInput("label: must be a string, an integer or a boolean")
    if not 1 <= len(value) <= MAX_LABEL or "\x00" in value:
        raise InvalidInput(f"label: must be 1 to {MAX_LABEL} characters, without NUL")
    return value


def _score(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput("score: must be a finite number")
    score = float(value)
    if not math.isfinite(score):
        raise InvalidInput("score: must be a finite number")
    return score


def _kind(value: Any) -> str:
    if not isinstance(value, str) or KIND.fullmatch(value) is None:
        raise InvalidInput("kind: must match [a-z][a-z0-9_.-]{0,63}, e.g. label or csat")
    return value


class FeedbackRecorder:
    """Authenticates feedback posts, validates them and writes them to a store."""

    def __init__(self, access: Access, store: FeedbackStore, *, metrics: GatewayMetrics) -> None:
        self._access = access
        self._store = store
        self._metrics = metrics

    def authenticate(self, header: HeaderLookup) -> Tenant:
        """The caller's tenant (any enabled tenant may post); Unauthenticated or
        PermissionDenied (a disabled tenant)."""
        outcome = self._access.authenticate(header)
        if isinstance(outcome, AuthFailure):
            self._metrics.auth_failures.labels(outcome.reason).inc()
            raise outcome.error()
        return outcome

    async def record(self, tenant: Tenant, raw: bytes) -> Feedback:
        """Validate the JSON body `raw` and store it as `tenant`'s; the feedback stored.

        Raises InvalidInput (naming the field) or Unavailable (the store is down).
        """
        try:
            feedback = parse_feedback(raw)
            await self._store.put(tenant.name, feedback)
        except InfermeshError as exc:
            self._metrics.feedback.labels(tenant.name, exc.code).inc()
            raise
        self._metrics.feedback.labels(tenant.name, STORED).inc()
        return feedback
