"""The launcher's worker processes: by default one set per model, serving every version of it
within each worker's memory budget, so a canary costs no process; a version registered with
`worker: dedicated` gets a set of its own, and `INFERMESH_WORKERS_PER=version` gives every
version one (the layout before shared workers). Either way they are replaced, never just
stopped while they serve.

How many: per version, the autoscaler's `scale/{model}/{version}` record (`{"replicas": n,
...}`) when there is one, else the version record's `replicas.min` (1 when absent); at most its
`replicas.max` and `LOCAL_CEILING`. A model's shared workers number the largest of its shared
versions' counts (every one of them loads in every shared worker, lazily beyond the budget),
or, when larger, the sum of the counts the autoscaler gave its versions (`scale/` records):
each of those sizes its version's own demand, and the shared set carries all of it. Versions
the autoscaler does not size count only through the largest (a floor of `replicas.min` each
would otherwise add an idle process per version). This is the local actuator: the fleet spawns
what is missing (a new worker publishes its versions only once warm, so it takes traffic only
then) and stops the newest extra workers with SIGTERM: each marks itself draining (batchers
send it nothing new while another worker has its versions), finishes what it holds and exits.
The last worker of a set scaled to 0 gets SIGINT instead (no replacement is coming to hand off
to): it drains and exits, and the batchers hold its versions' requests until a worker is back.

A shared worker is started with `INFERMESH_WORKER_MODELS=<model>`, which leaves out the
versions whose records say `dedicated` (`services.worker.settings`): those run in workers
started with `<model>/<version>`. The record, not an exclusion list in the shared workers'
environment, decides, because the field is fixed at registration: a dedicated version
registered later never lands in the running shared workers, and nothing restarts them.

A worker that gets SIGTERM marks its endpoint record `draining: true` and serves on until
another ready worker has its versions; on seeing the mark the fleet starts that replacement at
once and lets the old process go (it exits 0 and is not restarted). `replace` does the same in
the other order: start the new process, wait until it is ready, then SIGTERM the old one.
`rolling_restart` (the launcher's SIGHUP) replaces every worker, one at a time.

A `models/` record is control-plane data: one that fails the mesh's trust checks (its key's
names, its sha256, its bounds; `services.mesh.domain.trust`) starts no process; it is logged,
once per content, naming the key and the field. So is a `scale/` record or a `replicas` field
that does not parse; the count then stays what it was.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from deploy.worker_counts import replica_bounds, scale_replicas
from services.mesh.domain.config import ConfigView
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.trust import RECORD_ERRORS, trusted_version
from services.mesh.domain.types import ModelVersion

log = logging.getLogger("infermesh.up")

Key = tuple[str, str]
"""(model, version)."""

Group = tuple[str, str | None]
"""Whose workers a set is: (model, version) for a dedicated version, (model, None) for the
model's shared workers."""

LOCAL_CEILING = 16
"""Most worker processes the launcher runs for one set: a `scale/` value is control-plane
data, and a wrong one must not fork hundreds of processes on one machine."""


class WorkerProcess(Protocol):
    """What the fleet needs of a supervised process (`deploy.supervisor.Supervised`)."""

    name: str

    @property
    def pid(self) -> int | None: ...

    def retire(self) -> None: ...

    async def stop(self, timeout: float = 10.0, *, now: bool = False) -> None: ...


P = TypeVar("P", bound=WorkerProcess)


