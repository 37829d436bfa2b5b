"""Prediction log and feedback rows written straight to Postgres, as routers and gateways do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg


async def predict(
    pool: asyncpg.Pool, request_id: str, *, version: str = "1", bucket: int | None = 100,
    latency_ms: float = 10.0, label: str | None = "cat", tenant: str = "acme",
    shadow: bool = False, age: timedelta = timedelta(minutes=1), model: str = "iris",
) -> None:
    """One prediction log row, `age` ago (its day's partition created first)."""
    ts = datetime.now(UTC) - age
    await pool.execute("SELECT infermesh_ensure_prediction_partition($1::date)", ts.date())
    await pool.execute(
        "INSERT INTO predictions (ts, request_id, tenant, model, version, bucket, shadow,"
        " latency_ms, label) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        ts, request_id, tenant, model, version, bucket, shadow, latency_ms, label,
    )


async def feedback(
    pool: asyncpg.Pool, request_id: str, *, label: str | None = None,
    score: float | None = None, kind: str | None = None, tenant: str = "acme",
) -> None:
    """One feedback row (kind "label" or "score" unless named)."""
    kind = kind or ("label" if label is not None else "score")
    await pool.execute(
        "INSERT INTO feedback (tenant, request_id, kind, label, score) VALUES ($1, $2, $3, $4, $5)",
        tenant, request_id, kind, label, score,
    )
