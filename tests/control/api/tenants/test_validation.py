"""What TenantStore checks before writing: pure functions, every error naming its field."""

from __future__ import annotations

from typing import Any

import pytest

from control.api.tenants.validation import (
    parse_key_request,
    parse_limits,
    parse_new_tenant,
    parse_tenant_update,
)
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tenancy import ModelLimits, Tenant

MODELS = {"iris", "mlp"}
ACME = Tenant("acme", rate=10, burst=10, max_concurrency=64)


@pytest.mark.parametrize(
    ("rate", "burst"), [(0.1, 1), (1, 1), (2.5, 3), (100, 100)]
)
def test_burst_defaults_to_the_rate_rounded_up(rate: float, burst: int) -> None:
    tenant = parse_new_tenant({"name": "acme", "rate": rate}, models=MODELS)
    assert (tenant.rate, tenant.burst, tenant.max_concurrency) == (rate, burst, 64)
    assert (tenant.allowed_models, tenant.priority_class, tenant.weight) == (None, "realtime", 1)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rate": 1}, "name"),
        ({"name": "-bad", "rate": 1}, "name"),
        ({"name": "a" * 65, "rate": 1}, "name"),
        ({"name": "acme"}, "rate"),
        ({"name": "acme", "rate": 0}, "rate"),
        ({"name": "acme", "rate": "fast"}, "rate"),
        ({"name": "acme", "rate": float("inf")}, "rate"),
        ({"name": "acme", "rate": True}, "rate"),
        ({"name": "acme", "rate": 1, "burst": 0}, "burst"),
        ({"name": "acme", "rate": 1, "burst": 2.5}, "burst"),
        ({"name": "acme", "rate": 1, "max_concurrency": True}, "max_concurrency"),
        ({"name": "acme", "rate": 1, "max_concurrency": None}, "max_concurrency"),
        ({"name": "acme", "rate": 1, "allowed_models": "iris"}, "allowed_models"),
        ({"name": "acme", "rate": 1, "allowed_models": ["iris", "wine"]}, "allowed_models[1]"),
        ({"name": "acme", "rate": 1, "allowed_models": ["iris", "iris"]}, "allowed_models[1]"),
        ({"name": "acme", "rate": 1, "allowed_models": [3]}, "allowed_models[0]"),
        ({"name": "acme", "rate": 1, "priority_class": "urgent"}, "priority_class"),
        ({"name": "acme", "rate": 1, "weight": -1}, "weight"),
        ({"name": "acme", "rate": 1, "disabled": "no"}, "disabled"),
        ({"name": "acme", "rate": 1, "quota": 5}, "quota"),
        ({"name": "acme", "rate": 1, "created_at": "x"}, "created_at"),
    ],
)
def test_an_invalid_new_tenant_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_new_tenant(body, models=MODELS)
    assert caught.value.message.startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("body", "field"),
    [({"name": "other"}, "name"), ({"burst": -1}, "burst"), ({"created": "x"}, "created"),
     ({"allowed_models": ["wine"]}, "allowed_models[0]"), ({"rate": None}, "rate")],
)
def test_an_invalid_update_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_tenant_update(ACME, body, models=MODELS)
    assert caught.value.message.startswith(f"{field}: ")


def test_an_update_keeps_what_it_does_not_name() -> None:
    echoed = {**ACME.to_json(), "created_at": "t0", "updated_at": "t1"}
    assert parse_tenant_update(ACME, echoed, models=MODELS) == ACME
    changed = parse_tenant_update(ACME, {"rate": 50, "allowed_models": []}, models=MODELS)
    assert (changed.rate, changed.burst, changed.allowed_models) == (50, 10, ())
    assert not changed.allows("iris")


@pytest.mark.parametrize(
    ("body", "field"),
    [({}, "max_concurrency"), ({"max_concurrency": 0}, "max_concurrency"),
     ({"max_concurrency": "8"}, "max_concurrency"),
     ({"max_concurrency": 1, "model": "wine"}, "model"), ({"rate": 1}, "rate")],
)
def test_invalid_limits_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_limits("iris", body)
    assert caught.value.message.startswith(f"{field}: ")


def test_limits_and_key_requests() -> None:
    assert parse_limits("iris", {"max_concurrency": 4, "model": "iris"}) == ModelLimits("iris", 4)
    assert parse_key_request({}) == "" and parse_key_request({"note": "ci"}) == "ci"
    for body in ({"note": 5}, {"note": "x" * 201}, {"owner": "x"}):
        with pytest.raises(InvalidInput, match="^(note|owner): "):
            parse_key_request(body)
