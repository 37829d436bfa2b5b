"""A model version's prediction cache policy: the `cache` block of its `models/` record.

Opt-in: a version without the block is never cached. The router's `PredictionCache`
(services/router/cache.py) reads it on every request, so a change the registry publishes
(`PATCH /v1/models/{m}/versions/{v}/cache`) applies from the next request. Parsing is strict and
each error names its field, since the registry validates with this very parser and every
router parses the record back from etcd.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.mesh.domain.errors import InvalidInput

MAX_TTL_S = 86_400.0
"""Longest `ttl_s`: a day (a rollout change drops entries earlier anyway)."""
MAX_CACHE_BYTES = 16 << 30
"""Largest `max_bytes` of one version's budget."""


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """`ttl_s`: seconds an answer is served from the cache after it was computed.
    `max_bytes`: the budget of this version's entries (output bytes plus a fixed overhead
    each); beyond it the least recently used go first.
    `per_tenant`: whether the tenant is part of the key (tenants never share answers)."""

    ttl_s: float = 60.0
    max_bytes: int = 64 << 20
    per_tenant: bool = False

    @classmethod
    def from_json(cls, raw: Any) -> CachePolicy:
        """The policy of a `cache` object; unset fields take the defaults."""
        if not isinstance(raw, Mapping):
            raise InvalidInput("cache: must be an object (ttl_s, max_bytes, per_tenant) or null")
        unknown = sorted(set(raw) - {"ttl_s", "max_bytes", "per_tenant"})
        if unknown:
            raise InvalidInput(
                f"cache: unknown field '{unknown[0]}' (fields: ttl_s, max_bytes, per_tenant)"
            )
        default = cls()
        ttl_s = raw.get("ttl_s", default.ttl_s)
        max_bytes = raw.get("max_bytes", default.max_bytes)
        per_tenant = raw.get("per_tenant", default.per_tenant)
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not (
            0 < ttl_s <= MAX_TTL_S
        ):
            raise InvalidInput(f"cache: 'ttl_s' must be a number within (0, {MAX_TTL_S:g}]")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not (
            1 <= max_bytes <= MAX_CACHE_BYTES
        ):
            raise InvalidInput(
                f"cache: 'max_bytes' must be an integer within 1..{MAX_CACHE_BYTES}"
            )
        if not isinstance(per_tenant, bool):
            raise InvalidInput("cache: 'per_tenant' must be true or false")
        return cls(float(ttl_s), max_bytes, per_tenant)

    def to_json(self) -> dict[str, Any]:
        return {"ttl_s": self.ttl_s, "max_bytes": self.max_bytes, "per_tenant": self.per_tenant}
