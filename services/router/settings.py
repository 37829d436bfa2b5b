"""Router settings (`INFERMESH_ROUTER_*`, falling back to `INFERMESH_*`)."""

from __future__ import annotations

from dataclasses import dataclass

from services.mesh.settings import ServiceSettings


@dataclass(frozen=True, kw_only=True)
class RouterSettings(ServiceSettings):
    """The router needs only the shared settings today (etcd, listen address, drain)."""
