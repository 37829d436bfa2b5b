"""Tenants, API keys and model limits: the records the control API publishes to etcd.

    tenants/{tenant}   Tenant        quotas (fleet-wide), allowed models, priority class, weight
    apikeys/{key_id}   ApiKeyRecord  which tenant a key belongs to, and its salted hash;
                                     present only while the key is active (revoking deletes it)
    limits/{model}     ModelLimits   a per-model concurrency cap (fleet-wide)

An API key reads `imk_<key_id>_<secret>`: `key_id` (12 hex digits) finds the record without a
scan, `imk_<key_id>` is the prefix support staff may see, and only
`sha256(salt || secret)` is ever stored. Secrets carry 256 random bits, so a fast hash is
enough (as for GitHub or Stripe tokens); a slow KDF would only cost every request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.mesh.domain.errors import InvalidInput

KEY_SCHEME = "imk"
PRIORITY_CLASSES = ("realtime", "bulk")


@dataclass(frozen=True, slots=True)
class Tenant:
    """The record under `tenants/{tenant}`. Rates and caps are for the whole fleet."""

    name: str
    rate: float
    """Requests per second, refilled continuously."""
    burst: int
    """Bucket size: requests that may arrive at once after an idle spell."""
    max_concurrency: int
    """Requests in flight at once."""
    allowed_models: tuple[str, ...] | None = None
    """Models the tenant may call; None means every model."""
    priority_class: str = "realtime"
    """The batcher lane of the tenant's requests."""
    weight: float = 1.0
    """Share of a busy model's batch rows relative to other tenants (weighted fair queuing)."""
    disabled: bool = False
    webhook_allowlist: tuple[str, ...] = ()
    """Hosts the tenant's webhooks may target: exact hosts, `*.domain` suffixes, or `*`
    (services/webhooks/targets.py); empty: no webhooks."""

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Tenant:
        models = raw.get("allowed_models")
        return cls(
            name=str(raw["name"]), rate=float(raw["rate"]), burst=int(raw["burst"]),
            max_concurrency=int(raw["max_concurrency"]),
            allowed_models=None if models is None else tuple(str(m) for m in models),
            priority_class=str(raw.get("priority_class", "realtime")),
            weight=float(raw.get("weight", 1.0)), disabled=bool(raw.get("disabled", False)),
            webhook_allowlist=tuple(str(h) for h in raw.get("webhook_allowlist") or ()),
        )

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "name": self.name, "rate": self.rate, "burst": self.burst,
            "max_concurrency": self.max_concurrency,
            "allowed_models": None if self.allowed_models is None else list(self.allowed_models),
            "priority_class": self.priority_class, "weight": self.weight,
            "disabled": self.disabled,
        }
        if self.webhook_allowlist:  # absent when empty: older records read the same
            record["webhook_allowlist"] = list(self.webhook_allowlist)
        return record

    def allows(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """The record under `apikeys/{key_id}`: never the secret, only its salted hash."""

    key_id: str
    tenant: str
    salt: str
    """Hex."""
    hash: str
    """Hex sha256 of salt bytes + secret bytes."""

    @property
    def prefix(self) -> str:
        return f"{KEY_SCHEME}_{self.key_id}"

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ApiKeyRecord:
        return cls(str(raw["key_id"]), str(raw["tenant"]), str(raw["salt"]), str(raw["hash"]))

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "tenant": self.tenant, "prefix": self.prefix,
                "salt": self.salt, "hash": self.hash}

    def matches(self, secret: str) -> bool:
        """Constant-time check of a presented secret against the stored hash."""
        return hmac.compare_digest(hash_secret(self.salt, secret), self.hash)


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """The record under `limits/{model}`."""

    model: str
    max_concurrency: int
    """Requests for this model in flight at once, across all tenants and gateways."""

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelLimits:
        return cls(str(raw["model"]), int(raw["max_concurrency"]))

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "max_concurrency": self.max_concurrency}


def hash_secret(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def new_key(tenant: str) -> tuple[str, ApiKeyRecord]:
    """A fresh key: the full key (show it once) and the record to store."""
    key_id, salt, secret = secrets.token_hex(6), secrets.token_hex(16), secrets.token_urlsafe(32)
    record = ApiKeyRecord(key_id, tenant, salt, hash_secret(salt, secret))
    return f"{KEY_SCHEME}_{key_id}_{secret}", record


def split_key(key: str) -> tuple[str, str]:
    """(key_id, secret) of a presented key; InvalidInput when it is not shaped like one."""
    scheme, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    if scheme != KEY_SCHEME or len(key_id) != 12 or not secret:
        raise InvalidInput("not an infermesh API key (expected imk_<id>_<secret>)")
    return key_id, secret
