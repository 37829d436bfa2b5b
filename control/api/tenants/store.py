"""The control API's tenancy core: tenants, API keys and model limits.

Every write is one Postgres transaction (the row, then a `tenancy_history` entry naming the
author), then a publish of the etcd key it touched (`TenancyPublisher`): `tenants/{name}`,
`apikeys/{key_id}` or `limits/{model}`. When publishing fails the write stays saved and
Unavailable says so; the reconcile loop publishes it later.

API keys: only `salt` and `sha256(salt || secret)` are stored (in Postgres and etcd); the full
key is returned once, by `issue_key`. Revoking marks the row and deletes `apikeys/{key_id}`,
which gateways watching etcd see at once. A disabled tenant keeps its keys; gateways refuse it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import aetcd
import asyncpg

from control.api.tenants import queries
from control.api.tenants.publisher import TenancyPublisher
from control.api.tenants.validation import (
    parse_limits,
    parse_new_tenant,
    parse_note,
    parse_tenant_update,
)
from services.mesh.domain.errors import Conflict, NotFound
from services.mesh.domain.tenancy import ModelLimits, Tenant, new_key

TenantChange = Callable[[Tenant, Collection[str]], Tenant]
"""A tenant's new record from its current one and the models that exist."""


class TenantExists(Conflict):
    """A tenant of that name exists already."""

    def __init__(self, name: str) -> None:
        super().__init__(f"name: tenant '{name}' exists; update it instead")


@dataclass(frozen=True, slots=True)
class TenantState:
    """A tenant's record and when it was created and last changed."""

    tenant: Tenant
    created_at: str
    updated_at: str

    def to_json(self) -> dict[str, Any]:
        return {**self.tenant.to_json(), "created_at": self.created_at,
                "updated_at": self.updated_at}


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What may be shown about an API key: never its salt or hash."""

    key_id: str
    tenant: str
    prefix: str
    note: str
    created_by: str
    created_at: str
    revoked_at: str | None
    revoked_by: str | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TenantStore:
    """Tenants, API keys and model limits: Postgres is the truth and the audit, etcd the copy."""

    def __init__(self, pool: asyncpg.Pool, etcd: aetcd.Client, *, etcd_prefix: str) -> None:
        self._pool = pool
        self._publisher = TenancyPublisher(pool, etcd, etcd_prefix=etcd_prefix)

    # -- tenants --------------------------------------------------------------------------

    async def create_tenant(self, body: Mapping[str, Any], *, author: str) -> Tenant:
        """Create the tenant `body` describes (see `parse_new_tenant`) and publish it.

        InvalidInput names the field at fault; TenantExists when the name is taken.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            tenant = parse_new_tenant(body, models=await _model_names(conn))
            if not await conn.fetchval(queries.INSERT_TENANT, tenant.name, tenant.to_json()):
                raise TenantExists(tenant.name)
            await _audit(conn, "tenant", tenant.name, "create", tenant.to_json(), author)
        await self._publisher.publish("tenants", tenant.name)
        return tenant

    async def update_tenant(self, name: str, body: Mapping[str, Any], *, author: str) -> Tenant:
        """Change the fields `body` names (all but `name`); NotFound for an unknown tenant."""
        def change(current: Tenant, models: Collection[str]) -> Tenant:
            return parse_tenant_update(current, body, models=models)

        return await self._rewrite(name, "update", author, change)

    async def disable_tenant(self, name: str, *, author: str) -> Tenant:
        """Mark the tenant disabled: its keys stay, but gateways refuse its requests."""
        def change(current: Tenant, models: Collection[str]) -> Tenant:
            return dataclasses.replace(current, disabled=True)

        return await self._rewrite(name, "disable", author, change)

    async def get_tenant(self, name: str) -> TenantState:
        """One tenant; NotFound if unknown."""
        row = await self._pool.fetchrow(queries.TENANT_STATE, name)
        if row is None:
            raise NotFound(f"tenant '{name}' not found")
        return _tenant_state(row)

    async def list_tenants(self) -> list[TenantState]:
        """Every tenant, disabled ones included, by name."""
        return [_tenant_state(row) for row in await self._pool.fetch(queries.TENANT_STATES)]

    async def _rewrite(self, name: str, action: str, author: str, change: TenantChange) -> Tenant:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(queries.LOCK_TENANT, name)
            if row is None:
                raise NotFound(f"tenant '{name}' not found")
            current = Tenant.from_json(row["record"])
            tenant = change(current, await _model_names(conn))
            if tenant != current:
                await conn.execute(queries.UPDATE_TENANT, name, tenant.to_json())
                await _audit(conn, "tenant", name, action, tenant.to_json(), author)
        await self._publisher.publish("tenants", name)
        return tenant

    # -- API keys -------------------------------------------------------------------------

    async def issue_key(self, tenant: str, *, note: str, author: str) -> tuple[str, KeyInfo]:
        """A new key for `tenant`: the full key (show it once; it is stored nowhere) and its
        info. NotFound for an unknown tenant."""
        note = parse_note(note)
        key, record = new_key(tenant)
        async with self._pool.acquire() as conn, conn.transaction():
            await _tenant_exists(conn, tenant)
            row = await conn.fetchrow(
                queries.INSERT_KEY, record.key_id, tenant, record.prefix, record.salt,
                record.hash, note, author,
            )
            info = _key_info(row)
            await _audit(conn, "api_key", info.key_id, "issue", _key_audit(info), author)
        await self._publisher.publish("apikeys", info.key_id)
        return key, info

    async def list_keys(self, tenant: str) -> list[KeyInfo]:
        """Every key of `tenant`, revoked ones included, oldest first; NotFound if unknown."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(queries.KEYS_OF, tenant)
            if not rows:
                await _tenant_exists(conn, tenant)
        return [_key_info(row) for row in rows]

    async def revoke_key(self, key_id: str, *, author: str) -> KeyInfo:
        """Revoke a key and delete it from etcd; revoking a revoked key changes nothing but
        publishes again. NotFound for an unknown key."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(queries.REVOKE_KEY, key_id, author)
            if row is not None:
                await _audit(conn, "api_key", key_id, "revoke", _key_audit(_key_info(row)), author)
            else:
                row = await conn.fetchrow(queries.KEY_INFO, key_id)
                if row is None:
                    raise NotFound(f"API key '{key_id}' not found")
        await self._publisher.publish("apikeys", key_id)
        return _key_info(row)

    # -- model limits ---------------------------------------------------------------------

    async def set_model_limits(
        self, model: str, body: Mapping[str, Any], *, author: str
    ) -> ModelLimits:
        """Set `{max_concurrency}` for `model`, across every tenant and gateway."""
        limits = parse_limits(model, body)
        async with self._pool.acquire() as conn, conn.transaction():
            await _model_exists(conn, model)
            await conn.execute(queries.UPSERT_LIMITS, model, limits.to_json())
            await _audit(conn, "model_limits", model, "set", limits.to_json(), author)
        await self._publisher.publish("limits", model)
        return limits

    async def get_model_limits(self, model: str) -> ModelLimits:
        """The model's limits; NotFound for an unknown model or one without limits."""
        async with self._pool.acquire() as conn:
            record = await conn.fetchval(queries.LIMITS, model)
            if record is None:
                await _model_exists(conn, model)
                raise NotFound(f"model '{model}' has no limits")
        return ModelLimits.from_json(record)

    async def clear_model_limits(self, model: str, *, author: str) -> None:
        """Remove the model's limits (none is fine); NotFound for an unknown model."""
        async with self._pool.acquire() as conn, conn.transaction():
            await _model_exists(conn, model)
            if await conn.fetchval(queries.DELETE_LIMITS, model):
                await _audit(conn, "model_limits", model, "clear", None, author)
        await self._publisher.publish("limits", model)

    # -- etcd -----------------------------------------------------------------------------

    async def reconcile(self) -> int:
        """Make etcd's tenants/, apikeys/ and limits/ match Postgres; how many keys changed."""
        return await self._publisher.reconcile()


