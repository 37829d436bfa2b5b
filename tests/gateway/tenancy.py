"""Tenants and keys for access tests, as the control API would publish them; a fake clock."""

from __future__ import annotations

from typing import Any

from services.gateway.auth import HeaderLookup
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.tenancy import Tenant, new_key, split_key


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def add_tenant(config: StaticConfig, name: str, **fields: Any) -> str:
    """Publish `tenants/{name}` (generous quotas unless `fields` say otherwise) and one key
    for it; the full key."""
    record = {"name": name, "rate": 1000.0, "burst": 1000, "max_concurrency": 1000, **fields}
    config.put(f"tenants/{name}", Tenant.from_json(record).to_json())
    return add_key(config, name)


def add_key(config: StaticConfig, tenant: str) -> str:
    key, record = new_key(tenant)
    config.put(f"apikeys/{record.key_id}", record.to_json())
    return key


def revoke(config: StaticConfig, key: str) -> None:
    """What revoking a key does: delete its record."""
    config.delete(f"apikeys/{split_key(key)[0]}")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def lookup(headers: dict[str, str]) -> HeaderLookup:
    """A case-insensitive header lookup over `headers`."""
    lowered = {k.lower(): v for k, v in headers.items()}
    return lambda name: lowered.get(name.lower())
