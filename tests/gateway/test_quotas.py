"""The quota policy alone: token buckets, concurrency caps and replica shares, on a fake clock."""

from __future__ import annotations

import pytest

from services.gateway.quotas import (
    Permit,
    QuotaLedger,
    Rejection,
    burst_share,
    concurrency_share,
)
from services.mesh.domain.tenancy import Tenant
from tests.gateway.tenancy import FakeClock


def tenant(name: str = "acme", *, rate: float = 100, burst: int = 10,
           max_concurrency: int = 0) -> Tenant:
    return Tenant(name, rate=rate, burst=burst, max_concurrency=max_concurrency)


def admitted(ledger: QuotaLedger, who: Tenant, count: int, *, model: str = "m",
             model_cap: int = 0) -> list[Permit]:
    """Ask `count` times; the permits granted."""
    decisions = [ledger.admit(who, model, model_cap=model_cap) for _ in range(count)]
    return [d for d in decisions if isinstance(d, Permit)]


def rejected(ledger: QuotaLedger, who: Tenant, *, model: str = "m",
             model_cap: int = 0) -> Rejection:
    decision = ledger.admit(who, model, model_cap=model_cap)
    assert isinstance(decision, Rejection), "expected a rejection"
    return decision


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_fresh_tenant_gets_its_burst_then_waits_for_a_token(clock: FakeClock) -> None:
    ledger, acme = QuotaLedger(clock=clock), tenant(rate=10, burst=5)
    assert len(admitted(ledger, acme, 100)) == 5
    refusal = rejected(ledger, acme)
    assert refusal.limit == "rate"
    assert refusal.retry_after == pytest.approx(0.1)
    assert "'acme'" in refusal.message
    clock.advance(0.03)
    assert rejected(ledger, acme).retry_after == pytest.approx(0.07)
    clock.advance(0.07)
    assert len(admitted(ledger, acme, 100)) == 1


def test_an_idle_bucket_refills_only_to_its_burst(clock: FakeClock) -> None:
    ledger, acme = QuotaLedger(clock=clock), tenant(rate=10, burst=5)
    admitted(ledger, acme, 5)
    clock.advance(3600)
    assert len(admitted(ledger, acme, 100)) == 5


def test_1000_requests_at_500_per_second_admit_exactly_the_buckets_figure(
    clock: FakeClock,
) -> None:
    """100 requests/s, burst 10, asked every 2 ms for 2 s: the burst plus 100/s for 1.998 s."""
    ledger, acme = QuotaLedger(clock=clock), tenant(rate=100, burst=10)
    granted = 0
    for _ in range(1000):
        granted += len(admitted(ledger, acme, 1))
        clock.advance(0.002)
    assert granted == 10 + 199


def test_1000_requests_at_once_admit_the_burst(clock: FakeClock) -> None:
    ledger = QuotaLedger(clock=clock)
    assert len(admitted(ledger, tenant(rate=100, burst=10), 1000)) == 10


def test_each_of_n_replicas_enforces_its_share(clock: FakeClock) -> None:
    ledger, acme = QuotaLedger(clock=clock, replicas=2), tenant(rate=100, burst=10,
                                                                  max_concurrency=5)
    held = admitted(ledger, acme, 10)
    assert len(held) == 3  # ceil(5 / 2) in flight here, though 5 tokens are there
    assert rejected(ledger, acme).limit == "concurrency"
    for permit in held:
        permit.release()
    assert len(admitted(ledger, acme, 10)) == 2  # burst 10 / 2 = 5 tokens, 3 used
    assert rejected(ledger, acme).retry_after == pytest.approx(1 / 50)


def test_a_rebalance_keeps_the_token_level_and_mints_no_burst(clock: FakeClock) -> None:
    ledger, acme = QuotaLedger(clock=clock), tenant(rate=100, burst=10)
    admitted(ledger, acme, 4)  # 6 tokens left
    ledger.set_replicas(2)  # capacity 5: clamped to 5
    assert len(admitted(ledger, acme, 100)) == 5
    ledger.set_replicas(1)  # capacity 10 again, but no tokens appear
    assert rejected(ledger, acme).retry_after == pytest.approx(1 / 100)
    clock.advance(1.0)  # refills at 100/s, up to 10
    assert len(admitted(ledger, acme, 100)) == 10


