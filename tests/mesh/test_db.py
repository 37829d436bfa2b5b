from __future__ import annotations

import asyncio

from services.mesh.infra.db import available_migrations, create_pool, migrate


async def test_migrate_applies_once(database_url: str) -> None:
    pool = await create_pool(database_url)
    try:
        applied = await migrate(pool)
        shipped = await asyncio.to_thread(available_migrations)
        assert applied == [version for version, _ in shipped]
        assert applied[0] == "0001_registry"
        assert await migrate(pool) == []
        tables = await pool.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        assert {"models", "model_versions", "rollouts", "rollout_history"} <= {
            t["tablename"] for t in tables
        }
        assert await pool.fetchval("SELECT count(*) FROM schema_migrations") == len(applied)
    finally:
        await pool.close()


async def test_concurrent_migrate_applies_each_migration_once(database_url: str) -> None:
    pools = [await create_pool(database_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(pool) for pool in pools))
        applied = sorted(v for result in results for v in result)
        shipped = await asyncio.to_thread(available_migrations)
        assert applied == [version for version, _ in shipped]
    finally:
        for pool in pools:
            await pool.close()


async def test_jsonb_round_trips_python_objects(database_url: str) -> None:
    pool = await create_pool(database_url)
    try:
        value = {"routes": [{"version": "1", "weight": 100.0}], "sticky_key": None}
        assert await pool.fetchval("SELECT $1::jsonb", value) == value
    finally:
        await pool.close()
