"""Turning tenant, key and limits bodies into records; every error names its field path.

Pure functions: the caller passes the models that exist, so these run inside the write's
transaction without doing any I/O themselves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from typing import Any

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tenancy import PRIORITY_CLASSES, ModelLimits, Tenant
from services.registry.validation import check_name
from services.webhooks.targets import parse_allowlist

TENANT_FIELDS = (
    "name", "rate", "burst", "max_concurrency", "allowed_models", "priority_class", "weight",
    "disabled", "webhook_allowlist",
)
ECHOED = ("created_at", "updated_at")
"""Fields of a GET that a GET-edit-PATCH round trip sends back; they are ignored."""
DEFAULT_MAX_CONCURRENCY = 64
MAX_NOTE = 200
MAX_RATE = 1_000_000.0
"""Requests per second: beyond any fleet this runs, and far from float overflow."""
MAX_COUNT = 1_000_000
"""The most a burst or concurrency cap may be."""
MAX_WEIGHT = 1_000.0


def parse_new_tenant(body: Mapping[str, Any], *, models: Collection[str]) -> Tenant:
    """The tenant `body` creates: `name` and `rate` required; the rest defaulted.

    Defaults: burst = max(1, ceil(rate)), max_concurrency 64, every model, realtime, weight 1.
    """
    _known(body, TENANT_FIELDS)
    if "name" not in body:
        raise InvalidInput("name: required")
    name = check_name(body["name"], field="name")
    if "rate" not in body:
        raise InvalidInput("rate: required, requests per second (> 0)")
    rate = _positive(body["rate"], where="rate", most=MAX_RATE)
    base = Tenant(name=name, rate=rate, burst=max(1, math.ceil(rate)),
                  max_concurrency=DEFAULT_MAX_CONCURRENCY)
    return _changed(base, body, models)


def parse_tenant_update(
    current: Tenant, body: Mapping[str, Any], *, models: Collection[str]
) -> Tenant:
    """`current` with the fields `body` names replaced; the name cannot change."""
    _known(body, TENANT_FIELDS + ECHOED)
    if body.get("name", current.name) != current.name:
        raise InvalidInput(
            f"name: a tenant cannot be renamed (the path names '{current.name}')"
        )
    return _changed(current, body, models)


def parse_limits(model: str, body: Mapping[str, Any]) -> ModelLimits:
    """`{max_concurrency}` for `model`; a `model` echoed from a GET must match the path."""
    _known(body, ("max_concurrency", "model"))
    if body.get("model", model) != model:
        raise InvalidInput(f"model: the body names {body['model']!r}, the path {model!r}")
    if "max_concurrency" not in body:
        raise InvalidInput("max_concurrency: required, an integer >= 1")
    return ModelLimits(model, _count(body["max_concurrency"], where="max_concurrency"))


def parse_key_request(body: Mapping[str, Any]) -> str:
    """The note of a key-issuing request (`{note?}`)."""
    _known(body, ("note",))
    return parse_note(body.get("note", ""))


def parse_note(raw: Any) -> str:
    """A free-text note kept with a key (who or what uses it)."""
    if not isinstance(raw, str) or len(raw) > MAX_NOTE:
        raise InvalidInput(f"note: must be a string of at most {MAX_NOTE} characters")
    return raw


def _changed(tenant: Tenant, body: Mapping[str, Any], models: Collection[str]) -> Tenant:
    changes: dict[str, Any] = {}
    if "rate" in body:
        changes["rate"] = _positive(body["rate"], where="rate", most=MAX_RATE)
    for field in ("burst", "max_concurrency"):
        if field in body:
            changes[field] = _count(body[field], where=field)
    if "allowed_models" in body:
        changes["allowed_models"] = _allowed_models(body["allowed_models"], models)
    if "priority_class" in body:
        changes["priority_class"] = _priority_class(body["priority_class"])
    if "weight" in body:
        changes["weight"] = _positive(body["weight"], where="weight", most=MAX_WEIGHT)
    if "disabled" in body:
        if not isinstance(body["disabled"], bool):
            raise InvalidInput("disabled: must be true or false")
        changes["disabled"] = body["disabled"]
    if "webhook_allowlist" in body:
        changes["webhook_allowlist"] = parse_allowlist(body["webhook_allowlist"])
    return dataclasses.replace(tenant, **changes)


def _known(body: Mapping[str, Any], fields: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(fields))
    if unknown:
        allowed = ", ".join(f for f in fields if f not in ECHOED)
        raise InvalidInput(f"{unknown[0]}: unknown field (allowed: {allowed})")


def _positive(raw: Any, *, where: str, most: float) -> float:
    allowed = f"a number > 0 and <= {most:g}"
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise InvalidInput(f"{where}: must be {allowed}")
    try:
        value = float(raw)
    except OverflowError:  # an integer past float range
        value = math.inf if raw > 0 else -math.inf
    if not math.isfinite(value) or not 0 < value <= most:
        raise InvalidInput(f"{where}: must be {allowed}, got {value:g}")
    return value


def _count(raw: Any, *, where: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_COUNT:
        shown = repr(raw) if len(repr(raw)) <= 40 else f"{repr(raw)[:37]}..."
        raise InvalidInput(f"{where}: must be an integer from 1 to {MAX_COUNT}, got {shown}")
    return raw


def _allowed_models(raw: Any, models: Collection[str]) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidInput("allowed_models: must be a list of model names, or null for every model")
    allowed: list[str] = []
    for i, name in enumerate(raw):
        if not isinstance(name, str) or name not in models:
            raise InvalidInput(f"allowed_models[{i}]: model {name!r} does not exist")
        if name in allowed:
            raise InvalidInput(f"allowed_models[{i}]: model '{name}' is listed twice")
        allowed.append(name)
    return tuple(allowed)


def _priority_class(raw: Any) -> str:
    if raw not in PRIORITY_CLASSES:
        raise InvalidInput(
            f"priority_class: must be one of {', '.join(PRIORITY_CLASSES)}, got {raw!r}"
        )
    return str(raw)
