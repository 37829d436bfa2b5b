"""A hot model spread over several batchers, each with its own workers (issue 17, point 3).

A model's traffic goes to the top k batcher instances by rendezvous score on the model name
(`LinkPool.pick_by_key(model, k=k)` on the router, the least busy of those k per request), k
being the version's `batching.batchers` (`ModelCatalog.batchers`). Each of those k batchers
dispatches to its own share of the version's workers (`WorkerShare`, handed to
`LinkedWorkerPool`), so k batchers and their workers form k independent pipelines and adding
batcher and worker processes adds throughput to one model. With k = 1, nothing changes: one
batcher, every worker.

Every batcher computes the same split from the same inputs (the batchers listed in etcd, the
workers that list the version), so no batcher asks another which workers are its own. While
their views differ (a link not yet open, a key not yet seen), a worker may briefly serve two
batchers or none; the next change of either view settles it.

k is the larger of the version's `batchers` setting and the `batchers` the autoscaler
publishes in `scale/{model}/{version}` as the model's load grows (`ModelCatalog.batchers`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from services.mesh.domain.config import ConfigView
from services.mesh.transport.peers import rendezvous_score


def rank(key: str, instances: Iterable[str]) -> list[str]:
    """`instances` best first for `key` by rendezvous score (ties keep their order): the first
    is `LinkPool.pick_by_key`'s choice for `key`, the first k share a key spread over k."""
    return sorted(instances, key=lambda instance: rendezvous_score(key, instance), reverse=True)


def split(members: Iterable[str], owners: Sequence[str]) -> dict[str, str]:
    """Each member's owner: the owner it scores highest with (rendezvous) that has room.

    Balanced, so k batchers get k equal pipelines rather than the 3-and-1 a plain
    highest-score split of four workers over two batchers gives half the time: the first
    `len(members) % len(owners)` owners take one member more than the others. Members choose
    in name order, so every batcher computes the same split from the same names.
    """
    names = sorted(set(members))
    if not owners:
        return {}
    base, extra = divmod(len(names), len(owners))
    room = {owner: base + (1 if i < extra else 0) for i, owner in enumerate(owners)}
    owned: dict[str, str] = {}
    for name in names:
        owner = max((o for o in owners if room[o] > 0),
                    key=lambda o: rendezvous_score(name, o))
        room[owner] -= 1
        owned[name] = owner
    return owned


class _Cached(NamedTuple):
    spread: int
    workers: list[str]
    mine: frozenset[str] | None


class WorkerShare:
    """Which of a version's workers one batcher dispatches to, when its model is spread over
    `batchers(model, version)` batcher instances listed under `endpoints/batcher/`.

    `mine` answers None (every worker) when the model is not spread, when this batcher is not
    among the model's top k (a router's view ran ahead of ours: serve what arrives with all),
    or when its share is empty (fewer workers than batchers): a batcher with traffic and
    no worker of its own would only fail it.
    """

    def __init__(
        self, config: ConfigView, *, instance: str, batchers: Callable[[str, str], int],
        service: str = "batcher",
    ) -> None:
        self._config = config
        self._instance = instance
        self._batchers = batchers
        self._prefix = f"endpoints/{service}/"
        self._cache: dict[tuple[str, str], _Cached] = {}
        config.subscribe(self._cache.clear)  # a batcher came or went: split again

    def mine(self, model: str, version: str, workers: list[str]) -> frozenset[str] | None:
        """This batcher's share of `workers` (instance keys) for `model` at `version`, or None
        for all of them. Cached per version while k, the workers and the batchers stay."""
        spread = self._batchers(model, version)
        if spread <= 1:
            return None
        cached = self._cache.get((model, version))
        if cached is None or cached.spread != spread or cached.workers != workers:
            cached = _Cached(spread, workers, self._compute(model, spread, workers))
            self._cache[(model, version)] = cached
        return cached.mine

    def _compute(self, model: str, spread: int, workers: list[str]) -> frozenset[str] | None:
        listed = [
            str(record.get("instance", key[len(self._prefix):]))
            for key, record in self._config.items(self._prefix).items()
            if isinstance(record, dict) and record.get("link")
        ]
        top = rank(model, listed)[:spread]
        if self._instance not in top:
            return None
        mine = frozenset(w for w, owner in split(workers, top).items() if owner == self._instance)
        return mine or None

