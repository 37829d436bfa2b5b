"""Worker settings (`INFERMESH_WORKER_*`, falling back to `INFERMESH_*`)."""

from __future__ import annotations

from dataclasses import dataclass

from services.mesh.infra.settings import ServiceSettings


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(ServiceSettings):
    models: tuple[str, ...] = ("*",)
    """What this worker serves (comma-separated): `model` (all its versions), `model/version`,
    or `*` for every model."""
    cache_dir: str = ".infermesh/worker-cache"
    """Where downloaded artifacts are kept, by sha256."""
    threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""
