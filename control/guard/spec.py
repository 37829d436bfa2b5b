"""The `guard` block of a rollout record: what to compare, how much worse is too much.

Parsed by the control API when a rollout is written (a 400 names the bad field) and by the
guard loop when it evaluates one. Every field has a default, so `"guard": {}` guards the
smallest-weight route against the fallback with the defaults below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.types import Rollout

_NUMBERS: dict[str, tuple[float, float, float | None]] = {
    # field: (default, lowest allowed value, highest allowed value or None)
    "window_s": (30.0, 0.1, None),
    "max_error_rate_delta": (0.05, 0.0, 1.0),
    "max_p99_ratio": (2.0, 1.0, None),
    "step_interval_s": (30.0, 0.0, None),
}


@dataclass(frozen=True, slots=True)
class GuardSpec:
    """A guard, resolved against the rollout it belongs to (canary and baseline are named)."""

    canary: str
    baseline: str
    window_s: float = 30.0
    """Sliding window of router figures compared, in seconds."""
    min_samples: int = 50
    """Requests each side needs in the window before a verdict (fewer: hold)."""
    max_error_rate_delta: float = 0.05
    """Roll back when canary error rate > baseline error rate + this."""
    max_p99_ratio: float = 2.0
    """Roll back when canary p99 latency > baseline p99 × this."""
    steps: tuple[float, ...] = ()
    """Canary weights to advance through while healthy, e.g. (5, 25, 50, 100); empty: hold."""
    step_interval_s: float = 30.0
    """How long a step must stay healthy (with `min_samples`) before the next one."""

    def to_json(self) -> dict[str, Any]:
        return {
            "canary": self.canary, "baseline": self.baseline, "window_s": self.window_s,
            "min_samples": self.min_samples, "max_error_rate_delta": self.max_error_rate_delta,
            "max_p99_ratio": self.max_p99_ratio, "steps": list(self.steps),
            "step_interval_s": self.step_interval_s,
        }


def parse_guard(raw: Any, rollout: Rollout) -> GuardSpec:
    """Validate a `guard` block against `rollout`; InvalidInput names the field at fault."""
    if not isinstance(raw, Mapping):
        raise InvalidInput("guard: must be an object")
    unknown = set(raw) - {"canary", "baseline", "min_samples", "steps", *_NUMBERS}
    if unknown:
        raise InvalidInput(f"guard.{sorted(unknown)[0]}: unknown field")
    routed = [r.version for r in rollout.routes]
    baseline = _version(raw, "baseline", rollout.fallback or rollout.primary, routed)
    canaries = [r for r in rollout.routes if r.version != baseline]
    default_canary = min(canaries, key=lambda r: r.weight).version if canaries else None
    canary = _version(raw, "canary", default_canary, routed)
    if canary == baseline:
        raise InvalidInput("guard.canary: must differ from guard.baseline")
    numbers = {name: _number(raw, name, *bounds) for name, bounds in _NUMBERS.items()}
    return GuardSpec(
        canary=canary, baseline=baseline, min_samples=_min_samples(raw),
        steps=_steps(raw.get("steps", [])), **numbers,
    )


def _version(raw: Mapping[str, Any], name: str, default: str | None, routed: list[str]) -> str:
    value = raw.get(name, default)
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"guard.{name}: needs a version (the rollout has none to default to)")
    if value not in routed:
        raise InvalidInput(f"guard.{name}: version '{value}' is not one of the routes")
    return value


def _number(raw: Mapping[str, Any], name: str, default: float, low: float,
            high: float | None) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"guard.{name}: must be a number")
    if value < low or (high is not None and value > high):
        bound = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise InvalidInput(f"guard.{name}: must be {bound}, got {value}")
    return float(value)


def _min_samples(raw: Mapping[str, Any]) -> int:
    value = raw.get("min_samples", 50)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput("guard.min_samples: must be an integer >= 1")
    return value


def _steps(value: Any) -> tuple[float, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise InvalidInput("guard.steps: must be a list of weights, e.g. [5, 25, 50, 100]")
    steps: list[float] = []
    for i, step in enumerate(value):
        if isinstance(step, bool) or not isinstance(step, int | float) or not 0 < step <= 100:
            raise InvalidInput(f"guard.steps[{i}]: must be a weight in (0, 100]")
        if steps and step <= steps[-1]:
            raise InvalidInput(f"guard.steps[{i}]: steps must increase")
        steps.append(float(step))
    return tuple(steps)
