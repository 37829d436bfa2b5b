"""Tenants' fair-share weights, read from `tenants/{tenant}` once per config change."""

from __future__ import annotations

import logging
import math
from typing import Any

from services.mesh.domain.config import ConfigView
from services.mesh.domain.tenancy import Tenant

log = logging.getLogger(__name__)

DEFAULT_WEIGHT = 1.0


class TenantWeights:
    """`weights(tenant)`: the tenant's weight; 1.0 for a tenant without a (valid) record."""

    def __init__(self, config: ConfigView) -> None:
        self._config = config
        self._raw: dict[str, Any] = {}
        self._weights: dict[str, float] = {}
        config.subscribe(self._refresh)
        self._refresh()

    def __call__(self, tenant: str) -> float:
        return self._weights.get(tenant, DEFAULT_WEIGHT)

    def _refresh(self) -> None:
        raw = self._config.items("tenants/")
        if raw == self._raw:
            return  # some other key changed (endpoints, models): nothing to parse
        weights: dict[str, float] = {}
        for key, record in raw.items():
            weight = _weight(key, record)
            if weight is not None:
                weights[key.removeprefix("tenants/")] = weight
        self._raw, self._weights = raw, weights


def _weight(key: str, record: Any) -> float | None:
    try:
        weight = Tenant.from_json(record).weight
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        log.error("ignoring bad tenant record %s: %r", key, exc)
        return None
    if not math.isfinite(weight) or weight <= 0.0:
        log.error("ignoring tenant record %s: weight %r is not a positive number", key, weight)
        return None
    return weight
