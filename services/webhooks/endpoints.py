"""Endpoints disabled by a 410 Gone, and turning them back on.

The dispatcher disables (tenant, url) when the receiver answers 410 Gone (the spec's "stop
sending"): later deliveries to it end `gone` without a POST, and the gateway refuses new jobs
naming it. A receiver that is fixed, or a URL answered 410 by mistake, needs a way back that is
not a database session: the tenant lists its disabled URLs and re-enables one
(`GET|DELETE /v1/webhooks/disabled` on the gateway, services/gateway/webhook_routes.py).
It is the tenant's own doing because the URL is the tenant's, as is the job that named it;
the allowlist (an operator's) still applies at every delivery.

Deliveries that ended `gone` while the URL was disabled stay ended: re-enabling affects what
is sent from then on, so a receiver never sees a burst of stale events it had refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.mesh.domain.errors import Unavailable

_DOWN = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
         asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError)
RETRY_AFTER = 5.0


@dataclass(frozen=True, slots=True)
class DisabledEndpoint:
    url: str
    disabled_at: datetime
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "disabled_at": self.disabled_at.isoformat(),
                "reason": self.reason}


class DisabledEndpoints:
    """A tenant's disabled webhook URLs in Postgres (`webhook_disabled_endpoints`, migration
    0006), over a pool the caller owns. Unavailable when Postgres cannot answer now."""

    def __init__(self, pool: asyncpg.Pool, *, timeout: float = 10.0) -> None:
        self._pool = pool
        self._timeout = timeout

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                return list(await conn.fetch(sql, *args))
        except _DOWN as exc:
            raise Unavailable("webhook endpoints are unavailable right now: the database is "
                              "unreachable; retry later", retry_after=RETRY_AFTER) from exc

    async def reason(self, tenant: str, url: str) -> str | None:
        """Why `url` takes no more webhooks of `tenant`; None when it is not disabled."""
        rows = await self._fetch("SELECT reason FROM webhook_disabled_endpoints"
                                 " WHERE tenant = $1 AND url = $2", tenant, url)
        return str(rows[0]["reason"]) if rows else None

    async def list(self, tenant: str) -> list[DisabledEndpoint]:
        """The tenant's disabled URLs, most recently disabled first."""
        rows = await self._fetch("SELECT url, disabled_at, reason FROM webhook_disabled_endpoints"
                                 " WHERE tenant = $1 ORDER BY disabled_at DESC, url", tenant)
        return [DisabledEndpoint(r["url"], r["disabled_at"], r["reason"]) for r in rows]

    async def enable(self, tenant: str, url: str) -> bool:
        """Send to `url` again from now on; False when it was not disabled."""
        rows = await self._fetch("DELETE FROM webhook_disabled_endpoints"
                                 " WHERE tenant = $1 AND url = $2 RETURNING url", tenant, url)
        return bool(rows)
