"""Rows Postgres refused, set aside beside the spool so that a person can see why.

A refused row (a value the table or an index will not take) is never retried and never takes
its neighbours with it: the writer finds it by splitting the refused batch, and it lands here,
one JSON line per row, `{"error": "<what Postgres said>", "row": [<the row as a spool line>]}`,
in `<spool directory>/rejected.jsonl`. The file is bounded: past half of `max_bytes` it becomes
`rejected.1.jsonl` (replacing the previous one), so the newest refusals are kept.

Every method does its file IO in a thread; one task at a time may call them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import orjson

from services.predlog.rows import Row, encode_rows

REJECTED = "rejected.jsonl"
REJECTED_OLD = "rejected.1.jsonl"


class RejectedRows:
    """The refused rows of one instance, in `directory`, at most about `max_bytes` on disk."""

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        self.path = directory / REJECTED
        self.max_bytes = max_bytes

    async def append(self, refused: Sequence[tuple[Row, str]]) -> int:
        """Write each (row, error) durably; returns how many fit (the first ones, within half
        of `max_bytes`); raises OSError when the file cannot be written."""
        return await asyncio.to_thread(self._append, refused) if refused else 0

    def _append(self, refused: Sequence[tuple[Row, str]]) -> int:
        room = self.max_bytes // 2
        kept: list[bytes] = []
        for line, (_, error) in zip(encode_rows([row for row, _ in refused]), refused,
                                    strict=True):
            entry = b'{"error":' + orjson.dumps(error) + b',"row":' + line.rstrip(b"\n") + b"}\n"
            if len(entry) > room:
                break
            room -= len(entry)
            kept.append(entry)
        data = b"".join(kept)
        if not data:
            return 0
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.max_bytes // 2:
            self.path.replace(self.path.with_name(REJECTED_OLD))
        with self.path.open("ab") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        return len(kept)
