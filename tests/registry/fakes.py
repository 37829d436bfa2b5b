"""In-process stand-ins for the registry's stores: core tests without Postgres or etcd."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.mesh.domain.errors import NotFound, Unavailable
from services.mesh.domain.types import ModelVersion, Rollout
from services.registry.ports import (
    ModelDetail,
    ModelSummary,
    VersionInsert,
    rollout_key,
    version_key,
)


@dataclass
class MemoryStore:
    """A `RegistryStore` in dicts: `saved` is the truth, `published` the etcd copy.

    While `etcd_down` is set, every etcd call raises Unavailable, as the real store does.
    """

    saved: dict[str, dict[str, Any]] = field(default_factory=dict)
    published: dict[str, Any] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    etcd_down: bool = False

    async def create_model(self, name: str, description: str) -> bool:
        created = name not in self.descriptions
        self.descriptions.setdefault(name, description)
        return created

    async def list_models(self) -> list[ModelSummary]:
        return [await self.model_summary(name) for name in sorted(self.descriptions)]

    async def model_summary(self, name: str) -> ModelSummary:
        if name not in self.descriptions:
            raise NotFound(f"model '{name}' not found")
        versions = self._versions(name)
        rollout = self.saved.get(rollout_key(name))
        return ModelSummary(
            name=name, description=self.descriptions[name], created_at="", versions=len(versions),
            latest=versions[-1].version if versions else None,
            serving=None if rollout is None else Rollout.from_json(rollout).primary,
        )

    async def model_detail(self, name: str) -> ModelDetail:
        rollout = self.saved.get(rollout_key(name))
        return ModelDetail(await self.model_summary(name), self._versions(name),
                           None if rollout is None else Rollout.from_json(rollout))

    async def insert_version(
        self, record: ModelVersion, *, first_rollout: Rollout
    ) -> VersionInsert:
        self.descriptions.setdefault(record.model, "")
        rollout = self.saved.get(rollout_key(record.model))
        existing = self.saved.get(version_key(record.model, record.version))
        if existing is not None:
            return VersionInsert(ModelVersion.from_json(existing),
                                 None if rollout is None else Rollout.from_json(rollout))
        self.saved[version_key(record.model, record.version)] = record.to_json()
        if rollout is not None:
            return VersionInsert(None, None)
        self.saved[rollout_key(record.model)] = first_rollout.to_json()
        return VersionInsert(None, first_rollout)

    async def update_version(
        self, model: str, version: str, change: Callable[[ModelVersion], ModelVersion]
    ) -> ModelVersion:
        current = self.saved.get(version_key(model, version))
        if current is None:
            raise NotFound(f"unknown version '{version}' of model '{model}'")
        record = change(ModelVersion.from_json(current))
        self.saved[version_key(model, version)] = record.to_json()
        return record

    async def saved_records(self) -> dict[str, dict[str, Any]]:
        return dict(self.saved)

    async def published_record(self, key: str) -> Any:
        self._check_etcd()
        return self.published.get(key)

    async def published_records(self) -> dict[str, Any]:
        self._check_etcd()
        return dict(self.published)

    async def publish(self, key: str, record: dict[str, Any]) -> bool:
        self._check_etcd()
        current = self.published.get(key)
        if key.startswith("rollouts/") and current is not None and (
            current["epoch"] > record["epoch"] or current == record
        ):
            return False
        self.published[key] = record
        return True

    def _versions(self, model: str) -> list[ModelVersion]:
        prefix = version_key(model, "")
        return [ModelVersion.from_json(r) for k, r in sorted(self.saved.items())
                if k.startswith(prefix)]

    def _check_etcd(self) -> None:
        if self.etcd_down:
            raise Unavailable("etcd is away")
