"""Tenant weights come from `tenants/{tenant}` records and follow config changes."""

from __future__ import annotations

from services.batcher.tenants import TenantWeights
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.tenancy import Tenant


def record(name: str, weight: float) -> dict[str, object]:
    return Tenant(name, rate=10.0, burst=10, max_concurrency=10, weight=weight).to_json()


def test_weights_are_read_from_tenant_records_with_one_as_the_default() -> None:
    weights = TenantWeights(StaticConfig({"tenants/acme": record("acme", 3.0)}))
    assert (weights("acme"), weights("unknown"), weights("anonymous")) == (3.0, 1.0, 1.0)


def test_weights_follow_config_changes() -> None:
    config = StaticConfig()
    weights = TenantWeights(config)
    config.put("tenants/acme", record("acme", 2.5))
    assert weights("acme") == 2.5
    config.put("tenants/acme", record("acme", 0.5))
    assert weights("acme") == 0.5
    config.delete("tenants/acme")
    assert weights("acme") == 1.0


def test_a_bad_or_non_positive_weight_counts_as_one() -> None:
    config = StaticConfig({
        "tenants/zero": record("zero", 0.0),
        "tenants/broken": {"name": "broken", "weight": 4.0},  # no rate, burst, ...
        "tenants/fine": record("fine", 2.0),
    })
    weights = TenantWeights(config)
    assert (weights("zero"), weights("broken"), weights("fine")) == (1.0, 1.0, 2.0)
