"""What a loaded version costs in memory, measured, and the machine's memory for a default
budget.

A version's footprint is the growth of this process's resident set (RSS) across its load and
warm-up, or of torch's CUDA allocator when it runs on CUDA. Freed heap memory stays in the
process unless returned: glibc keeps it for the next allocation, so without `release_freed`
a version loaded after another's eviction would reuse those pages and measure as almost
nothing. Every snapshot therefore trims first. All functions block (they read /proc, trim the
heap): the worker calls them in a thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MEMINFO = Path("/proc/meminfo")
STATM = Path("/proc/self/statm")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Bytes in use at one moment: the process's RSS, and torch's CUDA allocations."""

    rss: int
    cuda: int


def snapshot() -> Snapshot:
    """The memory in use now, after giving freed heap pages back to the system."""
    release_freed()
    return Snapshot(rss_bytes(), cuda_allocated())


def footprint(before: Snapshot, after: Snapshot, device: str) -> int:
    """What a version loaded between `before` and `after` holds on `device` (never negative:
    another version's batch freeing memory meanwhile can make the raw delta so)."""
    if device.startswith("cuda"):
        return max(0, after.cuda - before.cuda)
    return max(0, after.rss - before.rss)


def rss_bytes() -> int:
    """This process's resident set in bytes (`/proc/self/statm`; 0 where there is none)."""
    try:
        resident_pages = int(STATM.read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def cuda_allocated() -> int:
    """Bytes torch's CUDA allocator holds for tensors; 0 unless torch is already imported
    and CUDA initialised (an ONNX-only worker never imports torch for this)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.memory_allocated())


def release_freed() -> None:
    """Return the heap's free pages to the system (glibc `malloc_trim`; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim: Callable[[int], int] | None = getattr(ctypes.CDLL(name), "malloc_trim", None)
    except (OSError, TypeError):  # no C library by that name (musl names none)
        return None
    return trim if name else None


def memory_total(meminfo: Path = MEMINFO) -> int:
    """The machine's memory in bytes (`MemTotal` of /proc/meminfo); 0 when unreadable."""
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        name, _, value = line.partition(":")
        if name == "MemTotal":
            parts = value.split()
            if parts and parts[0].isdigit():
                return int(parts[0]) * 1024  # always reported in kB
    return 0


def file_bytes(path: Path) -> int:
    """The size of the file at `path` (an artifact: the least its load will hold); 0 when
    there is none (a backend that reads no file)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0
