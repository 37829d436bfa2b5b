"""Faults, injected one at a time into a running mesh and its private etcd and Postgres.

Each injector returns once its fault has ended (`time.monotonic()` of that moment): at once
for a signal to a service process (the launcher's supervisor restarts it), after `OUTAGE`
seconds and the restart for etcd and Postgres.
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from deploy.localdeps import LocalEtcd, LocalPostgres, start_postgres
from tests.integration.conftest import RunningMesh, mesh_processes

OUTAGE = 10.0
"""How long etcd stays paused or dead and Postgres stopped (seconds)."""


@dataclass
class PrivateDeps:
    """The running etcd and Postgres of the group (an injector replaces one it restarts)."""

    etcd: LocalEtcd
    postgres: LocalPostgres


@dataclass
class FaultBed:
    """The mesh under test and the private dependencies it runs on."""

    mesh: RunningMesh
    deps: PrivateDeps


Inject = Callable[[FaultBed], Awaitable[float]]


@dataclass(frozen=True)
class Fault:
    """How to inject a fault, and whether requests may fail (fast and clearly) because of it."""

    inject: Inject
    failures_allowed: bool
    """True when a serving process dies without warning (its in-flight requests fail) or
    stops with no replacement. False for a worker's SIGTERM (it hands off to a ready
    replacement first) and for etcd and Postgres, which are off the request path: services
    serve from their last known config and the prediction log spills to disk."""


def service_pid(mesh: RunningMesh, module: str, *, environ: str = "") -> int:
    """The pid of the mesh's one `python -m <module>` process (whose environment holds
    `environ`, when given)."""
    found = service_pids(mesh, module, environ=environ)
    assert len(found) == 1, f"expected one {module} process ({environ}), found {found}"
    return found[0]


def service_pids(mesh: RunningMesh, module: str, *, environ: str = "") -> list[int]:
    """The pids of the mesh's `python -m <module>` processes (whose environment holds
    `environ`, when given)."""
    found = []
    for pid in mesh_processes(mesh.prefix):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if cmdline[1:3] == [b"-m", module.encode()] and environ.encode() in env:
            found.append(pid)
    return found


def signal_service(module: str, signum: signal.Signals, *, environ: str = "") -> Inject:
    """Send `signum` to the mesh's `module` process; the fault ends when it is sent."""

    async def inject(bed: FaultBed) -> float:
        os.kill(service_pid(bed.mesh, module, environ=environ), signum)
        return time.monotonic()

    return inject


async def pause_etcd(bed: FaultBed) -> float:
    """SIGSTOP etcd for `OUTAGE` seconds, then SIGCONT."""
    os.kill(bed.deps.etcd.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(OUTAGE)  # the outage itself, not a wait for something to happen
    finally:
        os.kill(bed.deps.etcd.pid, signal.SIGCONT)
    return time.monotonic()


async def kill_etcd(bed: FaultBed) -> float:
    """SIGKILL etcd, and after `OUTAGE` seconds start it again on its port and data dir."""
    old = bed.deps.etcd
    command = [str(part) for part in old.process.args]  # type: ignore[union-attr]
    old.process.kill()
    await asyncio.to_thread(old.stop)  # reaps it, closes its log
    await asyncio.sleep(OUTAGE)  # the outage itself
    bed.deps.etcd = await asyncio.to_thread(
        _restart_etcd, command, old.data_dir, old.port, old.passwords
    )
    return time.monotonic()


def _restart_etcd(
    command: list[str], data_dir: Path, port: int, passwords: dict[str, str]
) -> LocalEtcd:
    """The same etcd command line again: same client and peer ports, same data."""
    env = dict(os.environ)
    if platform.machine() == "aarch64":
        env["ETCD_UNSUPPORTED_ARCH"] = "arm64"
    log = (data_dir / "etcd.log").open("ab")
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT, env=env, start_new_session=True)
    etcd = LocalEtcd(process, log, data_dir, port, passwords=passwords)
    (data_dir / "etcd.pid").write_text(str(process.pid))
    deadline = time.monotonic() + 30
    while not _etcd_healthy(etcd.endpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            etcd.stop()
            raise AssertionError(f"etcd did not come back on {etcd.endpoint}")
        time.sleep(0.05)
    return etcd


def _etcd_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return b'"true"' in response.read()
    except (urllib.error.URLError, OSError):
        return False


async def stop_postgres(bed: FaultBed) -> float:
    """`pg_ctl stop -m fast`, and after `OUTAGE` seconds start it again on the same port."""
    old = bed.deps.postgres
    await asyncio.to_thread(old.stop)
    await asyncio.sleep(OUTAGE)  # the outage itself
    bed.deps.postgres = await asyncio.to_thread(start_postgres, old.data_dir, port=old.port,
                                           fast=True)
    return time.monotonic()


WORKER = "INFERMESH_WORKER_MODELS=mlp\0"
"""The environment entry of the mlp model's shared worker (every mlp version but a dedicated
one), as /proc/<pid>/environ ends it."""

FAULTS: dict[str, Fault] = {
    "worker kill -9": Fault(signal_service("services.worker", signal.SIGKILL, environ=WORKER),
                            failures_allowed=True),
    "worker SIGTERM": Fault(signal_service("services.worker", signal.SIGTERM, environ=WORKER),
                            failures_allowed=False),
    **{
        f"{name} {how}": Fault(signal_service(f"services.{name}", signum), failures_allowed=True)
        for name in ("batcher", "router", "gateway")
        for how, signum in (("kill -9", signal.SIGKILL), ("SIGTERM", signal.SIGTERM))
    },
    "etcd paused 10 s": Fault(pause_etcd, failures_allowed=False),
    "etcd killed 10 s": Fault(kill_etcd, failures_allowed=False),
    "Postgres stopped 10 s": Fault(stop_postgres, failures_allowed=False),
}
"""Every fault, in the order the group injects them."""
