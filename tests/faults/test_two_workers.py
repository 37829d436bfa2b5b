"""Worker death with a survivor (issue 14, point 5): kill -9 one of two mlp workers under load.

A second mlp worker process joins the launcher's (same environment, same mesh). Under an
open-loop load with 2 s and 0.5 s deadlines mixed, one worker dies with batches in flight, then
the other in turn: first the launcher's (its supervisor restarts it, and the test waits until
the batcher has both again), then the extra one. Every request must succeed or fail clearly
before its deadline and none may hang; because a worker survives each time, the batches on the
dead one are re-dispatched to it (services/batcher/core.py) and no 2 s request may fail.

At 40 requests/s a batch of the tiny mlp spends a few milliseconds on a worker, so a plain
kill -9 mostly finds the worker idle and proves nothing about the batches it held. The victim
is therefore stopped (SIGSTOP) first, and killed once a batch has reached it: the kernel shows
the unread frame on its link socket (/proc/net/tcp). That is a worker dying mid-batch. A
freeze lasts at most `FREEZE` (a frame read just before the stop shows no unread bytes and
waits, with its requests, until the worker runs again): a worker stopped for seconds is a hung
worker, whose requests rightly end in 504 at their deadline, not this fault.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from services.mesh.infra.etcd import connect_client
from services.mesh.infra.runtime import PARENT_PID
from tests.faults.injectors import WORKER, FaultBed, service_pids
from tests.faults.load import DEADLINE, OpenLoop, Outcome
from tests.faults.summary import FaultRow, steady_since, summarise
from tests.faults.test_faults import (
    STEADY_AFTER,
    STEADY_BEFORE,
    assert_contained,
    missing_from_log,
    serving,
)
from tests.integration.conftest import RunningMesh
from tests.waiting import wait_for

# The mesh comes up first (up to 240 s on a busy machine); the test itself takes ~30 s.
pytestmark = [pytest.mark.faults, pytest.mark.timeout(420)]

VERSION = "1"
"""The demo mlp version, served by the model's shared worker (and by the extra one, started
with its environment)."""
SHORT = 0.5
"""The tighter deadline every other request carries (seconds)."""
MARGIN = 1.0
"""A failure must be answered within its deadline plus this (the fault group's margin for a
busy machine's scheduling, `summary.FAST`)."""
FREEZE = 0.25
"""Longest a victim stays stopped at a time, waiting for a batch to reach it (seconds). A
batch it read just before a freeze waits that long: well within a 2 s deadline."""
MAX_SHORT_FAILURES = 8
"""At most this many 0.5 s requests fail per kill, all of them in flight during the fault. The
dead worker held at most `pipeline_depth` = 2 batches; it was stopped at most `FREEZE` s, and
at 40 requests/s behind a 2 ms batch window the survivor keeps the queue short, so each batch
holds a few rows. A member is re-run unless its deadline leaves no time (a 503 naming that), so
only 0.5 s requests can fail at all. 2 s requests have over a second of slack left
when the worker dies: none may fail."""


async def test_killing_one_of_two_workers_fails_no_request_the_survivor_can_serve(
    fault_bed: FaultBed, fault_table: list[FaultRow],
) -> None:
    mesh = fault_bed.mesh
    await serving(mesh)
    (launchers,) = service_pids(mesh, "services.worker", environ=WORKER)
    load = OpenLoop(f"{mesh.gateway}/v2/models/mlp/infer", headers=mesh.auth(),
                    deadlines=(DEADLINE, SHORT))
    with extra_worker(mesh, like=launchers) as extra:
        ports = await ready(mesh, {launchers, extra.pid})
        await load.start()
        try:
            await steady(load, "before the first kill", after=time.monotonic(),
                         seconds=STEADY_BEFORE)
            first_fault, first_kill = await kill_mid_batch(launchers, ports[launchers])
            await steady(load, "after killing the launcher's worker", after=first_kill,
                         seconds=STEADY_AFTER)
            (restarted,) = await wait_for(
                lambda: set(service_pids(mesh, "services.worker", environ=WORKER))
                - {launchers, extra.pid},
                lambda new: len(new) == 1, timeout=60,
                what="the launcher's restarted mlp worker process")
            await ready(mesh, {restarted, extra.pid})
            second_phase = time.monotonic()
            await steady(load, "before the second kill", after=second_phase,
                         seconds=STEADY_BEFORE)
            second_fault, second_kill = await kill_mid_batch(extra.pid, ports[extra.pid])
            await steady(load, "after killing the extra worker", after=second_kill,
                         seconds=STEADY_AFTER)
        finally:
            outcomes = await load.stop()
    lost = await missing_from_log(mesh, [o.request_id for o in outcomes if o.ok])
    phases = [
        ("worker kill -9 mid-batch, 1 of 2 (launcher's)", first_fault, first_kill,
         [o for o in outcomes if o.sent < second_phase]),
        ("worker kill -9 mid-batch, 1 of 2 (extra)", second_fault, second_kill,
         [o for o in outcomes if o.sent >= second_phase]),
    ]
    for fault, fault_start, killed, phase in phases:
        row = summarise(fault, phase, fault_end=killed,
                        lost_log_rows=sum(o.request_id in lost for o in phase))
        fault_table.append(row)
        print(f"\n{row}\n  failures by deadline: {by_deadline(phase)}")
        assert_contained(row, failures_allowed=True)
        assert_only_short_in_flight_failed(phase, fault_start=fault_start, killed=killed)
    print(f"\nbatcher: {redispatches(mesh)} batches re-dispatched after a worker died")


@contextmanager
def extra_worker(mesh: RunningMesh, *, like: int) -> Iterator[subprocess.Popen[bytes]]:
    """A second `python -m services.worker` with the environment of the launcher's worker
    `like` (the mesh's settings, its version, the test marker), this process as its parent
    (it stops if the test dies); its output goes to the mesh's logs. Killed at exit if still
    running."""
    environ = Path(f"/proc/{like}/environ").read_bytes().split(b"\0")
    env = dict(entry.decode().split("=", 1) for entry in environ if b"=" in entry)
    env[PARENT_PID] = str(os.getpid())
    log_path = mesh.state_dir / "logs" / "worker-mlp-extra.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.worker"], env=env, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


