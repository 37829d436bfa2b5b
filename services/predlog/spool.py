"""The prediction log's spool: every row on local disk until it is in Postgres.

Each router instance owns `<root>/<instance>/`, held with an exclusive `flock` on its `.lock`
file for as long as the instance runs. Rows are appended as JSON lines to numbered segment files
(`spill-000000000001.jsonl`, ...; a new one past `segment_bytes`) and read back oldest first in
chunks; a segment is deleted once every row in it is in Postgres (`consume`, `consume_to`).

Two kinds of append: `append` (rows spilled while Postgres is unavailable) fsyncs; `append_from`
(the journal: each group of served predictions, before their answers leave the router) does not.
A write(2) that returned is in the OS page cache, which survives the death of the process
(kill -9 included), and that is what the journal guards against; a machine crash may lose the
journal's last writes unless `sync()` ran since, and the prediction log syncs whenever Postgres
is unavailable (rows then stay on disk for long), so that case is no worse than a spill.

At open, the spool adopts what earlier instances left: its own directory's segments (the same
instance id restarted, or killed mid-journal) and those of sibling directories whose lock nobody
holds (an instance id is host-pid by default, so a restarted router has a new one). A chunk is
consumed only after the write succeeded, so a crash at any point replays rows at worst twice,
and the table's primary key makes the second write a no-op. The total size is bounded by
`max_bytes`.

All file IO and all changes to the segment list run on one thread of the spool's own, in the
order they were asked for, under one lock, so the journal's appends and the writer's reads never
interleave. A small journal append may run on the caller's thread instead (`append_now`) when
that lock is free: the thread hop costs more than the write itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

from services.predlog.rows import Row, decode_row, encode_rows

log = logging.getLogger(__name__)

LOCK = ".lock"
_SEGMENT = re.compile(r"^spill-(\d{12})\.jsonl$")
_LOCK_WAIT = 5.0
T = TypeVar("T")


@dataclass(slots=True)
class _Segment:
    path: Path
    size: int
    offset: int = 0
    """Bytes already replayed (everything before is in Postgres)."""
    appendable: bool = True
    """False for segments found at open: their last line may be torn by a crash."""
    synced: bool = True
    """False while some appended bytes may be in the page cache only."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Rows read from the oldest segment; `Spool.consume` it once they are in Postgres."""

    rows: list[Row]
    corrupt: int
    """Lines that were not rows (torn by a crash, edited): skipped, counted by the caller."""
    _segment: _Segment = field(repr=False)
    _end: int = field(repr=False)


@dataclass(frozen=True, slots=True)
class Mark:
    """The end of an append: `Spool.consume_to` it once everything before is in Postgres."""

    _segment: _Segment = field(repr=False)
    _end: int = field(repr=False)


