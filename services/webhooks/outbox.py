"""Writing a delivery: one row in the caller's transaction (the transactional outbox).

The job that finishes and the webhook that announces it commit together, so a crash can neither
send a webhook for work that rolled back nor lose one for work that committed. The body is
built once here, in the spec's recommended shape `{"type", "timestamp", "data"}`, and stored as
bytes, so every retry sends exactly the same body under the same webhook-id.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from services.webhooks.signing import secret_key

INSERT = """
INSERT INTO webhook_deliveries (id, tenant, url, secret, event_type, body)
VALUES ($1, $2, $3, $4, $5, $6)
"""


def new_message_id() -> str:
    """A webhook-id, `msg_` and 128 random bits."""
    return f"msg_{secrets.token_urlsafe(16)}"


async def enqueue(
    conn: asyncpg.Connection, *, tenant: str, url: str, secret: str, event_type: str,
    payload: dict[str, Any],
) -> str:
    """Queue one delivery of `payload` as event `event_type` to `url`, signed with `secret`,
    in `conn`'s current transaction; returns its webhook-id (`msg_...`). The URL must have
    passed `targets.check_target` already; the dispatcher checks it again before each POST."""
    secret_key(secret)  # a malformed secret fails the caller's transaction, not every retry
    msg_id = new_message_id()
    body = orjson.dumps({
        "type": event_type, "timestamp": datetime.now(UTC).isoformat(), "data": payload,
    })
    await conn.execute(INSERT, msg_id, tenant, url, secret, event_type, body)
    return msg_id
