"""Writing online features: `PUT /v1/features/{entity_type}/{entity_id}` and the bulk upsert.
No HTTP in here (routes: feature_routes.py; Postgres: feature_store.py).

Tenancy: any enabled tenant may write, and writes only its own rows: the table is keyed by
(tenant, entity type, entity id, name) and the router reads a request's features under the
request's tenant. No tenant can read or overwrite another's features, and no admin role is
needed to load them.

    PUT  {"features": {"age": 31, "spend_30d": 12.5}, "event_time": "2026-01-01T00:00:00Z"}
    POST {"rows": [{"entity_id": "u1", "features": {...}, "event_time": ...}, ...]}

Values are finite JSON numbers; `event_time` (when the values were true; their age is measured
from it) is an RFC 3339 time or epoch seconds, default now. A value older than the stored one is
ignored, so replayed or out-of-order loads never roll a feature back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from services.gateway.access import Access
from services.gateway.auth import AuthFailure, HeaderLookup
from services.gateway.metrics import GatewayMetrics
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.features import NAME_CHARS
from services.mesh.domain.tenancy import Tenant

MAX_BULK_ROWS = 10_000
"""Most entities one bulk upsert may carry."""
MAX_FEATURES_PER_ENTITY = 256


@dataclass(frozen=True, slots=True)
class FeatureRow:
    """One value to store: (entity id, feature name) of an entity type."""

    entity_id: str
    name: str
    value: float
    event_time: datetime


class FeatureWrites(Protocol):
    """Where written features go (Postgres, or a fake in tests)."""

    async def upsert(self, tenant: str, entity_type: str, rows: list[FeatureRow]) -> int:
        """Store `rows` (newer event times win); how many values changed. Unavailable when
        the store cannot take them now."""
        ...


class FeatureWriter:
    """Authenticates feature writes, validates them and hands them to a store."""

    def __init__(self, access: Access, store: FeatureWrites, *, metrics: GatewayMetrics) -> None:
        self._access = access
        self._store = store
        self._metrics = metrics

    def authenticate(self, header: HeaderLookup) -> Tenant:
        """The caller's tenant (any enabled tenant; it writes its own rows)."""
        outcome = self._access.authenticate(header)
        if isinstance(outcome, AuthFailure):
            self._metrics.auth_failures.labels(outcome.reason).inc()
            raise outcome.error()
        return outcome

    async def put(self, tenant: Tenant, entity_type: str, entity_id: str, body: Any) -> int:
        """Store one entity's features from a decoded PUT body; how many values changed."""
        _check_name(entity_type, "entity_type")
        rows = _entity_rows(_check_name(entity_id, "entity_id"), body, where="", now=time.time())
        return await self._store.upsert(tenant.name, entity_type, rows)

    async def bulk(self, tenant: Tenant, entity_type: str, body: Any) -> int:
        """Store many entities' features from a decoded bulk body; how many values changed."""
        _check_name(entity_type, "entity_type")
        if not isinstance(body, dict) or set(body) != {"rows"}:
            raise InvalidInput("body: must be an object with only 'rows'")
        entities = body["rows"]
        if not isinstance(entities, list) or not 1 <= len(entities) <= MAX_BULK_ROWS:
            raise InvalidInput(f"rows: must be a list of 1 to {MAX_BULK_ROWS} objects")
        now, rows = time.time(), []
        for i, entity in enumerate(entities):
            where = f"rows[{i}]."
            if not isinstance(entity, dict):
                raise InvalidInput(f"rows[{i}]: must be an object")
            entity_id = _check_name(entity.get("entity_id"), f"{where}entity_id")
            rest = {k: v for k, v in entity.items() if k != "entity_id"}
            rows.extend(_entity_rows(entity_id, rest, where=where, now=now))
        return await self._store.upsert(tenant.name, entity_type, rows)


def _entity_rows(entity_id: str, body: Any, *, where: str, now: float) -> list[FeatureRow]:
    if not isinstance(body, dict):
        raise InvalidInput(f"{where or 'body: '}must be an object with 'features'")
    unknown = sorted(set(body) - {"features", "event_time"})
    if unknown:
        raise InvalidInput(f"{where}{unknown[0]}: unknown field (allowed: features, event_time)")
    features = body.get("features")
    if not isinstance(features, dict) or not 1 <= len(features) <= MAX_FEATURES_PER_ENTITY:
        raise InvalidInput(
            f"{where}features: must be an object of 1 to {MAX_FEATURES_PER_ENTITY} names"
        )
    event_time = _event_time(body.get("event_time"), f"{where}event_time", now)
    rows = []
    for name, value in features.items():
        _check_name(name, f"{where}features")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value
        ):
            raise InvalidInput(f"{where}features.{name[:64]}: must be a finite number")
        rows.append(FeatureRow(entity_id, name, float(value), event_time))
    return rows


def _event_time(value: Any, where: str, now: float) -> datetime:
    if value is None:
        return datetime.fromtimestamp(now, UTC)
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is not None:
                return parsed
    except (ValueError, OverflowError, OSError):
        pass
    raise InvalidInput(f"{where}: must be an RFC 3339 time with an offset, or epoch seconds")


def _check_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= NAME_CHARS or "\x00" in value:
        raise InvalidInput(f"{where}: must be a string of 1 to {NAME_CHARS} characters")
    return value
