"""The registry core: models and immutable versions, saved durably, then published to etcd.

Every write is saved first (Postgres: durable, audited) and then published to etcd, where the
data plane watches it. `reconcile()` republishes whatever etcd lacks, repairing a crash or an
etcd outage between the two writes; it runs at start and then periodically. The stores are
interfaces (`services.registry.ports`); `__main__` hands in the Postgres + etcd one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from services.mesh.domain.errors import Conflict, InvalidInput, NotFound, Unavailable
from services.mesh.domain.trust import DEFAULT_MAX_FRAME_BYTES, check_frame_fit
from services.mesh.domain.types import BatchingPolicy, ModelVersion, Rollout, Signature
from services.registry.ports import (
    QUANTIZATION_MODES,
    ArtifactInfo,
    Artifacts,
    ModelDetail,
    ModelSummary,
    Quantizer,
    RegistryStore,
    SignatureReader,
    rollout_key,
    version_key,
)
from services.registry.validation import (
    check_name,
    check_sha256,
    parse_autoscaling,
    parse_autoscaling_change,
    parse_batching,
    parse_batching_change,
    parse_cache,
    parse_cpu_fallback,
    parse_device,
    parse_prediction_log,
    parse_worker_placement,
    resolve_signature,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class VersionConflict(Conflict):
    """A version exists already with different content (versions are immutable)."""


@dataclass(frozen=True, slots=True)
class Stored(Generic[T]):
    """The outcome of an idempotent write: the record, and whether this call created it."""

    value: T
    created: bool


class Registry:
    """Models, versions and artifacts; the store's saved records are the truth, etcd a copy."""

    def __init__(
        self, store: RegistryStore, artifacts: Artifacts, *, public_url: str,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, quantizer: Quantizer | None = None,
        signatures: SignatureReader | None = None,
    ) -> None:
        self._store = store
        self._signatures = signatures
        """Reads signatures out of artifacts that declare one (ONNX); None: none is read."""
        self._quantizer = quantizer
        self._artifacts = artifacts
        self._public_url = public_url.rstrip("/")
        self._max_frame_bytes = max_frame_bytes
        """The mesh's link frame limit: a version's full batch must fit in one frame."""

    # -- models ---------------------------------------------------------------------------

    async def create_model(self, name: str, description: str = "") -> Stored[ModelSummary]:
        """Create a model (idempotent: an existing model is returned unchanged)."""
        check_name(name, field="name")
        if not isinstance(description, str):
            raise InvalidInput("description: must be a string")
        created = await self._store.create_model(name, description)
        return Stored(await self._store.model_summary(name), created)

    async def list_models(self) -> list[ModelSummary]:
        """Every model, by name."""
        return await self._store.list_models()

    async def get_model(self, name: str) -> ModelDetail:
        """A model with its versions and rollout; NotFound if unknown."""
        return await self._store.model_detail(name)

    # -- artifacts ------------------------------------------------------------------------

    async def put_artifact(
        self, chunks: AsyncIterator[bytes], *, expected_sha256: str | None = None
    ) -> ArtifactInfo:
        """Store a streamed artifact under its sha256; InvalidInput on a digest mismatch."""
        return await self._artifacts.put(chunks, expected_sha256=expected_sha256)

    async def artifact_path(self, sha256: str) -> Path:
        """The local file of a stored artifact; NotFound if it is not stored."""
        return await self._artifacts.path(sha256)

    def artifact_uri(self, sha256: str) -> str:
        """Where workers download the artifact from."""
        return f"{self._public_url}/v1/artifacts/{sha256}"

    # -- versions -------------------------------------------------------------------------

    async def register_version(
        self, model: str, version: str, *, artifact_sha256: str,
        signature: Mapping[str, Any] | None = None,
        batching: Mapping[str, Any] | None = None, device: str = "auto",
        platform: str = "pytorch_torchscript", prediction_log: str = "digest",
        autoscaling: Mapping[str, Any] | None = None, cpu_fallback: bool = False,
        cache: Mapping[str, Any] | None = None, worker: str = "shared",
    ) -> Stored[ModelVersion]:
        """Register an immutable version (creating the model and its first rollout if needed).

        Re-registering identical content is a no-op; different content raises VersionConflict.
        The queue and scaling policies are not part of that content: a saved version keeps its
        own (changed through `change_batching`, `change_autoscaling`), whatever a
        re-registration sends. An ONNX version's signature is read from its artifact; any
        `signature` given must agree with it and may be partial (`resolve_signature`).
        """
        read = await self._read_signature(platform, artifact_sha256)
        record = ModelVersion(
            model=check_name(model, field="model"),
            version=check_name(version, field="version"),
            signature=resolve_signature(signature, read),
            artifact_uri=self.artifact_uri(check_sha256(artifact_sha256, field="artifact_sha256")),
            sha256=artifact_sha256,
            batching=parse_batching(batching),
            device=parse_device(device),
            cpu_fallback=parse_cpu_fallback(cpu_fallback),
            worker=parse_worker_placement(worker),
            platform=check_name(platform, field="platform"),
            prediction_log=parse_prediction_log(prediction_log),
            autoscaling=parse_autoscaling(autoscaling),
            cache=parse_cache(cache),
        )
        check_frame_fit(record.signature, record.batching, max_frame_bytes=self._max_frame_bytes)
        await self._require_artifact(artifact_sha256)
        return await self._save(record)

    async def _save(self, record: ModelVersion) -> Stored[ModelVersion]:
        """Insert a new version (or find it identical) and publish it."""
        model, version = record.model, record.version
        inserted = await self._store.insert_version(
            record, first_rollout=Rollout.stable(record.model, record.version)
        )
        stored = (Stored(record, True) if inserted.existing is None
                  else Stored(_check_same(inserted.existing, record), False))
        # An identical re-register republishes too: a retry after an etcd failure repairs it.
        await self._publish_if_stale(version_key(model, version), stored.value.to_json())
        if inserted.rollout is not None:
            await self._publish_if_stale(rollout_key(model), inserted.rollout.to_json())
        return stored

    async def change_batching(
        self, model: str, version: str, batching: Mapping[str, Any]
    ) -> ModelVersion:
        """Merge a partial batching object over a version's queue policy, save and publish it.

        The data plane watches the record and applies the policy without a restart; the
        artifact and signature stay (only the queue policy of a version may change).
        """
        check_name(model, field="model")
        check_name(version, field="version")
        record = await self._store.update_version(
            model, version,
            lambda current: replace(
                current, batching=self._fitting(current, batching)
            ),
        )
        await self._publish_if_stale(version_key(model, version), record.to_json())
        return record

    async def change_cache(self, model: str, version: str, cache: Any) -> ModelVersion:
        """Set (a policy object) or clear (None) a version's prediction cache policy, save and
        publish it; routers apply it from their next request and drop the model's entries."""
        check_name(model, field="model")
        check_name(version, field="version")
        policy = parse_cache(cache)
        record = await self._store.update_version(
            model, version, lambda current: replace(current, cache=policy)
        )
        await self._publish_if_stale(version_key(model, version), record.to_json())
        return record

    async def change_autoscaling(
        self, model: str, version: str, autoscaling: Mapping[str, Any]
    ) -> ModelVersion:
        """Merge a partial `autoscaling` object over a version's (a field set to null goes
        back to its default), save and publish it; a version without one becomes autoscaled.

        The autoscaler reads the record on its next tick, the launcher's fleet its bounds.
        """
        check_name(model, field="model")
        check_name(version, field="version")
        record = await self._store.update_version(
            model, version,
            lambda current: replace(
                current, autoscaling=parse_autoscaling_change(current.autoscaling, autoscaling)
            ),
        )
        await self._publish_if_stale(version_key(model, version), record.to_json())
        return record

    async def quantize_version(
        self, model: str, version: str, *, mode: str = "int8-dynamic",
        new_version: str | None = None,
    ) -> Stored[ModelVersion]:
        """Derive a quantized version (default name `<version>-int8`) from an ONNX version,
        measured against it before it is saved: speed-ups and output errors go on the record
        even when int8 is slower (its verdict says so). Same signature, queue and scaling
        policies; its own artifact and sha256. A target derived already is returned as is.
        """
        if mode not in QUANTIZATION_MODES:
            raise InvalidInput(f"mode: must be one of {', '.join(QUANTIZATION_MODES)}")
        versions = {v.version: v for v in (await self._store.model_detail(model)).versions}
        source = versions.get(version)
        if source is None:
            raise NotFound(f"unknown version '{version}' of model '{model}'")
        if source.derived_from is not None:
            raise InvalidInput(f"version: {version} of {model} is derived already; quantize "
                               f"its source, version {source.derived_from.get('version')}")
        if source.platform != "onnxruntime_onnx":
            raise InvalidInput(
                f"platform: version {version} of {model} is {source.platform}; quantization "
                f"needs an ONNX version (onnxruntime_onnx): convert it first: infermesh "
                f"models convert {model} {version}"
            )
        target = check_name(new_version or f"{version}-int8", field="version")
        derived_from = {"version": version, "mode": mode}
        existing = versions.get(target)
        if existing is not None and existing.derived_from == derived_from:
            return Stored(existing, False)
        if self._quantizer is None:
            raise Unavailable("quantization: this registry runs without a quantizer")
        path = await self._artifacts.path(source.sha256)
        quantized = await self._quantizer.quantize(path, source.signature, mode=mode)
        info = await self._artifacts.put(_single(quantized.artifact))
        return await self._save(replace(
            source, version=target, sha256=info.sha256, artifact_uri=self.artifact_uri(info.sha256),
            derived_from=derived_from, quantization=quantized.measurement,
        ))

    def _fitting(self, current: ModelVersion, change: Mapping[str, Any]) -> BatchingPolicy:
        """`current`'s queue policy with `change` merged, if a full batch still fits a frame."""
        policy = parse_batching_change(current.batching, change)
        check_frame_fit(current.signature, policy, max_frame_bytes=self._max_frame_bytes)
        return policy

    async def _read_signature(self, platform: Any, sha256: Any) -> Signature | None:
        """What the artifact declares, for a platform whose files declare a signature."""
        if self._signatures is None or not self._signatures.reads(platform):
            return None
        await self._require_artifact(check_sha256(sha256, field="artifact_sha256"))
        return await self._signatures.read(await self._artifacts.path(sha256))

    async def _require_artifact(self, sha256: str) -> None:
        try:
            await self._artifacts.info(sha256)
        except NotFound:
            raise InvalidInput(
                f"artifact_sha256: no artifact {sha256} in the registry; upload it first"
            ) from None

    # -- publishing -----------------------------------------------------------------------

    async def reconcile(self) -> int:
        """Republish every saved version and rollout record that etcd lacks or has stale.

        Returns the number of keys written. A rollout in etcd with a higher epoch than the
        saved one is left alone (a newer write is on its way to the saved view of the world).
        """
        saved = await self._store.saved_records()
        published = await self._store.published_records()
        written = 0
        for key, record in saved.items():
            if _stale(published.get(key), record) and await self._store.publish(key, record):
                written += 1
        if written:
            log.info("reconcile republished %d etcd keys", written)
        return written

    async def reconcile_forever(self, interval: float) -> None:
        """Run `reconcile()` every `interval` seconds until cancelled; failures are logged."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reconcile()
            except Exception as exc:
                log.warning("reconcile failed (%r); retrying in %.0fs", exc, interval)

    async def _publish_if_stale(self, key: str, record: dict[str, Any]) -> None:
        if _stale(await self._store.published_record(key), record):
            await self._store.publish(key, record)


def _stale(published: Any, record: dict[str, Any]) -> bool:
    """Whether `record` should replace what etcd holds; a newer rollout epoch there wins."""
    if published == record:
        return False
    if isinstance(published, dict) and "routes" in record:
        return int(published.get("epoch", 0)) <= int(record.get("epoch", 0))
    return True


def _check_same(existing: ModelVersion, wanted: ModelVersion) -> ModelVersion:
    # artifact_uri is derived from the registry's public URL, which may change between runs;
    # the queue and scaling policies may have been changed since (`change_batching`,
    # `change_autoscaling`): the saved ones stand, so re-running a registration script after
    # such a change is still a no-op. A derived version's measurement differs run to run: the
    # artifact and its source make it what it is.
    def content(v: ModelVersion) -> dict[str, Any]:
        return {k: val for k, val in v.to_json().items()
                if k not in ("artifact_uri", "batching", "autoscaling", "replicas",
                             "quantization", "cache")}

    if content(existing) != content(wanted):
        raise VersionConflict(
            f"version {wanted.version} of model {wanted.model} already exists with a different "
            "artifact/signature; versions are immutable, register a new version"
        )
    return existing


async def _single(data: bytes) -> AsyncIterator[bytes]:
    yield data
