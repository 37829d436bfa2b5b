"""Tenant and limits numbers stay in ranges the gateway's quota arithmetic can use: the error
names the field and the allowed range (pure validation, no database)."""

from __future__ import annotations

from typing import Any

import pytest

from control.api.tenants.validation import (
    parse_limits,
    parse_new_tenant,
    parse_tenant_update,
)
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tenancy import Tenant

CURRENT = Tenant(name="acme", rate=10.0, burst=10, max_concurrency=64)


@pytest.mark.parametrize(("body", "error"), [
    ({"rate": 1e308}, r"rate: must be a number > 0 and <= 1e\+06, got 1e\+308"),
    ({"rate": 10**400}, r"rate: must be a number > 0 and <= 1e\+06, got inf"),
    ({"rate": -(10**400)}, r"rate: must be a number > 0 and <= 1e\+06, got -inf"),
    ({"rate": 0}, r"rate: must be a number > 0 and <= 1e\+06, got 0"),
    ({"burst": 10**30}, r"burst: must be an integer from 1 to 1000000, got 1000000000000"),
    ({"max_concurrency": 0}, "max_concurrency: must be an integer from 1 to 1000000, got 0"),
    ({"weight": 1001}, "weight: must be a number > 0 and <= 1000, got 1001"),
])
def test_an_update_out_of_range_names_the_field_and_the_range(
    body: dict[str, Any], error: str
) -> None:
    with pytest.raises(InvalidInput, match=error):
        parse_tenant_update(CURRENT, body, models=())


def test_the_largest_values_are_taken() -> None:
    tenant = parse_new_tenant({"name": "acme", "rate": 1e6, "burst": 10**6,
                               "max_concurrency": 10**6, "weight": 1000}, models=())
    assert (tenant.rate, tenant.burst, tenant.max_concurrency, tenant.weight) == (
        1e6, 10**6, 10**6, 1000.0)


def test_a_model_limit_out_of_range_is_refused() -> None:
    with pytest.raises(InvalidInput, match="max_concurrency: must be an integer from 1 to"):
        parse_limits("iris", {"max_concurrency": 2**63})
