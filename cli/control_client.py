"""A client of the control API's REST interface: models, rollouts, rollback, history,
tenants, API keys, model limits and model reports."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson


class ControlError(Exception):
    """The control API refused a request (`status` set) or could not be reached (None).

    `body` is the server's JSON error object (e.g. a 412 carries the current `epoch`).
    """

    def __init__(self, status: int | None, message: str,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.body = body or {}

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        try:
            phrase = HTTPStatus(self.status).phrase
        except ValueError:
            phrase = "Error"
        return f"{self.status} {phrase}: {self.message}"


class ControlClient:
    """Calls the control API at `base_url` through a session the caller owns and closes."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, *,
                 token: str | None = None) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def list_models(self) -> list[dict[str, Any]]:
        """Every model: name, description, versions, latest, serving."""
        body = await self._call("GET", "/v1/models")
        models: list[dict[str, Any]] = body["models"]
        return models

    async def get_model(self, name: str) -> dict[str, Any]:
        """One model with its version records and its rollout."""
        return await self._call("GET", f"/v1/models/{_part(name)}")

    async def get_rollout(self, model: str) -> dict[str, Any]:
        """The model's current rollout record (its `epoch` is what If-Match compares)."""
        return await self._call("GET", f"/v1/rollouts/{_part(model)}")

    async def set_rollout(self, model: str, rollout: dict[str, Any], *,
                          if_match: int | None = None) -> dict[str, Any]:
        """Write a rollout; with `if_match`, only if the current epoch is still that one."""
        headers = {"If-Match": f'"{if_match}"'} if if_match is not None else {}
        return await self._call("PUT", f"/v1/rollouts/{_part(model)}", json=rollout,
                                headers=headers)

    async def rollback(self, model: str, *, epoch: int | None = None,
                       reason: str | None = None) -> dict[str, Any]:
        """Restore an earlier rollout (by default the one before the current); the new record."""
        body: dict[str, Any] = {}
        if epoch is not None:
            body["epoch"] = epoch
        if reason:
            body["reason"] = reason
        return await self._call("POST", f"/v1/rollouts/{_part(model)}/rollback", json=body)

    async def history(self, model: str, *, limit: int | None = None) -> dict[str, Any]:
        """{model, history: [{epoch, author, reason, created_at, record}]}, newest first."""
        query = f"?limit={limit}" if limit is not None else ""
        return await self._call("GET", f"/v1/rollouts/{_part(model)}/history{query}")

    # -- tenants, keys, limits -------------------------------------------------------------

    async def create_tenant(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create a tenant from {name, rate, burst?, max_concurrency?, allowed_models?, ...}."""
        return await self._call("POST", "/v1/tenants", json=body)

    async def list_tenants(self) -> list[dict[str, Any]]:
        """Every tenant, by name."""
        body = await self._call("GET", "/v1/tenants")
        tenants: list[dict[str, Any]] = body["tenants"]
        return tenants

    async def get_tenant(self, name: str) -> dict[str, Any]:
        """One tenant's record, with created_at and updated_at."""
        return await self._call("GET", f"/v1/tenants/{_part(name)}")

    async def update_tenant(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Change the fields `changes` names; the tenant's new record."""
        return await self._call("PATCH", f"/v1/tenants/{_part(name)}", json=changes)

    async def disable_tenant(self, name: str) -> dict[str, Any]:
        """Disable a tenant (its keys stay; gateways refuse it); its record."""
        return await self._call("DELETE", f"/v1/tenants/{_part(name)}")

    async def issue_key(self, tenant: str, *, note: str = "") -> dict[str, Any]:
        """A new API key: `key` (the only time it is shown), key_id, prefix, tenant, note..."""
        body = {"note": note} if note else {}
        return await self._call("POST", f"/v1/tenants/{_part(tenant)}/keys", json=body)

    async def list_keys(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's keys, revoked ones included (never a secret)."""
        body = await self._call("GET", f"/v1/tenants/{_part(tenant)}/keys")
        keys: list[dict[str, Any]] = body["keys"]
        return keys

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        """Revoke a key (again is fine); its info with revoked_at."""
        return await self._call("DELETE", f"/v1/keys/{_part(key_id)}")

    async def get_model_limits(self, model: str) -> dict[str, Any]:
        """{model, max_concurrency}; a 404 ControlError when the model has none."""
        return await self._call("GET", f"/v1/models/{_part(model)}/limits")

    async def set_model_limits(self, model: str, *, max_concurrency: int) -> dict[str, Any]:
        """Cap the model's requests in flight across the fleet."""
        body = {"max_concurrency": max_concurrency}
        return await self._call("PUT", f"/v1/models/{_part(model)}/limits", json=body)

    async def clear_model_limits(self, model: str) -> dict[str, Any]:
        """Remove the model's limits: {model, max_concurrency: null}."""
        return await self._call("DELETE", f"/v1/models/{_part(model)}/limits")

    # -- reports ---------------------------------------------------------------------------

    async def model_report(
        self, model: str, *, since: str | None = None, buckets: int | None = None,
        include_shadow: bool = False, label_kind: str | None = None,
        score_kind: str | None = None,
    ) -> dict[str, Any]:
        """Predictions joined with feedback per version and bucket band: {model, since,
        buckets, include_shadow, label_kind, score_kind, rows}; the API's defaults for what
        is None (24h, 10 bands, kinds "label" and "score")."""
        params = {"since": since, "buckets": buckets, "label_kind": label_kind,
                  "score_kind": score_kind, "include_shadow": "true" if include_shadow else None}
        query = urlencode({k: v for k, v in params.items() if v is not None})
        return await self._call("GET", f"/v1/models/{_part(model)}/report"
                                       + (f"?{query}" if query else ""))

    async def _call(self, method: str, path: str, *, json: Any = None,
                    headers: dict[str, str] | None = None) -> dict[str, Any]:
        sent = {**self._headers, **(headers or {})}
        data = None
        if json is not None:
            data = orjson.dumps(json)
            sent["Content-Type"] = "application/json"
        try:
            async with self._session.request(method, self._base_url + path, data=data,
                                             headers=sent) as response:
                raw, status = await response.read(), response.status
        except aiohttp.ClientError as exc:
            raise ControlError(
                None, f"cannot reach the control API at {self._base_url}: {exc}") from exc
        return _decode(raw, status)


def _decode(raw: bytes, status: int) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = {"error": raw.decode(errors="replace").strip()[:200] or f"HTTP {status}"}
    if not isinstance(body, dict):
        raise ControlError(status, f"unexpected reply from the control API: {raw[:200]!r}")
    if status >= 400:
        raise ControlError(status, str(body.get("error") or f"HTTP {status}"), body)
    return body


def _part(name: str) -> str:
    return quote(name, safe="")
