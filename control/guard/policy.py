"""The guard's verdict on a canary, and the rollout it asks for, as pure functions.

`evaluate` decides, in this order:

1. **rollback on errors**: the canary has >= `min_samples` requests (success + failure; client
   errors are the caller's fault and never count) and its error rate exceeds the baseline's
   by more than `max_error_rate_delta`. When the baseline has fewer than `min_samples` (it
   is idle, or just restarted) its rate is taken as 0: a canary failing more often than the
   allowed delta on its own is rolled back without waiting for a comparison.
2. **rollback on latency**: both sides have >= `min_samples` and the canary's p99 exceeds the
   baseline's p99 × `max_p99_ratio`.
3. **hold** while either side has fewer than `min_samples`.
4. **advance** to the first of `steps` above the current weight once the current epoch has
   been held for `step_interval_s`; **hold** without steps, before that, or on the last step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from control.guard.metrics import Buckets, VersionFigures
from control.guard.spec import GuardSpec
from services.mesh.domain.types import Rollout, Route

Action = Literal["hold", "rollback", "advance"]


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reason: str
    """For a person: what was measured and why this action."""
    next_weight: float | None = None
    """The canary's next weight (advance only)."""


def quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile of a cumulative histogram, like PromQL `histogram_quantile`.

    Linear interpolation inside the bucket holding the rank (the first bucket starts at 0);
    a rank in the +Inf bucket answers the largest finite bound. None without observations.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank and cumulative > below:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / (cumulative - below)
        lower, below = le, cumulative
    return lower


def p99(buckets: Buckets) -> float | None:
    """The 99th percentile latency in seconds (None without observations)."""
    return quantile(0.99, buckets)


def evaluate(spec: GuardSpec, canary: VersionFigures, baseline: VersionFigures, *,
             held_s: float, current_weight: float) -> Verdict:
    """hold, rollback or advance for one guarded rollout (the module docstring has the rules)."""
    figures = _Figures(spec, canary, baseline, span_s=min(held_s, spec.window_s))
    if canary.samples >= spec.min_samples and figures.errors_too_high():
        return Verdict("rollback", figures.describe(errors_first=True))
    if canary.samples < spec.min_samples or baseline.samples < spec.min_samples:
        return Verdict("hold", f"waiting for {spec.min_samples} requests each: "
                               + figures.describe(errors_first=True))
    if figures.latency_too_high():
        return Verdict("rollback", figures.describe(errors_first=False))
    return _next_step(spec, figures, held_s=held_s, current_weight=current_weight)


def _next_step(spec: GuardSpec, figures: _Figures, *, held_s: float,
               current_weight: float) -> Verdict:
    measured = figures.describe(errors_first=True)
    step = _step_above(spec.steps, current_weight)
    if step is None:
        return Verdict("hold", f"healthy: {measured}")
    if held_s < spec.step_interval_s:
        return Verdict("hold", f"healthy: {measured}; step to {step:g}% after "
                               f"{spec.step_interval_s:g} s (held {held_s:.0f} s)")
    if step >= 100:
        return Verdict("advance", f"promoted {spec.canary} to 100%: {measured}",
                       next_weight=100.0)
    return Verdict("advance", f"advanced {spec.canary} from {current_weight:g}% to {step:g}%: "
                              f"{measured}", next_weight=step)


def _step_above(steps: Sequence[float], weight: float) -> float | None:
    # A little slack: weights normalised from the routes are floats (e.g. 24.999999).
    return next((step for step in steps if step > weight + 1e-6), None)


@dataclass(frozen=True, slots=True)
class _Figures:
    """The two sides' measured figures, compared and described."""

    spec: GuardSpec
    canary: VersionFigures
    baseline: VersionFigures
    span_s: float

    def errors_too_high(self) -> bool:
        enough = self.baseline.samples >= self.spec.min_samples
        baseline_rate = (self.baseline.error_rate or 0.0) if enough else 0.0
        return (self.canary.error_rate or 0.0) > baseline_rate + self.spec.max_error_rate_delta

    def latency_too_high(self) -> bool:
        canary, baseline = p99(self.canary.buckets), p99(self.baseline.buckets)
        if canary is None or baseline is None:
            return False
        return canary > baseline * self.spec.max_p99_ratio

    def describe(self, errors_first: bool) -> str:
        """e.g. `canary v2 error rate 100.0% vs baseline v1 0.0% (allowed +5.0%) over 30 s,
        120 vs 1080 requests; p99 3.1 ms vs 2.5 ms (allowed ×2)`."""
        first, second = (self._errors, self._latency) if errors_first else (
            self._latency, self._errors)
        return (f"canary {self.spec.canary} {first(named=True)} over {self.span_s:.0f} s, "
                f"{self.canary.samples:.0f} vs {self.baseline.samples:.0f} requests; "
                f"{second(named=False)}")

    def _errors(self, *, named: bool) -> str:
        baseline = f"baseline {self.spec.baseline} " if named else ""
        return (f"error rate {_percent(self.canary.error_rate)} vs {baseline}"
                f"{_percent(self.baseline.error_rate)} "
                f"(allowed +{self.spec.max_error_rate_delta * 100:.1f}%)")

    def _latency(self, *, named: bool) -> str:
        baseline = f"baseline {self.spec.baseline} " if named else ""
        return (f"p99 {_ms(p99(self.canary.buckets))} vs {baseline}"
                f"{_ms(p99(self.baseline.buckets))} (allowed ×{self.spec.max_p99_ratio:g})")


def _percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate * 100:.1f}%"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def canary_weight(rollout: Rollout, canary: str) -> float:
    """The canary's share of the traffic in percent (weights are relative to their sum)."""
    routed = sum(r.weight for r in rollout.routes if r.weight > 0)
    weight = sum(r.weight for r in rollout.routes if r.version == canary and r.weight > 0)
    return 100.0 * weight / routed if routed > 0 else 0.0


def next_rollout(rollout: Rollout, spec: GuardSpec, verdict: Verdict) -> Rollout | None:
    """The rollout a verdict asks for (None for hold). Sticky key, salt and shadow are kept.

    rollback: all traffic to the baseline, which is also the fallback; the guard is removed.
    advance: the canary gets the step, other non-baseline routes keep their weights and the
    baseline the rest of 100 (its route dropped at 0); the guard stays, with its canary and
    baseline pinned (their defaults follow the weights, which just changed). The step to 100
    promotes the canary: all traffic and the fallback to it, guard removed.
    """
    if verdict.action == "rollback":
        return replace(rollout, routes=(Route(spec.baseline, 100.0),),
                       fallback=spec.baseline, guard=None)
    if verdict.action != "advance" or verdict.next_weight is None:
        return None
    step = verdict.next_weight
    if step >= 100:
        return replace(rollout, routes=(Route(spec.canary, 100.0),),
                       fallback=spec.canary, guard=None)
    others = [r for r in rollout.routes if r.version not in (spec.canary, spec.baseline)]
    rest = max(0.0, 100.0 - step - sum(r.weight for r in others))
    routes = [Route(spec.canary, step), *others]
    if rest > 0:
        routes.insert(0, Route(spec.baseline, rest))
    guard = {**(rollout.guard or {}), "canary": spec.canary, "baseline": spec.baseline}
    return replace(rollout, routes=tuple(routes), guard=guard)