@dataclass(frozen=True, slots=True)
class Appended:
    """What `Spool.append_from` did with the rows it made."""

    rows: list[Row]
    fitting: int
    """How many rows (the first ones) are on disk now; the others did not fit or failed."""
    mark: Mark | None
    """Where the appended rows end; None when none were appended."""
    clean: bool
    """Whether nothing was pending before these rows (they start where replay stands)."""
    error: OSError | None = None
    """Why no row was appended, when the write failed."""


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
        self._executor: ThreadPoolExecutor | None = None
        self._mutex = threading.Lock()
        self._file: BinaryIO | None = None
        """The last segment appended to, kept open."""
        self._file_segment: _Segment | None = None

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
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="prediction-spool")
        await self._call(self._open)
        if self._segments:
            log.info("prediction spool %s: %d bytes left by earlier runs to replay",
                     self.directory, self.size)

    async def close(self) -> None:
        """Release the directory lock (the segments stay for the next run)."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(executor, self._close)
        await asyncio.to_thread(executor.shutdown)

    async def append(self, rows: Sequence[Row]) -> int:
        """Append `rows`, durably; returns how many fit under `max_bytes` (the first ones)."""
        return await self._call(self._append, rows, True)

    async def append_from(self, make_rows: Callable[[], list[Row]]) -> Appended:
        """Make rows (on the spool's thread) and append them without fsync; never raises OSError
        (a failed write appends nothing and says why in `Appended.error`)."""
        return await self._call(self._append_from, make_rows)

    def append_now(self, make_rows: Callable[[], list[Row]]) -> Appended | None:
        """`append_from` on the calling thread (the event loop: keep `make_rows` small), when
        the spool's thread is not busy; None when it is (then use `append_from`).

        A write(2) into the page cache takes microseconds; it could block only while the
        kernel throttles writers of dirty pages, a disk far behind.
        """
        return self._journal_now(make_rows)

    async def sync(self) -> None:
        """fsync what `append_from` wrote since the last sync (and the directory)."""
        if any(not s.synced for s in self._segments):
            await self._call(self._sync)

    async def read(self, max_rows: int, max_bytes: int = 8 << 20) -> Chunk | None:
        """The next rows to replay (up to `max_rows` or about `max_bytes`); None when none."""
        return await self._call(self._read, max_rows, max_bytes)

    async def consume(self, chunk: Chunk) -> None:
        """Mark `chunk` replayed; a segment replayed to its end is deleted."""
        await self._call(self._consume, chunk._segment, chunk._end)

    async def consume_to(self, mark: Mark) -> None:
        """Mark everything up to `mark` replayed (all of it is in Postgres); segments replayed
        to their end are deleted."""
        await self._call(self._consume_to, mark)

    async def _call(self, function: Callable[..., T], *args: object) -> T:
        if self._executor is None:
            raise RuntimeError("prediction spool is not open")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(self._locked, function, *args)
        )

    # -- in a thread -------------------------------------------------------------------------

    def _locked(self, function: Callable[..., T], *args: object) -> T:
        with self._mutex:
            return function(*args)

    def _journal_now(self, make_rows: Callable[[], list[Row]]) -> Appended | None:
        if self._executor is None or not self._mutex.acquire(blocking=False):
            return None
        try:
            return self._append_from(make_rows)
        finally:
            self._mutex.release()

    def _close(self) -> None:
        self._close_file()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _close_file(self) -> None:
        file, self._file, self._file_segment = self._file, None, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()

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

    def _append(self, rows: Sequence[Row], sync: bool) -> int:
        lines = encode_rows(rows)
        room = self.max_bytes - self.size
        fitting = 0
        for line in lines:
            if len(line) > room:
                break
            room -= len(line)
            fitting += 1
        if fitting:
            self._write(b"".join(lines[:fitting]), sync=sync)
        return fitting

    def _append_from(self, make_rows: Callable[[], list[Row]]) -> Appended:
        rows = make_rows()
        clean = not self.pending
        try:
            fitting = self._append(rows, False) if rows else 0
        except OSError as exc:
            return Appended(rows, 0, None, clean, exc)
        segment = self._segments[-1] if fitting else None
        mark = None if segment is None else Mark(segment, segment.size)
        return Appended(rows, fitting, mark, clean)

    def _write(self, data: bytes, *, sync: bool) -> None:
        segment = self._segments[-1] if self._segments else None
        if segment is None or not segment.appendable or segment.size >= self._segment_bytes:
            segment = _Segment(self._new_path(), 0, synced=False)
            self._segments.append(segment)
        try:
            if self._file is None or self._file_segment is not segment:
                self._close_file()
                self._file, self._file_segment = segment.path.open("ab"), segment
            self._file.write(data)
            self._file.flush()
            if sync:
                os.fsync(self._file.fileno())
        except OSError:
            segment.appendable = False  # it may end in a torn line now
            self._close_file()
            raise
        segment.size += len(data)
        if sync:
            self._sync()
        else:
            segment.synced = False

    def _sync(self) -> None:
        unsynced = [s for s in self._segments if not s.synced]
        for segment in unsynced:
            with contextlib.suppress(FileNotFoundError), segment.path.open("rb") as file:
                os.fsync(file.fileno())
            segment.synced = True
        if unsynced:
            _fsync_dir(self.directory)

    def _consume(self, segment: _Segment, end: int) -> None:
        segment.offset = max(segment.offset, end)
        if segment.offset >= segment.size and segment in self._segments:
            self._segments.remove(segment)
            if segment is self._file_segment:
                self._close_file()
            segment.path.unlink(missing_ok=True)

    def _consume_to(self, mark: Mark) -> None:
        if mark._segment not in self._segments:
            return  # consumed already
        for segment in self._segments[:self._segments.index(mark._segment)]:
            self._consume(segment, segment.size)
        self._consume(mark._segment, mark._end)

    def _read(self, max_rows: int, max_bytes: int) -> Chunk | None:
        segment = next((s for s in self._segments if s.offset < s.size), None)
        if segment is None:
            return None
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
