"""Who may call what, and how much, on one gateway replica: auth and quotas over the config.

`Access` feeds the `Authenticator` and the `QuotaLedger` from the watched config: tenants and
keys (through the authenticator), `limits/{model}` for model concurrency caps, and the number of
`endpoints/gateway/*` records for each replica's share of a quota. Nothing here does I/O on the
request path: every check reads local state kept fresh by etcd watch events.

With auth off (dev mode) every request is tenant `anonymous`, which has no quota; model
concurrency caps still apply, as they protect the models, not a tenant's budget.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from services.gateway.auth import (
    ANONYMOUS,
    Authenticator,
    AuthFailure,
    HeaderLookup,
    presented_key,
)
from services.gateway.quotas import Clock, Permit, QuotaLedger, Rejection
from services.gateway.settings import GatewaySettings
from services.mesh.domain.config import ConfigView
from services.mesh.domain.tenancy import ModelLimits, Tenant

log = logging.getLogger(__name__)


class Access:
    """Authentication, authorization and quotas for one gateway replica."""

    def __init__(
        self, config: ConfigView, *, auth: bool = True, default_model_max_concurrency: int = 0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._config = config
        self._auth = Authenticator(config) if auth else None
        self._ledger = QuotaLedger(clock=clock)
        self._default_model_cap = default_model_max_concurrency
        self._model_caps: dict[str, int] = {}
        config.subscribe(self._refresh)
        self._refresh()

    @classmethod
    def from_settings(cls, config: ConfigView, settings: GatewaySettings) -> Access:
        """Access as the settings ask, shouting once in the log when auth is off."""
        if not settings.auth:
            log.warning("AUTH IS OFF (INFERMESH_GATEWAY_AUTH=0): every request is served as "
                        "tenant 'anonymous' with no quota; never run this way in production")
        return cls(config, auth=settings.auth,
                   default_model_max_concurrency=settings.default_model_max_concurrency)

    @property
    def replicas(self) -> int:
        """Live gateway replicas sharing each quota (this one included)."""
        return self._ledger.replicas

    def authorize(self, model: str, header: HeaderLookup) -> Tenant | AuthFailure:
        """The caller's tenant, if its key is valid and it may use `model`; else why not."""
        if self._auth is None:
            return ANONYMOUS
        return self._auth.authorize(presented_key(header), model)

    def authenticate(self, header: HeaderLookup) -> Tenant | AuthFailure:
        """The caller's tenant, if its key is valid and the tenant enabled; no model check
        (for calls about no one model, such as feedback). Else why not."""
        if self._auth is None:
            return ANONYMOUS
        return self._auth.authenticate(presented_key(header))

    def tenant(self, name: str, model: str) -> Tenant | AuthFailure:
        """Tenant `name` as it is now, if it still exists, is enabled and may use `model`
        (for work a key submitted earlier, such as a job's rows); else why not."""
        if self._auth is None:
            return ANONYMOUS
        tenant = self._auth.tenant(name)
        if tenant is None:
            return AuthFailure("invalid", f"tenant '{name}' no longer exists")
        if tenant.disabled:
            return AuthFailure("disabled", f"tenant '{name}' is disabled")
        if not tenant.allows(model):
            return AuthFailure("forbidden_model", f"tenant '{name}' may not use model '{model}'")
        return tenant

    def admit(self, tenant: Tenant, model: str, *, cost: int = 1) -> Permit | Rejection:
        """Take one request's quota (`cost` requests' worth of rate), or say which limit
        refuses it (taking nothing)."""
        cap = self._model_caps.get(model, self._default_model_cap)
        return self._ledger.admit(tenant, model, model_cap=cap, cost=cost)

    def _refresh(self) -> None:
        caps: dict[str, int] = {}
        for key, raw in self._config.items("limits/").items():
            limits = _parse_limits(key, raw)
            if limits is not None:
                caps[limits.model] = limits.max_concurrency
        self._model_caps = caps
        self._ledger.set_replicas(len(self._config.items("endpoints/gateway/")))


def _parse_limits(key: str, raw: Any) -> ModelLimits | None:
    try:
        return ModelLimits.from_json(raw)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        log.error("ignoring bad config record %s: %r", key, exc)
        return None