async def ready(mesh: RunningMesh, pids: set[int]) -> dict[int, int]:
    """Wait until each worker process in `pids` is registered for mlp (not draining) and the
    batcher holds a link to it (an established connection to its port): what makes it a
    candidate for batches. Returns each one's port."""
    async def observe() -> dict[int, tuple[int, bool]]:
        ports = await _worker_ports(mesh, VERSION)
        return {pid: (port, bool(_link_queues(port))) for pid, port in ports.items()}

    def linked(now: dict[int, tuple[int, bool]]) -> bool:
        return all(pid in now and now[pid][1] for pid in pids)

    found = await wait_for(observe, linked, timeout=120, interval=0.2,
                           what=f"workers {sorted(pids)} registered for mlp/{VERSION} and "
                                "linked (pid: (port, linked))")
    return {pid: found[pid][0] for pid in pids}


async def steady(load: OpenLoop, what: str, *, after: float, seconds: float) -> None:
    """Wait until the sends after `after` end in an unbroken run of successes `seconds` long."""
    await wait_for(lambda: steady_since(load.outcomes, after=after),
                   lambda run: run >= seconds, timeout=60,
                   what=f"{seconds} s of successes {what}")


async def kill_mid_batch(pid: int, port: int) -> tuple[float, float]:
    """Freeze the worker (SIGSTOP) for up to `FREEZE` s at a time, letting it run `FREEZE` s
    between freezes, until a frame waits unread on its link, then SIGKILL it: it dies with a
    batch in flight. When the first freeze began and when it was killed. (Killed whatever
    happens: a stopped process would hang the teardown.)"""
    started = time.monotonic()
    try:
        while not await _frame_arrives(pid, port):
            assert time.monotonic() - started < 30, f"no batch reached worker {pid} in 30 s"
            os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(FREEZE)  # the worker runs between freezes: the fault's pattern
    finally:
        os.kill(pid, signal.SIGKILL)
    return started, time.monotonic()


