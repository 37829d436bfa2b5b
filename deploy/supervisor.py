"""Supervised child processes: started, restarted with backoff when they crash, stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

log = logging.getLogger("infermesh.up")


class Supervised:
    """One service process, restarted when it exits unexpectedly."""

    def __init__(self, name: str, args: list[str], *, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self._args = args
        self._env = env
        self._log_path = log_dir / f"{name}.log"
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"supervise-{self.name}")

    async def _spawn(self) -> asyncio.subprocess.Process:
        handle = await asyncio.to_thread(self._log_path.open, "ab")
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable, *self._args, env=self._env, stdout=handle,
                stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            handle.close()

    async def _run(self) -> None:
        backoff = 0.5
        while not self._stopping:
            started = time.monotonic()
            self._process = await self._spawn()
            code = await self._process.wait()
            if self._stopping:
                return
            if time.monotonic() - started > 30:
                backoff = 0.5
            log.warning("%s exited with %s; restarting in %.1fs (log: %s)",
                        self.name, code, backoff, self._log_path)
            self.restarts += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (drain and exit), then SIGKILL after `timeout`."""
        self._stopping = True
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
