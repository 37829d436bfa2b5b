from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from services.mesh.infra.credentials import MeshCredential
from services.registry.app import create_app
from tests.registry.harness import RegistryHarness, open_registry


@pytest.fixture
async def registry_url(
    database_url: str, etcd_url: str, etcd_prefix: str, tmp_path: Path,
    mesh_credential: MeshCredential,
) -> AsyncIterator[tuple[str, RegistryHarness]]:
    """A registry served on a real port in this test's loop, requiring the session's mesh
    credential (which the CLI finds through INFERMESH_MESH_CREDENTIAL_FILE): (base URL,
    harness)."""
    async with open_registry(database_url, etcd_url, etcd_prefix, tmp_path / "artifacts") as h:
        runner = web.AppRunner(create_app(h.registry, credential=mesh_credential))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            yield f"http://127.0.0.1:{port}", h
        finally:
            await runner.cleanup()
