"""Supervised services stop themselves when their launcher is gone (it may have been SIGKILLed)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from services.mesh.infra.runtime import watch_parent
from tests.waiting import wait_for_sync


async def test_a_parent_that_is_not_ours_any_more_stops_the_service() -> None:
    gone = asyncio.Event()
    async with asyncio.timeout(5):
        await watch_parent(os.getppid() + 1_000_000, gone.set, interval=0.01)
    assert gone.is_set()


_CHILD = """
import asyncio, os, sys
from services.mesh.infra.runtime import watch_parent
async def main():
    done = asyncio.Event()
    print("watching", flush=True)  # the first check of its parent runs before any await
    await watch_parent(int(sys.argv[1]), done.set, interval=0.05)
    print("stopped", flush=True)
asyncio.run(main())
"""

_LAUNCHER = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(__import__("os").getpid())])
print(child.pid, flush=True)
child.wait(timeout=60)  # alive until the test SIGKILLs it (the bound spares a stray one)
"""


@pytest.mark.timeout(30)
def test_a_service_outlives_its_sigkilled_launcher_by_moments_only() -> None:
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _CHILD],
                                stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    # The launcher prints the child's pid, the child "watching" once it watches: either may
    # come first (the pytest timeout bounds these reads).
    lines = {launcher.stdout.readline().strip(), launcher.stdout.readline().strip()}
    assert "watching" in lines, lines
    [child] = [int(line) for line in lines if line.isdigit()]
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    try:
        wait_for_sync(lambda: _gone(child), timeout=10,
                      what="the child to stop after its launcher was SIGKILLed")
    except AssertionError:
        os.kill(child, signal.SIGKILL)
        raise


def _gone(pid: int) -> bool:
    """Exited: reaped, or a zombie waiting for a reaper that may never come in a container."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return "State:\tZ" in status.read()
    except FileNotFoundError:
        return True
