"""Fetching model artifacts into a local cache and verifying their sha256 (off the loop)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from services.mesh.domain.errors import InternalError, Unavailable
from services.mesh.domain.types import ModelVersion
from services.mesh.infra.digests import sha256_of

CHUNK = 1 << 20


class ArtifactCache:
    """Content-addressed local copies of artifacts, by sha256."""

    def __init__(self, session: aiohttp.ClientSession, cache_dir: Path) -> None:
        self._session = session
        self._dir = cache_dir

    async def fetch(self, spec: ModelVersion) -> Path:
        """A verified local path for the version's artifact; raises on a sha256 mismatch."""
        target = self._dir / spec.sha256
        if not await asyncio.to_thread(self._prepare, target):
            await self._download(spec.artifact_uri, target)
        actual = await asyncio.to_thread(sha256_of, target)
        if actual != spec.sha256:
            await asyncio.to_thread(target.unlink, missing_ok=True)
            raise InternalError(
                f"artifact of {spec.model}/{spec.version} failed verification: sha256 "
                f"{actual} != registered {spec.sha256}; refusing to load it"
            )
        return target

    def _prepare(self, target: Path) -> bool:
        """Make the cache dir; whether the artifact is already there (blocking)."""
        self._dir.mkdir(parents=True, exist_ok=True)
        return target.exists()

    async def _download(self, uri: str, target: Path) -> None:
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        parts = urlsplit(uri)
        if parts.scheme in ("", "file"):
            await asyncio.to_thread(shutil.copyfile, parts.path, partial)
        else:
            try:
                async with self._session.get(uri, raise_for_status=True) as response:
                    handle = await asyncio.to_thread(partial.open, "wb")
                    try:
                        async for chunk in response.content.iter_chunked(CHUNK):
                            await asyncio.to_thread(handle.write, chunk)
                    finally:
                        await asyncio.to_thread(handle.close)
            except aiohttp.ClientError as exc:
                raise Unavailable(f"cannot download artifact {uri}: {exc}") from exc
        await asyncio.to_thread(partial.replace, target)