async def _model_names(conn: asyncpg.Connection) -> set[str]:
    return {row["name"] for row in await conn.fetch(queries.MODEL_NAMES)}


async def _model_exists(conn: asyncpg.Connection, model: str) -> None:
    if await conn.fetchval(queries.MODEL_EXISTS, model) is None:
        raise NotFound(f"model '{model}' not found")


async def _tenant_exists(conn: asyncpg.Connection, tenant: str) -> None:
    if await conn.fetchval(queries.TENANT_EXISTS, tenant) is None:
        raise NotFound(f"tenant '{tenant}' not found")


async def _audit(
    conn: asyncpg.Connection, kind: str, subject: str, action: str,
    record: dict[str, Any] | None, author: str,
) -> None:
    await conn.execute(queries.INSERT_HISTORY, kind, subject, action, record, author)


def _tenant_state(row: Mapping[str, Any]) -> TenantState:
    return TenantState(Tenant.from_json(row["record"]), row["created_at"].isoformat(),
                       row["updated_at"].isoformat())


def _key_info(row: Mapping[str, Any]) -> KeyInfo:
    revoked_at = row["revoked_at"]
    return KeyInfo(
        key_id=row["key_id"], tenant=row["tenant"], prefix=row["prefix"], note=row["note"],
        created_by=row["created_by"], created_at=row["created_at"].isoformat(),
        revoked_at=None if revoked_at is None else revoked_at.isoformat(),
        revoked_by=row["revoked_by"],
    )


def _key_audit(info: KeyInfo) -> dict[str, Any]:
    return {"key_id": info.key_id, "tenant": info.tenant, "prefix": info.prefix,
            "note": info.note}
