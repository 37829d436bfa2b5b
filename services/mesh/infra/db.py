"""Postgres: connection pools and the schema migrations that apply on start.

Migrations are `services/mesh/infra/migrations/NNNN_name.sql`, shipped as package data. Each applies
in its own transaction and is recorded in `schema_migrations`; a session advisory lock makes
several instances starting at once apply each migration exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import re
from importlib import resources
from typing import Any

import asyncpg
import orjson

log = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any constant works; it only has to be the same for every starter of this schema.
_MIGRATION_LOCK = 0x1F_E5_4E_5A


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 5) -> asyncpg.Pool:
    """A connection pool whose jsonb columns read and write Python objects (via orjson)."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection
    )
    return pool


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, schema="pg_catalog", encoder=_encode_json, decoder=orjson.loads
        )


def _encode_json(value: Any) -> str:
    return orjson.dumps(value).decode()


def available_migrations() -> list[tuple[str, str]]:
    """Every migration shipped with the package as (version, sql), in order."""
    folder = resources.files("services.mesh.infra").joinpath("migrations")
    found = [
        (entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if _MIGRATION_NAME.match(entry.name)
    ]
    return sorted(found)


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply the migrations this database lacks, in order; returns the versions applied."""
    migrations = await asyncio.to_thread(available_migrations)
    applied: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            rows = await conn.fetch("SELECT version FROM schema_migrations")
            done = {row["version"] for row in rows}
            for version, sql in migrations:
                if version not in done:
                    await _apply(conn, version, sql)
                    applied.append(version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


async def _apply(conn: asyncpg.Connection, version: str, sql: str) -> None:
    async with conn.transaction():
        await conn.execute(sql)
        await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
    log.info("applied migration %s", version)
