"""`python -m services.registry`: migrate, reconcile etcd with Postgres, serve the API."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from services.mesh.infra.db import create_pool, migrate
from services.mesh.infra.health import PostgresProbe
from services.mesh.infra.runtime import MeshNode, run
from services.mesh.infra.settings import load_settings
from services.registry.app import create_app
from services.registry.artifacts import ArtifactStore
from services.registry.core import Registry
from services.registry.onnx_signatures import OnnxSignatureReader
from services.registry.quantize import OnnxQuantizer
from services.registry.settings import RegistrySettings
from services.registry.store import PostgresEtcdStore


async def main() -> None:
    settings = load_settings(RegistrySettings, "registry")
    async with MeshNode(settings, service="registry") as node:
        pool = await create_pool(settings.database_url)
        try:
            await migrate(pool)
            registry = Registry(
                PostgresEtcdStore(pool, node.etcd, etcd_prefix=settings.etcd_prefix),
                ArtifactStore(Path(settings.artifact_dir),
                              max_bytes=settings.max_artifact_bytes),
                public_url=settings.public_url or node.http_url,
                max_frame_bytes=settings.max_frame_bytes, quantizer=OnnxQuantizer(),
                signatures=OnnxSignatureReader(),
            )
            await registry.reconcile()
            probe = PostgresProbe(pool)
            probe.start()
            node.watch_health(postgres=[probe])
            reconciler = asyncio.create_task(
                registry.reconcile_forever(settings.reconcile_interval), name="registry-reconcile"
            )
            try:
                await node.serve(create_app(registry, credential=node.credential))
            finally:
                reconciler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reconciler
                await probe.aclose()
        finally:
            await pool.close()


if __name__ == "__main__":
    run(main)
