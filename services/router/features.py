"""Online features: the router fills a request's feature inputs from the store, in one query
per loop turn, through a small cache that never serves a value older than its `max_age_s`.

Why in the router (not a service of its own): the version, and so the signature naming the
features, is known only once the router has chosen it; and the router already holds Postgres
for its prediction log. A separate service would add a hop to every request. Writes come
through the gateway (`PUT /v1/features/...`, `services.gateway.feature_routes`), keyed by the
writing tenant: a tenant reads only the rows it wrote.

One lookup: every key (tenant, entity type, entity id, feature name) the request needs is
looked up in the cache; an entry serves when it was fetched less than `cache_ttl` ago and, if it
holds a value, that value's `event_time` is within the feature's `max_age_s` (else it is fetched
again: the store may hold a newer one). What is left joins the batch of the current loop turn:
every request arriving in the same turn waits for the same single query (`FeatureRows.fetch`).
A fetch that fails or takes longer than `timeout` marks the store down for `retry_interval`
seconds: lookups meanwhile answer `store_down` at once rather than each waiting `timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from services.mesh.domain.errors import InvalidInput, Unavailable
from services.mesh.domain.features import (
    DEFAULTED_MISSING,
    DEFAULTED_STALE,
    PRESENT,
    STORE_DOWN,
    FeatureReport,
    FeatureSpec,
)
from services.mesh.domain.tensors import DTYPES, Tensor
from services.mesh.domain.types import InferRequest, ModelVersion, TensorSpec

Key = tuple[str, str, str, str]
"""(tenant, entity type, entity id, feature name)."""


class FeatureValue(NamedTuple):
    value: Any
    """The stored JSON value (a number is usable; anything else counts as missing)."""
    event_time: float
    """Epoch seconds the value was true at (its age is measured from here)."""


class StoreDown(Exception):
    """The feature store cannot answer now."""


class FeatureRows(Protocol):
    """The store's read side: Postgres (`feature_store`), or a fake."""

    async def fetch(self, keys: Sequence[Key]) -> dict[Key, FeatureValue]:
        """The stored value of each key that has one, in one query; StoreDown on failure."""
        ...


class _Entry(NamedTuple):
    found: FeatureValue | None
    fetched_at: float


