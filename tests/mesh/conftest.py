"""Fixtures shared by the mesh infrastructure tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aetcd
import pytest

from services.mesh.infra.etcd import connect_client


@pytest.fixture
async def etcd(etcd_url: str, etcd_prefix: str) -> AsyncIterator[aetcd.Client]:
    """A client of the session's etcd; the test's prefix is deleted afterwards."""
    client = connect_client(etcd_url)
    try:
        yield client
    finally:
        await client.delete_prefix(etcd_prefix.encode())
        await client.close()
