"""The mesh credential as transport sees it: presented by callers, checked by internal servers.

Internal surfaces (the `/link` WebSocket of router, batcher and worker; the registry's API)
accept a call only with `Authorization: Bearer <token>` naming a token of the mesh credential
(`services.mesh.infra.credentials.MeshCredential` reads it from a file). The check is made
before anything else: a link is refused at its upgrade, before a frame can reach a handler.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from services.mesh.domain.errors import Unauthenticated

AUTHORIZATION = "Authorization"


class Credential(Protocol):
    """A mesh credential: the token this process presents and the tokens it accepts."""

    @property
    def token(self) -> str:
        """The token to present (the first of the credential file)."""
        ...

    def accepts(self, header_value: str | None) -> bool:
        """Whether an `Authorization` header value names an accepted token."""
        ...


def bearer(credential: Credential) -> dict[str, str]:
    """The header that presents `credential`."""
    return {AUTHORIZATION: f"Bearer {credential.token}"}


MESSAGE = f"this internal surface needs the mesh credential: '{AUTHORIZATION}: Bearer <token>'"
CHALLENGE = 'Bearer realm="infermesh-mesh"'


def unauthorized() -> web.Response:
    """The answer to a link upgrade without an accepted mesh credential."""
    return web.Response(status=401, text=MESSAGE, headers={"WWW-Authenticate": CHALLENGE})


def credential_middleware(
    credential: Credential, *, open_paths: Iterable[str] = ("/healthz", "/metrics")
) -> Middleware:
    """A middleware refusing (`Unauthenticated`, 401 through `error_middleware`) every request
    without the credential, except on `open_paths`; place it after the error middleware."""
    exempt = frozenset(open_paths)

    @web.middleware
    async def require_credential(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in exempt and not credential.accepts(
            request.headers.get(AUTHORIZATION)
        ):
            raise Unauthenticated(MESSAGE)
        return await handler(request)

    return require_credential
