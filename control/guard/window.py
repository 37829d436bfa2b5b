"""Sliding windows over router scrapes, and when the guard first saw each rollout epoch.

Every router instance keeps its own deque of (time, figures) snapshots. The figures of a
window are the sum, over routers and over consecutive snapshot pairs inside the window, of
`VersionFigures.since`: a router that restarted mid-window counts from its post-restart
value, one that appeared counts from its first snapshot, one that disappeared keeps what it
counted until its snapshots age out. Times come from the caller (an injected clock).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from control.guard.metrics import VersionFigures, VersionKey, total

Snapshot = tuple[float, Mapping[VersionKey, VersionFigures]]


class RouterWindows:
    """Snapshots of every router's cumulative figures, queried as windowed deltas."""

    def __init__(self) -> None:
        self._routers: dict[str, deque[Snapshot]] = {}

    def record(self, router: str, figures: Mapping[VersionKey, VersionFigures], *,
               now: float) -> None:
        """Add one scrape of `router` taken at `now`."""
        self._routers.setdefault(router, deque()).append((now, figures))

    def prune(self, *, before: float) -> None:
        """Forget snapshots taken before `before` (and routers left with none)."""
        for router, snapshots in list(self._routers.items()):
            while snapshots and snapshots[0][0] < before:
                snapshots.popleft()
            if not snapshots:
                del self._routers[router]

    def delta(self, key: VersionKey, *, start: float) -> VersionFigures:
        """What `key` did across all routers, from snapshots taken at or after `start`."""
        return total(self._router_delta(snapshots, key, start)
                     for snapshots in self._routers.values())

    @staticmethod
    def _router_delta(snapshots: deque[Snapshot], key: VersionKey,
                      start: float) -> VersionFigures:
        inside = [figures for taken, figures in snapshots if taken >= start]
        steps = []
        for earlier, later in zip(inside, inside[1:], strict=False):
            if key in later:
                # A series missing from the earlier scrape was born after it: all of it is new.
                steps.append(later[key].since(earlier.get(key, VersionFigures())))
        return total(steps)


class EpochClock:
    """When the guard first saw each model's current rollout epoch.

    A new epoch (an operator's change, or the guard's own step) restarts the comparison: only
    figures from snapshots taken at or after this time count, and a step's hold time runs
    from it. A guard that just started (or just became leader) sees every epoch as new.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, float]] = {}

    def since(self, model: str, epoch: int, *, now: float) -> float:
        """The time `epoch` of `model` was first seen (`now` if this is the first time)."""
        seen = self._seen.get(model)
        if seen is None or seen[0] != epoch:
            seen = self._seen[model] = (epoch, now)
        return seen[1]

    def forget_except(self, models: set[str]) -> None:
        """Drop models no longer guarded."""
        for model in self._seen.keys() - models:
            del self._seen[model]