async def _frame_arrives(pid: int, port: int) -> bool:
    """Stop worker `pid`; whether a frame reaches its link within `FREEZE` s."""
    os.kill(pid, signal.SIGSTOP)
    try:
        await wait_for(lambda: _link_queues(port), lambda queues: any(queues), timeout=FREEZE,
                       interval=0.01, what=f"a batch frame waiting on worker {pid}'s link")
    except AssertionError:
        return False
    return True


def _link_queues(port: int) -> list[int]:
    """Unread bytes on each established TCP connection to local `port` (the kernel's
    /proc/net/tcp tables: state 01 is ESTABLISHED, rx_queue the bytes not yet read)."""
    queues = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, tx_rx = fields[1], fields[3], fields[4]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                queues.append(int(tx_rx.split(":")[1], 16))
    return queues


async def _worker_ports(mesh: RunningMesh, version: str) -> dict[int, int]:
    """The port of each worker registered (not draining) for mlp/`version`, by pid."""
    client = connect_client(mesh.env["INFERMESH_ETCD_URL"])
    async with client:
        found = await client.get_prefix(f"{mesh.prefix}endpoints/worker/".encode())
    records: list[dict[str, Any]] = [orjson.loads(kv.value) for kv in found]
    return {int(r["pid"]): int(urlsplit(str(r["http"])).port or 0) for r in records
            if f"mlp/{version}" in r.get("models", ()) and "pid" in r and not r.get("draining")}


def redispatches(mesh: RunningMesh) -> int:
    """Batches the batcher logged as failed on a dead worker (each is re-run or failed)."""
    log = (mesh.state_dir / "logs" / "batcher.log").read_text()
    return sum(" failed on worker " in line for line in log.splitlines())


def by_deadline(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """Failures (hangs included) by deadline, then by kind."""
    found: dict[str, Counter[str]] = {}
    for outcome in outcomes:
        if not outcome.ok:
            found.setdefault(f"{outcome.deadline:g}s", Counter())[outcome.kind] += 1
    return {deadline: dict(kinds) for deadline, kinds in found.items()}


def assert_only_short_in_flight_failed(
    outcomes: list[Outcome], *, fault_start: float, killed: float,
) -> None:
    """Every failure answered within its deadline plus `MARGIN`; none of a 2 s request; at
    most `MAX_SHORT_FAILURES`, all in flight during the fault (sent before the kill, answered
    after the first freeze) and
    for lack of time (a 504, or a 503 saying no time was left to re-run the batch), never for
    the dead worker alone: that batch must be re-run on the survivor."""
    failures = [o for o in outcomes if not o.ok]
    late = [o for o in failures if o.latency is None or o.latency > o.deadline + MARGIN]
    assert not late, f"failures answered after their deadline + {MARGIN} s: {late[:5]}"
    long = [o for o in failures if o.deadline > SHORT]
    assert not long, f"{len(long)} requests with a {DEADLINE} s deadline failed: {long[:5]}"
    unrelated = [o for o in failures
                 if o.sent > killed or o.sent + (o.latency or 0.0) < fault_start]
    assert not unrelated, f"failures not in flight during the fault: {unrelated[:5]}"
    not_rerun = [o for o in failures if o.status != 504 and "deadline" not in o.error]
    assert not not_rerun, f"failed with the dead worker, not re-run: {not_rerun[:5]}"
    assert len(failures) <= MAX_SHORT_FAILURES, (
        f"{len(failures)} failures (bound {MAX_SHORT_FAILURES}): {by_deadline(outcomes)}")
