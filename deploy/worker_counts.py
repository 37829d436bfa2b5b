"""What the launcher's worker fleet reads besides the `models/` records: a version's replica
bounds, the autoscaler's `scale/` records, and the launcher's own settings for its workers
(and for fused mode's processes). Pure parsing, apart from `deploy.workers` so that module
keeps to the fleet itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.mesh.domain.errors import InvalidInput

WORKERS_PER = ("model", "version")
"""`INFERMESH_WORKERS_PER`: one set of workers per model (shared) or per version."""
FUSED_LAYOUTS = ("fronts", "replicas")
"""`INFERMESH_FUSED_LAYOUT`, with several fused processes: `fronts`, one process batches and
runs the models for all (deploy/fused.py); `replicas`, each process is a whole fused data plane
on the gateway's shared ports, batching only what reaches it (docs/PERFORMANCE.md, "Fused
replicas", says which wins for which model)."""


def replica_bounds(raw: Any) -> tuple[int, int | None]:
    """(min, max) of a version record's `replicas` field (`{"min": 1, "max": 4}`, both
    optional; absent: (1, None)); InvalidInput naming the field otherwise."""
    if raw is None:
        return 1, None
    if not isinstance(raw, dict):
        raise InvalidInput("replicas: must be an object with 'min' and 'max'")
    low = _count(raw.get("min", 1), "replicas.min")
    high = None if raw.get("max") is None else _count(raw["max"], "replicas.max")
    if high is not None and high < low:
        raise InvalidInput("replicas.max: must be >= replicas.min")
    return low, high


def scale_replicas(raw: Any) -> int:
    """The count of a `scale/{model}/{version}` record (`{"replicas": n, "reason": ...,
    "at": ...}`); InvalidInput naming the field otherwise."""
    if not isinstance(raw, dict):
        raise InvalidInput("record: not a JSON object")
    return _count(raw.get("replicas"), "replicas")


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{field}: must be an integer >= 0")
    return value


def workers_per_version(env: Mapping[str, str]) -> bool:
    """Whether `INFERMESH_WORKERS_PER` asks for one set of workers per version (`version`)
    rather than per model (`model`, the default); ValueError naming it otherwise."""
    raw = env.get("INFERMESH_WORKERS_PER") or "model"
    if raw not in WORKERS_PER:
        raise ValueError(f"INFERMESH_WORKERS_PER: must be one of {', '.join(WORKERS_PER)}, "
                         f"not {raw[:40]!r}")
    return raw == "version"


def fused_layout(env: Mapping[str, str]) -> str:
    """`INFERMESH_FUSED_LAYOUT` (default `fronts`); ValueError naming it otherwise."""
    raw = env.get("INFERMESH_FUSED_LAYOUT") or "fronts"
    if raw not in FUSED_LAYOUTS:
        raise ValueError(f"INFERMESH_FUSED_LAYOUT: must be one of {', '.join(FUSED_LAYOUTS)}, "
                         f"not {raw[:40]!r}")
    return raw


def replica_threads(env: Mapping[str, str], replicas: int, cores: int) -> dict[str, str]:
    """The most intra-op threads a model may get in each of `replicas` fused processes on
    `cores` cores: an equal share, at least one. Each replica runs every model, and a
    compute-bound one takes all of its team: two replicas of the encoder on torch's two threads
    each served 0.38x one process's rate here, on one thread each 0.9-1.04x. A model quick
    enough for one thread still gets one (the warm-up decides within the share). Nothing for
    one replica, or when the operator set `INFERMESH_WORKER_THREADS` or `..._MAX_THREADS`."""
    if replicas <= 1 or any(env.get(f"INFERMESH_WORKER_{name}")
                            for name in ("THREADS", "MAX_THREADS")):
        return {}
    return {"INFERMESH_WORKER_MAX_THREADS": str(max(1, cores // replicas))}


def handoff_bound(env: Mapping[str, str]) -> float:
    """How long a worker may take to leave after SIGTERM: its handoff, its drain, a margin
    (the workers' settings, `INFERMESH_[WORKER_]HANDOFF_TIMEOUT` and `..._DRAIN_TIMEOUT`)."""
    handoff = float(env.get("INFERMESH_WORKER_HANDOFF_TIMEOUT")
                    or env.get("INFERMESH_HANDOFF_TIMEOUT") or 30.0)
    drain = float(env.get("INFERMESH_WORKER_DRAIN_TIMEOUT")
                  or env.get("INFERMESH_DRAIN_TIMEOUT") or 10.0)
    return handoff + drain + 5.0