class WorkerFleet(Generic[P]):
    """The supervised worker processes per set (a model's shared workers, or a dedicated
    version's) in `config`, oldest first.

    `spawn(model, version)` starts a worker of `version` alone, or with `version` None one
    serving the model's shared versions; `per_version` treats every version as dedicated.
    """

    def __init__(
        self, spawn: Callable[[str, str | None], P], config: ConfigView, *,
        handoff_bound: float, per_version: bool = False,
    ) -> None:
        self._spawn = spawn
        self._config = config
        self._handoff_bound = handoff_bound
        self._per_version = per_version
        self._workers: dict[Group, list[P]] = {}
        self._replacing: set[int] = set()
        """`id()` of the processes `replace` is replacing: their draining starts no other."""
        self._counts: dict[Key, int] = {}
        """The replica count last applied per version (kept while its records do not parse)."""
        self._stopping: set[asyncio.Task[None]] = set()
        self._rolling: asyncio.Task[None] | None = None
        self._refused: dict[tuple[str, str], Any] = {}
        """What was refused, by (key, what was done about it): logged once per content."""

    def ensure(self) -> None:
        """Every set of workers at its replica count (the largest of its versions', or the sum
        of its autoscaled versions' when larger); a replacement for every draining worker."""
        largest: dict[Group, int] = {}
        scaled: dict[Group, int] = {}
        for name, record in self._config.items("models/").items():
            spec = self._trusted(name, record)
            if spec is not None:
                group = self._group_of(spec)
                count = self._replicas((spec.model, spec.version), record)
                largest[group] = max(largest.get(group, 0), count)
                if self._config.get(f"scale/{spec.model}/{spec.version}") is not None:
                    scaled[group] = scaled.get(group, 0) + count
        for group, count in largest.items():
            self._scale(group, min(max(count, scaled.get(group, 0)), LOCAL_CEILING))
        draining = {r.get("pid") for r in self._config.items("endpoints/worker/").values()
                    if isinstance(r, dict) and r.get("draining")}
        for group, children in self._workers.items():
            for index, child in enumerate(children):
                if child.pid in draining and id(child) not in self._replacing:
                    log.info("%s (pid %s) is draining: starting its replacement", child.name,
                             child.pid)
                    child.retire()
                    children[index] = self._spawn(*group)

    def _group_of(self, spec: ModelVersion) -> Group:
        dedicated = self._per_version or spec.worker == "dedicated"
        return (spec.model, spec.version if dedicated else None)

    def _scale(self, group: Group, count: int) -> None:
        """Spawn or stop processes of `group` until `count` remain; the newest go first."""
        children = self._workers.setdefault(group, [])
        if len(children) != count:
            log.info("%s: %d worker(s) -> %d", _label(group), len(children), count)
        while len(children) < count:
            children.append(self._spawn(*group))
        while len(children) > count:
            self._stop(children.pop(), now=count == 0)

    def _stop(self, child: P, *, now: bool) -> None:
        """Let `child` go in the background: SIGTERM (it drains while the others serve), or
        with `now` SIGINT (the version goes to zero: there is no one to hand off to)."""
        log.info("stopping %s (pid %s)%s", child.name, child.pid, " now" if now else "")
        task = asyncio.create_task(child.stop(timeout=self._handoff_bound, now=now),
                                   name=f"stop-{child.name}")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _replicas(self, key: Key, record: dict[str, Any]) -> int:
        """How many processes version `key` asks for (see the module docstring). A `replicas`
        field or a `scale/` record that does not parse is logged and ignored: the count stays
        what it was."""
        name, scale_key = "models/{}/{}".format(*key), "scale/{}/{}".format(*key)
        last = self._counts.get(key)
        try:
            low, high = replica_bounds(record.get("replicas"))
        except InvalidInput as exc:
            self._refuse(name, record, exc, "ignoring the replica bounds of")
            return 1 if last is None else last
        self._refused.pop((name, "ignoring the replica bounds of"), None)
        scale = self._config.get(scale_key)
        try:
            wanted = low if scale is None else scale_replicas(scale)
        except InvalidInput as exc:
            self._refuse(scale_key, scale, exc, "ignoring")
            wanted = low if last is None else last
        else:
            self._refused.pop((scale_key, "ignoring"), None)
        ceiling = LOCAL_CEILING if high is None else min(high, LOCAL_CEILING)
        count = self._counts[key] = min(wanted, ceiling)
        return count

    def _trusted(self, name: str, record: Any) -> ModelVersion | None:
        """The `models/` record `record` at key `name`, or None (logged once per content)
        when it fails the trust checks."""
        try:
            spec = trusted_version(name, record)
        except RECORD_ERRORS as exc:
            self._refuse(name, record, exc, "not starting a worker for")
            return None
        self._refused.pop((name, "not starting a worker for"), None)
        return spec

    def _refuse(self, name: str, value: Any, exc: Exception, action: str) -> None:
        """Log (once per content of `name`) that `value` was refused, naming the field."""
        if (name, action) not in self._refused or self._refused[name, action] != value:
            log.warning("%s %s: %s", action, name[:200], _reason(exc))
        self._refused[name, action] = value

    def _group_serving(self, model: str, version: str) -> Group:
        """The set that serves (model, version): its own when it has one, else the model's."""
        return (model, version) if (model, version) in self._workers else (model, None)

    def worker(self, model: str, version: str) -> P | None:
        """The oldest process serving (model, version), if any."""
        children = self._workers.get(self._group_serving(model, version))
        return children[0] if children else None

    def workers(self, model: str, version: str) -> list[P]:
        """The processes serving (model, version), oldest first (those being stopped
        excluded): the model's shared workers, or the version's own when it is dedicated."""
        return list(self._workers.get(self._group_serving(model, version), ()))

    async def replace(self, model: str, version: str, *, timeout: float = 300.0) -> None:
        """Start a new worker for the set serving (model, version), wait until it is ready
        (registered, serving the version and whatever the old one serves), then SIGTERM the
        oldest one, which drains and exits.

        Raises TimeoutError (and stops the new process, keeping the old) when the new one is
        not ready within `timeout` seconds.
        """
        group = self._group_serving(model, version)
        await self._replace(group, self.worker(model, version), timeout,
                            also=f"{model}/{version}")

    async def _replace(
        self, group: Group, old: P | None, timeout: float, *, also: str | None = None
    ) -> None:
        if old is not None:
            self._replacing.add(id(old))
        try:
            versions = self._published(old) | ({also} if also else set())
            new = self._spawn(*group)
            try:
                await self._until_ready(new, versions, timeout)
            except BaseException:
                await new.stop(now=True)
                raise
            children = self._workers.setdefault(group, [])
            if old in children:
                children[children.index(old)] = new
            else:  # scaled down meanwhile: the next `ensure` trims it again if need be
                children.append(new)
        finally:
            self._replacing.discard(id(old))
        if old is not None:
            # The old worker sees its replacement at once: its handoff ends, its drain runs.
            await old.stop(timeout=self._handoff_bound)

    def _published(self, child: P | None) -> set[str]:
        """The `model/version`s `child`'s endpoint record lists (empty when it has none)."""
        records = self._config.items("endpoints/worker/").values()
        return {str(v) for r in records if child is not None and isinstance(r, dict)
                and r.get("pid") == child.pid for v in r.get("models", ())}

    async def _until_ready(self, child: P, versions: set[str], timeout: float) -> None:
        changed = asyncio.Event()
        self._config.subscribe(changed.set)
        async with asyncio.timeout(timeout):
            while not _serves(self._config.items("endpoints/worker/"), child.pid, versions):
                await changed.wait()
                changed.clear()

    def rolling_restart(self) -> None:
        """Replace every worker, one at a time; one rolling restart at a time."""
        if self._rolling is not None and not self._rolling.done():
            log.info("a rolling restart is already under way")
            return
        self._rolling = asyncio.create_task(self._roll(), name="rolling-restart")

    async def _roll(self) -> None:
        processes = [(group, child) for group, children in sorted(self._workers.items(),
                                                                  key=lambda g: _label(g[0]))
                     for child in list(children)]
        log.info("rolling restart of %d workers", len(processes))
        for group, child in processes:
            if child not in self._workers.get(group, ()):
                continue  # stopped or replaced meanwhile
            try:
                await self._replace(group, child, 300.0)
            except Exception as exc:  # keep the old worker; go on with the others
                log.error("could not replace %s: %r", child.name, exc)
        log.info("rolling restart done")

    async def aclose(self) -> None:
        """Stop a rolling restart under way and stop waiting for the processes being stopped
        (the launcher then stops every process)."""
        tasks = [*self._stopping, *([self._rolling] if self._rolling is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _serves(records: dict[str, Any], pid: int | None, versions: set[str]) -> bool:
    """Whether the worker process `pid` is registered, serving each of `versions` (at least
    one), not draining."""
    return pid is not None and any(
        isinstance(r, dict) and r.get("pid") == pid and not r.get("draining")
        and (served := set(r.get("models", ()))) and versions <= served
        for r in records.values()
    )


def _label(group: Group) -> str:
    model, version = group
    return f"{model} (shared)" if version is None else f"{model}/{version}"


def _reason(exc: Exception) -> str:
    if isinstance(exc, InvalidInput):
        return exc.message
    if isinstance(exc, KeyError):
        return f"missing field {exc}"
    return str(exc)
