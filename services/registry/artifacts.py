"""A content-addressed artifact store: `root/sha256/<sha[:2]>/<sha>`.

Uploads stream into a temp file next to the final location while being hashed; the file is
renamed into place only once its digest is known (and matches the one the caller promised),
so a reader never sees a partial artifact. File I/O and hashing run in threads. An upload
larger than the store's `max_bytes` is refused as soon as it passes the limit (the request
body is streamed, so the HTTP body limit never applies) and its partial file deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from services.mesh.domain.errors import InvalidInput, NotFound
from services.registry.ports import ArtifactInfo
from services.registry.validation import check_sha256

WRITE_SIZE = 256 * 1024
"""Bytes handed to each thread hop: small chunks are joined so a thread hop is worth it."""
MAX_ARTIFACT_BYTES = 512 * 1024 * 1024
"""The default upload cap (the registry's `max_artifact_bytes` setting)."""


class ArtifactTooLarge(InvalidInput):
    """An upload went past the store's size limit (`limit` bytes); HTTP adapters answer 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"artifact: larger than the registry's limit of {limit} bytes (max_artifact_bytes)"
        )
        self.limit = limit


class ArtifactStore:
    """Content-addressed files under one directory (the `Artifacts` of `ports`)."""

    def __init__(self, root: Path, *, max_bytes: int = MAX_ARTIFACT_BYTES) -> None:
        self._root = root / "sha256"
        self._max_bytes = max_bytes

    def _path(self, sha256: str) -> Path:
        return self._root / sha256[:2] / sha256

    async def put(
        self, chunks: AsyncIterator[bytes], *, expected_sha256: str | None = None
    ) -> ArtifactInfo:
        """Store the streamed bytes; InvalidInput if they do not hash to `expected_sha256`,
        ArtifactTooLarge (nothing kept) past `max_bytes`."""
        if expected_sha256 is not None:
            check_sha256(expected_sha256, field="expected sha256")
        await asyncio.to_thread(self._root.mkdir, parents=True, exist_ok=True)
        fd, tmp_name = await asyncio.to_thread(tempfile.mkstemp, dir=self._root, prefix=".upload-")
        tmp = Path(tmp_name)
        try:
            info = await self._write(os.fdopen(fd, "wb"), chunks)
            if expected_sha256 is not None and info.sha256 != expected_sha256:
                raise InvalidInput(
                    f"artifact sha256 mismatch: got {info.sha256}, expected {expected_sha256}"
                )
            await asyncio.to_thread(_move_into_place, tmp, self._path(info.sha256))
        except BaseException:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
            raise
        return info

    async def _write(self, file: IO[bytes], chunks: AsyncIterator[bytes]) -> ArtifactInfo:
        hasher = hashlib.sha256()
        size = 0
        try:
            async for block in _coalesce(chunks, WRITE_SIZE):
                size += len(block)
                if size > self._max_bytes:
                    raise ArtifactTooLarge(self._max_bytes)
                await asyncio.to_thread(_write_block, file, hasher, block)
            await asyncio.to_thread(_sync, file)
        finally:
            await asyncio.to_thread(file.close)
        if size == 0:
            raise InvalidInput("artifact: the body is empty")
        return ArtifactInfo(hasher.hexdigest(), size)

    async def path(self, sha256: str) -> Path:
        """Where the artifact `sha256` lives; NotFound if it is not stored."""
        path = self._path(check_sha256(sha256))
        if not await asyncio.to_thread(path.is_file):
            raise NotFound(f"artifact {sha256} not found")
        return path

    async def info(self, sha256: str) -> ArtifactInfo:
        """Digest and size of a stored artifact; NotFound if it is not stored."""
        path = await self.path(sha256)
        stat = await asyncio.to_thread(path.stat)
        return ArtifactInfo(sha256, stat.st_size)


async def _coalesce(chunks: AsyncIterator[bytes], min_size: int) -> AsyncIterator[bytes]:
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        if len(buffer) >= min_size:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


def _write_block(file: IO[bytes], hasher: hashlib._Hash, block: bytes) -> None:
    hasher.update(block)
    file.write(block)


def _sync(file: IO[bytes]) -> None:
    file.flush()
    os.fsync(file.fileno())


def _move_into_place(tmp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # same content by construction: keep the one readers may have open
        tmp.unlink()
        return
    os.replace(tmp, final)
    with contextlib.suppress(OSError):
        final.chmod(0o444)
