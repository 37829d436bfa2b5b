"""CPU time of a process tree, read from ``/proc``, each process named by the part it plays.

A system under test is the tree of processes under the one the benchmark started (the plain
server; ``infermesh up`` with its services, etcd and nginx), plus the Postgres the launcher
started: ``pg_ctl`` detaches the postmaster, so it is found through ``postmaster.pid`` in the
launcher's state dir. Processes are keyed by (pid, start time), so a reused pid is not mistaken
for the process that had it before.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

TICK_S = 1 / os.sysconf("SC_CLK_TCK")
FUSED_FRONT = "fused front (gateway+router)"
"""A front process of `infermesh up --fused --processes N` (deploy/fused.py)."""
FUSED_CORE = "fused core (batcher+worker)"
"""The core of `infermesh up --fused --processes N` when it takes no public connections."""
MODULE_LABELS = {
    "services.gateway": "gateway", "services.router": "router", "services.batcher": "batcher",
    "services.worker": "worker", "deploy.fused": "fused (gateway+router+batcher+worker)",
    "bench.plain_server": "plain server", "services.registry": "registry",
    "control.api": "control API",
}  # fmt: skip
"""What each ``python -m`` module is, as the report names it."""


class ProcessKey(NamedTuple):
    pid: int
    start_ticks: int


class Stat(NamedTuple):
    ppid: int
    start_ticks: int
    cpu_s: float
    """User + system time so far, all threads."""


def read_stat(pid: int) -> Stat | None:
    """The process's parent, start time and CPU seconds, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text.rsplit(")", 1)[1].split()
    return Stat(int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) * TICK_S)


def all_stats() -> dict[int, Stat]:
    """Every live process's stat."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := read_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    return stats


def children_of(pid: int) -> set[int]:
    """The live direct children of ``pid``."""
    return {child for child, stat in all_stats().items() if stat.ppid == pid}


def with_postmasters(roots: Iterable[int]) -> set[int]:
    """``roots`` and the postmaster of each launcher among them (from ``--state-dir``)."""
    found = set(roots)
    for root in roots:
        args = _cmdline(root)
        if "--state-dir" in args[:-1]:
            # A relative state dir is relative to the launcher's working directory.
            state_dir = Path(f"/proc/{root}/cwd") / args[args.index("--state-dir") + 1]
            pid_file = state_dir / "postgres" / "postmaster.pid"
            try:
                found.add(int(pid_file.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
    return found


def tree_cpu(roots: Iterable[int]) -> dict[ProcessKey, float]:
    """CPU seconds of every live process in the trees under ``roots`` (roots included)."""
    stats = all_stats()
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat.ppid, []).append(pid)
    pending, seen = [pid for pid in roots if pid in stats], set()
    while pending:
        pid = pending.pop()
        if pid not in seen:
            seen.add(pid)
            pending += children.get(pid, [])
    return {ProcessKey(pid, stats[pid].start_ticks): stats[pid].cpu_s for pid in seen}


def label_of(pid: int) -> str:
    """What the process is: a service, the launcher, etcd, postgres, nginx, or its name."""
    args = _cmdline(pid)
    if "-m" in args[:-1]:
        module = args[args.index("-m") + 1]
        label = MODULE_LABELS.get(module, module)
        if module == "services.worker" and (models := _environ(pid, "INFERMESH_WORKER_MODELS")):
            label = f"worker {models}"
        if module == "deploy.fused" and _environ(pid, "INFERMESH_FUSED_ROLE") == "front":
            label = FUSED_FRONT
        elif module == "deploy.fused" and not _core_public(pid):
            label = FUSED_CORE
        return label
    if len(args) > 1 and Path(args[1]).name == "infermesh" and "up" in args:
        return "launcher"
    first = args[0].split()[0] if args else "?"
    name = Path(first.rstrip(":")).name
    return {"nginx": "nginx (edge)"}.get(name, name)


def kill_leftovers(keys: Iterable[ProcessKey]) -> None:
    """SIGKILL each process still alive with the same start time (last resort after a stop)."""
    for key in keys:
        stat = read_stat(key.pid)
        if stat is not None and stat.start_ticks == key.start_ticks:
            try:
                os.kill(key.pid, signal.SIGKILL)
            except OSError:
                pass


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _core_public(pid: int) -> bool:
    """Whether fused process `pid` (not a front) listens on the public ports: the rule of
    deploy.fused.FusedProcess.core_serves_public, read from its environment."""
    public = _environ(pid, "INFERMESH_FUSED_CORE_PUBLIC")
    if public is not None:
        return public.strip().lower() in ("1", "true", "yes", "on")
    return int(_environ(pid, "INFERMESH_FUSED_PROCESSES") or "1") <= 2


def _environ(pid: int, name: str) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = name.encode() + b"="
    return next((v[len(prefix):].decode(errors="replace") for v in raw.split(b"\0")
                 if v.startswith(prefix)), None)  # fmt: skip