def test_tokens_refill_at_the_old_share_until_the_rebalance(clock: FakeClock) -> None:
    ledger, acme = QuotaLedger(clock=clock, replicas=4), tenant(rate=100, burst=100)
    admitted(ledger, acme, 25)  # empty at 25 tokens a second
    clock.advance(0.2)  # 5 tokens at the old share
    ledger.set_replicas(1)
    clock.advance(0.05)  # 5 more at the new share
    assert len(admitted(ledger, acme, 100)) == 10


def test_a_changed_tenant_record_resizes_its_bucket(clock: FakeClock) -> None:
    ledger = QuotaLedger(clock=clock)
    admitted(ledger, tenant(rate=10, burst=2), 2)
    bigger = tenant(rate=10, burst=50)
    assert admitted(ledger, bigger, 1) == []  # no free burst from the change
    clock.advance(1.0)
    assert len(admitted(ledger, bigger, 100)) == 10


def test_a_rejected_request_consumes_no_token_and_no_slot(clock: FakeClock) -> None:
    ledger, acme = QuotaLedger(clock=clock), tenant(rate=1, burst=2, max_concurrency=1)
    [first] = admitted(ledger, acme, 1)
    assert rejected(ledger, acme).limit == "concurrency"  # a token was there, not taken
    first.release()
    [second] = admitted(ledger, acme, 1)  # the token the rejection left
    second.release()
    assert rejected(ledger, acme).limit == "rate"


def test_a_model_cap_is_shared_by_every_tenant(clock: FakeClock) -> None:
    ledger = QuotaLedger(clock=clock)
    a, b = tenant("a"), tenant("b", burst=1)
    held = admitted(ledger, a, 2, model_cap=2)
    refusal = rejected(ledger, b, model_cap=2)
    assert (refusal.limit, refusal.retry_after) == ("model_concurrency", 0.1)
    assert "'m'" in refusal.message and "'b'" in refusal.message
    assert len(admitted(ledger, b, 1, model="other", model_cap=2)) == 1  # b's only token
    held[0].release()
    clock.advance(1 / 100)
    assert len(admitted(ledger, b, 1, model_cap=2)) == 1


def test_a_released_permit_frees_its_slot_once(clock: FakeClock) -> None:
    ledger, acme = QuotaLedger(clock=clock), tenant(max_concurrency=2)
    one, _ = admitted(ledger, acme, 2)
    one.release()
    one.release()
    assert len(admitted(ledger, acme, 5)) == 1


def test_zero_means_no_limit(clock: FakeClock) -> None:
    ledger = QuotaLedger(clock=clock)
    assert len(admitted(ledger, tenant(rate=0, burst=0), 5000)) == 5000


@pytest.mark.parametrize(("cap", "replicas", "share"), [(5, 2, 3), (4, 2, 2), (1, 3, 1),
                                                         (0, 3, 0)])
def test_concurrency_share_rounds_up(cap: int, replicas: int, share: int) -> None:
    assert concurrency_share(cap, replicas) == share


def test_burst_share_is_at_least_one_request() -> None:
    assert burst_share(10, 20) == 1.0
    assert burst_share(10, 4) == 2.5


def test_a_request_standing_for_several_takes_that_many_tokens(clock: FakeClock) -> None:
    """A pack of a job's rows costs one token per row: the tenant's rate holds in rows."""
    ledger, acme = QuotaLedger(clock=clock), tenant(rate=10, burst=8)
    permit = ledger.admit(acme, "m", cost=5)
    assert isinstance(permit, Permit)
    refusal = ledger.admit(acme, "m", cost=5)  # 3 tokens left
    assert isinstance(refusal, Rejection) and refusal.limit == "rate"
    assert refusal.retry_after == pytest.approx(0.2)
    assert len(admitted(ledger, acme, 100)) == 3


def test_a_cost_above_the_burst_needs_a_full_bucket_and_leaves_a_debt(clock: FakeClock) -> None:
    """Otherwise a pack larger than the burst could never pass; the debt keeps the rate."""
    ledger, acme = QuotaLedger(clock=clock), tenant(rate=10, burst=4)
    assert isinstance(ledger.admit(acme, "m", cost=10), Permit)  # 4 - 10 = -6 tokens
    clock.advance(0.6)  # -6 + 6 = 0: not yet one token
    assert rejected(ledger, acme).retry_after == pytest.approx(0.1)
    clock.advance(0.1)
    assert len(admitted(ledger, acme, 100)) == 1
