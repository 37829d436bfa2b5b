"""Tenant and model quotas on one gateway replica: pure policy over an injected clock.

A tenant has a fleet-wide rate r (requests/s), burst b and concurrency cap c; a model may have a
fleet-wide concurrency cap m (`limits/{model}`, else the gateway's default). A rate or cap of 0
means no limit of that kind. With N live gateway replicas (the `endpoints/gateway/*` records),
each replica enforces its share, with no coordination on the request path:

    token bucket        refills r/N per second, holds max(1, b/N), starts full
    tenant concurrency  ceil(c/N) of the tenant's requests in flight on this replica
    model concurrency   ceil(m/N) requests for the model in flight here, all tenants together

A request is checked against all three and consumes nothing unless all three admit it.

Error bound. Over any window of T seconds the fleet admits at most r*T + max(b, N) requests
of one tenant (each replica at most its capacity plus r/N*T): rate plus burst per window once
b >= N. Fleet concurrency is at most N*ceil(c/N) < c + N (likewise for m). Shares are never
lent between replicas, so the error is on the low side when traffic is uneven: a client that
reaches only k of the N replicas gets at most k/N of its rate (r/N through one replica); only an
even spread (round-robin balancing) gets all of r. While the replica set changes:

- a replica that died still counts until its lease expires (one TTL, ~10 s): the survivors
  under-admit at r/N_old for up to that long, never over;
- a new replica starts with a full bucket (one extra burst of max(1, b/N)) and, until its
  record is registered and watched by the others (milliseconds), every replica still uses
  N_old: the fleet may admit up to r/N_old per second more than r for that moment;
- a rebalance keeps each bucket's token level (clamped to the new capacity), so a replica
  change never mints a burst; while etcd is unreachable the last known N stays in force.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.mesh.domain.tenancy import Tenant

Clock = Callable[[], float]

CONCURRENCY_RETRY_AFTER = 0.1
"""Retry-After for a concurrency rejection: an estimate, as no one knows when a slot frees."""
_EPSILON = 1e-9
"""Float slack, so a token refilled in many small steps counts as a whole one."""
MAX_RETRY_AFTER = 86_400.0
"""The longest wait a rate rejection names (a tiny rate would otherwise ask for years)."""


def rate_limited(rate: float) -> bool:
    """Whether a stored rate limits at all: a finite rate > 0. The control API allows
    nothing else, but a hand-written record may hold 0 (no limit), inf or NaN, which must
    never reach the bucket's arithmetic (inf * 0 is NaN); both are taken as no limit."""
    return math.isfinite(rate) and rate > 0


def rate_share(rate: float, replicas: int) -> float:
    return rate / replicas


def burst_share(burst: int, replicas: int) -> float:
    return max(1.0, min(burst, 1 << 53) / replicas)  # a huge int never overflows a float


def concurrency_share(cap: int, replicas: int) -> int:
    """This replica's part of a fleet-wide cap; 0 (no cap) stays 0."""
    return 0 if cap <= 0 else -(-cap // replicas)


@dataclass(slots=True)
class TokenBucket:
    """Holds up to `capacity` tokens, refilled at `rate` a second; a request takes one."""

    rate: float
    capacity: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, capacity: float, now: float) -> TokenBucket:
        return cls(rate, capacity, capacity, now)

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait(self, now: float, cost: float = 1.0) -> float:
        """Seconds until `cost` tokens may be taken: 0.0 when they may be now. A cost above
        the capacity needs a full bucket and leaves it in debt (below zero), so the rate over
        time holds whatever the cost."""
        self.refill(now)
        needed = min(cost, self.capacity)
        if self.tokens + _EPSILON >= needed:
            return 0.0
        return min(MAX_RETRY_AFTER, (needed - self.tokens) / self.rate)

    def take(self, cost: float = 1.0) -> None:
        self.tokens -= cost

    def resize(self, rate: float, capacity: float, now: float) -> None:
        """New rate and capacity, keeping the token level (clamped): no free burst."""
        self.refill(now)
        self.rate, self.capacity = rate, capacity
        self.tokens = min(self.tokens, capacity)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request was not admitted: which limit, and when to retry."""

    limit: str
    """"rate", "concurrency" or "model_concurrency"."""
    retry_after: float
    message: str


class _Slots:
    """Requests in flight against one cap."""

    __slots__ = ("in_flight",)

    def __init__(self) -> None:
        self.in_flight = 0


class _TenantAccount:
    """One tenant's share on this replica: its bucket (None without a rate limit), its
    concurrency cap (0: none) and its requests in flight here."""

    __slots__ = ("bucket", "cap", "slots", "tenant")

    def __init__(self, tenant: Tenant, replicas: int, now: float) -> None:
        self.tenant = tenant
        self.cap = concurrency_share(tenant.max_concurrency, replicas)
        self.bucket = self._new_bucket(tenant, replicas, now)
        self.slots = _Slots()

    @staticmethod
    def _new_bucket(tenant: Tenant, replicas: int, now: float) -> TokenBucket | None:
        if not rate_limited(tenant.rate):
            return None
        rate, capacity = rate_share(tenant.rate, replicas), burst_share(tenant.burst, replicas)
        return TokenBucket.full(rate, capacity, now)

    def conform(self, tenant: Tenant, replicas: int, now: float) -> None:
        """Follow the tenant's record and the replica count; the token level carries over."""
        self.tenant = tenant
        self.cap = concurrency_share(tenant.max_concurrency, replicas)
        if not rate_limited(tenant.rate) or self.bucket is None:
            self.bucket = self._new_bucket(tenant, replicas, now)
        else:
            rate, capacity = rate_share(tenant.rate, replicas), burst_share(tenant.burst, replicas)
            self.bucket.resize(rate, capacity, now)

    def check(self, now: float, cost: int = 1) -> Rejection | None:
        if self.bucket is not None:
            wait = self.bucket.wait(now, cost)
            if wait > 0.0:
                tenant = self.tenant
                return Rejection("rate", wait, f"tenant '{tenant.name}' is over its rate quota "
                                 f"({tenant.rate:g} requests/s, burst {tenant.burst})")
        if self.cap and self.slots.in_flight >= self.cap:
            return Rejection("concurrency", CONCURRENCY_RETRY_AFTER,
                             f"tenant '{self.tenant.name}' is at its concurrency quota "
                             f"({self.tenant.max_concurrency} requests in flight)")
        return None


