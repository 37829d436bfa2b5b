"""The control API's core: rollouts written to Postgres (audited), then published to etcd.

Every write (`apply`, `set_rollout`, `rollback`) is one Postgres transaction:

    SELECT ... FOR UPDATE the model's rollouts row     writers to one model queue here
    If-Match epoch given and not current -> StaleEpoch nothing is written
    validate; epoch = current + 1; UPDATE rollouts; INSERT rollout_history (author, reason)

then, after COMMIT, `failpoint("control.after_commit")` and a compare-and-swap publish of
`rollouts/{model}` to etcd (`services.mesh.infra.publishing`), which never replaces a newer epoch.
A crash or an etcd outage between commit and publish leaves etcd behind Postgres; `reconcile()`
(at start, then every few seconds) publishes what etcd lacks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import aetcd
import asyncpg

from control.api.rollouts import queries
from control.api.rollouts.validation import echoed_epoch, parse_reason, parse_rollout
from services.mesh.domain.errors import InvalidInput, NotFound, PreconditionFailed, Unavailable
from services.mesh.domain.types import Rollout, Signature
from services.mesh.infra.failpoints import failpoint
from services.mesh.infra.publishing import is_older, publish_newer
from services.registry import reads
from services.registry.reads import ModelDetail, ModelSummary

log = logging.getLogger(__name__)


class StaleEpoch(PreconditionFailed):
    """A conditional write named an epoch that is no longer the current one."""

    def __init__(self, model: str, *, expected: int, current: int) -> None:
        super().__init__(
            f"the rollout of '{model}' is at epoch {current}, not {expected}; "
            "read it again and retry"
        )
        self.current = current


@dataclass(frozen=True, slots=True)
class RolloutState:
    """A model's current rollout and when it was last written."""

    rollout: Rollout
    updated_at: str

    def to_json(self) -> dict[str, Any]:
        return {**self.rollout.to_json(), "updated_at": self.updated_at}


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One rollout ever written: who, when, why, and the record itself."""

    epoch: int
    author: str
    reason: str
    created_at: str
    record: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "author": self.author, "reason": self.reason,
            "created_at": self.created_at, "record": self.record,
        }


class RolloutStore:
    """Rollouts: Postgres is the truth and the audit trail, etcd the published copy."""

    def __init__(self, pool: asyncpg.Pool, etcd: aetcd.Client, *, etcd_prefix: str) -> None:
        self._pool = pool
        self._etcd = etcd
        self._prefix = etcd_prefix

    # -- reads ----------------------------------------------------------------------------

    async def get(self, model: str) -> RolloutState:
        """The current rollout; NotFound for an unknown model or one without a rollout."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(queries.ROLLOUT_STATE, model)
            if row is None:
                await _missing(conn, model)
        return RolloutState(Rollout.from_json(row["record"]), row["updated_at"].isoformat())

    async def history(self, model: str, *, limit: int = 50) -> list[HistoryEntry]:
        """The last `limit` rollouts written for `model`, newest first."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(queries.HISTORY, model, limit)
            if not rows and await conn.fetchval(queries.MODEL_EXISTS, model) is None:
                raise NotFound(f"model '{model}' not found")
        return [_history_entry(row) for row in rows]

    async def guarded(self) -> list[Rollout]:
        """Current rollouts that carry a guard block, by model."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(queries.GUARDED)
        return [Rollout.from_json(row["record"]) for row in rows]

    async def list_models(self) -> list[ModelSummary]:
        """Every model, by name (the registry's `GET /v1/models` data)."""
        return await reads.list_models(self._pool)

    async def get_model(self, name: str) -> ModelDetail:
        """A model with its versions and rollout; NotFound if unknown."""
        return await reads.model_detail(self._pool, name)

    # -- writes ---------------------------------------------------------------------------

    async def apply(
        self, model: str, body: Mapping[str, Any], *, author: str, if_match: int | None
    ) -> Rollout:
        """Write the rollout `body` describes as the next epoch and publish it.

        `body` has `routes` (required), `sticky_key`, `salt`, `shadow`, `fallback`, `guard` and
        `reason`; InvalidInput names the field at fault. With `if_match`, StaleEpoch unless it
        is the current epoch. Unavailable when saved but not published (reconcile will).
        """
        reason = parse_reason(body.get("reason", ""))
        if_match = echoed_epoch(body, if_match)
        async with self._pool.acquire() as conn, conn.transaction():
            current = await _lock(conn, model, if_match)
            signatures = {
                row["version"]: Signature.from_json(row["signature"])
                for row in await conn.fetch(queries.VERSION_SIGNATURES, model)
            }
            rollout = parse_rollout(model, body, current=current, versions=signatures,
                                    signatures=signatures)
            await _save(conn, rollout, author=author, reason=reason)
        await self._publish_saved(rollout)
        return rollout

    async def set_rollout(
        self, rollout: Rollout, *, author: str, reason: str, if_match: int | None
    ) -> Rollout:
        """`apply` for a record already built (the guard loop's steps); its epoch is ignored."""
        body = {k: v for k, v in rollout.to_json().items() if k not in ("model", "epoch")}
        return await self.apply(
            rollout.model, {**body, "reason": reason}, author=author, if_match=if_match
        )

    async def rollback(
        self, model: str, *, to_epoch: int | None, author: str, reason: str = ""
    ) -> Rollout:
        """Restore the record of `to_epoch` (default: the latest before now) as a new epoch.

        The restored record has no guard: a rollback goes to a known state and stays there until
        someone writes a new guarded rollout. NotFound for an unknown epoch; InvalidInput when
        there is no earlier epoch. `reason` defaults to "rollback to epoch K".
        """
        async with self._pool.acquire() as conn, conn.transaction():
            current = await _lock(conn, model, None)
            target = await _rollback_target(conn, model, current.epoch, to_epoch)
            rollout = dataclasses.replace(target, epoch=current.epoch + 1, guard=None)
            reason = reason or f"rollback to epoch {target.epoch}"
            await _save(conn, rollout, author=author, reason=reason)
        await self._publish_saved(rollout)
        return rollout

    # -- etcd -----------------------------------------------------------------------------

    async def reconcile(self) -> int:
        """Publish every rollout that etcd lacks or holds at an older epoch; returns how many."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(queries.ALL_ROLLOUTS)
        published = {
            kv.key: kv.value
            for kv in await self._etcd.get_prefix(self._key("").encode())
        }
        written = 0
        for row in rows:
            key = self._key(row["model"]).encode()
            value = published.get(key)
            if value is not None and not is_older(value, row["record"], row["epoch"]):
                continue
            if await publish_newer(self._etcd, key, row["record"], epoch=row["epoch"]):
                written += 1
        if written:
            log.info("reconcile published %d rollouts", written)
        return written

    async def reconcile_forever(self, interval: float) -> None:
        """Run `reconcile()` every `interval` seconds until cancelled; failures are logged."""
        await reconcile_forever(self.reconcile, interval)

    async def _publish_saved(self, rollout: Rollout) -> None:
        failpoint("control.after_commit")
        key = self._key(rollout.model).encode()
        try:
            await publish_newer(self._etcd, key, rollout.to_json(), epoch=rollout.epoch)
        except Exception as exc:  # aetcd raises several unrelated types for "etcd is away"
            raise Unavailable(
                f"saved as epoch {rollout.epoch}, but publishing to etcd failed ({exc!r}); "
                "the reconcile loop will publish it"
            ) from exc

    def _key(self, model: str) -> str:
        return f"{self._prefix}rollouts/{model}"


async def reconcile_forever(reconcile: Callable[[], Awaitable[int]], interval: float) -> None:
    """Await `reconcile()` every `interval` seconds until cancelled; failures are logged."""
    while True:
        await asyncio.sleep(interval)
        try:
            await reconcile()
        except Exception as exc:
            log.warning("reconcile failed (%r); retrying in %.0fs", exc, interval)


async def _lock(conn: asyncpg.Connection, model: str, if_match: int | None) -> Rollout:
    """The current rollout, its row locked until the transaction ends."""
    row = await conn.fetchrow(queries.LOCK_ROLLOUT, model)
    if row is None:
        await _missing(conn, model)
    if if_match is not None and if_match != row["epoch"]:
        raise StaleEpoch(model, expected=if_match, current=row["epoch"])
    return dataclasses.replace(Rollout.from_json(row["record"]), epoch=row["epoch"])


async def _save(conn: asyncpg.Connection, rollout: Rollout, *, author: str, reason: str) -> None:
    record = rollout.to_json()
    await conn.execute(queries.UPDATE_ROLLOUT, rollout.model, rollout.epoch, record)
    await conn.execute(
        queries.INSERT_HISTORY, rollout.model, rollout.epoch, record, author, reason
    )


async def _rollback_target(
    conn: asyncpg.Connection, model: str, current: int, to_epoch: int | None
) -> Rollout:
    if to_epoch is None:
        row = await conn.fetchrow(queries.HISTORY_BEFORE, model, current)
        if row is None:
            raise InvalidInput(
                f"epoch: model '{model}' has no epoch before {current} to roll back to"
            )
    else:
        row = await conn.fetchrow(queries.HISTORY_AT, model, to_epoch)
        if row is None:
            raise NotFound(f"epoch {to_epoch} of model '{model}' not found in its history")
    return Rollout.from_json(row["record"])


async def _missing(conn: asyncpg.Connection, model: str) -> NoReturn:
    if await conn.fetchval(queries.MODEL_EXISTS, model) is None:
        raise NotFound(f"model '{model}' not found")
    raise NotFound(f"model '{model}' has no rollout yet; register a version first")


def _history_entry(row: Mapping[str, Any]) -> HistoryEntry:
    return HistoryEntry(
        epoch=row["epoch"], author=row["author"], reason=row["reason"],
        created_at=row["created_at"].isoformat(), record=row["record"],
    )
