"""Router settings (`INFERMESH_ROUTER_*`, falling back to `INFERMESH_*`)."""

from __future__ import annotations

from dataclasses import dataclass

from services.mesh.settings import ServiceSettings


@dataclass(frozen=True, kw_only=True)
class RouterSettings(ServiceSettings):
    shadow_max_inflight: int = 64
    """Most shadow mirrors in flight at once per router; beyond it mirrors are dropped (and
    counted in `infermesh_shadow_requests_total{outcome="dropped"}`)."""
