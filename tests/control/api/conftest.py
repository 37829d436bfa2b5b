from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from control.api.core import RolloutStore
from control.api.tenants.store import TenantStore
from tests.registry.harness import SIGNATURE, RegistryHarness, chunks_of, open_registry

VERSIONS = ("1", "2", "3")


@dataclass
class ControlHarness:
    """A RolloutStore and a TenantStore over the registry harness' pool and etcd, with model
    iris registered."""

    store: RolloutStore
    registry: RegistryHarness
    tenants: TenantStore

    async def published(self, model: str = "iris") -> Any:
        """The rollout record in etcd, or None."""
        return await self.registry.etcd_json(f"rollouts/{model}")

    async def saved_epoch(self, model: str = "iris") -> int:
        """The rollout's epoch in Postgres."""
        epoch: int = await self.registry.pool.fetchval(
            "SELECT epoch FROM rollouts WHERE model = $1", model
        )
        return epoch


@pytest.fixture
async def control(
    database_url: str, etcd_url: str, etcd_prefix: str, tmp_path: Path
) -> AsyncIterator[ControlHarness]:
    """Model `iris` with versions 1, 2, 3 and its first rollout (epoch 1: all traffic to 1)."""
    async with open_registry(database_url, etcd_url, etcd_prefix, tmp_path / "artifacts") as h:
        info = await h.registry.put_artifact(chunks_of(b"torchscript bytes"))
        for version in VERSIONS:
            await h.registry.register_version(
                "iris", version, artifact_sha256=info.sha256, signature=SIGNATURE
            )
        yield ControlHarness(
            RolloutStore(h.pool, h.etcd, etcd_prefix=etcd_prefix), h,
            TenantStore(h.pool, h.etcd, etcd_prefix=etcd_prefix),
        )


def canary(weight: float = 10, **extra: Any) -> dict[str, Any]:
    """A body sending `weight`% to version 2, the rest to version 1."""
    routes = [{"version": "1", "weight": 100 - weight}, {"version": "2", "weight": weight}]
    return {"routes": routes, **extra}
