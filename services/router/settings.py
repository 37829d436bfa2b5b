"""Router settings (`INFERMESH_ROUTER_*`, falling back to `INFERMESH_*`)."""

from __future__ import annotations

from dataclasses import dataclass

from services.mesh.infra.settings import ServiceSettings


@dataclass(frozen=True, kw_only=True)
class RouterSettings(ServiceSettings):
    shadow_max_inflight: int = 64
    """Most shadow mirrors in flight at once per router; beyond it mirrors are dropped (and
    counted in `infermesh_shadow_requests_total{outcome="dropped"}`)."""
    database_url: str = ""
    """Postgres DSN of the prediction log (`INFERMESH_DATABASE_URL`); empty: no prediction log."""
    prediction_log_spool: str = ""
    """Directory under which each router instance spills prediction rows while Postgres is
    unavailable (a subdirectory per instance id); empty: `<tmp>/infermesh-spool`."""
    prediction_log_buffer: int = 10_000
    """Most prediction records waiting in memory; beyond it records are dropped and counted
    (`infermesh_prediction_log_dropped_total{reason="buffer_full"}`)."""
    feature_timeout: float = 0.05
    """Seconds a feature lookup waits for Postgres (`database_url`) before serving defaults
    (`store_down`, response `degraded`); the store is then left alone for a second."""
    feature_cache_ttl: float = 1.0
    """Seconds a fetched feature (or its absence) is reused; never past its `max_age_s`."""
    prediction_log_spill_max_bytes: int = 1 << 30
    """Most bytes of spilled rows on disk per instance; beyond it rows are dropped and counted
    (`reason="spill_full"`)."""
