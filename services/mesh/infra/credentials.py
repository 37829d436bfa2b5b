"""The mesh credential: a file of tokens that internal callers present and servers accept.

One token a line; blank lines and `#` comments are ignored. The first token is the one this
process presents; any token of the file is accepted. Rotation without downtime: put the new
token on top (every process accepts it within a second and starts presenting it), and remove
the old one once every caller has moved on.

The file must be readable by its owner only (0600 or stricter): it is as good as a password to
every internal surface. A started credential (`start()`) re-reads the file when its mtime or
size changes, checked once a second off the event loop; the request path only compares
strings in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import stat
from pathlib import Path

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from services.mesh.transport.auth import AUTHORIZATION

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
"""Seconds between two checks of the file for a rotation."""


class CredentialError(ValueError):
    """The credential file is missing, empty or readable by others."""


def read_tokens(path: Path) -> tuple[tuple[str, ...], tuple[int, int]]:
    """The tokens of `path` and its (mtime_ns, size) stamp; raises CredentialError (blocking)."""
    try:
        with path.open("rb") as file:
            info = os.fstat(file.fileno())
            text = file.read().decode()
    except OSError as exc:
        raise CredentialError(f"cannot read the mesh credential {path}: {exc}") from exc
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise CredentialError(
            f"the mesh credential {path} is readable by others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}): chmod 600 it"
        )
    tokens = tuple(
        line.strip() for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    )
    if not tokens:
        raise CredentialError(f"the mesh credential {path} holds no token")
    return tokens, (info.st_mtime_ns, info.st_size)


class MeshCredential:
    """The tokens of one credential file; `load` it, `start()` it to follow rotations."""

    def __init__(self, path: Path, tokens: tuple[str, ...], stamp: tuple[int, int]) -> None:
        self.path = path
        self._tokens = tokens
        self._encoded = tuple(token.encode() for token in tokens)
        self._stamp = stamp
        self._watch: asyncio.Task[None] | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MeshCredential:
        """Read the credential file (blocking); raises CredentialError with what is wrong."""
        if not str(path):
            raise CredentialError(
                "no mesh credential: set INFERMESH_MESH_CREDENTIAL_FILE to a file of tokens "
                "(`infermesh up` makes one in <state dir>/secrets/mesh-credential)"
            )
        tokens, stamp = read_tokens(Path(path))
        return cls(Path(path), tokens, stamp)

    @property
    def token(self) -> str:
        """The token this process presents: the first of the file."""
        return self._tokens[0]

    def accepts(self, header_value: str | None) -> bool:
        """Whether `header_value` is `Bearer <token>` for any token of the file.

        Compared in constant time against every token, with no early exit, so the time taken
        says nothing about which token (or how much of one) matched.
        """
        scheme, _, presented = (header_value or "").partition(" ")
        candidate = presented.strip().encode()
        matched = False
        for token in self._encoded:
            matched |= hmac.compare_digest(candidate, token)
        return matched and scheme.lower() == "bearer"

    def reload(self) -> bool:
        """Re-read the file if its mtime or size changed (blocking); whether it changed.

        A file that turns unreadable, empty or too open keeps the tokens already loaded (and
        is logged): a botched edit must not lock the whole mesh out.
        """
        try:
            info = self.path.stat()
        except OSError as exc:
            log.error("mesh credential %s: %s; keeping the tokens loaded", self.path, exc)
            return False
        if (info.st_mtime_ns, info.st_size) == self._stamp:
            return False
        try:
            tokens, stamp = read_tokens(self.path)
        except CredentialError as exc:
            log.error("%s; keeping the tokens loaded", exc)
            return False
        self._encoded = tuple(token.encode() for token in tokens)
        self._tokens, self._stamp = tokens, stamp
        log.info("mesh credential %s changed: %d token(s) accepted", self.path, len(tokens))
        return True

    def start(self, interval: float = POLL_INTERVAL) -> None:
        """Follow the file: re-read it (off the loop) when it changes."""
        if self._watch is None:
            self._watch = asyncio.create_task(self._follow(interval), name="mesh-credential")

    async def _follow(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.reload)

    async def aclose(self) -> None:
        """Stop following the file."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch

    async def present(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        """A client middleware presenting the current token on every request of a session
        (the registry, artifact downloads, link upgrades) unless the request sets its own."""
        if AUTHORIZATION not in request.headers:
            request.headers[AUTHORIZATION] = f"Bearer {self.token}"
        return await handler(request)
