"""The `autoscaling` block and `replicas` bounds of a model version record, as a `ScaleSpec`.

Parsed by the autoscaler for every version it scales, and by the registry, which refuses a bad
block with the field's name before it saves or publishes it (so it lives in the domain layer,
which both may import). Every field has a default: a record without either block scales
between 1 and 4 replicas, learning each replica's capacity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.mesh.domain.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class ScaleSpec:
    """Per model version; parsed from the version record's `autoscaling` block (all optional)
    and its `replicas: {min, max}`."""

    min_replicas: int = 1
    """0 allowed only with scale_to_zero."""
    max_replicas: int = 4
    target_wait: float = 0.05
    """Seconds: the queue wait p95 the policy aims under (the SLO's share for queueing)."""
    rows_per_replica: float = 0.0
    """Sustained rows/s one worker serves; 0 = learn it from the observations."""
    stable_window: float = 60.0
    """Seconds averaged for normal decisions."""
    panic_window: float = 6.0
    """Seconds: the short window that detects bursts."""
    panic_threshold: float = 2.0
    """Panic when the short window's demand >= this x the ready replicas' capacity."""
    max_step: int = 2
    """At most this many replicas added per decision (removal: always 1)."""
    downscale_delay: float = 120.0
    """Seconds demand must stay low before a replica is removed."""
    startup_seconds: float = 20.0
    """Expected seconds from start to ready."""
    scale_to_zero: bool = False
    idle_to_zero: float = 300.0
    """Seconds without traffic before going to zero."""
    workers_per_batcher: int = 4
    """Desired workers per batcher: above this many times the current batchers, the
    autoscaler spreads the model over more (`policy.batchers_for`)."""


_FLOATS: dict[str, tuple[float, bool]] = {
    # field: (bound, whether the bound itself is allowed)
    "target_wait": (0.0, False), "rows_per_replica": (0.0, True),
    "stable_window": (0.0, False), "panic_window": (0.0, False),
    "panic_threshold": (1.0, True), "downscale_delay": (0.0, True),
    "startup_seconds": (0.0, True), "idle_to_zero": (0.0, True),
}
_AUTOSCALING = frozenset({*_FLOATS, "max_step", "scale_to_zero", "min_replicas", "max_replicas",
                          "workers_per_batcher"})
_DEFAULTS = ScaleSpec()


def parse_spec(record: Mapping[str, Any]) -> ScaleSpec:
    """The spec of a version record; InvalidInput names the field at fault.

    The bounds come from `replicas.min`/`replicas.max` (or `autoscaling.min_replicas`/
    `max_replicas`, which must agree with them when both are given).
    """
    if not isinstance(record, Mapping):
        raise InvalidInput("version record must be an object")
    raw, replicas = _block(record, "autoscaling"), _block(record, "replicas")
    unknown = sorted(set(raw) - _AUTOSCALING)
    if unknown:
        raise InvalidInput(f"autoscaling.{unknown[0]} is not a known field "
                           f"(known: {', '.join(sorted(_AUTOSCALING))})")
    numbers = {name: _number(raw, name, *bound) for name, bound in _FLOATS.items()}
    if numbers["panic_window"] > numbers["stable_window"]:
        raise InvalidInput("autoscaling.panic_window must be <= autoscaling.stable_window")
    to_zero = raw.get("scale_to_zero", False)
    if not isinstance(to_zero, bool):
        raise InvalidInput("autoscaling.scale_to_zero must be true or false")
    low = _bound(replicas, raw, ("min", "min_replicas"), _DEFAULTS.min_replicas, 0)
    high = _bound(replicas, raw, ("max", "max_replicas"), max(_DEFAULTS.max_replicas, low), 1)
    if low > high:
        raise InvalidInput(f"replicas.min must be <= replicas.max (got {low} > {high})")
    if low == 0 and not to_zero:
        raise InvalidInput("replicas.min must be >= 1 unless autoscaling.scale_to_zero is true")
    max_step = _integer("autoscaling.max_step", raw.get("max_step", _DEFAULTS.max_step), 1)
    per_batcher = _integer("autoscaling.workers_per_batcher",
                           raw.get("workers_per_batcher", _DEFAULTS.workers_per_batcher), 1)
    return ScaleSpec(min_replicas=low, max_replicas=high, max_step=max_step,
                     scale_to_zero=to_zero, workers_per_batcher=per_batcher, **numbers)


def _block(record: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = record.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{name} must be an object")
    return value


def _number(raw: Mapping[str, Any], name: str, bound: float, inclusive: bool) -> float:
    value = raw.get(name, getattr(_DEFAULTS, name))
    relation = ">=" if inclusive else ">"
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or value < bound or (value == bound and not inclusive)):
        raise InvalidInput(f"autoscaling.{name} must be a number {relation} {bound:g}, "
                           f"got {value!r}")
    return float(value)


def _bound(replicas: Mapping[str, Any], raw: Mapping[str, Any], keys: tuple[str, str],
           default: int, low: int) -> int:
    key, alias = keys
    here, there = replicas.get(key), raw.get(alias)
    if here is not None and there is not None and here != there:
        raise InvalidInput(f"replicas.{key} and autoscaling.{alias} disagree "
                           f"({here!r} vs {there!r})")
    if here is None and there is not None:
        return _integer(f"autoscaling.{alias}", there, low)
    return _integer(f"replicas.{key}", default if here is None else here, low)


def _integer(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidInput(f"{name} must be an integer >= {low}, got {value!r}")
    return value
