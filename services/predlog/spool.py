"""The prediction log's spool: rows that could not reach Postgres, on local disk until they can.

Each router instance owns `<root>/<instance>/`, held with an exclusive `flock` on its `.lock`
file for as long as the instance runs. Rows are appended as JSON lines to numbered segment files
(`spill-000000000001.jsonl`, ...; a new one past `segment_bytes`), fsynced per append, and read
back oldest first in chunks; a segment is deleted once every row in it is back in Postgres.

At open, the spool adopts what earlier instances left: its own directory's segments (the same
instance id restarted) and those of sibling directories whose lock nobody holds (an instance id
is host-pid by default, so a restarted router has a new one). A chunk is consumed only after
the write succeeded, so a crash at any point replays rows at worst twice, and the table's
primary key makes the second write a no-op. The total size is bounded by `max_bytes`.

Every method does its file IO in a thread; one task at a time may call them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.predlog.rows import Row, decode_row, encode_rows

log = logging.getLogger(__name__)

LOCK = ".lock"
_SEGMENT = re.compile(r"^spill-(\d{12})\.jsonl$")
_LOCK_WAIT = 5.0


@dataclass(slots=True)
class _Segment:
    path: Path
    size: int
    offset: int = 0
    """Bytes already replayed (everything before is in Postgres)."""
    appendable: bool = True
    """False for segments found at open: their last line may be torn by a crash."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Rows read from the oldest segment; `Spool.consume` it once they are in Postgres."""

    rows: list[Row]
    corrupt: int
    """Lines that were not rows (torn by a crash, edited): skipped, counted by the caller."""
    _segment: _Segment = field(repr=False)
    _end: int = field(repr=False)


def instance_dir_name(instance: str) -> str:
    """A directory name for an instance id (anything but letters, digits, `_.-` becomes `_`)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", instance).lstrip(".") or "instance"


class Spool:
    """Spilled rows of one instance, oldest first, at most `max_bytes` on disk."""

    def __init__(self, root: Path, instance: str, *, max_bytes: int,
                 segment_bytes: int = 64 << 20) -> None:
        self.root = root
        self.directory = root / instance_dir_name(instance)
        self.max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._segments: list[_Segment] = []
        self._next = 1
        self._lock: int | None = None

    @property
    def size(self) -> int:
        """Bytes of segment files on disk (replayed parts included until a segment goes)."""
        return sum(s.size for s in self._segments)

    @property
    def pending(self) -> bool:
        """Whether some spilled rows are not replayed yet."""
        return any(s.offset < s.size for s in self._segments)

    async def open(self) -> None:
        """Lock this instance's directory and adopt the segments earlier instances left."""
        await asyncio.to_thread(self._open)
        if self._segments:
            log.info("prediction spool %s: %d bytes left by earlier runs to replay",
                     self.directory, self.size)

    async def close(self) -> None:
        """Release the directory lock (the segments stay for the next run)."""
        if self._lock is not None:
            await asyncio.to_thread(os.close, self._lock)
            self._lock = None

    async def append(self, rows: Sequence[Row]) -> int:
        """Append `rows`, durably; returns how many fit under `max_bytes` (the first ones)."""
        return await asyncio.to_thread(self._append, rows)

    async def read(self, max_rows: int, max_bytes: int = 8 << 20) -> Chunk | None:
        """The next rows to replay (up to `max_rows` or about `max_bytes`); None when none."""
        segment = next((s for s in self._segments if s.offset < s.size), None)
        if segment is None:
            return None
        return await asyncio.to_thread(self._read, segment, max_rows, max_bytes)

    async def consume(self, chunk: Chunk) -> None:
        """Mark `chunk` replayed; a segment replayed to its end is deleted."""
        segment = chunk._segment
        segment.offset = max(segment.offset, chunk._end)
        if segment.offset >= segment.size and segment in self._segments:
            self._segments.remove(segment)
            await asyncio.to_thread(segment.path.unlink, missing_ok=True)

    # -- in a thread -------------------------------------------------------------------------

    def _open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_own(self.directory)
        found = _segment_files(self.directory)
        if found:
            self._next = _number(found[-1]) + 1
        for sibling in sorted(self.root.iterdir()):
            if sibling != self.directory and sibling.is_dir() and not sibling.name.startswith("."):
                found += self._adopt(sibling)
        for path in found:
            self._segments.append(_Segment(path, path.stat().st_size, appendable=False))
        _fsync_dir(self.directory)

    def _adopt(self, sibling: Path) -> list[Path]:
        """Move the segments of a dead instance's directory into ours, then remove it."""
        fd = _try_lock(sibling)
        if fd is None:
            return []  # a live instance holds it (or it is already gone)
        adopted = []
        try:
            for path in _segment_files(sibling):
                target = self._new_path()
                path.rename(target)
                adopted.append(target)
            (sibling / LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                sibling.rmdir()
        finally:
            os.close(fd)
        if adopted:
            log.info("prediction spool: adopted %d segments of %s", len(adopted), sibling.name)
        return adopted

    def _new_path(self) -> Path:
        path = self.directory / f"spill-{self._next:012d}.jsonl"
        self._next += 1
        return path

    def _append(self, rows: Sequence[Row]) -> int:
        lines = encode_rows(rows)
        room = self.max_bytes - self.size
        fitting = 0
        for line in lines:
            if len(line) > room:
                break
            room -= len(line)
            fitting += 1
        if fitting:
            self._write(b"".join(lines[:fitting]))
        return fitting

    def _write(self, data: bytes) -> None:
        segment = self._segments[-1] if self._segments else None
        if segment is None or not segment.appendable or segment.size >= self._segment_bytes:
            segment = _Segment(self._new_path(), 0)
            segment.path.touch()
            _fsync_dir(self.directory)
            self._segments.append(segment)
        try:
            with segment.path.open("ab") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        except OSError:
            segment.appendable = False  # it may end in a torn line now
            raise
        segment.size += len(data)

    def _read(self, segment: _Segment, max_rows: int, max_bytes: int) -> Chunk:
        rows: list[Row] = []
        corrupt = read = 0
        with segment.path.open("rb") as file:
            file.seek(segment.offset)
            while len(rows) + corrupt < max_rows and read < max_bytes:
                line = file.readline()
                if not line:
                    segment.size = segment.offset + read  # shorter than we thought
                    break
                read += len(line)
                try:
                    if not line.endswith(b"\n"):
                        raise ValueError("torn line")
                    rows.append(decode_row(line))
                except ValueError:
                    corrupt += 1
        return Chunk(rows, corrupt, segment, segment.offset + read)


def _segment_files(directory: Path) -> list[Path]:
    """The segment files in `directory`, oldest first (their numbers are zero-padded)."""
    return sorted(p for p in directory.iterdir() if _SEGMENT.match(p.name))


def _number(segment: Path) -> int:
    match = _SEGMENT.match(segment.name)
    return int(match.group(1)) if match else 0


def _lock_own(directory: Path) -> int:
    """Lock (creating) our directory; a live holder with the same instance id is an error."""
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        directory.mkdir(parents=True, exist_ok=True)
        fd = _try_lock(directory)
        if fd is not None:
            return fd
        if time.monotonic() > deadline:
            raise RuntimeError(f"prediction spool {directory} is locked by another process "
                               "(two routers with the same instance id?)")
        time.sleep(0.05)


def _try_lock(directory: Path) -> int | None:
    """An exclusive lock on `directory/.lock`, or None when another process holds it or the
    directory was removed (by an instance adopting it) while we waited."""
    path = directory / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
