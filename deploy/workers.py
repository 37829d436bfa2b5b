"""The launcher's worker processes: one per registered (model, version), replaced, never just
stopped while they serve.

A worker that gets SIGTERM marks its endpoint record `draining: true` and serves on until
another ready worker has its versions; on seeing the mark the fleet starts that replacement at
once and lets the old process go (it exits 0 and is not restarted). `replace` does the same in
the other order: start the new process, wait until it is ready, then SIGTERM the old one.
`rolling_restart` (the launcher's SIGHUP) replaces every worker, one at a time.

A `models/` record is control-plane data: one that fails the mesh's trust checks (its key's
names, its sha256, its bounds; `services.mesh.domain.trust`) starts no process; it is logged,
once per content, naming the key and the field.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from services.mesh.domain.config import ConfigView
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.trust import check_version_record, parse_version_key
from services.mesh.domain.types import ModelVersion

log = logging.getLogger("infermesh.up")

Key = tuple[str, str]
"""(model, version)."""


class WorkerProcess(Protocol):
    """What the fleet needs of a supervised process (`deploy.supervisor.Supervised`)."""

    name: str

    @property
    def pid(self) -> int | None: ...

    def retire(self) -> None: ...

    async def stop(self, timeout: float = 10.0, *, now: bool = False) -> None: ...


P = TypeVar("P", bound=WorkerProcess)


class WorkerFleet(Generic[P]):
    """The supervised worker processes, kept one per (model, version) in `config`."""

    def __init__(
        self, spawn: Callable[[str, str], P], config: ConfigView, *,
        handoff_bound: float,
    ) -> None:
        self._spawn = spawn
        self._config = config
        self._handoff_bound = handoff_bound
        self._workers: dict[Key, P] = {}
        self._replacing: set[Key] = set()
        self._rolling: asyncio.Task[None] | None = None
        self._refused: dict[str, Any] = {}

    def ensure(self) -> None:
        """A worker for every registered version; a replacement for every draining one.

        Separate processes per version let a canary's worker fail (or be stopped) alone.
        """
        for name, record in self._config.items("models/").items():
            key = self._trusted(name, record)
            if key is not None and key not in self._workers:
                self._workers[key] = self._spawn(*key)
        draining = {r.get("pid") for r in self._config.items("endpoints/worker/").values()
                    if isinstance(r, dict) and r.get("draining")}
        for key, child in list(self._workers.items()):
            if child.pid in draining and key not in self._replacing:
                log.info("%s (pid %s) is draining: starting its replacement", child.name,
                         child.pid)
                child.retire()
                self._workers[key] = self._spawn(*key)

    def _trusted(self, name: str, record: Any) -> Key | None:
        """(model, version) of the `models/` record `record` at key `name`, or None (logged
        once per content) when it fails the trust checks."""
        try:
            key = parse_version_key(name)
            if not isinstance(record, dict):
                raise InvalidInput("record: not a JSON object")
            check_version_record(ModelVersion.from_json(record), key=name)
        except (InvalidInput, AttributeError, KeyError, TypeError, ValueError) as exc:
            if self._refused.get(name) != record:
                log.warning("not starting a worker for %s: %s", name[:200], _reason(exc))
            self._refused[name] = record
            return None
        self._refused.pop(name, None)
        return key

    def worker(self, model: str, version: str) -> P | None:
        return self._workers.get((model, version))

    async def replace(self, model: str, version: str, *, timeout: float = 300.0) -> None:
        """Start a new worker for (model, version), wait until it is ready (registered and
        serving the version), then SIGTERM the old one, which drains and exits.

        Raises TimeoutError (and stops the new process, keeping the old) when the new one is
        not ready within `timeout` seconds.
        """
        key = (model, version)
        old = self._workers.get(key)
        self._replacing.add(key)
        try:
            new = self._spawn(model, version)
            try:
                await self._until_ready(new, f"{model}/{version}", timeout)
            except BaseException:
                await new.stop(now=True)
                raise
            self._workers[key] = new
        finally:
            self._replacing.discard(key)
        if old is not None:
            # The old worker sees its replacement at once: its handoff ends, its drain runs.
            await old.stop(timeout=self._handoff_bound)

    async def _until_ready(self, child: P, version: str, timeout: float) -> None:
        changed = asyncio.Event()
        self._config.subscribe(changed.set)
        async with asyncio.timeout(timeout):
            while not _serves(self._config.items("endpoints/worker/"), child.pid, version):
                await changed.wait()
                changed.clear()

    def rolling_restart(self) -> None:
        """Replace every worker, one at a time; one rolling restart at a time."""
        if self._rolling is not None and not self._rolling.done():
            log.info("a rolling restart is already under way")
            return
        self._rolling = asyncio.create_task(self._roll(), name="rolling-restart")

    async def _roll(self) -> None:
        log.info("rolling restart of %d workers", len(self._workers))
        for model, version in sorted(self._workers):
            try:
                await self.replace(model, version)
            except Exception as exc:  # keep the old worker; go on with the others
                log.error("could not replace the worker of %s/%s: %r", model, version, exc)
        log.info("rolling restart done")

    async def aclose(self) -> None:
        """Stop a rolling restart under way (the launcher then stops every process)."""
        if self._rolling is not None:
            self._rolling.cancel()
            await asyncio.gather(self._rolling, return_exceptions=True)


def _serves(records: dict[str, Any], pid: int | None, version: str) -> bool:
    """Whether the worker process `pid` is registered, serving `version`, not draining."""
    return pid is not None and any(
        isinstance(r, dict) and r.get("pid") == pid and version in r.get("models", ())
        and not r.get("draining") for r in records.values()
    )


def _reason(exc: Exception) -> str:
    if isinstance(exc, InvalidInput):
        return exc.message
    if isinstance(exc, KeyError):
        return f"missing field {exc}"
    return str(exc)


def handoff_bound(env: Mapping[str, str]) -> float:
    """How long a worker may take to leave after SIGTERM: its handoff, its drain, a margin
    (the workers' settings, `INFERMESH_[WORKER_]HANDOFF_TIMEOUT` and `..._DRAIN_TIMEOUT`)."""
    handoff = float(env.get("INFERMESH_WORKER_HANDOFF_TIMEOUT")
                    or env.get("INFERMESH_HANDOFF_TIMEOUT") or 30.0)
    drain = float(env.get("INFERMESH_WORKER_DRAIN_TIMEOUT")
                  or env.get("INFERMESH_DRAIN_TIMEOUT") or 10.0)
    return handoff + drain + 5.0
