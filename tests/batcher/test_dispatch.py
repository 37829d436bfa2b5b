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


def loading(key: str) -> _Worker:
    """A worker that serves the version but would load it before running the batch."""
    worker = _Worker(key)
    worker.loaded = False
    return worker


def test_a_worker_with_the_version_loaded_wins_over_an_idle_one_that_would_load_it() -> None:
    book = WorkerBook(clock=lambda: 0.0)
    cold, warm = loading("cold"), _Worker("warm")
    book.launched("warm", 8)

    def resident(worker: _Worker) -> bool:
        return worker.resident("m", "1")

    assert book.pick([cold, warm], depth=2, resident=resident) == warm
    assert book.pick([cold, warm], depth=2) == cold, "without residency: fewest rows"


def test_among_loaded_workers_the_fewest_outstanding_rows_win() -> None:
    book = WorkerBook(clock=lambda: 0.0)
    cold, busy, idle = loading("cold"), _Worker("busy"), _Worker("idle")
    book.launched("busy", 8)
    book.launched("idle", 1)
    assert book.pick([cold, busy, idle], depth=2,
                     resident=lambda w: w.resident("m", "1")) == idle


def test_a_worker_that_would_load_gets_the_batch_once_the_loaded_ones_are_full() -> None:
    book = WorkerBook(clock=lambda: 0.0)
    cold, warm = loading("cold"), _Worker("warm")
    book.launched("warm", 8)
    book.launched("warm", 8)
    assert book.pick([warm, cold], depth=2, resident=lambda w: w.resident("m", "1")) == cold


def test_a_worker_is_bulk_only_while_every_batch_it_runs_is_bulk() -> None:
    book = WorkerBook(clock=lambda: 0.0)
    assert not book.bulk_only("a")  # idle is not "busy with bulk"
    book.launched("a", 32, bulk=True)
    assert book.bulk_only("a")
    book.launched("a", 1)
    assert not book.bulk_only("a")
    book.finished("a", 32, bulk=True)
    assert not book.bulk_only("a")
    book.launched("a", 32, bulk=True)
    book.finished("a", 1)
    assert book.bulk_only("a")
    book.finished("a", 32, bulk=True)
    assert not book.bulk_only("a") and book.inflight("a") == 0
