"""WorkerBook: which worker gets the next batch."""

from __future__ import annotations

from services.batcher.dispatch import WorkerBook
from tests.batcher.fakes import FakeWorker as _Worker


def test_idle_workers_take_turns() -> None:
    # Ties (no outstanding rows anywhere) go to the worker used least recently: at light load
    # every worker gets batches, instead of the first in the list getting them all.
    book = WorkerBook(clock=lambda: 0.0)
    workers = [_Worker("a"), _Worker("b"), _Worker("c")]
    picked = []
    for _ in range(6):
        worker = book.pick(workers, depth=2)
        assert worker is not None
        picked.append(worker.key)
        book.launched(worker.key, 1)
        book.finished(worker.key, 1)
    assert picked == ["a", "b", "c", "a", "b", "c"]


def test_the_fewest_outstanding_rows_wins_over_turns() -> None:
    book = WorkerBook(clock=lambda: 0.0)
    a, b = _Worker("a"), _Worker("b")
    book.launched("a", 1)
    book.finished("a", 1)
    book.launched("b", 8)  # b is busy with 8 rows; a was used last but is idle
    assert book.pick([a, b], depth=2) == a
