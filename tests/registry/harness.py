"""A real registry for tests: Postgres from `database_url`, etcd from `etcd_url`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import asyncpg
import orjson

from services.mesh.infra.db import create_pool, migrate
from services.mesh.infra.etcd import connect_client
from services.registry.artifacts import ArtifactStore
from services.registry.core import Registry
from services.registry.store import PostgresEtcdStore

SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
}


@dataclass
class RegistryHarness:
    registry: Registry
    pool: asyncpg.Pool
    etcd: aetcd.Client
    prefix: str

    async def etcd_json(self, key: str) -> Any:
        """The decoded value at prefix + key, or None."""
        value = await self.etcd.get((self.prefix + key).encode())
        return None if value is None else orjson.loads(value.value)


@contextlib.asynccontextmanager
async def open_registry(
    database_url: str, etcd_url: str, etcd_prefix: str, artifact_dir: Path,
    *, public_url: str = "http://registry.test",
) -> AsyncIterator[RegistryHarness]:
    """Migrate the database and build a Registry; closes the pool and etcd client after."""
    pool = await create_pool(database_url)
    etcd = connect_client(etcd_url)
    try:
        await migrate(pool)
        registry = Registry(
            PostgresEtcdStore(pool, etcd, etcd_prefix=etcd_prefix), ArtifactStore(artifact_dir),
            public_url=public_url,
        )
        yield RegistryHarness(registry, pool, etcd, etcd_prefix)
    finally:
        await etcd.delete_prefix(etcd_prefix.encode())
        await etcd.close()
        await pool.close()


async def chunks_of(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    """`data` as an async stream of small chunks."""
    for start in range(0, len(data), size):
        yield data[start : start + size]
