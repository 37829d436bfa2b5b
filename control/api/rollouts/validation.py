"""Turning a rollout write (a JSON body) into a `Rollout`; every error names its field path.

Pure functions: the caller passes the current rollout (for defaults) and the versions that
exist, so these run inside the write's transaction without doing any I/O themselves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from typing import Any

from control.guard.spec import parse_guard
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.signatures import rollout_incompatibility
from services.mesh.domain.types import Rollout, Route, ShadowRoute, Signature

FIELDS = ("routes", "sticky_key", "salt", "shadow", "fallback", "guard", "reason")
ECHOED = ("model", "epoch", "updated_at")
"""Fields of a GET that a GET-edit-PUT round trip sends back: `model` must match, `epoch`
acts as If-Match when no header is given, `updated_at` is ignored."""
TOTAL_WEIGHT = 100.0
WEIGHT_TOLERANCE = 1e-6


def parse_rollout(
    model: str, body: Mapping[str, Any], *, current: Rollout, versions: Collection[str],
    signatures: Mapping[str, Signature] | None = None,
) -> Rollout:
    """The rollout `body` asks for, defaults taken from `current`; epoch is `current.epoch + 1`.

    `versions` are the versions of `model` that exist; every version named must be one. With
    `signatures` (by version), every routed, shadow and fallback version must be compatible
    with the primary (`services.mesh.domain.signatures`): the gateway validates against it.
    """
    unknown = sorted(set(body) - set(FIELDS) - set(ECHOED))
    if unknown:
        raise InvalidInput(f"{unknown[0]}: unknown field (allowed: {', '.join(FIELDS)})")
    if body.get("model", model) != model:
        raise InvalidInput(f"model: the body names {body['model']!r}, the path {model!r}")
    if "routes" not in body:
        raise InvalidInput("routes: required, a non-empty list of {version, weight}")
    routes = _routes(model, body["routes"], versions)
    rollout = Rollout(
        model=model, routes=routes,
        sticky_key=_sticky_key(body.get("sticky_key", current.sticky_key)),
        salt=_salt(body.get("salt", current.salt or model)),
        shadow=_shadow(model, body.get("shadow", []), versions),
        epoch=current.epoch + 1,
    )
    fallback = _version(model, body.get("fallback", rollout.primary), versions, where="fallback")
    rollout = dataclasses.replace(rollout, fallback=fallback)
    if signatures is not None and (found := rollout_incompatibility(rollout, signatures)):
        raise InvalidInput(found)
    raw_guard = body.get("guard")
    if raw_guard is None:
        return rollout
    spec = parse_guard(raw_guard, rollout)
    # Rollout drops an empty (falsy) guard when serialised, so `{}` is stored resolved.
    return dataclasses.replace(rollout, guard=dict(raw_guard) or spec.to_json())


def echoed_epoch(body: Mapping[str, Any], if_match: int | None) -> int | None:
    """The epoch a write is conditional on: the If-Match header, else the body's `epoch`."""
    if if_match is not None or "epoch" not in body:
        return if_match
    epoch = body["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise InvalidInput("epoch: must be the integer epoch the edit started from")
    return epoch


def parse_reason(raw: Any) -> str:
    """The free-text reason recorded in the history."""
    if not isinstance(raw, str):
        raise InvalidInput("reason: must be a string")
    return raw


def _routes(model: str, raw: Any, versions: Collection[str]) -> tuple[Route, ...]:
    if not isinstance(raw, list) or not raw:
        raise InvalidInput("routes: must be a non-empty list of {version, weight}")
    routes: list[Route] = []
    for i, item in enumerate(raw):
        where = f"routes[{i}]"
        entry = _entry(item, where, ("version", "weight"))
        version = _version(model, entry.get("version"), versions, where=f"{where}.version")
        if any(r.version == version for r in routes):
            raise InvalidInput(f"{where}.version: version '{version}' is listed twice")
        weight = _number(entry.get("weight"), where=f"{where}.weight")
        if weight < 0:
            raise InvalidInput(f"{where}.weight: must be >= 0, got {weight:g}")
        routes.append(Route(version, weight))
    total = math.fsum(r.weight for r in routes)
    if abs(total - TOTAL_WEIGHT) > WEIGHT_TOLERANCE:
        raise InvalidInput(f"routes: weights must sum to 100 (got {total:g})")
    return tuple(routes)


def _shadow(model: str, raw: Any, versions: Collection[str]) -> tuple[ShadowRoute, ...]:
    if not isinstance(raw, list):
        raise InvalidInput("shadow: must be a list of {version, fraction}")
    shadow: list[ShadowRoute] = []
    for i, item in enumerate(raw):
        where = f"shadow[{i}]"
        entry = _entry(item, where, ("version", "fraction"))
        version = _version(model, entry.get("version"), versions, where=f"{where}.version")
        if any(s.version == version for s in shadow):
            raise InvalidInput(f"{where}.version: version '{version}' is listed twice")
        fraction = _number(entry.get("fraction"), where=f"{where}.fraction")
        if not 0.0 <= fraction <= 1.0:
            raise InvalidInput(f"{where}.fraction: must be in [0, 1], got {fraction:g}")
        shadow.append(ShadowRoute(version, fraction))
    return tuple(shadow)


def _entry(item: Any, where: str, fields: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(item, Mapping):
        raise InvalidInput(f"{where}: must be an object with {' and '.join(fields)}")
    unknown = sorted(set(item) - set(fields))
    if unknown:
        raise InvalidInput(f"{where}.{unknown[0]}: unknown field")
    for name in fields:
        if name not in item:
            raise InvalidInput(f"{where}.{name}: required")
    return item


def _version(model: str, raw: Any, versions: Collection[str], *, where: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise InvalidInput(f"{where}: must be a version name (a non-empty string)")
    if raw not in versions:
        raise InvalidInput(f"{where}: version '{raw}' of model '{model}' does not exist")
    return raw


def _number(raw: Any, *, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise InvalidInput(f"{where}: must be a number")
    return float(raw)


def _sticky_key(raw: Any) -> str | None:
    if raw is not None and (not isinstance(raw, str) or not raw):
        raise InvalidInput("sticky_key: must be a non-empty string or null")
    return raw


def _salt(raw: Any) -> str:
    if not isinstance(raw, str):
        raise InvalidInput("salt: must be a string")
    return raw

