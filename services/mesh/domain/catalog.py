"""The data plane's read-only view of the config in etcd: models, rollouts, ready workers.

A record that does not parse, or a `models/` record that fails the mesh's trust checks
(`services.mesh.domain.trust`: names, sha256, bounds, its key), is logged and ignored: the
view keeps only records every service can act on safely."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from services.mesh.domain.config import ConfigView
from services.mesh.domain.errors import InfermeshError, NotFound
from services.mesh.domain.trust import MAX_BATCHERS, check_version_record
from services.mesh.domain.types import ModelVersion, Rollout

log = logging.getLogger(__name__)


class ModelCatalog:
    """Parsed, cached views over `models/`, `rollouts/`, `endpoints/worker/` and the
    autoscaler's `scale/` records (their `batchers`)."""

    def __init__(self, config: ConfigView) -> None:
        self.config = config
        self._versions: dict[tuple[str, str], ModelVersion] = {}
        self._rollouts: dict[str, Rollout] = {}
        self._ready: dict[tuple[str, str], int] = {}
        self._spread: dict[tuple[str, str], int] = {}
        config.subscribe(self._refresh)
        self._refresh()

    def _refresh(self) -> None:
        versions: dict[tuple[str, str], ModelVersion] = {}
        for key, raw in self.config.items("models/").items():
            parsed = _parse(_version_at(key), raw, key)
            if parsed is not None:
                versions[(parsed.model, parsed.version)] = parsed
        rollouts: dict[str, Rollout] = {}
        for key, raw in self.config.items("rollouts/").items():
            rollout = _parse(Rollout.from_json, raw, key)
            if rollout is not None:
                rollouts[rollout.model] = rollout
        ready: dict[tuple[str, str], int] = {}
        for record in self.config.items("endpoints/worker/").values():
            for served in record.get("models", []) if isinstance(record, dict) else []:
                model, _, version = str(served).partition("/")
                ready[(model, version)] = ready.get((model, version), 0) + 1
        self._versions, self._rollouts, self._ready = versions, rollouts, ready
        self._spread = _scaled_batchers(self.config.items("scale/"))
        self._sticky_keys = frozenset(r.sticky_key for r in rollouts.values() if r.sticky_key)

    def models(self) -> list[str]:
        """Names of every model with at least one version or a rollout."""
        return sorted({m for m, _ in self._versions} | set(self._rollouts))

    def versions(self, model: str) -> list[ModelVersion]:
        """Every registered version of `model`, in version order."""
        found = [v for (m, _), v in self._versions.items() if m == model]
        return sorted(found, key=lambda v: (len(v.version), v.version))

    def version(self, model: str, version: str) -> ModelVersion:
        """One version; NotFound names what is missing."""
        found = self._versions.get((model, version))
        if found is None:
            if not self.versions(model):
                raise NotFound(f"unknown model '{model}'")
            raise NotFound(f"unknown version '{version}' of model '{model}'")
        return found

    def rollouts(self) -> list[Rollout]:
        """Every rollout record, by model name."""
        return [self._rollouts[m] for m in sorted(self._rollouts)]

    def sticky_keys(self) -> frozenset[str]:
        """The sticky key of every rollout (a new set after each config refresh)."""
        return self._sticky_keys

    def rollout(self, model: str) -> Rollout:
        found = self._rollouts.get(model)
        if found is None:
            raise NotFound(f"unknown model '{model}'")
        return found

    def resolve(self, model: str, version: str | None) -> ModelVersion:
        """The pinned version, else the rollout's primary version (for signatures)."""
        if version:
            return self.version(model, version)
        primary = self.rollout(model).primary
        if primary is None:
            raise NotFound(f"model '{model}' has no version to serve")
        return self.version(model, primary)

    def batchers(self, model: str, version: str | None) -> int:
        """How many batcher instances share the traffic of `model` at `version`: the version's
        `batching.batchers`, or more when the autoscaler's `scale/` record asks for more (its
        `batchers`, from the load); 1 for a version not known here. Routers and batchers both
        read it, so a router spreads over the same top-k batchers that split the workers."""
        key = (model, version or "")
        found = self._versions.get(key)
        return 1 if found is None else max(found.batching.batchers, self._spread.get(key, 1))

    def ready_workers(self, model: str, version: str) -> int:
        """How many worker instances report (model, version) loaded and warm."""
        return self._ready.get((model, version), 0)


def _scaled_batchers(records: Mapping[str, Any]) -> dict[tuple[str, str], int]:
    """`batchers` of each `scale/{model}/{version}` record that asks for more than one (at
    most MAX_BATCHERS); a record without a positive integer there asks for nothing."""
    spread: dict[tuple[str, str], int] = {}
    for key, record in records.items():
        count = record.get("batchers") if isinstance(record, dict) else None
        if isinstance(count, int) and not isinstance(count, bool) and count > 1:
            model, _, version = key.removeprefix("scale/").partition("/")
            spread[(model, version)] = min(count, MAX_BATCHERS)
    return spread


def _version_at(key: str) -> Callable[[Mapping[str, Any]], ModelVersion]:
    """A parser of the `models/` record at `key` that also applies the trust checks."""
    return lambda raw: check_version_record(ModelVersion.from_json(raw), key=key)


def _parse(parse: Any, raw: Any, key: str) -> Any:
    if not isinstance(raw, dict):
        log.error("ignoring bad config record %s: not a JSON object", key)
        return None
    try:
        return parse(raw)
    except (InfermeshError, AttributeError, KeyError, TypeError, ValueError) as exc:
        log.error("ignoring bad config record %s: %s", key, exc)
        return None
