"""Desired worker replicas for one model version, from its batchers' load: a pure policy.

The runner feeds one `ScalePolicy` per model version with `Observation`s (summed over the
version's batchers) and asks it to `decide` at times of its choosing; the policy reads no
clock and does no I/O. Each decision moves from the previous desired count:

- **Demand** is rows/s: the mean arrival rate over a window plus the backlog (queued rows)
  to drain within one start-up + `DRAIN_SECONDS`. The backlog counts only once the fleet has
  settled (nothing starting, every desired replica ready): rows that pile up while workers
  start are what those workers are for, so a slow start never orders more
  (knative/serving#13284).
- **Capacity per replica** is `rows_per_replica` when set, else learned: an EWMA of served
  rows/s per ready worker over intervals with full batches (occupancy >= `HIGH_OCCUPANCY`)
  and rows left waiting (a queue, or a wait at `target_wait`): a fleet with idle time shows
  its load, not its capacity. Each sample is clipped to [1/2, 2] x the estimate so one odd
  interval cannot swing it. The mean per-replica rate over the stable window is a lower
  bound: it raises the estimate, and alone (nothing learned yet) it may justify a
  scale-down, never a scale-up.
- **Scale up** to ceil(demand / (capacity x `TARGET_UTILISATION`)) over the stable window, at
  most `max_step` more per decision. Latency speaks too, even without a capacity: a queue wait
  (p95, or the batcher's predicted wait if higher) above `target_wait` on busy workers adds
  one replica once the fleet has settled, unless a known capacity says the ready replicas
  already cover the demand: then the wait is a backlog draining, and it lags the fleet.
- **Panic** while the panic window's demand reaches `panic_threshold` x what the *ready*
  replicas serve, or its wait `panic_threshold` x `target_wait`: the panic window's demand
  sizes the fleet now (starting replicas count), and nothing is removed. Panic ends a whole
  stable window after the condition last held, and leaving it removes nothing by itself
  (knative/serving#3153): scale-down has its own rule.
- **Scale down** one replica per decision, once the stable window's demand has fitted in one
  replica fewer at `DOWNSCALE_UTILISATION` or less, waits under target, for `downscale_delay`.
  Demand is rows/s, never rows per replica, so a scale-up that shrinks each replica's share
  cannot trigger the next scale-down (ray-project/ray#18925).
- **Scale to zero** (`scale_to_zero`, `min_replicas` 0) after `idle_to_zero` seconds without
  arrivals, queued or in-flight rows; at zero, any of them asks for one replica at once.
- Without an observation inside the stable window the count holds: missing figures are not
  an idle model.
- **Batchers** follow the replicas (`batchers_for`): one batcher per `workers_per_batcher`
  desired workers, so a hot model spreads over more batcher pipelines as it grows (issue 17,
  point 3); the catalog takes the larger of that and the version's `batching.batchers`.

`ScaleSpec` and `parse_spec` live in `services.mesh.domain.autoscaling` (the registry checks
a version's `autoscaling` with them) and are re-exported here.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from control.autoscaler.spec import ScaleSpec, parse_spec
from services.mesh.domain.trust import MAX_BATCHERS

__all__ = ["Decision", "Observation", "ScalePolicy", "ScaleSpec", "batchers_for", "parse_spec"]

TARGET_UTILISATION = 0.85
"""Scale up so replicas run at most this busy: headroom for noise and the next burst."""
DOWNSCALE_UTILISATION = 0.7
"""Remove a replica only if the rest would run at most this busy (hysteresis against 0.85)."""
HIGH_OCCUPANCY = 0.9
"""Batches this full mean the workers are the bottleneck: their served rate is their capacity."""
BUSY_OCCUPANCY = 0.5
"""Below this, a long wait is a batch window filling up, which more replicas would not shorten."""
DRAIN_SECONDS = 10.0
"""A backlog should be gone one start-up plus this after it is seen (the issue's target)."""
CAPACITY_SMOOTHING = 0.3
"""EWMA weight of a new capacity sample."""


@dataclass(frozen=True, slots=True)
class Observation:
    """One sample of a model version's load, summed over its batchers."""

    at: float
    """Injected clock (monotonic seconds)."""
    queue_rows: int
    """Rows waiting in the batchers' queues."""
    inflight_rows: int
    """Rows dispatched to workers, not yet answered."""
    arrival_rate: float
    """Rows/s admitted since the previous sample."""
    served_rate: float
    """Rows/s executed since the previous sample."""
    wait_p95: float
    """Seconds: queue wait p95 over the last interval (0 if none)."""
    predicted_wait: float | None
    """The batcher latency model's predicted wait for a new row, if it has one."""
    occupancy: float
    """Executed rows / (batches x max_batch_size) over the interval, 0..1."""
    ready: int
    """Ready workers for this version."""
    starting: int
    """Workers started but not ready yet."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The replica count asked for, why, and the figures it came from."""

    desired: int
    reason: str
    """Short text for people and the decisions table, e.g. `panic: demand 2.4x capacity`."""
    panicking: bool
    inputs: Mapping[str, float]
    """What the decision looked at (for the decisions table and metrics)."""


class ScalePolicy:
    """Stateful per model version (keeps its windows); pure otherwise: no I/O, no clock reads."""

    def __init__(self, spec: ScaleSpec) -> None:
        self._spec = spec
        self._samples: deque[Observation] = deque()
        self._capacity: float | None = None
        """Learned rows/s per replica (from intervals with full batches)."""
        self._desired: int | None = None
        self._panic_seen: float | None = None
        """When the panic condition last held."""
        self._low_since: float | None = None
        self._idle_since: float | None = None
        self._woken = False
        """Traffic was seen while the desired count was zero."""

    def observe(self, obs: Observation) -> None:
        """Add one sample; one older than the newest kept is dropped (samples come in order)."""
        if self._samples and obs.at < self._samples[-1].at:
            return
        self._samples.append(obs)
        self._learn_capacity(obs)
        if self._desired is None:
            self._desired = self._clamp(obs.ready + obs.starting)
        if obs.arrival_rate > 0 or obs.queue_rows > 0 or obs.inflight_rows > 0:
            self._idle_since = None
            self._woken = self._desired == 0
        elif self._idle_since is None:
            self._idle_since = obs.at
        horizon = obs.at - max(self._spec.stable_window, self._spec.panic_window)
        while self._samples[0].at <= horizon:
            self._samples.popleft()

    def decide(self, now: float) -> Decision:
        """The desired replica count at `now` (the module docstring has the rules)."""
        spec = self._spec
        previous = self._desired if self._desired is not None else spec.min_replicas
        latest = self._samples[-1] if self._samples else None
        if latest is None or latest.at <= now - spec.stable_window:
            self._desired = self._clamp(previous)
            return Decision(self._desired, "hold: no load figures in the stable window",
                            self._panicking(now), {"previous": float(previous)})
        load = self._load(now, latest, previous)
        panicking = self._track(now, load, previous)
        desired, reason = self._choose(now, load, previous, panicking)
        self._desired = self._clamp(desired)
        inputs = {**load.inputs(), "previous": float(previous), "needed": float(load.needed(
            panicking)), "low_for": self._since(self._low_since, now),
            "idle_for": self._since(self._idle_since, now)}
        return Decision(self._desired, reason, panicking, inputs)

    def update_spec(self, spec: ScaleSpec) -> None:
        """Use `spec` from now on; the windows and learned capacity are kept."""
        self._spec = spec
        if self._desired is not None:
            self._desired = self._clamp(self._desired)

    def _learn_capacity(self, obs: Observation) -> None:
        # Only a saturated fleet shows its capacity: full batches *and* rows left waiting.
        # Full batches alone are no sign at max_batch_size 1 (every batch is full), and
        # served/ready of a fleet with idle time is its load, not its capacity: learning from
        # it shrinks the estimate as replicas are added, which then asks for more replicas.
        saturated = obs.queue_rows > 0 or obs.wait_p95 >= self._spec.target_wait
        if (obs.ready <= 0 or obs.served_rate <= 0 or obs.occupancy < HIGH_OCCUPANCY
                or not saturated):
            return
        sample = obs.served_rate / obs.ready
        if self._capacity is None:
            self._capacity = sample
            return
        sample = min(max(sample, self._capacity / 2), self._capacity * 2)
        self._capacity += CAPACITY_SMOOTHING * (sample - self._capacity)

    def _load(self, now: float, latest: Observation, previous: int) -> _Load:
        spec = self._spec
        stable = [s for s in self._samples if s.at > now - spec.stable_window]
        panic = [s for s in stable if s.at > now - spec.panic_window] or [latest]
        settled = latest.starting == 0 and latest.ready >= previous
        backlog = latest.queue_rows / (spec.startup_seconds + DRAIN_SECONDS) if settled else 0.0
        floor = _mean([s.served_rate / s.ready for s in stable if s.ready > 0])
        learned = max(self._capacity, floor) if self._capacity is not None else None
        return _Load(
            spec=spec, latest=latest, settled=settled,
            capacity=spec.rows_per_replica or learned,
            capacity_floor=spec.rows_per_replica or max(learned or 0.0, floor),
            stable=_Window.of(stable, backlog), panic=_Window.of(panic, backlog))

    def _track(self, now: float, load: _Load, previous: int) -> bool:
        """Update the panic and low-demand clocks; whether the policy is panicking."""
        if load.panic_condition():
            self._panic_seen = now
        if load.fits_fewer(previous) and not load.pressure(panicking=False):
            self._low_since = now if self._low_since is None else self._low_since
        else:
            self._low_since = None
        return self._panicking(now)

    def _choose(self, now: float, load: _Load, previous: int,
                panicking: bool) -> tuple[int, str]:
        spec = self._spec
        if previous == 0:
            return self._at_zero(now, load)
        idle = self._since(self._idle_since, now)
        if (spec.scale_to_zero and spec.min_replicas == 0 and self._idle_since is not None
                and idle >= spec.idle_to_zero):
            return 0, f"idle: no traffic for {idle:.0f} s, scale to zero"
        if previous < spec.min_replicas:
            return spec.min_replicas, f"raise to replicas.min {spec.min_replicas}"
        needed = load.needed(panicking)
        if needed > previous:
            return min(needed, previous + spec.max_step), load.describe_up(panicking, needed)
        if load.settled and load.pressure(panicking) and previous < spec.max_replicas:
            step = spec.max_step if panicking else 1
            return previous + step, load.describe_wait(panicking)
        low_for = self._since(self._low_since, now)
        if (not panicking and low_for >= spec.downscale_delay
                and previous > max(spec.min_replicas, 1)):
            return previous - 1, (f"scale down: demand {load.stable.demand:.1f} rows/s fits "
                                  f"{previous - 1} replicas for {low_for:.0f} s")
        return previous, ("panic: hold, no scale-down" if panicking else
                          f"hold: demand {load.stable.demand:.1f} rows/s")

    def _at_zero(self, now: float, load: _Load) -> tuple[int, str]:
        if self._woken:
            self._woken = False
            latest = load.latest
            return 1, (f"wake: {latest.queue_rows} rows queued, "
                       f"{latest.arrival_rate:.1f} rows/s arriving")
        if self._spec.min_replicas > 0:
            return self._spec.min_replicas, f"raise to replicas.min {self._spec.min_replicas}"
        return 0, f"idle at zero for {self._since(self._idle_since, now):.0f} s"

    def _panicking(self, now: float) -> bool:
        seen = self._panic_seen
        return seen is not None and now - seen < self._spec.stable_window

    def _clamp(self, replicas: int) -> int:
        return min(max(replicas, self._spec.min_replicas), self._spec.max_replicas)

    @staticmethod
    def _since(start: float | None, now: float) -> float:
        return 0.0 if start is None else max(0.0, now - start)


@dataclass(frozen=True, slots=True)
class _Window:
    """Demand and latency over one window of samples."""

    demand: float
    """Mean arrival rows/s, plus the backlog to drain (rows/s)."""
    wait: float
    """Mean queue wait (p95, or the predicted wait when higher), seconds."""
    busy: bool
    """Mean occupancy >= BUSY_OCCUPANCY: a long wait there means too little capacity."""

    @classmethod
    def of(cls, samples: Sequence[Observation], backlog: float) -> _Window:
        return cls(demand=_mean([s.arrival_rate for s in samples]) + backlog,
                   wait=_mean([max(s.wait_p95, s.predicted_wait or 0.0) for s in samples]),
                   busy=_mean([s.occupancy for s in samples]) >= BUSY_OCCUPANCY)


@dataclass(frozen=True, slots=True)
class _Load:
    """One decision's view of the windows and the capacity."""

    spec: ScaleSpec
    latest: Observation
    settled: bool
    """Nothing starting and every desired replica ready."""
    capacity: float | None
    """Rows/s per replica trusted for scaling up (None: not known yet)."""
    capacity_floor: float
    """Rows/s per replica known to be reachable, for scaling down (0: not known)."""
    stable: _Window
    panic: _Window

    def needed(self, panicking: bool) -> int:
        """Replicas the demand needs at TARGET_UTILISATION (0 without a capacity)."""
        demand = max(self.stable.demand, self.panic.demand) if panicking else self.stable.demand
        if not self.capacity:
            return 0
        return math.ceil(demand / (self.capacity * TARGET_UTILISATION) - 1e-9)

    def panic_condition(self) -> bool:
        threshold, demand = self.spec.panic_threshold, self.panic.demand
        burst = bool(self.capacity) and demand > 0 and demand >= (
            threshold * (self.capacity or 0.0) * self.latest.ready)
        slow = (self.panic.busy and self.panic.wait >= threshold * self.spec.target_wait
                and self.short_of(self.panic))
        return burst or slow

    def pressure(self, panicking: bool) -> bool:
        """The queue wait is over target on busy workers: more capacity is needed."""
        window = self.panic if panicking else self.stable
        return window.busy and window.wait > self.spec.target_wait and self.short_of(window)

    def short_of(self, window: _Window) -> bool:
        """Whether a long wait means too few replicas. With a known capacity that the ready
        replicas' rate covers (the window's demand, backlog included), it is a backlog
        draining (left by a burst or by a start-up) and more replicas would overshoot:
        the wait lags the fleet by a window. Without a capacity, the wait is all we have."""
        if not self.capacity or self.latest.ready <= 0:
            return True
        return window.demand > self.capacity * TARGET_UTILISATION * self.latest.ready

    def fits_fewer(self, replicas: int) -> bool:
        """The stable demand fits one replica fewer at DOWNSCALE_UTILISATION."""
        if self.stable.demand <= 0:
            return True
        allowed = DOWNSCALE_UTILISATION * self.capacity_floor * (replicas - 1)
        return self.capacity_floor > 0 and self.stable.demand <= allowed

    def describe_up(self, panicking: bool, needed: int) -> str:
        capacity = self.capacity or 0.0
        if panicking:
            ratio = self.panic.demand / max(capacity * self.latest.ready, 1e-9)
            return (f"panic: demand {ratio:.1f}x ready capacity, {self.panic.demand:.1f} "
                    f"rows/s needs {needed} x {capacity:.1f} rows/s")
        return (f"scale up: demand {self.stable.demand:.1f} rows/s needs {needed} "
                f"x {capacity:.1f} rows/s")

    def describe_wait(self, panicking: bool) -> str:
        window = self.panic if panicking else self.stable
        return (f"{'panic' if panicking else 'latency'}: wait {window.wait * 1000:.1f} ms > "
                f"target {self.spec.target_wait * 1000:.1f} ms")

    def inputs(self) -> dict[str, float]:
        latest = self.latest
        figures = {
            "demand": self.stable.demand, "panic_demand": self.panic.demand,
            "capacity_per_replica": self.capacity or 0.0, "capacity_floor": self.capacity_floor,
            "wait_p95": latest.wait_p95, "wait_stable": self.stable.wait,
            "wait_panic": self.panic.wait, "occupancy": latest.occupancy,
            "queue_rows": float(latest.queue_rows), "inflight_rows": float(latest.inflight_rows),
            "arrival_rate": latest.arrival_rate, "served_rate": latest.served_rate,
            "ready": float(latest.ready), "starting": float(latest.starting),
            "settled": float(self.settled),
        }
        if latest.predicted_wait is not None:
            figures["predicted_wait"] = latest.predicted_wait
        return figures


def batchers_for(desired: int, *, workers_per_batcher: int) -> int:
    """How many batchers `desired` workers need: ceil(desired / workers_per_batcher), at least
    1 (a version at zero still has a batcher to hold its requests) and at most MAX_BATCHERS.
    It moves only when the desired count does, so it inherits the count's hysteresis."""
    return min(MAX_BATCHERS, max(1, math.ceil(desired / workers_per_batcher)))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
