"""API keys → tenants: the Authenticator over a StaticConfig, as the control API publishes."""

from __future__ import annotations

import pytest

import services.mesh.domain.tenancy
from services.gateway.auth import Authenticator, AuthFailure, presented_key
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import PermissionDenied, Unauthenticated
from services.mesh.domain.tenancy import Tenant, new_key, split_key
from tests.gateway.tenancy import add_key, add_tenant, lookup, revoke


@pytest.fixture
def config() -> StaticConfig:
    return StaticConfig()


@pytest.fixture
def auth(config: StaticConfig) -> Authenticator:
    return Authenticator(config)


def failure(outcome: object) -> AuthFailure:
    assert isinstance(outcome, AuthFailure), f"expected a failure, got {outcome}"
    return outcome


@pytest.mark.parametrize(("headers", "found"), [
    ({"Authorization": "Bearer imk_x"}, "imk_x"),
    ({"authorization": "bearer   imk_x "}, "imk_x"),
    ({"X-Api-Key": "imk_y"}, "imk_y"),
    ({"Authorization": "Bearer imk_x", "X-Api-Key": "imk_y"}, "imk_x"),
])
def test_the_key_comes_from_a_bearer_header_or_x_api_key(
    headers: dict[str, str], found: str
) -> None:
    assert presented_key(lookup(headers)) == found


@pytest.mark.parametrize(("headers", "reason"), [
    ({}, "missing"),
    ({"X-Api-Key": ""}, "missing"),
    ({"Authorization": "Basic dXNlcjpwdw=="}, "invalid"),
    ({"Authorization": "Bearer"}, "invalid"),
])
def test_no_key_or_a_malformed_header_is_a_failure(
    headers: dict[str, str], reason: str
) -> None:
    assert failure(presented_key(lookup(headers))).reason == reason


def test_a_valid_key_finds_its_tenant(config: StaticConfig, auth: Authenticator) -> None:
    key = add_tenant(config, "acme", priority_class="bulk")
    tenant = auth.authorize(key, "m")
    assert isinstance(tenant, Tenant)
    assert (tenant.name, tenant.priority_class) == ("acme", "bulk")


@pytest.mark.parametrize("presented", [
    "imk_000000000000_nope",  # unknown key id
    "not-a-key",
    "imk_short_secret",
])
def test_an_unknown_or_malformed_key_is_unauthenticated(
    config: StaticConfig, auth: Authenticator, presented: str
) -> None:
    add_tenant(config, "acme")
    refusal = failure(auth.authorize(presented, "m"))
    assert refusal.reason == "invalid"
    assert isinstance(refusal.error(), Unauthenticated)


def test_a_wrong_secret_is_unauthenticated_and_never_echoed(
    config: StaticConfig, auth: Authenticator
) -> None:
    key = add_tenant(config, "acme")
    wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    refusal = failure(auth.authorize(wrong, "m"))
    assert refusal.reason == "invalid"
    assert split_key(wrong)[1] not in refusal.message
    assert isinstance(auth.authorize(key, "m"), Tenant)


def test_a_revoked_key_fails_at_once_even_when_cached(
    config: StaticConfig, auth: Authenticator
) -> None:
    key = add_tenant(config, "acme")
    assert isinstance(auth.authorize(key, "m"), Tenant)
    assert auth.cached == 1
    revoke(config, key)
    assert failure(auth.authorize(key, "m")).reason == "revoked"
    assert isinstance(failure(auth.authorize(key, "m")).error(), Unauthenticated)
    assert auth.cached == 0


def test_a_replaced_key_record_drops_the_cached_verification(
    config: StaticConfig, auth: Authenticator
) -> None:
    key = add_tenant(config, "acme")
    assert isinstance(auth.authorize(key, "m"), Tenant)
    key_id = split_key(key)[0]
    _, other = new_key("acme")  # same id, another secret (a rotation)
    config.put(f"apikeys/{key_id}", {**other.to_json(), "key_id": key_id})
    assert failure(auth.authorize(key, "m")).reason == "invalid"


def test_a_cache_hit_does_no_hashing(
    config: StaticConfig, auth: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = add_tenant(config, "acme")
    hashes: list[str] = []
    real = services.mesh.domain.tenancy.hash_secret

    def counting(salt: str, secret: str) -> str:
        hashes.append(salt)
        return real(salt, secret)

    monkeypatch.setattr(services.mesh.domain.tenancy, "hash_secret", counting)
    for _ in range(100):
        assert isinstance(auth.authorize(key, "m"), Tenant)
    assert len(hashes) == 1


def test_other_config_changes_keep_the_cache(config: StaticConfig, auth: Authenticator) -> None:
    key = add_tenant(config, "acme")
    auth.authorize(key, "m")
    add_tenant(config, "other")
    config.put("endpoints/gateway/g2", {"http": "x"})
    assert auth.cached == 1


def test_the_cache_is_bounded(config: StaticConfig) -> None:
    auth = Authenticator(config, max_cached=2)
    add_tenant(config, "acme")
    keys = [add_key(config, "acme") for _ in range(3)]
    for key in keys:
        assert isinstance(auth.authorize(key, "m"), Tenant)
    assert auth.cached == 2
    assert isinstance(auth.authorize(keys[0], "m"), Tenant)  # verified afresh


def test_a_disabled_tenant_is_forbidden_until_enabled(
    config: StaticConfig, auth: Authenticator
) -> None:
    key = add_tenant(config, "acme")
    add_tenant(config, "acme", disabled=True)
    refusal = failure(auth.authorize(key, "m"))
    assert refusal.reason == "disabled"
    assert isinstance(refusal.error(), PermissionDenied)
    add_tenant(config, "acme")
    assert isinstance(auth.authorize(key, "m"), Tenant)


def test_a_key_of_a_deleted_tenant_is_unauthenticated(
    config: StaticConfig, auth: Authenticator
) -> None:
    key = add_tenant(config, "acme")
    auth.authorize(key, "m")
    config.delete("tenants/acme")
    assert failure(auth.authorize(key, "m")).reason == "invalid"


def test_a_model_outside_allowed_models_is_forbidden(
    config: StaticConfig, auth: Authenticator
) -> None:
    key = add_tenant(config, "acme", allowed_models=["m"])
    assert isinstance(auth.authorize(key, "m"), Tenant)
    refusal = failure(auth.authorize(key, "secret-model"))
    assert refusal.reason == "forbidden_model"
    assert isinstance(refusal.error(), PermissionDenied)
    assert "'secret-model'" in refusal.message
