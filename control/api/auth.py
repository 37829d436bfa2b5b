"""Admin bearer tokens: loading them from settings, and the middleware that checks them.

Each token is `name:secret`; a request carrying `Authorization: Bearer <secret>` acts as
`name`, which the rollout history records as the author. Secrets are compared in constant
time against every configured secret, so the response time does not say how close a guess was.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from control.api.settings import ControlSettings
from services.mesh.domain.errors import InvalidInput, Unauthenticated
from services.mesh.domain.ids import is_printable_ascii

AUTHOR = web.RequestKey("author", str)
"""The name of the admin token a request was made with."""

PUBLIC_PATHS = frozenset({"/v1/health", "/metrics", "/openapi.json"})


def parse_tokens(entries: Iterable[str], *, source: str) -> dict[str, str]:
    """`name:secret` entries as {secret: name}; InvalidInput names the entry, never the secret."""
    tokens: dict[str, str] = {}
    for number, entry in enumerate(entries, start=1):
        name, sep, secret = (part.strip() for part in entry.partition(":"))
        if not sep or not name or not secret:
            raise InvalidInput(f"{source}: entry {number} is not name:secret")
        if secret in tokens:
            raise InvalidInput(f"{source}: tokens '{tokens[secret]}' and '{name}' share a secret")
        tokens[secret] = name
    return tokens


def read_token_file(path: str) -> list[str]:
    """The `name:secret` lines of a token file (blank lines and # comments skipped).

    Blocking: call it before the event loop starts, or in a thread.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"admin_token_file: cannot read {path}: {exc.strerror}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def load_tokens(settings: ControlSettings) -> dict[str, str]:
    """Every configured admin token as {secret: name}; InvalidInput when there is none.

    Blocking when `admin_token_file` is set (it reads the file).
    """
    tokens = parse_tokens(settings.admin_tokens, source="admin_tokens")
    if settings.admin_token_file:
        lines = read_token_file(settings.admin_token_file)
        for secret, name in parse_tokens(lines, source="admin_token_file").items():
            if secret in tokens:
                raise InvalidInput(f"admin_token_file: token '{name}' reuses a secret")
            tokens[secret] = name
    if not tokens:
        raise InvalidInput(
            "no admin token configured: set INFERMESH_CONTROL_ADMIN_TOKENS=name:secret "
            "or INFERMESH_CONTROL_ADMIN_TOKEN_FILE"
        )
    return tokens


def author_of(authorization: str | None, tokens: Mapping[bytes, str]) -> str:
    """The token name for an `Authorization` header value; Unauthenticated otherwise."""
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthenticated("missing admin token: send Authorization: Bearer <token>")
    if not is_printable_ascii(secret):
        # Undecodable bytes arrive as lone surrogates, which cannot be compared as bytes.
        raise Unauthenticated("malformed Authorization header: a token is printable ASCII")
    given = secret.strip().encode()
    author = None
    for known, name in tokens.items():  # no early exit: every secret is compared
        if hmac.compare_digest(given, known):
            author = name
    if author is None:
        raise Unauthenticated("unknown admin token")
    return author


def auth_middleware(tokens: Mapping[str, str]) -> Middleware:
    """Require an admin token (`tokens` maps secret to name) outside `PUBLIC_PATHS`."""
    encoded = {secret.encode(): name for secret, name in tokens.items()}

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            request[AUTHOR] = author_of(request.headers.get("Authorization"), encoded)
        return await handler(request)

    return authenticate
