"""Read-only model queries, shared by the registry and the control API (same data, same JSON).

Both services answer `GET /v1/models` and `GET /v1/models/{model}` from these functions, so a
client sees one shape whichever it asks. The records themselves live in the pure
`services.registry.ports` (the core returns them); they are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg

from services.mesh.domain.errors import NotFound
from services.mesh.domain.types import ModelVersion, Rollout
from services.registry import queries
from services.registry.ports import ModelDetail as ModelDetail
from services.registry.ports import ModelSummary as ModelSummary


async def list_models(pool: asyncpg.Pool) -> list[ModelSummary]:
    """Every model, by name."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(queries.LIST_MODELS)
    return [_summary_of(row) for row in rows]


async def model_summary(pool: asyncpg.Pool, name: str) -> ModelSummary:
    """One model's list row; NotFound if unknown."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(queries.MODEL_SUMMARY, name)
    if row is None:
        raise NotFound(f"model '{name}' not found")
    return _summary_of(row)


async def model_detail(pool: asyncpg.Pool, name: str) -> ModelDetail:
    """A model with its versions and rollout; NotFound if unknown."""
    summary = await model_summary(pool, name)
    async with pool.acquire() as conn:
        versions = await conn.fetch(queries.MODEL_VERSIONS, name)
        rollout = await conn.fetchval(queries.ROLLOUT, name)
    return ModelDetail(
        summary,
        [ModelVersion.from_json(row["record"]) for row in versions],
        None if rollout is None else Rollout.from_json(rollout),
    )


def _summary_of(row: Mapping[str, Any]) -> ModelSummary:
    rollout = row["rollout"]
    serving = None if rollout is None else Rollout.from_json(rollout).primary
    return ModelSummary(
        name=row["name"], description=row["description"],
        created_at=row["created_at"].isoformat(), versions=row["versions"],
        latest=row["latest"], serving=serving,
    )
