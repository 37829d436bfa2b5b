"""The launcher's worker processes: one per registered (model, version), replaced, never just
stopped while they serve.

A worker that gets SIGTERM marks its endpoint record `draining: true` and serves on until
another ready worker has its versions; on seeing the mark the fleet starts that replacement at
once and lets the old process go (it exits 0 and is not restarted). `replace` does the same in
the other order: start the new process, wait until it is ready, then SIGTERM the old one.
`rolling_restart` (the launcher's SIGHUP) replaces every worker, one at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from services.mesh.domain.config import ConfigView

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

    def ensure(self) -> None:
        """A worker for every registered version; a replacement for every draining one.

        Separate processes per version let a canary's worker fail (or be stopped) alone.
        """
        for name in self._config.items("models/"):
            _, model, version = name.split("/", 2)
            if (model, version) not in self._workers:
                self._workers[model, version] = self._spawn(model, version)
        draining = {r.get("pid") for r in self._config.items("endpoints/worker/").values()
                    if isinstance(r, dict) and r.get("draining")}
        for key, child in list(self._workers.items()):
            if child.pid in draining and key not in self._replacing:
                log.info("%s (pid %s) is draining: starting its replacement", child.name,
                         child.pid)
                child.retire()
                self._workers[key] = self._spawn(*key)

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


def handoff_bound(env: Mapping[str, str]) -> float:
    """How long a worker may take to leave after SIGTERM: its handoff, its drain, a margin
    (the workers' settings, `INFERMESH_[WORKER_]HANDOFF_TIMEOUT` and `..._DRAIN_TIMEOUT`)."""
    handoff = float(env.get("INFERMESH_WORKER_HANDOFF_TIMEOUT")
                    or env.get("INFERMESH_HANDOFF_TIMEOUT") or 30.0)
    drain = float(env.get("INFERMESH_WORKER_DRAIN_TIMEOUT")
                  or env.get("INFERMESH_DRAIN_TIMEOUT") or 10.0)
    return handoff + drain + 5.0
