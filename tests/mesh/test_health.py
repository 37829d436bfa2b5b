"""Dependency health metrics: etcd through a real config cache, Postgres through a real probe."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.mesh.infra.db import create_pool
from services.mesh.infra.etcd import ConfigCache, connect_client
from services.mesh.infra.health import HealthCollector, PostgresProbe


def _values(registry: CollectorRegistry) -> dict[str, float]:
    text = generate_latest(registry).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


async def test_etcd_and_postgres_health_are_reported(
    etcd_url: str, etcd_prefix: str, database_url: str
) -> None:
    client = connect_client(etcd_url)
    config = ConfigCache(client, etcd_prefix)
    pool = await create_pool(database_url)
    probe = PostgresProbe(pool)
    registry = CollectorRegistry()
    registry.register(HealthCollector(config, [], [probe]))
    try:
        assert _values(registry)["infermesh_etcd_up"] == 0  # not started: not following
        await config.start()
        assert await probe.probe()
        values = _values(registry)
        assert values["infermesh_etcd_up"] == 1 and values["infermesh_etcd_resyncs_total"] == 1
        assert values["infermesh_postgres_up"] == 1
    finally:
        await config.aclose()
        await client.close()
        await pool.close()
    assert not await probe.probe()  # the pool is gone: Postgres is not up for this service
    assert _values(registry)["infermesh_postgres_up"] == 0
