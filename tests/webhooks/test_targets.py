"""Webhook targets: only allowlisted hosts, never an address inside the network unless the
allowlist names that exact host (SSRF)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from control.api.tenants.validation import parse_new_tenant, parse_tenant_update
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tenancy import Tenant
from services.webhooks.targets import check_target, check_target_async

PUBLIC = "93.184.215.14"


def _dns(table: dict[str, list[str]]) -> Callable[[str, int], list[str]]:
    def resolve(host: str, port: int) -> list[str]:
        return table[host]
    return resolve


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9000/hook", "http://localhost/hook", "https://10.1.2.3/hook",
    "http://169.254.169.254/latest/meta-data", "http://[::1]:8000/", "http://0.0.0.0/",
    "http://[::ffff:127.0.0.1]/", "http://224.0.0.1/", "http://192.168.1.1/",
])
def test_internal_addresses_are_refused_naming_the_field(url: str) -> None:
    with pytest.raises(InvalidInput, match=r"^webhook\.url: .* resolves to .* address"):
        check_target(url, ["*"])


def test_a_public_name_resolving_inside_is_refused() -> None:
    dns = _dns({"hooks.example.com": [PUBLIC], "evil.example.com": [PUBLIC, "127.0.0.1"]})
    assert check_target("https://hooks.example.com/x", ["*.example.com"], resolve=dns)
    with pytest.raises(InvalidInput, match="evil.example.com.* resolves to 127.0.0.1, a loopback"):
        check_target("https://evil.example.com/x", ["*.example.com"], resolve=dns)


@pytest.mark.parametrize(("url", "allowlist", "message"), [
    ("https://other.org/x", ["*.example.com", "hooks.example.net"], "not on the tenant's"),
    ("https://example.com/x", ["*.example.com"], "not on the tenant's"),
    ("https://hooks.example.com/x", [], "not on the tenant's"),
    ("ftp://hooks.example.com/x", ["*"], "scheme must be https or http"),
    ("https:///nohost", ["*"], "no host"),
    ("http://hooks.example.com:99999/", ["*"], "not a valid URL"),
])
def test_urls_off_the_allowlist_or_malformed_are_refused(
    url: str, allowlist: list[str], message: str
) -> None:
    with pytest.raises(InvalidInput, match=rf"^webhook\.url: .*{message}"):
        check_target(url, allowlist, resolve=_dns({"hooks.example.com": [PUBLIC]}))


def test_an_explicit_allowlist_entry_permits_an_internal_host() -> None:
    target = check_target("http://127.0.0.1:9000/hook", ["127.0.0.1"])
    assert target.addresses == ("127.0.0.1",) and target.port == 9000
    dns = _dns({"hooks.internal": ["10.0.0.7"]})
    assert check_target("http://hooks.internal/", ["hooks.internal"], resolve=dns)
    with pytest.raises(InvalidInput, match="private"):
        check_target("http://a.hooks.internal/", ["*.hooks.internal"],
                     resolve=_dns({"a.hooks.internal": ["10.0.0.7"]}))


async def test_the_async_check_resolves_off_the_loop() -> None:
    with pytest.raises(InvalidInput, match="loopback"):
        await check_target_async("http://localhost:8100/", ["localhost.", "*"][1:])
    target = await check_target_async("http://localhost:8100/", ["LOCALHOST"])
    assert set(target.addresses) <= {"127.0.0.1", "::1"}


def test_the_tenant_record_carries_a_validated_allowlist() -> None:
    body = {"name": "acme", "rate": 5, "webhook_allowlist": ["Hooks.Example.com.", "*.acme.io",
                                                              "127.0.0.1", "[::1]"]}
    tenant = parse_new_tenant(body, models=[])
    assert tenant.webhook_allowlist == ("hooks.example.com", "*.acme.io", "127.0.0.1", "::1")
    assert Tenant.from_json(tenant.to_json()) == tenant
    plain = parse_new_tenant({"name": "b", "rate": 1}, models=[])
    assert "webhook_allowlist" not in plain.to_json()
    for bad, where in ((["ok.example.com", "http://x.com"], r"webhook_allowlist\[1\]"),
                       ("*.example.com", "webhook_allowlist: must be a list"),
                       (["a.*.com"], r"webhook_allowlist\[0\]"), ([7], r"webhook_allowlist\[0\]")):
        with pytest.raises(InvalidInput, match=where):
            parse_tenant_update(tenant, {"webhook_allowlist": bad}, models=[])
