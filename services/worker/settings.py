"""Worker settings (`INFERMESH_WORKER_*`, falling back to `INFERMESH_*`)."""

from __future__ import annotations

from dataclasses import dataclass

from services.mesh.domain.errors import InvalidInput
from services.mesh.infra.settings import ServiceSettings


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(ServiceSettings):
    models: tuple[str, ...] = ("*",)
    """What this worker serves (comma-separated): `model` (its versions, less those registered
    `worker: dedicated`), `model/version` (that one, dedicated or not), or `*` for every
    version of every model.

    A dedicated version is left out by its record, not by an exclusion listed here: the
    worker reads each record anyway and the field is fixed at registration, so a shared
    worker started before a dedicated version was registered never loads it and needs no
    restart to learn of it."""
    cache_dir: str = ".infermesh/worker-cache"
    """Where downloaded artifacts are kept, by sha256."""
    threads: int = 0
    """torch intra-op threads per batch; 0 lets each model's warm-up choose: torch's default,
    or one thread for a CPU model whose largest batch takes under a millisecond."""
    max_threads: int = 0
    """With `threads` 0: the most intra-op threads a warm-up may choose for a model (0: every
    core). `infermesh up --fused --processes N --layout replicas` sets each replica's share of
    the cores, so N replicas' teams do not spin on the same cores."""
    inline_below_ms: float = 0.0
    """A CPU version whose largest batch takes less than this (its fastest warm-up run) runs
    its batches on the event loop rather than in the inference thread, sparing two thread
    hand-offs a batch; 0 (the default): never, batches run off the loop as the architecture
    says. 0.25 is what pays for the mlp (`services.worker.core.INLINE_BELOW_S`)."""
    artifact_stores: tuple[str, ...] = ()
    """Where artifacts may be fetched from (comma-separated): base URLs of the registry
    (`http(s)://host:port`, whose artifacts are `{base}/v1/artifacts/{sha256}`) or `file:///`
    directories. A record naming any other URI is refused. Empty means the local registry,
    `http://{host}:{registry_port}`."""
    triton_urls: tuple[str, ...] = ()
    """Triton servers this worker may forward batches to (comma-separated gRPC endpoints,
    `host:port` or `grpc://host:port`). A `triton` version naming any other server is refused;
    empty: no `triton` version loads here."""
    triton_timeout: float = 30.0
    """Most seconds one call to a Triton server may take (a batch, or a check while loading);
    a version's `default_timeout_ms`, when smaller, bounds its batches instead."""
    registry_port: int = 8200
    """The local registry's port (`INFERMESH_REGISTRY_PORT`, which the launcher sets)."""
    memory_budget_bytes: int = 0
    """Bytes the versions loaded here may hold together, each measured after its load (RSS
    growth; CUDA allocations for a version on CUDA, so set it to a share of the GPU's memory
    on a CUDA worker). Versions beyond it are loaded on their first batch, evicting the least
    valuable idle ones (docs/PLACEMENT.md). 0: half the machine's memory (MemTotal)."""
    thrash_window: float = 60.0
    """Seconds after an eviction within which a request for the evicted version counts as a
    thrash (`infermesh_worker_model_thrashes_total`)."""

    def __post_init__(self) -> None:
        if self.memory_budget_bytes < 0:
            raise InvalidInput(f"setting memory_budget_bytes: must be 0 (half the machine's "
                               f"memory) or positive bytes, not {self.memory_budget_bytes}")
        if not 0 <= self.inline_below_ms <= 1000:  # NaN too
            raise InvalidInput(f"setting inline_below_ms: must be milliseconds within 0..1000, "
                               f"not {self.inline_below_ms}")
        if not self.thrash_window >= 0:  # NaN too
            raise InvalidInput(f"setting thrash_window: must be seconds >= 0, "
                               f"not {self.thrash_window}")

    @property
    def stores(self) -> tuple[str, ...]:
        """The artifact stores this worker fetches from (`artifact_stores`, or its default)."""
        local_registry = f"http://{self.host}:{self.registry_port}"
        return self.artifact_stores or (local_registry,)