class Permit:
    """The slots an admitted request holds; `release()` (idempotent) gives them back."""

    __slots__ = ("_model", "_tenant")

    def __init__(self, tenant: _Slots, model: _Slots) -> None:
        self._tenant: _Slots | None = tenant
        self._model = model

    def release(self) -> None:
        if self._tenant is not None:
            self._tenant.in_flight -= 1
            self._model.in_flight -= 1
            self._tenant = None


class QuotaLedger:
    """The buckets and in-flight counts of one gateway replica."""

    def __init__(self, *, clock: Clock = time.monotonic, replicas: int = 1) -> None:
        self._clock = clock
        self._replicas = max(1, replicas)
        self._tenants: dict[str, _TenantAccount] = {}
        self._models: dict[str, _Slots] = {}

    @property
    def replicas(self) -> int:
        """Live gateway replicas this replica shares each quota with (itself included)."""
        return self._replicas

    def set_replicas(self, replicas: int) -> None:
        """Rebalance every tenant's share to `replicas` (at least 1), keeping token levels."""
        replicas = max(1, replicas)
        if replicas == self._replicas:
            return
        self._replicas, now = replicas, self._clock()
        for account in self._tenants.values():
            account.conform(account.tenant, replicas, now)

    def admit(
        self, tenant: Tenant, model: str, *, model_cap: int = 0, cost: int = 1,
    ) -> Permit | Rejection:
        """A permit for one request of `tenant` to `model`, or why not (nothing consumed).
        `cost`: the requests it stands for against the rate (a pack of a job's rows, each
        one request as submitted); it holds one concurrency slot whatever its cost."""
        now = self._clock()
        account = self._tenants.get(tenant.name)
        if account is None:
            account = self._tenants[tenant.name] = _TenantAccount(tenant, self._replicas, now)
        elif account.tenant is not tenant:  # the record was re-read, maybe changed
            account.conform(tenant, self._replicas, now)
        model_slots = self._models.get(model)
        if model_slots is None:
            model_slots = self._models[model] = _Slots()
        rejection = account.check(now, cost)
        if rejection is None and model_cap > 0:
            rejection = self._check_model(tenant, model, model_slots, model_cap)
        if rejection is not None:
            return rejection
        if account.bucket is not None:
            account.bucket.take(cost)
        account.slots.in_flight += 1
        model_slots.in_flight += 1
        return Permit(account.slots, model_slots)

    def _check_model(
        self, tenant: Tenant, model: str, slots: _Slots, model_cap: int
    ) -> Rejection | None:
        cap = concurrency_share(model_cap, self._replicas)
        if cap and slots.in_flight >= cap:
            return Rejection("model_concurrency", CONCURRENCY_RETRY_AFTER,
                             f"tenant '{tenant.name}': model '{model}' is at its concurrency "
                             f"limit ({model_cap} requests in flight)")
        return None
