"""Config records for core and adapter tests: what the registry would publish to etcd."""

from __future__ import annotations

from services.mesh.domain.types import BatchingPolicy, ModelVersion, Rollout, Signature


def model_records(
    model: str, signature: Signature, *, versions: tuple[str, ...] = ("1",),
    stable: str = "1", max_batch_size: int = 8,
) -> dict[str, object]:
    """`models/{model}/{v}` for each version and a stable rollout to `stable`."""
    records: dict[str, object] = {
        f"models/{model}/{version}": ModelVersion(
            model, version, signature, "file:///dev/null", "0" * 64,
            batching=BatchingPolicy(max_batch_size=max_batch_size),
        ).to_json()
        for version in versions
    }
    records[f"rollouts/{model}"] = Rollout.stable(model, stable).to_json()
    return records
