from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.registry.harness import RegistryHarness, open_registry


@pytest.fixture
async def harness(
    database_url: str, etcd_url: str, etcd_prefix: str, tmp_path: Path
) -> AsyncIterator[RegistryHarness]:
    """A registry on a fresh database and a private etcd prefix."""
    async with open_registry(database_url, etcd_url, etcd_prefix, tmp_path / "artifacts") as h:
        yield h
