"""Online features in a signature: which inputs the router fills from the feature store.

An input of a model version's signature may carry a `feature` block:

    {"name": "user_features", "datatype": "FP32", "shape": [-1, 2],
     "feature": {"entity_type": "user", "entity_key": "user_id",
                 "names": ["age", "spend_30d"], "max_age_s": 3600,
                 "default": [0, 0], "on_missing": "default"}}

`entity_key` names the request parameter carrying the entity id. When a request lacks the
input, the router reads the named features of that entity (the tenant's own rows) and builds
the input, one row per request row; a caller that sends the input is served as sent.

Every filled value has a status, after Feast's field statuses: `present`, `defaulted_missing`
(no row), `defaulted_stale` (its `event_time` is older than `max_age_s`), `store_down` (the
store did not answer in time: every feature defaulted, the response says `degraded`). With
`on_missing: reject` a missing or stale feature fails the request (InvalidInput naming it) and
an unreachable store makes it Unavailable instead of answering with defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from services.mesh.domain.errors import InvalidInput

if TYPE_CHECKING:  # types.py imports this module to parse a TensorSpec's feature block
    from services.mesh.domain.types import InferRequest, ModelVersion

PRESENT = "present"
DEFAULTED_MISSING = "defaulted_missing"
DEFAULTED_STALE = "defaulted_stale"
STORE_DOWN = "store_down"
ON_MISSING = ("default", "reject")
MAX_FEATURES = 256
"""Most feature names one input may carry."""
NAME_CHARS = 128
"""Most characters of an entity type, entity key or feature name."""


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """How one input is filled from the store; `default` holds one value per name."""

    entity_type: str
    entity_key: str
    names: tuple[str, ...]
    max_age_s: float
    default: tuple[float, ...]
    on_missing: str = "default"

    @classmethod
    def from_json(cls, raw: Any, *, where: str) -> FeatureSpec:
        """The spec of `raw`; InvalidInput naming `where` and the field at fault."""
        if not isinstance(raw, Mapping):
            raise InvalidInput(f"{where}: 'feature' must be an object")
        entity_type = _name(raw.get("entity_type"), f"{where}: feature.entity_type")
        entity_key = _name(raw.get("entity_key"), f"{where}: feature.entity_key")
        names = raw.get("names")
        if not isinstance(names, list) or not 1 <= len(names) <= MAX_FEATURES:
            raise InvalidInput(
                f"{where}: feature.names must be a list of 1 to {MAX_FEATURES} names"
            )
        checked = tuple(_name(n, f"{where}: feature.names[{i}]") for i, n in enumerate(names))
        if len(set(checked)) != len(checked):
            raise InvalidInput(f"{where}: feature.names must not repeat a name")
        max_age: Any = raw.get("max_age_s")
        if not _number(max_age) or not 0 < max_age <= 10 * 365 * 86_400:
            raise InvalidInput(f"{where}: feature.max_age_s must be a positive number of seconds")
        default = raw.get("default", [0] * len(checked))
        if not isinstance(default, list) or len(default) != len(checked) or not all(
            _number(v) for v in default
        ):
            raise InvalidInput(
                f"{where}: feature.default must be a list of {len(checked)} numbers (one a name)"
            )
        on_missing = raw.get("on_missing", "default")
        if on_missing not in ON_MISSING:
            raise InvalidInput(
                f"{where}: feature.on_missing must be one of {', '.join(ON_MISSING)}"
            )
        return cls(entity_type, entity_key, checked, float(max_age),
                   tuple(float(v) for v in default), on_missing)

    def to_json(self) -> dict[str, Any]:
        return {"entity_type": self.entity_type, "entity_key": self.entity_key,
                "names": list(self.names), "max_age_s": self.max_age_s,
                "default": list(self.default), "on_missing": self.on_missing}


FEATURE_DATATYPES = ("FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64")
"""Datatypes a filled input may have (stored values are JSON numbers)."""


def feature_spec_of(raw: Any, datatype: str, shape: tuple[int, ...], *, where: str) -> FeatureSpec:
    """The feature block of an input of `datatype` and `shape`: the input must be numeric and
    of shape [-1 or rows, len(names) or -1] (one row of features per request row)."""
    spec = FeatureSpec.from_json(raw, where=where)
    if datatype not in FEATURE_DATATYPES:
        raise InvalidInput(
            f"{where}: an input filled from features must have a datatype among "
            f"{', '.join(FEATURE_DATATYPES)}"
        )
    if len(shape) != 2 or shape[1] not in (-1, len(spec.names)):
        raise InvalidInput(
            f"{where}: an input filled from features must have shape [-1, {len(spec.names)}] "
            "(one row of features per request row)"
        )
    return spec


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= NAME_CHARS or "\x00" in value:
        raise InvalidInput(f"{where} must be a string of 1 to {NAME_CHARS} characters")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class FeatureReport:
    """What filling a request did: a status per feature name, and whether the store was down."""

    statuses: dict[str, str]
    degraded: bool = False


class FeatureFiller(Protocol):
    """Fills a request's feature inputs from the online store (the router's lookup step)."""

    async def fill(self, request: InferRequest, version: ModelVersion) -> FeatureReport | None:
        """Add the inputs of `version` that name features and that `request` lacks; None when
        there were none to add. InvalidInput (naming the feature or the entity parameter) or
        Unavailable per the inputs' `on_missing`."""
        ...
