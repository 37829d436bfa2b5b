"""Registry settings, read from `INFERMESH_REGISTRY_*` (then `INFERMESH_*`) in `__main__`."""

from __future__ import annotations

import dataclasses

from services.mesh.infra.settings import ServiceSettings


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegistrySettings(ServiceSettings):
    """Where the registry listens, keeps its records and its artifacts."""

    port: int = 8200
    """HTTP port of the registry API (`INFERMESH_REGISTRY_PORT`)."""
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    """Postgres DSN (`INFERMESH_DATABASE_URL`); migrations apply on start."""
    artifact_dir: str = ".infermesh/artifacts"
    """Directory of the content-addressed artifact store."""
    public_url: str = ""
    """Base URL workers download artifacts from; empty means `http://{host}:{port}`."""
    max_artifact_bytes: int = 512 * 1024 * 1024
    """Largest artifact upload in bytes; a larger one gets 413 and is not kept."""
    reconcile_interval: float = 30.0
    """Seconds between reconcile passes that republish Postgres records missing from etcd."""
