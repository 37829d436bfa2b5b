"""Fetching model artifacts into a local cache and verifying their sha256 (off the loop).

What a version record names is control-plane data, written by whoever can write etcd: before
it touches a file or a URL the cache checks it (`services.mesh.domain.trust`). The sha256
names the cached file, so it must be 64 hex digits; the URI must point into one of the
configured artifact stores; and every path the cache reads, writes or deletes is resolved
(symlinks followed) and must stay inside its directory, or inside the `file:` store it reads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiohttp

from services.mesh.domain.errors import InternalError, InvalidInput, Unavailable
from services.mesh.domain.trust import check_artifact_uri, check_sha256, check_store
from services.mesh.domain.types import ModelVersion
from services.mesh.infra.digests import sha256_of

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class ArtifactCache:
    """Content-addressed local copies of artifacts, by sha256, fetched only from `stores`
    (`http(s)://` base URLs of the registry, or `file:///` directories)."""

    def __init__(
        self, session: aiohttp.ClientSession, cache_dir: Path, *, stores: Sequence[str]
    ) -> None:
        self._session = session
        self._dir = cache_dir
        self._stores = tuple(check_store(store) for store in stores)

    async def fetch(self, spec: ModelVersion) -> Path:
        """A verified local path for the version's artifact; InvalidInput (logged) for a
        record whose sha256 or URI is not to be trusted, InternalError on a sha256 mismatch."""
        try:
            sha256 = check_sha256(spec.sha256)
            uri = check_artifact_uri(spec.artifact_uri, sha256=sha256, stores=self._stores)
        except InvalidInput as exc:
            log.warning("refusing the artifact of %s/%s: %s", spec.model, spec.version, exc)
            raise
        target = await asyncio.to_thread(self._prepare, sha256)
        if not await asyncio.to_thread(target.exists):
            await self._download(uri, target)
        actual = await asyncio.to_thread(sha256_of, target)
        if actual != sha256:
            await asyncio.to_thread(target.unlink, missing_ok=True)
            raise InternalError(
                f"artifact of {spec.model}/{spec.version} failed verification: sha256 "
                f"{actual} != registered {sha256}; refusing to load it"
            )
        return target

    def _prepare(self, sha256: str) -> Path:
        """Make the cache dir; the artifact's path in it, checked to stay inside (blocking)."""
        self._dir.mkdir(parents=True, exist_ok=True)
        return _inside(self._dir / sha256, self._dir.resolve(), field="sha256")

    async def _download(self, uri: str, target: Path) -> None:
        # Unique per download, not per process: two caches in one process (fused mode, tests)
        # may fetch the same artifact at once, and each must rename only its own copy.
        partial = target.with_name(f"{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
        parts = urlsplit(uri)
        if parts.scheme == "file":
            await asyncio.to_thread(self._copy_local, Path(unquote(parts.path)), partial)
        else:
            try:
                async with self._session.get(uri, raise_for_status=True,
                                             allow_redirects=False) as response:
                    handle = await asyncio.to_thread(partial.open, "wb")
                    try:
                        async for chunk in response.content.iter_chunked(CHUNK):
                            await asyncio.to_thread(handle.write, chunk)
                    finally:
                        await asyncio.to_thread(handle.close)
            except aiohttp.ClientError as exc:
                raise Unavailable(f"cannot download artifact {uri}: {exc}") from exc
        await asyncio.to_thread(partial.replace, target)

    def _copy_local(self, source: Path, partial: Path) -> None:
        """Copy a `file:` artifact, refusing one whose real path leaves its store (blocking)."""
        roots = [Path(urlsplit(s).path).resolve() for s in self._stores if s.startswith("file:")]
        real = source.resolve()
        if not any(real.is_relative_to(root) for root in roots):
            raise InvalidInput(f"artifact_uri: {source} resolves outside the artifact store")
        shutil.copyfile(real, partial)


def _inside(path: Path, root: Path, *, field: str) -> Path:
    """`path` if, with symlinks resolved, it lies inside `root` (resolved); else InvalidInput."""
    if not path.resolve().is_relative_to(root) or path.resolve() == root:
        raise InvalidInput(f"{field}: {path.name!r} resolves outside the cache directory")
    return path
