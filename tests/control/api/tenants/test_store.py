"""TenantStore against real Postgres and etcd: writes land in both, keys only as hashes."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from control.api.tenants.store import TenantExists, TenantStore
from services.mesh.domain.errors import InvalidInput, NotFound, Unavailable
from services.mesh.domain.tenancy import ApiKeyRecord, ModelLimits, Tenant, split_key
from services.mesh.infra.etcd import ConfigCache, connect_client
from tests.control.api.conftest import ControlHarness


async def published(control: ControlHarness, key: str) -> Any:
    return await control.registry.etcd_json(key)


async def history(control: ControlHarness) -> list[tuple[str, str, str, str]]:
    rows = await control.registry.pool.fetch(
        "SELECT kind, subject, action, author FROM tenancy_history ORDER BY id"
    )
    return [tuple(row.values()) for row in rows]


async def test_create_applies_defaults_and_publishes(control: ControlHarness) -> None:
    tenant = await control.tenants.create_tenant({"name": "acme", "rate": 2.5}, author="alice")
    assert tenant == Tenant("acme", rate=2.5, burst=3, max_concurrency=64)
    assert await published(control, "tenants/acme") == tenant.to_json()
    state = await control.tenants.get_tenant("acme")
    assert state.tenant == tenant and state.created_at == state.updated_at
    assert [s.tenant for s in await control.tenants.list_tenants()] == [tenant]
    assert await history(control) == [("tenant", "acme", "create", "alice")]


async def test_create_with_every_field(control: ControlHarness) -> None:
    body = {"name": "batchco", "rate": 0.2, "burst": 5, "max_concurrency": 2,
            "allowed_models": ["iris"], "priority_class": "bulk", "weight": 0.5}
    tenant = await control.tenants.create_tenant(body, author="alice")
    assert tenant.to_json() == {**body, "disabled": False}
    assert tenant.allows("iris") and not tenant.allows("wine")
    assert Tenant.from_json(await published(control, "tenants/batchco")) == tenant


async def test_an_existing_name_is_refused_and_changes_nothing(control: ControlHarness) -> None:
    await control.tenants.create_tenant({"name": "acme", "rate": 10}, author="alice")
    with pytest.raises(TenantExists, match="^name: tenant 'acme' exists"):
        await control.tenants.create_tenant({"name": "acme", "rate": 99}, author="bob")
    assert (await published(control, "tenants/acme"))["rate"] == 10
    assert len(await history(control)) == 1


async def test_update_changes_only_the_fields_named(control: ControlHarness) -> None:
    await control.tenants.create_tenant({"name": "acme", "rate": 10}, author="alice")
    tenant = await control.tenants.update_tenant(
        "acme", {"max_concurrency": 4, "allowed_models": ["iris"]}, author="bob"
    )
    assert (tenant.rate, tenant.burst, tenant.max_concurrency) == (10, 10, 4)
    assert tenant.allowed_models == ("iris",)
    assert await published(control, "tenants/acme") == tenant.to_json()
    again = await control.tenants.update_tenant("acme", {"allowed_models": None}, author="bob")
    assert again.allowed_models is None
    # A GET-edit-PATCH round trip echoes name and timestamps back.
    state = (await control.tenants.get_tenant("acme")).to_json()
    assert await control.tenants.update_tenant("acme", state, author="bob") == again
    assert [h[2] for h in await history(control)] == ["create", "update", "update"]


async def test_disable_publishes_and_keeps_the_keys(control: ControlHarness) -> None:
    await control.tenants.create_tenant({"name": "acme", "rate": 10}, author="alice")
    _, info = await control.tenants.issue_key("acme", note="", author="alice")
    tenant = await control.tenants.disable_tenant("acme", author="bob")
    assert tenant.disabled
    assert (await published(control, "tenants/acme"))["disabled"] is True
    assert await published(control, f"apikeys/{info.key_id}") is not None
    assert [k.revoked_at for k in await control.tenants.list_keys("acme")] == [None]
    enabled = await control.tenants.update_tenant("acme", {"disabled": False}, author="bob")
    assert not enabled.disabled and not (await published(control, "tenants/acme"))["disabled"]


async def test_unknown_tenants_models_and_keys_are_not_found(control: ControlHarness) -> None:
    store = control.tenants
    for call in (
        store.get_tenant("nope"), store.update_tenant("nope", {"rate": 1}, author="a"),
        store.disable_tenant("nope", author="a"), store.list_keys("nope"),
        store.issue_key("nope", note="", author="a"), store.revoke_key("0123456789ab", author="a"),
        store.set_model_limits("wine", {"max_concurrency": 1}, author="a"),
        store.get_model_limits("wine"), store.clear_model_limits("wine", author="a"),
    ):
        with pytest.raises(NotFound):
            await call
    with pytest.raises(NotFound, match="'iris' has no limits"):
        await store.get_model_limits("iris")


async def test_an_invalid_write_names_the_field_and_writes_nothing(
    control: ControlHarness,
) -> None:
    body = {"name": "acme", "rate": 1, "allowed_models": ["iris", "wine"]}
    with pytest.raises(InvalidInput, match=r"^allowed_models\[1\]: model 'wine' does not exist"):
        await control.tenants.create_tenant(body, author="alice")
    assert await control.tenants.list_tenants() == []
    assert await published(control, "tenants/acme") is None
    before = await control.tenants.create_tenant({"name": "acme", "rate": 1}, author="alice")
    with pytest.raises(InvalidInput, match="^burst: "):
        await control.tenants.update_tenant("acme", {"burst": 0}, author="bob")
    with pytest.raises(InvalidInput, match="^max_concurrency: "):
        await control.tenants.set_model_limits("iris", {"max_concurrency": 0}, author="bob")
    assert (await control.tenants.get_tenant("acme")).tenant == before
    assert await published(control, "tenants/acme") == before.to_json()
    assert await published(control, "limits/iris") is None
    assert len(await history(control)) == 1


async def test_issue_key_stores_only_a_salted_hash(control: ControlHarness) -> None:
    await control.tenants.create_tenant({"name": "acme", "rate": 10}, author="alice")
    key, info = await control.tenants.issue_key("acme", note="ci runner", author="alice")
    key_id, secret = split_key(key)
    assert (info.key_id, info.tenant, info.note, info.created_by) == (
        key_id, "acme", "ci runner", "alice")
    assert info.prefix == f"imk_{key_id}" and key.startswith(info.prefix + "_")
    assert info.revoked_at is None and "hash" not in info.to_json()
    record = ApiKeyRecord.from_json(await published(control, f"apikeys/{key_id}"))
    assert record.tenant == "acme" and record.matches(secret) and not record.matches(secret + "x")
    row = await control.registry.pool.fetchrow("SELECT * FROM api_keys WHERE key_id = $1", key_id)
    assert (row["salt"], row["hash"]) == (record.salt, record.hash)
    stored = orjson.dumps([str(v) for v in row.values()]).decode()
    audit = orjson.dumps(await control.registry.pool.fetchval(
        "SELECT record FROM tenancy_history WHERE kind = 'api_key'")).decode()
    for text in (stored, audit):
        assert secret not in text and key not in text
    assert record.hash not in audit and record.salt not in audit


async def test_revoke_marks_the_row_and_deletes_the_etcd_key(control: ControlHarness) -> None:
    await control.tenants.create_tenant({"name": "acme", "rate": 10}, author="alice")
    _, kept = await control.tenants.issue_key("acme", note="", author="alice")
    _, revoked = await control.tenants.issue_key("acme", note="leaked", author="alice")
    info = await control.tenants.revoke_key(revoked.key_id, author="bob")
    assert info.revoked_at is not None and info.revoked_by == "bob"
    assert await published(control, f"apikeys/{revoked.key_id}") is None
    assert await published(control, f"apikeys/{kept.key_id}") is not None
    again = await control.tenants.revoke_key(revoked.key_id, author="carol")
    assert again == info  # idempotent: the first revocation stands
    listed = {k.key_id: k.revoked_by for k in await control.tenants.list_keys("acme")}
    assert listed == {kept.key_id: None, revoked.key_id: "bob"}
    assert [h[2] for h in await history(control) if h[0] == "api_key"] == [
        "issue", "issue", "revoke"]


async def test_a_revocation_reaches_a_watching_cache_within_a_second(
    control: ControlHarness,
) -> None:
    await control.tenants.create_tenant({"name": "acme", "rate": 10}, author="alice")
    _, info = await control.tenants.issue_key("acme", note="", author="alice")
    cache = ConfigCache(control.registry.etcd, control.registry.prefix)
    await cache.start()
    try:
        assert cache.get(f"apikeys/{info.key_id}") is not None
        await control.tenants.revoke_key(info.key_id, author="bob")
        await cache.wait_for(lambda: cache.get(f"apikeys/{info.key_id}") is None, timeout=1.0)
    finally:
        await cache.aclose()


async def test_model_limits_set_get_clear(control: ControlHarness) -> None:
    limits = await control.tenants.set_model_limits(
        "iris", {"max_concurrency": 8}, author="alice")
    assert limits == ModelLimits("iris", 8)
    assert await published(control, "limits/iris") == {"model": "iris", "max_concurrency": 8}
    assert await control.tenants.get_model_limits("iris") == limits
    await control.tenants.set_model_limits("iris", {"max_concurrency": 2}, author="alice")
    assert (await published(control, "limits/iris"))["max_concurrency"] == 2
    await control.tenants.clear_model_limits("iris", author="bob")
    await control.tenants.clear_model_limits("iris", author="bob")  # already clear: fine
    assert await published(control, "limits/iris") is None
    assert [h[2] for h in await history(control)] == ["set", "set", "clear"]


async def test_reconcile_makes_etcd_match_postgres(control: ControlHarness) -> None:
    etcd, prefix = control.registry.etcd, control.registry.prefix
    tenant = await control.tenants.create_tenant({"name": "acme", "rate": 10}, author="alice")
    _, active = await control.tenants.issue_key("acme", note="", author="alice")
    _, revoked = await control.tenants.issue_key("acme", note="", author="alice")
    revoked_record = await published(control, f"apikeys/{revoked.key_id}")
    await control.tenants.revoke_key(revoked.key_id, author="alice")
    await control.tenants.set_model_limits("iris", {"max_concurrency": 4}, author="alice")
    assert await control.tenants.reconcile() == 0

    await etcd.delete(f"{prefix}tenants/acme".encode())  # lost
    await etcd.put(f"{prefix}apikeys/{revoked.key_id}".encode(), orjson.dumps(revoked_record))
    await etcd.put(f"{prefix}apikeys/ffffffffffff".encode(), b'{"tenant": "acme"}')  # stale
    await etcd.put(f"{prefix}limits/iris".encode(), b"not json")  # garbled
    assert await control.tenants.reconcile() == 4
    assert await published(control, "tenants/acme") == tenant.to_json()
    assert await published(control, f"apikeys/{revoked.key_id}") is None
    assert await published(control, "apikeys/ffffffffffff") is None
    assert await published(control, f"apikeys/{active.key_id}") is not None
    assert await published(control, "limits/iris") == {"model": "iris", "max_concurrency": 4}
    assert await control.tenants.reconcile() == 0


async def test_a_failed_publish_is_unavailable_but_saved(
    control: ControlHarness, etcd_prefix: str
) -> None:
    nowhere = connect_client("http://127.0.0.1:9")  # discard port: nothing listens
    try:
        store = TenantStore(control.registry.pool, nowhere, etcd_prefix=etcd_prefix)
        with pytest.raises(Unavailable, match="^saved, but publishing tenants/acme to etcd"):
            await store.create_tenant({"name": "acme", "rate": 10}, author="alice")
    finally:
        await nowhere.close()
    assert (await control.tenants.get_tenant("acme")).tenant.rate == 10
    assert await control.tenants.reconcile() == 1
    assert await published(control, "tenants/acme") is not None


class HeldPut:
    """An etcd client whose first put of `key` waits for `release`: a slow publisher."""

    def __init__(self, etcd: Any, key: str) -> None:
        self._etcd = etcd
        self._key = key.encode()
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._etcd, name)

    async def put(self, key: bytes, value: bytes) -> Any:
        if key == self._key and not self.reached.is_set():
            self.reached.set()
            await self.release.wait()
        return await self._etcd.put(key, value)


def slow_store(control: ControlHarness, key: str) -> tuple[TenantStore, HeldPut]:
    held = HeldPut(control.registry.etcd, control.registry.prefix + key)
    return TenantStore(control.registry.pool, held, etcd_prefix=control.registry.prefix), held


async def test_a_publish_overtaken_by_a_newer_write_still_ends_with_the_newer(
    control: ControlHarness,
) -> None:
    await control.tenants.create_tenant({"name": "acme", "rate": 1}, author="alice")
    slow, held = slow_store(control, "tenants/acme")
    first = asyncio.create_task(slow.update_tenant("acme", {"rate": 2}, author="a"))
    await held.reached.wait()  # rate 2 is committed; its put is in flight
    await control.tenants.update_tenant("acme", {"rate": 3}, author="b")
    held.release.set()  # the rate-2 put lands after the rate-3 one
    assert (await first).rate == 2
    assert (await published(control, "tenants/acme"))["rate"] == 3


async def test_a_reconcile_pass_that_read_a_key_before_its_revocation_leaves_it_revoked(
    control: ControlHarness,
) -> None:
    await control.tenants.create_tenant({"name": "acme", "rate": 1}, author="alice")
    _, info = await control.tenants.issue_key("acme", note="", author="alice")
    key = f"apikeys/{info.key_id}"
    await control.registry.etcd.delete((control.registry.prefix + key).encode())  # a lost put
    slow, held = slow_store(control, key)
    reconcile = asyncio.create_task(slow.reconcile())
    await held.reached.wait()  # the pass read the key as active and is putting it back
    await control.tenants.revoke_key(info.key_id, author="bob")
    held.release.set()
    await reconcile
    assert await published(control, key) is None
    assert await control.tenants.reconcile() == 0
