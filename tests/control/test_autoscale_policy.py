"""The autoscaling policy against a simulated fleet, on an injected clock (no I/O, no sleeps).

`Fleet` is a fluid model of one model version: workers serve `capacity` rows/s each once
ready, `startup` seconds after being asked for; rows that cannot be served wait in the queue.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from control.autoscaler.policy import (
    Decision,
    Observation,
    ScalePolicy,
    ScaleSpec,
    parse_spec,
)
from services.mesh.domain.errors import InvalidInput

TICK = 1.0
CAPACITY = 100.0
"""True rows/s of one simulated worker."""


@dataclass
class Fleet:
    ready: int
    startup: float = 20.0
    queue: float = 0.0
    starting: list[float] = field(default_factory=list)
    """When each starting worker becomes ready."""

    def actuate(self, desired: int, now: float) -> None:
        missing = desired - self.ready - len(self.starting)
        self.starting += [now + self.startup] * max(0, missing)
        for _ in range(max(0, -missing)):
            if self.starting:
                self.starting.pop()
            else:
                self.ready -= 1

    def step(self, now: float, arrival: float) -> Observation:
        """Advance one tick ending at `now` with `arrival` rows/s offered."""
        self.ready += sum(1 for at in self.starting if at <= now)
        self.starting = [at for at in self.starting if at > now]
        can = self.ready * CAPACITY * TICK
        offered = self.queue + arrival * TICK
        served = min(offered, can)
        self.queue = offered - served
        wait = self.queue / (self.ready * CAPACITY) if self.ready else (10.0 if self.queue else 0)
        return Observation(
            at=now, queue_rows=round(self.queue), inflight_rows=round(served / 10),
            arrival_rate=arrival, served_rate=served / TICK, wait_p95=wait,
            predicted_wait=None, occupancy=served / can if can else 0.0,
            ready=self.ready, starting=len(self.starting))


Trace = list[tuple[float, Decision]]


def simulate(policy: ScalePolicy, fleet: Fleet, load: Callable[[float], float], *,
             until: float, start: float = 0.0, trace: Trace | None = None) -> Trace:
    """Tick the fleet and the policy from `start` to `until`; the decisions, in order."""
    trace = [] if trace is None else trace
    now = start
    while now < until:
        now += TICK
        policy.observe(fleet.step(now, load(now)))
        decision = policy.decide(now)
        fleet.actuate(decision.desired, now)
        trace.append((now, decision))
    return trace


def changes(trace: Trace, *, initial: int) -> list[tuple[float, int]]:
    """(time, new - old) for every decision that changed the desired count."""
    found, last = [], initial
    for at, decision in trace:
        if decision.desired != last:
            found.append((at, decision.desired - last))
            last = decision.desired
    return found


def direction_changes(steps: list[tuple[float, int]]) -> int:
    signs = [math.copysign(1, delta) for _, delta in steps]
    return sum(1 for a, b in zip(signs, signs[1:], strict=False) if a != b)


SPEC = ScaleSpec(min_replicas=1, max_replicas=8, rows_per_replica=CAPACITY, startup_seconds=20)


@pytest.mark.parametrize("rows_per_replica", [CAPACITY, 0.0], ids=["configured", "learned"])
def test_a_4x_step_scales_up_within_the_panic_window_and_leaving_panic_keeps_it(
        rows_per_replica: float) -> None:
    spec = ScaleSpec(min_replicas=1, max_replicas=8, rows_per_replica=rows_per_replica)
    policy, fleet = ScalePolicy(spec), Fleet(ready=1)
    before = simulate(policy, fleet, lambda _: 80.0, until=120)
    assert {d.desired for _, d in before} == {1}

    after = simulate(policy, fleet, lambda _: 320.0, start=120, until=120 + 240)

    first_up = next((at, d) for at, d in after if d.desired > 1)
    assert first_up[0] <= 120 + spec.panic_window + TICK
    assert first_up[1].panicking and first_up[1].reason.startswith("panic")
    assert {"demand", "capacity_per_replica", "wait_p95", "ready", "starting"} <= set(
        first_up[1].inputs)
    needed = math.ceil(320 / CAPACITY)
    settled = [d for at, d in after if at >= first_up[0] + spec.panic_window]
    assert min(d.desired for d in settled) >= needed  # leaving panic never undoes the scale-up
    assert not after[-1][1].panicking
    assert fleet.queue == 0


def test_a_slow_start_up_orders_no_extra_replicas() -> None:
    spec = ScaleSpec(min_replicas=1, max_replicas=8, rows_per_replica=CAPACITY,
                     startup_seconds=60)
    policy, fleet = ScalePolicy(spec), Fleet(ready=1, startup=60)
    simulate(policy, fleet, lambda _: 80.0, until=60)

    trace = simulate(policy, fleet, lambda _: 320.0, start=60, until=60 + 90)

    needed = math.ceil(320 / (CAPACITY * 0.85))
    first_up = next(at for at, d in trace if d.desired > 1)
    start_up = [d for at, d in trace if at < first_up + spec.startup_seconds]
    assert max(d.desired for d in start_up) == needed
    assert start_up[-1].inputs["queue_rows"] > 10_000  # the backlog grew, and ordered nothing
    ups_while_starting = [d.desired for _, d in trace
                          if d.inputs["starting"] > 0 and d.desired > d.inputs["previous"]]
    assert ups_while_starting and max(ups_while_starting) <= needed


def test_when_the_load_stops_replicas_go_one_at_a_time_after_the_delay() -> None:
    spec = SPEC
    policy, fleet = ScalePolicy(spec), Fleet(ready=4)
    warm = simulate(policy, fleet, lambda _: 320.0, until=120)
    assert {d.desired for _, d in warm} == {4}

    trace = simulate(policy, fleet, lambda _: 0.0, start=120, until=120 + 300)

    steps = changes(trace, initial=4)
    assert [delta for _, delta in steps] == [-1, -1, -1]
    assert steps[0][0] >= 120 + spec.downscale_delay
    assert trace[-1][1].desired == spec.min_replicas
    assert trace[-1][1].reason.startswith("hold")


def test_load_oscillating_near_the_threshold_changes_the_count_at_most_twice() -> None:
    # 3 replicas serve 255 rows/s at the 85 % target: the load swings across it every 20 s.
    policy, fleet = ScalePolicy(SPEC), Fleet(ready=3)

    trace = simulate(policy, fleet, lambda now: 240.0 if int(now) // 20 % 2 else 275.0,
                     until=600)

    assert len(changes(trace, initial=3)) <= 2


@pytest.mark.parametrize("ready", [1, 3, 6])
def test_steady_noisy_load_changes_direction_at_most_once(ready: int) -> None:
    noise = random.Random(17 + ready)
    policy, fleet = ScalePolicy(SPEC), Fleet(ready=ready)

    trace = simulate(policy, fleet, lambda _: 250.0 * noise.uniform(0.8, 1.2), until=300)

    assert direction_changes(changes(trace, initial=ready)) <= 1
    assert 3 <= trace[-1][1].desired <= 5  # 250 rows/s on 100 rows/s workers


def test_latency_adds_a_replica_without_rates_once_the_last_one_is_ready() -> None:
    policy = ScalePolicy(ScaleSpec(min_replicas=1, max_replicas=6, target_wait=0.05))

    def busy(at: float, *, ready: int, starting: int = 0) -> Observation:
        return Observation(at=at, queue_rows=40, inflight_rows=8, arrival_rate=50.0,
                           served_rate=50.0, wait_p95=0.07, predicted_wait=0.08,
                           occupancy=0.7, ready=ready, starting=starting)

    policy.observe(busy(1, ready=2))
    first = policy.decide(1)
    assert (first.desired, first.reason.split(":")[0]) == (3, "latency")
    assert first.inputs["capacity_per_replica"] == 0  # not learned: batches never full
    for at in range(2, 30):
        policy.observe(busy(at, ready=2, starting=1))
        assert policy.decide(at).desired == 3  # the third is on its way
    policy.observe(busy(30, ready=3))
    assert policy.decide(30).desired == 4


def test_scale_to_zero_after_idle_and_wake_on_the_first_row() -> None:
    spec = ScaleSpec(min_replicas=0, max_replicas=4, rows_per_replica=CAPACITY,
                     scale_to_zero=True, idle_to_zero=300, downscale_delay=60)
    policy, fleet = ScalePolicy(spec), Fleet(ready=1)
    simulate(policy, fleet, lambda _: 50.0, until=60)

    idle = simulate(policy, fleet, lambda _: 0.0, start=60, until=60 + 320)

    went = next(at for at, d in idle if d.desired == 0)
    assert 60 + spec.idle_to_zero <= went <= 60 + spec.idle_to_zero + 2 * TICK
    assert all(d.desired == 1 for at, d in idle if at < went)
    assert fleet.ready == 0

    woken = simulate(policy, fleet, lambda _: 2.0, start=380, until=381)
    assert woken[0][1].desired == 1 and woken[0][1].reason.startswith("wake")


def test_a_version_idle_at_zero_stays_there_when_the_autoscaler_restarts() -> None:
    spec = ScaleSpec(min_replicas=0, scale_to_zero=True, rows_per_replica=CAPACITY)
    policy, fleet = ScalePolicy(spec), Fleet(ready=0)

    trace = simulate(policy, fleet, lambda now: 0.0 if now < 30 else 1.0, until=31)

    assert [d.desired for _, d in trace] == [0] * 29 + [1, 1]


def test_no_figures_hold_the_count() -> None:
    policy = ScalePolicy(SPEC)
    policy.observe(Observation(at=0, queue_rows=0, inflight_rows=0, arrival_rate=0.0,
                               served_rate=0.0, wait_p95=0.0, predicted_wait=None,
                               occupancy=0.0, ready=3, starting=0))

    decision = policy.decide(10 * SPEC.stable_window)

    assert decision.desired == 3 and decision.reason.startswith("hold")


def test_update_spec_clamps_to_the_new_bounds() -> None:
    policy = ScalePolicy(SPEC)
    policy.observe(Observation(at=0, queue_rows=0, inflight_rows=0, arrival_rate=250.0,
                               served_rate=250.0, wait_p95=0.0, predicted_wait=None,
                               occupancy=0.5, ready=5, starting=0))
    policy.update_spec(ScaleSpec(min_replicas=1, max_replicas=2, rows_per_replica=CAPACITY))

    assert policy.decide(1).desired == 2


def test_parse_spec_reads_the_record() -> None:
    spec = parse_spec({"replicas": {"min": 0, "max": 6}, "autoscaling": {
        "target_wait": 0.1, "rows_per_replica": 400, "max_step": 3, "scale_to_zero": True,
        "idle_to_zero": 600, "panic_window": 4}})

    assert spec == ScaleSpec(min_replicas=0, max_replicas=6, target_wait=0.1,
                             rows_per_replica=400.0, max_step=3, scale_to_zero=True,
                             idle_to_zero=600.0, panic_window=4.0)
    assert parse_spec({}) == ScaleSpec()
    assert parse_spec({"replicas": {"min": 6}}).max_replicas == 6


@pytest.mark.parametrize(("record", "field"), [
    ({"autoscaling": {"max_step": 0}}, "autoscaling.max_step must be an integer >= 1"),
    ({"autoscaling": {"max_step": 1.5}}, "autoscaling.max_step"),
    ({"autoscaling": {"target_wait": "fast"}}, "autoscaling.target_wait must be a number"),
    ({"autoscaling": {"target_wait": 0}}, "autoscaling.target_wait"),
    ({"autoscaling": {"rows_per_replica": float("nan")}}, "autoscaling.rows_per_replica"),
    ({"autoscaling": {"panic_threshold": 0.5}}, "autoscaling.panic_threshold"),
    ({"autoscaling": {"panic_window": 90}}, "autoscaling.panic_window"),
    ({"autoscaling": {"scale_to_zero": "yes"}}, "autoscaling.scale_to_zero"),
    ({"autoscaling": {"stable_windw": 60}}, "autoscaling.stable_windw"),
    ({"autoscaling": [1]}, "autoscaling must be an object"),
    ({"replicas": 3}, "replicas must be an object"),
    ({"replicas": {"min": -1}}, "replicas.min must be an integer >= 0"),
    ({"replicas": {"max": True}}, "replicas.max"),
    ({"replicas": {"min": 3, "max": 2}}, "replicas.min must be <= replicas.max"),
    ({"replicas": {"min": 0}}, "autoscaling.scale_to_zero"),
    ({"replicas": {"min": 1}, "autoscaling": {"min_replicas": 2}}, "replicas.min"),
])
def test_parse_spec_names_the_bad_field(record: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput, match=field.replace(".", r"\.")):
        parse_spec(record)


@dataclass
class OneRowBatches(Fleet):
    """A version at max_batch_size 1: every batch it runs is full, busy or not."""

    def step(self, now: float, arrival: float) -> Observation:
        obs = super().step(now, arrival)
        return dataclasses.replace(obs, occupancy=1.0 if obs.served_rate else 0.0)


def test_full_batches_without_a_queue_do_not_shrink_the_learned_capacity() -> None:
    """At max_batch_size 1 occupancy is always 1: were idle replicas' load learned as their
    capacity, each added replica would lower it and ask for another, up to the maximum
    (seen on a real mesh: 1.5 workers' worth of load took the fleet to its maximum of 6)."""
    spec = ScaleSpec(min_replicas=1, max_replicas=6, target_wait=0.1, stable_window=6.0,
                     panic_window=6.0, startup_seconds=3.0, downscale_delay=30.0)
    policy, fleet = ScalePolicy(spec), OneRowBatches(ready=1, startup=3.0)
    trace = simulate(policy, fleet, lambda now: 1.5 * CAPACITY, until=120.0)
    # 1.5 workers' worth at 85 % target utilisation needs 2; one more for the backlog the
    # first seconds left is tolerated, the maximum is not.
    assert max(d.desired for _, d in trace) <= 3, changes(trace, initial=1)
    assert trace[-1][1].desired == 2, changes(trace, initial=1)
