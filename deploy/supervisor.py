"""Supervised child processes: started, restarted when they crash, stopped.

The first crash is restarted at once (a killed worker's requests are waiting in the batcher);
a crash loop backs off, 0.5 s doubling to 10 s, reset once a process has lived 30 s. A process
that was asked to go (`stop`) or said it is going (`retire`: a worker handing off to its
replacement) is not restarted.

Children are spawned with `subprocess.Popen` (vfork/posix_spawn, so no fork handlers run) and
waited for through a pidfd on the event loop (no thread parked per child: the default executor
has only a handful of threads and a busy mesh has more children than that). The launcher
holds a gRPC channel to etcd, and forking a process with live gRPC threads (as libuv's spawn
does) crashed gRPC's event engine in the parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.mesh.infra.runtime import PARENT_PID

log = logging.getLogger("infermesh.up")


async def wait_exit(process: subprocess.Popen[bytes]) -> int:
    """Wait for a child to exit without blocking the loop or a thread; its exit code."""
    if process.poll() is not None:
        return process.returncode
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    fd = os.pidfd_open(process.pid)

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return process.wait()


class Supervised:
    """One service process, restarted when it exits unexpectedly."""

    def __init__(self, name: str, args: list[str], *, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self._args = args
        self._env = env
        self._log_path = log_dir / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"supervise-{self.name}")

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self._log_path.open("ab") as handle:
            return subprocess.Popen(
                [sys.executable, *self._args], env={**self._env, PARENT_PID: str(os.getpid())},
                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def finished(self) -> bool:
        """True once the supervision is over: stopped or retired, and the process gone."""
        return self._task is not None and self._task.done()

    def retire(self) -> None:
        """The process is leaving on its own (a drained worker): let it exit, never restart."""
        self._stopping = True

    async def _run(self) -> None:
        backoff = 0.0
        while not self._stopping:
            started = time.monotonic()
            self._process = await asyncio.to_thread(self._spawn)
            code = await wait_exit(self._process)
            if self._stopping:
                log.info("%s pid %d exited with %s", self.name, self._process.pid, code)
                return
            if time.monotonic() - started > 30:
                backoff = 0.0
            log.warning("%s exited with %s; restarting in %.1fs (log: %s)",
                        self.name, code, backoff, self._log_path)
            self.restarts += 1
            await asyncio.sleep(backoff)
            backoff = min(max(backoff * 2, 0.5), 10.0)

    async def stop(self, timeout: float = 10.0, *, now: bool = False) -> None:
        """SIGTERM (hand off, drain and exit), or with `now` SIGINT (drain and exit, no
        handoff); then SIGKILL after `timeout`."""
        self._stopping = True
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT if now else signal.SIGTERM)
            try:
                await asyncio.wait_for(wait_exit(process), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await wait_exit(process)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
