"""Copying tenants, active API keys and model limits from Postgres to etcd.

    tenants       ->  tenants/{name}     Tenant.to_json()
    api_keys      ->  apikeys/{key_id}   ApiKeyRecord.to_json(), only while the key is not revoked
    model_limits  ->  limits/{model}     ModelLimits.to_json()

`publish(kind, name)` copies what Postgres holds *now* (deleting the key when it holds
nothing), then reads Postgres again and repeats until the two agree. Whoever writes etcd last
has therefore read Postgres after its own write, so two writers finishing out of order (or a
writer and the reconcile loop) still leave etcd with the latest record: a reconcile pass that
read a key before its revocation cannot put it back for good. These three prefixes belong to
the control API: `reconcile()` also deletes what Postgres does not hold.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final, Literal

import aetcd
import asyncpg
import orjson

from control.api.tenants import queries
from services.mesh.domain.errors import Unavailable
from services.mesh.domain.tenancy import ApiKeyRecord

log = logging.getLogger(__name__)

Kind = Literal["tenants", "apikeys", "limits"]
KINDS: Final[tuple[Kind, ...]] = ("tenants", "apikeys", "limits")
ATTEMPTS = 8
"""Rounds of publish-then-read tolerated before giving up; each means another write landed."""

# (SQL for one name, SQL for every record) of each kind.
_QUERIES: Final[dict[Kind, tuple[str, str]]] = {
    "tenants": (queries.TENANT_RECORD, queries.TENANT_RECORDS),
    "apikeys": (queries.ACTIVE_KEY, queries.ACTIVE_KEYS),
    "limits": (queries.LIMITS_RECORD, queries.LIMITS_RECORDS),
}
_UNREADABLE = object()
_UNSET = object()


class TenancyPublisher:
    """Makes etcd's `tenants/`, `apikeys/` and `limits/` match Postgres."""

    def __init__(self, pool: asyncpg.Pool, etcd: aetcd.Client, *, etcd_prefix: str) -> None:
        self._pool = pool
        self._etcd = etcd
        self._prefix = etcd_prefix

    async def publish(self, kind: Kind, name: str) -> None:
        """Publish one record after a committed write; Unavailable when that failed."""
        try:
            await self._sync(kind, name)
        except Exception as exc:  # aetcd raises several unrelated types for "etcd is away"
            raise Unavailable(
                f"saved, but publishing {kind}/{name} to etcd failed ({exc!r}); "
                "the reconcile loop will publish it"
            ) from exc

    async def reconcile(self) -> int:
        """Put what etcd lacks or holds differently, delete what Postgres lacks; how many."""
        wanted = await self._wanted()
        published = await self._published()
        stale = sorted(
            key for key in wanted.keys() | published.keys()
            if wanted.get(key, _UNSET) != published.get(key, _UNSET)
        )
        for kind, name in stale:
            await self._sync(kind, name)
        if stale:
            log.info("reconcile republished %d tenancy keys", len(stale))
        return len(stale)

    async def _sync(self, kind: Kind, name: str) -> None:
        written: Any = _UNSET
        for _ in range(ATTEMPTS):
            record = await self._record(kind, name)
            if record == written:
                return
            key = self._key(kind, name)
            if record is None:
                await self._etcd.delete(key)
            else:
                await self._etcd.put(key, orjson.dumps(record))
            written = record
        raise Unavailable(f"{kind}/{name} changed {ATTEMPTS} times while publishing; try again")

    async def _record(self, kind: Kind, name: str) -> dict[str, Any] | None:
        """What etcd should hold for (kind, name), read from Postgres; None for nothing."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_QUERIES[kind][0], name)
        return None if row is None else _record_of(kind, row)

    async def _wanted(self) -> dict[tuple[Kind, str], dict[str, Any]]:
        wanted: dict[tuple[Kind, str], dict[str, Any]] = {}
        async with self._pool.acquire() as conn:
            for kind in KINDS:
                for row in await conn.fetch(_QUERIES[kind][1]):
                    wanted[kind, row["name"]] = _record_of(kind, row)
        return wanted

    async def _published(self) -> dict[tuple[Kind, str], Any]:
        published: dict[tuple[Kind, str], Any] = {}
        for kind in KINDS:
            start = self._key(kind, "")
            for kv in await self._etcd.get_prefix(start):
                published[kind, kv.key[len(start):].decode()] = _decoded(kv.value)
        return published

    def _key(self, kind: Kind, name: str) -> bytes:
        return f"{self._prefix}{kind}/{name}".encode()


def _record_of(kind: Kind, row: Mapping[str, Any]) -> dict[str, Any]:
    if kind == "apikeys":
        key = ApiKeyRecord(row["key_id"], row["tenant"], row["salt"], row["hash"])
        return key.to_json()
    record: dict[str, Any] = row["record"]
    return record


def _decoded(value: bytes) -> Any:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return _UNREADABLE  # equal to no record: replaced
