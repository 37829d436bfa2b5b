"""What the registry core needs from the world, as interfaces, and the records they exchange.

`RegistryStore` keeps models, versions and rollouts (the truth, in Postgres) and publishes
them under etcd keys the data plane watches; `services.registry.store.PostgresEtcdStore`
implements it. `Artifacts` keeps content-addressed files; `services.registry.artifacts.
ArtifactStore` implements it. Both raise the project's own errors (NotFound, Unavailable).

Imports the domain layer and the standard library only: the core imports this module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from services.mesh.domain.types import ModelVersion, Rollout, Signature

QUANTIZATION_MODES = ("int8-dynamic",)
"""How a version may be quantized: int8 weights, activations quantized per batch at run time."""


def version_key(model: str, version: str) -> str:
    """The etcd key (below the mesh prefix) a version record is published at."""
    return f"models/{model}/{version}"


def rollout_key(model: str) -> str:
    """The etcd key (below the mesh prefix) a model's rollout is published at."""
    return f"rollouts/{model}"


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """One row of the model list."""

    name: str
    description: str
    created_at: str
    versions: int
    latest: str | None
    serving: str | None
    """The rollout's primary version, if the model has a rollout."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "created_at": self.created_at,
            "versions": self.versions, "latest": self.latest, "serving": self.serving,
        }


@dataclass(frozen=True, slots=True)
class ModelDetail:
    """A model with all its versions (oldest first) and its current rollout."""

    summary: ModelSummary
    versions: list[ModelVersion]
    rollout: Rollout | None

    def to_json(self) -> dict[str, Any]:
        return {
            **self.summary.to_json(),
            "versions": [v.to_json() for v in self.versions],
            "rollout": None if self.rollout is None else self.rollout.to_json(),
        }


@dataclass(frozen=True, slots=True)
class VersionInsert:
    """What inserting a version did."""

    existing: ModelVersion | None
    """The stored record when the version was there already (then nothing was written)."""
    rollout: Rollout | None
    """The rollout to publish: the first one, if this insert created it, or the model's
    current one when the version existed already; None otherwise."""


@dataclass(frozen=True, slots=True)
class ArtifactInfo:
    """A stored artifact: its digest (its name) and its size in bytes."""

    sha256: str
    size: int


class RegistryStore(Protocol):
    """Models, versions and rollouts: saved durably, then published for the data plane.

    Publishing failures raise Unavailable; keys are those of `version_key`/`rollout_key`.
    """

    async def create_model(self, name: str, description: str) -> bool:
        """Save a model unless one of that name exists; True when this call created it."""
        ...

    async def list_models(self) -> list[ModelSummary]:
        """Every model, by name."""
        ...

    async def model_summary(self, name: str) -> ModelSummary:
        """One model's list row; NotFound if unknown."""
        ...

    async def model_detail(self, name: str) -> ModelDetail:
        """A model with its versions and rollout; NotFound if unknown."""
        ...

    async def insert_version(
        self, record: ModelVersion, *, first_rollout: Rollout
    ) -> VersionInsert:
        """Save `record` (and its model) unless the version exists, in one transaction.

        `first_rollout` is saved, with its history row, if the model has no rollout yet.
        """
        ...

    async def update_version(
        self, model: str, version: str, change: Callable[[ModelVersion], ModelVersion]
    ) -> ModelVersion:
        """Replace a saved version record with `change(record)`, read and written in one
        transaction (concurrent changes apply one after the other); returns the new record.

        NotFound if the version is unknown; whatever `change` raises propagates, nothing saved.
        """
        ...

    async def saved_records(self) -> dict[str, dict[str, Any]]:
        """Every saved version and rollout record, as JSON, by the key it is published at."""
        ...

    async def published_record(self, key: str) -> Any:
        """The decoded record published at `key`; None if absent or not JSON."""
        ...

    async def published_records(self) -> dict[str, Any]:
        """Every decodable record published under models/ and rollouts/, by key."""
        ...

    async def publish(self, key: str, record: dict[str, Any]) -> bool:
        """Publish `record` at `key`; False when a rollout key already holds a newer epoch."""
        ...


class Artifacts(Protocol):
    """Content-addressed artifact files."""

    async def put(
        self, chunks: AsyncIterator[bytes], *, expected_sha256: str | None = None
    ) -> ArtifactInfo:
        """Store the streamed bytes; InvalidInput if they do not hash to `expected_sha256`."""
        ...

    async def path(self, sha256: str) -> Path:
        """Where the artifact `sha256` lives; NotFound if it is not stored."""
        ...

    async def info(self, sha256: str) -> ArtifactInfo:
        """Digest and size of a stored artifact; NotFound if it is not stored."""
        ...


@dataclass(frozen=True, slots=True)
class Quantized:
    """A quantized artifact and what measuring it against its source found (JSON)."""

    artifact: bytes
    measurement: dict[str, Any]


class Quantizer(Protocol):
    """Derives a quantized artifact from an fp32 ONNX one, measured against it."""

    async def quantize(self, source: Path, signature: Signature, *, mode: str) -> Quantized:
        """Quantize the model at `source` (one of `QUANTIZATION_MODES`) and measure it on
        inputs shaped from `signature`; InvalidInput when the model cannot be measured."""
        ...


class SignatureReader(Protocol):
    """Reads the inputs and outputs a model file declares (an ONNX graph does; a TorchScript
    file does not), so a version of such a platform may be registered without a signature."""

    def reads(self, platform: str) -> bool:
        """Whether artifacts of `platform` declare a signature this reader can read."""
        ...

    async def read(self, artifact: Path) -> Signature:
        """The signature `artifact` declares (-1 for symbolic dims); InvalidInput naming the
        artifact when it is not a readable model of its platform."""
        ...
