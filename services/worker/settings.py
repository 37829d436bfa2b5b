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
    """torch intra-op threads per batch; 0 lets each model's warm-up choose: torch's default,
    or one thread for a CPU model whose largest batch takes under a millisecond."""
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

    @property
    def stores(self) -> tuple[str, ...]:
        """The artifact stores this worker fetches from (`artifact_stores`, or its default)."""
        local_registry = f"http://{self.host}:{self.registry_port}"
        return self.artifact_stores or (local_registry,)
