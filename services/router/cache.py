"""The prediction cache: answers of opt-in model versions, keyed by what was asked, never stale.

Where it lives: in the router, around its call to the batcher (`Router._forward`). Only there
is everything the key needs known: the version the rollout chose (a key without it could serve
v1's answer after a switch to v2), the feature values fetched for the request (added to its
inputs before it is forwarded), the tenant. And the router is the first to see a rollout
change: its catalog follows `rollouts/` and `models/` through the etcd watch, and this cache,
subscribed to the same config, drops a model's entries on any change of its rollout or of one
of its version records, so a hit never crosses a version switch. The gateway, in front of
version choice, could not tell a v1 answer from a v2 one without routing itself.

The key is a sha256 over model, version, each input's name, datatype, shape and raw bytes
(hashed from the request's own buffers, no copy; inputs in name order), the requested outputs,
and the tenant when the version's policy says `per_tenant`. Request parameters are not in it:
they carry headers and tracing, which would make every key unique.

Each version has its own budget (`CachePolicy.max_bytes`, LRU) and TTL. Identical misses in
flight together execute once (single flight): the first starts one shared execution; every
request with that key awaits it, each under its own deadline. A waiter that leaves (cancelled,
or past its deadline) does not cancel it for the others; one that outlives the deadline of the
request it joined executes again; any other failure reaches every waiter and is
not cached; an answer that completes after its model's config changed is not stored.

Answers say how they were served in `parameters["cache"]`: `miss` (executed), `hit` (from the
cache), `coalesced` (joined an identical request in flight). Only cached versions carry it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services.mesh.domain.caching import CachePolicy
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import DeadlineExceeded, NotFound
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import InferRequest, InferResponse
from services.router.metrics import CacheMetrics

log = logging.getLogger(__name__)

Execute = Callable[[InferRequest], Awaitable[InferResponse]]
ENTRY_OVERHEAD = 256
"""Bytes counted per entry on top of its outputs (key, names, bookkeeping)."""
HIT, MISS, COALESCED = "hit", "miss", "coalesced"


def cache_key(request: InferRequest, *, per_tenant: bool) -> bytes:
    """The sha256 of what determines the answer of `request` (its version already chosen)."""
    digest = hashlib.sha256()
    _field(digest, request.model)
    _field(digest, str(request.version))
    for tensor in sorted(request.inputs, key=lambda t: t.name):
        _field(digest, tensor.name)
        _field(digest, tensor.datatype)
        _field(digest, ",".join(map(str, tensor.shape)))
        data = tensor.data
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)  # the buffer itself: hashlib reads memoryviews without a copy
    _field(digest, "*" if request.outputs is None else ",".join(sorted(request.outputs)))
    _field(digest, request.tenant if per_tenant else "")
    return digest.digest()


def _field(digest: Any, text: str) -> None:
    """Length-prefixed, so no two field sequences hash the same bytes."""
    raw = text.encode()
    digest.update(len(raw).to_bytes(4, "little"))
    digest.update(raw)


@dataclass(slots=True)
class _Entry:
    outputs: list[Tensor]
    parameters: dict[str, Any]
    expires: float
    size: int


class _VersionStore:
    """One version's entries, least recently used first, within its byte budget."""

    def __init__(self) -> None:
        self.entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.size = 0

    def get(self, key: bytes, now: float) -> _Entry | None | bool:
        """The live entry; False when it had expired (now dropped); None when absent."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            self._drop(key)
            return False
        self.entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: _Entry, max_bytes: int) -> int:
        """Store `entry`; the number of older entries evicted to stay within `max_bytes`."""
        if key in self.entries:
            self._drop(key)
        self.entries[key] = entry
        self.size += entry.size
        evicted = 0
        while self.size > max_bytes:
            self._drop(next(iter(self.entries)))
            evicted += 1
        return evicted

    def _drop(self, key: bytes) -> None:
        self.size -= self.entries.pop(key).size


class PredictionCache:
    """Serves cached answers of versions whose record has a `cache` policy; see the module.

    `clock` (monotonic seconds) measures TTLs; tests inject one.
    """

    def __init__(
        self, catalog: ModelCatalog, metrics: CacheMetrics, *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._catalog = catalog
        self._metrics = metrics
        self._clock = clock
        self._stores: dict[tuple[str, str], _VersionStore] = {}
        self._inflight: dict[bytes, tuple[str, asyncio.Task[InferResponse]]] = {}
        self._generations: dict[str, int] = {}
        self._seen: dict[str, object] = {}
        catalog.config.subscribe(self._config_changed)  # after the catalog's own refresh

    async def serve(self, request: InferRequest, execute: Execute) -> InferResponse:
        """The answer to `request` (its version chosen): cached, shared with an identical
        request in flight, or `execute(request)`'s, stored when the version's policy allows."""
        policy = self._policy(request)
        if policy is None:
            return await execute(request)
        model, version = request.model, str(request.version)
        key = cache_key(request, per_tenant=policy.per_tenant)
        store = self._stores.setdefault((model, version), _VersionStore())
        found = store.get(key, self._clock())
        if found is False:
            self._evicted(model, version, "ttl", 1)
        if isinstance(found, _Entry):
            self._metrics.hits.labels(model, version).inc()
            return _answer(request, found.outputs, found.parameters, HIT)
        shared = self._inflight.get(key)
        if shared is not None:
            return await self._join(request, shared[1], execute)
        self._metrics.misses.labels(model, version).inc()
        return await self._await(request, self._start(key, request, execute, policy), MISS)

    def _policy(self, request: InferRequest) -> CachePolicy | None:
        try:
            policy = self._catalog.version(request.model, str(request.version)).cache
        except NotFound:
            return None
        if policy is not None and request.model not in self._seen:
            self._seen[request.model] = self._fingerprint(request.model)
        return policy

    def _start(
        self, key: bytes, request: InferRequest, execute: Execute, policy: CachePolicy
    ) -> asyncio.Task[InferResponse]:
        """Start the one shared execution of `key`; it stores its answer when done."""
        model, version = request.model, str(request.version)
        generation = self._generations.get(model, 0)
        task = asyncio.create_task(_run(execute, request), name="prediction-cache-miss")
        self._inflight[key] = (model, task)

        def done(task: asyncio.Task[InferResponse]) -> None:
            if self._inflight.get(key, (None, None))[1] is task:
                del self._inflight[key]
            if task.cancelled() or task.exception() is not None:
                return  # every waiter got the error (retrieved here when none is left)
            if self._generations.get(model, 0) == generation:
                self._store(key, (model, version), task.result(), policy)

        task.add_done_callback(done)
        return task

    async def _join(
        self, request: InferRequest, shared: asyncio.Task[InferResponse], execute: Execute
    ) -> InferResponse:
        """Share an identical request's execution; should it fail on *its* deadline while
        this request's is still ahead, execute again (as the leader of a new one)."""
        self._metrics.hits.labels(request.model, str(request.version)).inc()
        try:
            return await self._await(request, shared, COALESCED)
        except DeadlineExceeded:
            if not shared.done() or shared.cancelled() or not isinstance(
                shared.exception(), DeadlineExceeded
            ) or (request.deadline is not None and time.time() >= request.deadline):
                raise
        return await self.serve(request, execute)

    async def _await(
        self, request: InferRequest, task: asyncio.Task[InferResponse], served: str
    ) -> InferResponse:
        """Wait for the shared execution under this request's own deadline; leaving (by
        cancellation or deadline) never cancels it for the others."""
        timeout = None if request.deadline is None else request.deadline - time.time()
        try:
            answer = await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                "deadline exceeded waiting for an identical request in flight"
            ) from None
        return _answer(request, answer.outputs, answer.parameters, served)

    def _store(
        self, key: bytes, at: tuple[str, str], answer: InferResponse, policy: CachePolicy
    ) -> None:
        outputs = [Tensor(t.name, t.datatype, t.shape, bytes(t.data)) for t in answer.outputs]
        size = ENTRY_OVERHEAD + sum(len(t.data) + len(t.name) for t in outputs)
        if size > policy.max_bytes:
            return  # would evict everything else and still not fit
        parameters = {k: v for k, v in answer.parameters.items() if k != "cache"}
        store = self._stores.setdefault(at, _VersionStore())
        entry = _Entry(outputs, parameters, self._clock() + policy.ttl_s, size)
        self._evicted(*at, "lru", store.put(key, entry, policy.max_bytes))

    def _evicted(self, model: str, version: str, reason: str, count: int) -> None:
        if count:
            self._metrics.evictions.labels(model, reason).inc(count)
        store = self._stores.get((model, version))
        self._metrics.bytes.labels(model, version).set(0 if store is None else store.size)

    def _fingerprint(self, model: str) -> object:
        """What a change of must empty the model's cache: its rollout and version records."""
        try:
            rollout: object = self._catalog.rollout(model)
        except NotFound:
            rollout = None
        return rollout, tuple(self._catalog.versions(model))

    def _config_changed(self) -> None:
        for model, seen in list(self._seen.items()):
            current = self._fingerprint(model)
            if current != seen:
                self._seen[model] = current
                self.invalidate(model)

    def invalidate(self, model: str) -> None:
        """Drop every entry of `model`; answers in flight are served but not stored, and new
        requests no longer join them."""
        self._generations[model] = self._generations.get(model, 0) + 1
        for key in [k for k, (m, _) in self._inflight.items() if m == model]:
            del self._inflight[key]
        for (owner, version), store in list(self._stores.items()):
            if owner == model:
                del self._stores[(owner, version)]
                self._evicted(model, version, "rollout", len(store.entries))
        log.info("prediction cache of model %s dropped: its config changed", model)

    def bytes_used(self) -> int:
        """Bytes held over every version."""
        return sum(store.size for store in self._stores.values())

    async def aclose(self) -> None:
        """Cancel the shared executions in flight and wait for them."""
        tasks = [task for _, task in self._inflight.values()]
        self._inflight.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _run(execute: Execute, request: InferRequest) -> InferResponse:
    return await execute(request)


def _answer(
    request: InferRequest, outputs: list[Tensor], parameters: dict[str, Any], served: str
) -> InferResponse:
    """A response of its own for each request (the router annotates its parameters)."""
    return InferResponse(request.model, str(request.version), request.request_id,
                         list(outputs), {**parameters, "cache": served})
