from __future__ import annotations

from control.guard.metrics import VersionFigures
from control.guard.window import EpochClock, RouterWindows

KEY = ("iris", "2")
INF = float("inf")


def scrape(success: float, failure: float = 0.0) -> dict[tuple[str, str], VersionFigures]:
    count = success + failure
    return {KEY: VersionFigures(success, failure, buckets=((0.01, count), (INF, count)))}


def test_delta_sums_every_router_over_the_window() -> None:
    windows = RouterWindows()
    windows.record("r1", scrape(100), now=0)
    windows.record("r2", scrape(50, 5), now=0)
    windows.record("r1", scrape(130), now=10)
    windows.record("r2", scrape(60, 9), now=10)

    delta = windows.delta(KEY, start=0)

    assert (delta.success, delta.failure) == (40, 4)
    assert delta.buckets == ((0.01, 44.0), (INF, 44.0))
    assert windows.delta(("iris", "1"), start=0) == VersionFigures()


def test_a_router_restart_mid_window_counts_from_the_post_restart_value() -> None:
    windows = RouterWindows()
    windows.record("r1", scrape(100), now=0)
    windows.record("r1", scrape(150), now=1)
    windows.record("r1", scrape(20, 3), now=2)  # restarted
    windows.record("r1", scrape(25, 3), now=3)

    delta = windows.delta(KEY, start=0)

    assert (delta.success, delta.failure) == (50 + 20 + 5, 3)


def test_a_new_router_counts_from_its_first_snapshot_and_a_gone_one_keeps_its_count() -> None:
    windows = RouterWindows()
    windows.record("old", scrape(10), now=0)
    windows.record("old", scrape(30), now=1)  # then it dies: no more scrapes
    windows.record("new", scrape(500), now=1)  # traffic from before the guard watched it
    windows.record("new", scrape(507), now=2)

    assert windows.delta(KEY, start=0).success == 20 + 7

    windows.prune(before=0.5)  # the dead router's counted interval ages out
    assert windows.delta(KEY, start=0).success == 7


def test_a_series_born_between_scrapes_counts_whole() -> None:
    windows = RouterWindows()
    windows.record("r1", {}, now=0)
    windows.record("r1", scrape(4, 1), now=1)

    assert windows.delta(KEY, start=0).samples == 5


def test_only_snapshots_at_or_after_start_count() -> None:
    windows = RouterWindows()
    windows.record("r1", scrape(0, 0), now=0)
    windows.record("r1", scrape(0, 80), now=5)  # failures under the old weights
    windows.record("r1", scrape(60, 80), now=10)

    assert windows.delta(KEY, start=5).failure == 0
    assert windows.delta(KEY, start=5).success == 60
    assert windows.delta(KEY, start=0).failure == 80


def test_the_epoch_clock_restarts_on_a_new_epoch_only() -> None:
    clock = EpochClock()
    assert clock.since("iris", 3, now=10) == 10
    assert clock.since("iris", 3, now=25) == 10
    assert clock.since("iris", 4, now=30) == 30
    assert clock.since("wine", 4, now=31) == 31

    clock.forget_except({"wine"})
    assert clock.since("iris", 4, now=40) == 40
    assert clock.since("wine", 4, now=41) == 31
