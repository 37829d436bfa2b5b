"""Tenant records and API keys: round trips, hashing, and the key format."""

from __future__ import annotations

import pytest

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tenancy import ApiKeyRecord, ModelLimits, Tenant, new_key, split_key


def test_a_tenant_round_trips_through_json() -> None:
    tenant = Tenant("acme", rate=100.0, burst=20, max_concurrency=8, allowed_models=("mlp",),
                    priority_class="bulk", weight=2.0)
    assert Tenant.from_json(tenant.to_json()) == tenant
    assert tenant.allows("mlp") and not tenant.allows("encoder")
    assert Tenant("any", 1.0, 1, 1).allows("encoder")


def test_a_new_key_matches_its_record_and_nothing_else() -> None:
    key, record = new_key("acme")
    key_id, secret = split_key(key)
    assert key_id == record.key_id and key.startswith(record.prefix + "_")
    assert record.matches(secret)
    assert not record.matches(secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    assert secret not in str(record.to_json())
    assert ApiKeyRecord.from_json(record.to_json()) == record


@pytest.mark.parametrize("key", ["", "imk_", "imk_short_secret", "sk_0123456789ab_x",
                                 "imk_0123456789ab_"])
def test_malformed_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidInput):
        split_key(key)


def test_model_limits_round_trip() -> None:
    assert ModelLimits.from_json(ModelLimits("mlp", 64).to_json()) == ModelLimits("mlp", 64)
