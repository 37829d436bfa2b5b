"""API keys → tenants, from the watched `apikeys/` and `tenants/` records. No HTTP in here.

A client presents its key as `Authorization: Bearer <key>` (REST header or gRPC metadata) or
bare as `x-api-key`. A key is verified once (a salted sha256, compared in constant time) and
then found in a bounded cache by the presented string, so a request with a known key costs a
dict lookup and no hashing. Every config change drops the cache entries whose `apikeys/{id}`
record changed or disappeared: a revocation (the record's delete) takes effect as soon as the
watch delivers it, even for cached keys.

Failures, and the metric reason of each:

    no key, or a header that is not `Bearer <key>`      401   missing / invalid
    a key that is not printable ASCII (raw bytes)       401   invalid
    unknown key id, wrong secret, tenant record gone    401   invalid
    key revoked while this gateway had it cached         401   revoked
    tenant disabled                                      403   disabled
    model not in the tenant's `allowed_models`           403   forbidden_model

A disabled tenant is a 403, not a 401: the key is genuine, so a client should not rotate it.
Clients see one message for every bad key, so the answers tell a key guesser nothing. Keys are
never logged nor put in a message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.mesh.domain.config import ConfigView
from services.mesh.domain.errors import (
    InfermeshError,
    InvalidInput,
    PermissionDenied,
    Unauthenticated,
)
from services.mesh.domain.ids import is_printable_ascii
from services.mesh.domain.tenancy import ApiKeyRecord, Tenant, split_key

log = logging.getLogger(__name__)

HeaderLookup = Callable[[str], str | None]
"""A request header (REST) or metadata (gRPC) value by name, None when absent."""

ANONYMOUS = Tenant("anonymous", rate=0, burst=0, max_concurrency=0)
"""Every request's tenant when auth is off: no quota of its own."""


@dataclass(frozen=True, slots=True)
class AuthFailure:
    """Why a request was refused: a metrics `reason` and the message the client sees."""

    reason: str
    message: str

    def error(self) -> InfermeshError:
        """A fresh error to raise (403 for a disabled tenant or a forbidden model, else 401)."""
        if self.reason in ("disabled", "forbidden_model"):
            return PermissionDenied(self.message)
        return Unauthenticated(self.message)


REASONS = ("missing", "invalid", "revoked", "disabled", "forbidden_model")
MISSING = AuthFailure("missing", "missing API key: send 'Authorization: Bearer <key>'")
MALFORMED = AuthFailure("invalid", "malformed Authorization header: expected 'Bearer <key>'")
UNREADABLE = "malformed {header} header: a key is printable ASCII (imk_<id>_<secret>)"
INVALID = AuthFailure("invalid", "invalid or revoked API key")
REVOKED = AuthFailure("revoked", INVALID.message)


def presented_key(header: HeaderLookup) -> str | AuthFailure:
    """The key a request presents, from `authorization: Bearer <key>` or `x-api-key`."""
    authorization = header("authorization")
    if authorization is None:
        bare = header("x-api-key")
        return MISSING if not bare else _readable(bare.strip(), "x-api-key")
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return MALFORMED
    return _readable(key, "Authorization")


def _readable(key: str, header: str) -> str | AuthFailure:
    # Undecodable bytes reach us as lone surrogates, which no hash or cache lookup may see.
    if is_printable_ascii(key):
        return key
    return AuthFailure("invalid", UNREADABLE.format(header=header))


@dataclass(frozen=True, slots=True)
class _Verified:
    key_id: str
    tenant: str
    record: Any
    """The `apikeys/{key_id}` value it was verified against (by identity)."""


class Authenticator:
    """Finds the tenant of a presented key and checks it may use a model."""

    def __init__(self, config: ConfigView, *, max_cached: int = 10_000) -> None:
        self._config = config
        self._max_cached = max_cached
        self._tenants: dict[str, Tenant] = {}
        self._verified: dict[str, _Verified] = {}
        self._revoked: dict[str, None] = {}
        """Key ids seen revoked (insertion-ordered, bounded): only for the metric's reason."""
        config.subscribe(self._refresh)
        self._refresh()

    @property
    def cached(self) -> int:
        """How many verified keys are cached."""
        return len(self._verified)

    def tenant(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    def authorize(self, key: str | AuthFailure, model: str) -> Tenant | AuthFailure:
        """The tenant of `key` if it may use `model`, else why not."""
        tenant = self.authenticate(key)
        if isinstance(tenant, AuthFailure):
            return tenant
        if not tenant.allows(model):
            return AuthFailure(
                "forbidden_model", f"tenant '{tenant.name}' may not use model '{model}'"
            )
        return tenant

    def authenticate(self, key: str | AuthFailure) -> Tenant | AuthFailure:
        """The tenant of `key` if the key is valid and the tenant enabled, whatever models it
        may use (for calls about no one model, such as feedback); else why not."""
        if isinstance(key, AuthFailure):
            return key
        verified = self._verified.get(key)
        if verified is None:
            found = self._verify(key)
            if isinstance(found, AuthFailure):
                return found
            verified = found
        tenant = self._tenants.get(verified.tenant)
        if tenant is None:
            return INVALID
        if tenant.disabled:
            return AuthFailure("disabled", f"tenant '{tenant.name}' is disabled")
        return tenant

    def _verify(self, key: str) -> _Verified | AuthFailure:
        try:
            key_id, secret = split_key(key)
        except InvalidInput:
            return INVALID
        raw = self._config.get(f"apikeys/{key_id}")
        if raw is None:
            return REVOKED if key_id in self._revoked else INVALID
        record = _parse_key(raw)
        if record is None or record.key_id != key_id or not record.matches(secret):
            return INVALID
        verified = _Verified(key_id, record.tenant, raw)
        if len(self._verified) >= self._max_cached:
            del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[key] = verified
        return verified

    def _refresh(self) -> None:
        self._tenants = _parse_tenants(self._config)
        for key, verified in list(self._verified.items()):
            current = self._config.get(f"apikeys/{verified.key_id}")
            if current is not verified.record:
                del self._verified[key]
                if current is None:
                    self._remember_revoked(verified.key_id)

    def _remember_revoked(self, key_id: str) -> None:
        if len(self._revoked) >= self._max_cached:
            del self._revoked[next(iter(self._revoked))]
        self._revoked[key_id] = None


def _parse_key(raw: Any) -> ApiKeyRecord | None:
    try:
        return ApiKeyRecord.from_json(raw)
    except (AttributeError, KeyError, TypeError, ValueError):
        log.error("ignoring a bad apikeys/ record")
        return None


def _parse_tenants(config: ConfigView) -> dict[str, Tenant]:
    tenants: dict[str, Tenant] = {}
    for key, raw in config.items("tenants/").items():
        try:
            tenant = Tenant.from_json(raw)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.error("ignoring bad config record %s: %r", key, exc)
            continue
        tenants[tenant.name] = tenant
    return tenants