class OnlineFeatures:
    """The router's `FeatureFiller`: cache, per-turn batching and statuses over `rows`."""

    def __init__(
        self, rows: FeatureRows, *, timeout: float = 0.05, cache_ttl: float = 1.0,
        cache_entries: int = 100_000, retry_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._rows = rows
        self._timeout = timeout
        self._cache_ttl = cache_ttl
        self._cache_entries = cache_entries
        self._retry_interval = retry_interval
        self._clock = clock
        self._cache: dict[Key, _Entry] = {}
        self._pending: set[Key] = set()
        self._batch: asyncio.Future[dict[Key, FeatureValue] | None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._down_until = 0.0
        self.queries = 0
        """Store queries made (a test and benchmark counter)."""

    async def fill(self, request: InferRequest, version: ModelVersion) -> FeatureReport | None:
        """Add the feature inputs of `version` that `request` lacks; their statuses."""
        given = {t.name for t in request.inputs}
        specs = [(s, s.feature) for s in version.signature.inputs
                 if s.feature is not None and s.name not in given]
        if not specs:
            return None
        wanted = {spec: _entity_id(request, feature) for spec, feature in specs}
        keys = [(request.tenant, f.entity_type, wanted[s], n) for s, f in specs for n in f.names]
        found = await self._lookup(keys, [f.max_age_s for _, f in specs for _ in f.names])
        rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
        statuses: dict[str, str] = {}
        for spec, feature in specs:
            vector = self._vector(feature, request.tenant, wanted[spec], found, statuses)
            request.inputs.append(_tensor(spec, vector, rows))
        return FeatureReport(statuses, degraded=found is None)

    def _vector(
        self, feature: FeatureSpec, tenant: str, entity_id: str,
        found: dict[Key, FeatureValue] | None, statuses: dict[str, str],
    ) -> list[float]:
        vector = []
        for name, default in zip(feature.names, feature.default, strict=True):
            value, status = default, STORE_DOWN
            if found is not None:
                hit = found.get((tenant, feature.entity_type, entity_id, name))
                value, status = _judge(hit, default, feature.max_age_s, self._clock())
            if status != PRESENT and feature.on_missing == "reject":
                if status == STORE_DOWN:
                    raise Unavailable(f"feature '{name}': the feature store is unreachable",
                                      retry_after=self._retry_interval)
                raise InvalidInput(f"feature '{name}' of {feature.entity_type} '{entity_id}': "
                                   f"{status.removeprefix('defaulted_')} (on_missing: reject)")
            statuses[name] = status
            vector.append(value)
        return vector

    async def _lookup(
        self, keys: list[Key], max_ages: list[float]
    ) -> dict[Key, FeatureValue] | None:
        """What the store holds for `keys` (cache first); None when the store is down."""
        now = self._clock()
        found: dict[Key, FeatureValue] = {}
        missed = []
        for key, max_age in zip(keys, max_ages, strict=True):
            entry = self._cache.get(key)
            if entry is not None and now - entry.fetched_at < self._cache_ttl and (
                entry.found is None or now - entry.found.event_time <= max_age
            ):
                if entry.found is not None:
                    found[key] = entry.found
            else:
                missed.append(key)
        if not missed:
            return found
        if time.monotonic() < self._down_until:
            return None
        fetched = await self._join_batch(missed)
        if fetched is None:
            return None
        found.update((k, fetched[k]) for k in missed if k in fetched)
        return found

    def _join_batch(self, keys: list[Key]) -> asyncio.Future[dict[Key, FeatureValue] | None]:
        """The future of this loop turn's query, with `keys` added to it."""
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
            task = asyncio.get_running_loop().create_task(self._query_batch(self._batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._pending.update(keys)
        return self._batch

    async def _query_batch(self, batch: asyncio.Future[dict[Key, FeatureValue] | None]) -> None:
        # The task starts after the callbacks ready in this loop turn: their keys are in.
        keys, self._pending, self._batch = sorted(self._pending), set(), None
        self.queries += 1
        fetched: dict[Key, FeatureValue] | None
        try:
            async with asyncio.timeout(self._timeout):
                fetched = await self._rows.fetch(keys)
        except (StoreDown, TimeoutError):
            self._down_until = time.monotonic() + self._retry_interval
            fetched = None
        except BaseException as exc:
            if not batch.done():
                if isinstance(exc, asyncio.CancelledError):
                    batch.cancel()
                else:
                    batch.set_exception(exc)
            raise
        else:
            self._remember(keys, fetched)
        if not batch.done():
            batch.set_result(fetched)

    def _remember(self, keys: list[Key], fetched: dict[Key, FeatureValue]) -> None:
        now = self._clock()
        for key in keys:
            self._cache.pop(key, None)  # re-inserted last: the oldest entries go first
            self._cache[key] = _Entry(fetched.get(key), now)
        while len(self._cache) > self._cache_entries:
            del self._cache[next(iter(self._cache))]

    async def aclose(self) -> None:
        """Cancel the queries in flight."""
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _judge(
    hit: FeatureValue | None, default: float, max_age: float, now: float
) -> tuple[float, str]:
    if hit is None or isinstance(hit.value, bool) or not isinstance(hit.value, int | float):
        return default, DEFAULTED_MISSING
    if now - hit.event_time > max_age:
        return default, DEFAULTED_STALE
    return float(hit.value), PRESENT


def _entity_id(request: InferRequest, feature: FeatureSpec) -> str:
    value = request.parameters.get(feature.entity_key)
    if value is None or isinstance(value, dict | list) or str(value) == "":
        raise InvalidInput(
            f"parameter '{feature.entity_key}': required to look up {feature.entity_type} "
            f"features (or send the input itself)"
        )
    return str(value)


def _tensor(spec: TensorSpec, vector: list[float], rows: int) -> Tensor:
    row = np.asarray(vector, dtype=DTYPES[spec.datatype]).reshape(1, -1)
    return Tensor.from_array(spec.name, np.repeat(row, max(rows, 1), axis=0))
