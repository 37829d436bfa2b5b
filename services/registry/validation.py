"""Validation of what callers send the registry: names, digests, signatures, batching, device,
logging.

Every failure is an InvalidInput whose message starts with the offending field. The bounds
(and the name and digest rules) are the mesh's own, `services.mesh.domain.trust`: what the
registry accepts, every service accepts back from etcd.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from services.mesh.domain.autoscaling import parse_spec
from services.mesh.domain.caching import CachePolicy
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.trust import check_batching, check_name, check_sha256, check_signature
from services.mesh.domain.types import (
    DEVICE_POLICIES,
    PREDICTION_LOG_POLICIES,
    WORKER_PLACEMENTS,
    BatchingPolicy,
    Signature,
)

__all__ = [
    "check_name", "check_sha256", "parse_autoscaling", "parse_autoscaling_change",
    "parse_batching", "parse_batching_change", "parse_cache", "parse_cpu_fallback", "parse_device",
    "parse_prediction_log",
    "parse_signature", "parse_worker_placement", "resolve_signature",
]


def parse_signature(raw: Any) -> Signature:
    """A signature from its JSON form; InvalidInput naming the bad field."""
    if not isinstance(raw, Mapping):
        raise InvalidInput("signature: must be an object with 'inputs' and 'outputs'")
    for side in ("inputs", "outputs"):
        specs = raw.get(side, [])
        if not isinstance(specs, list) or not all(isinstance(s, Mapping) for s in specs):
            raise InvalidInput(f"signature: '{side}' must be a list of objects")
    signature = Signature.from_json(raw)
    for spec in signature.outputs:
        if spec.feature is not None:
            raise InvalidInput(f"signature output '{spec.name}': only inputs may name features")
    return check_signature(signature)


def parse_batching(raw: Any) -> BatchingPolicy:
    """A batching policy from its JSON form (None: the defaults)."""
    if raw is None:
        return BatchingPolicy()
    if not isinstance(raw, Mapping):
        raise InvalidInput("batching: must be an object")
    for field, value in raw.items():
        _check_batching_type(field, value)
    try:
        # Defaults filled in here: BatchingPolicy.from_json cannot read them off a slots class.
        policy = BatchingPolicy.from_json({**BatchingPolicy().to_json(), **raw})
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"batching: {exc}") from None
    return check_batching(policy)


def parse_batching_change(current: BatchingPolicy, raw: Any) -> BatchingPolicy:
    """`current` with the fields of a partial batching object `raw` replaced, validated as a
    whole (a smaller `max_batch_size` must still hold every preferred size)."""
    if not isinstance(raw, Mapping):
        raise InvalidInput("batching: must be an object")
    fields = current.to_json()
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise InvalidInput(
            f"batching: unknown field '{unknown[0]}' (fields: {', '.join(fields)})"
        )
    if not raw:
        raise InvalidInput(f"batching: name at least one field to change ({', '.join(fields)})")
    for field, value in raw.items():
        _check_batching_type(field, value)
    return check_batching(BatchingPolicy.from_json({**fields, **raw}))


def _check_batching_type(field: str, value: Any) -> None:
    """InvalidInput naming `field` when `value` is not of its JSON type (the ranges are
    BatchingPolicy's to check)."""
    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    expected: dict[str, tuple[str, Callable[[Any], bool]]] = {
        "max_batch_size": ("an integer", integer),
        "max_queue_size": ("an integer", integer),
        "max_queue_delay_ms": ("a number", number),
        "default_timeout_ms": ("a number or null", lambda v: v is None or number(v)),
        "preferred_batch_sizes": (
            "a list of integers", lambda v: isinstance(v, list) and all(map(integer, v))
        ),
        "admission": ("a string", lambda v: isinstance(v, str)),
        "batchers": ("an integer", integer),
        "edge_inflight": ("an integer or null", lambda v: v is None or integer(v)),
    }
    if field in expected and not expected[field][1](value):
        raise InvalidInput(f"batching: '{field}' must be {expected[field][0]}")


def parse_cache(raw: Any) -> CachePolicy | None:
    """A prediction cache policy from its JSON form (None: the version is not cached);
    InvalidInput naming the bad field."""
    return None if raw is None else CachePolicy.from_json(raw)


def parse_device(raw: Any) -> str:
    """A device policy: auto, cuda or cpu."""
    if raw not in DEVICE_POLICIES:
        raise InvalidInput(f"device: must be one of {', '.join(DEVICE_POLICIES)}")
    return str(raw)


def parse_worker_placement(raw: Any) -> str:
    """Where the launcher runs a version: `shared` (its model's workers) or `dedicated`."""
    if raw not in WORKER_PLACEMENTS:
        raise InvalidInput(f"worker: must be one of {', '.join(WORKER_PLACEMENTS)}")
    return str(raw)


def parse_cpu_fallback(raw: Any) -> bool:
    """Whether a CUDA failure may move the version to CPU: a JSON boolean, never a string
    ("false" would read as true)."""
    if not isinstance(raw, bool):
        raise InvalidInput("cpu_fallback: must be true or false")
    return raw


def parse_prediction_log(raw: Any) -> str:
    """A prediction log policy: full, digest or none."""
    if raw not in PREDICTION_LOG_POLICIES:
        raise InvalidInput(
            f"prediction_log: must be one of {', '.join(PREDICTION_LOG_POLICIES)}"
        )
    return str(raw)


def parse_autoscaling(raw: Any) -> dict[str, Any] | None:
    """An `autoscaling` block as the autoscaler will read it (None: not autoscaled), checked
    by the autoscaler's own parser, with `min_replicas` and `max_replicas` filled in (the
    launcher's fleet reads them as the version's `replicas` bounds)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidInput("autoscaling: must be an object")
    return _checked_autoscaling(raw)


def parse_autoscaling_change(current: Mapping[str, Any] | None, raw: Any) -> dict[str, Any]:
    """`current` with a partial `autoscaling` object `raw` merged over it (a JSON merge patch:
    a field set to null goes back to its default), checked as a whole."""
    if not isinstance(raw, Mapping) or not raw:
        raise InvalidInput("autoscaling: must be an object naming at least one field")
    merged = {k: v for k, v in {**(current or {}), **raw}.items() if v is not None}
    return _checked_autoscaling(merged)


def _checked_autoscaling(raw: Mapping[str, Any]) -> dict[str, Any]:
    spec = parse_spec({"autoscaling": raw})
    return {**raw, "min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas}


def resolve_signature(given: Any, read: Signature | None) -> Signature:
    """The signature to store: `given` (its JSON form) alone when the artifact declares none;
    else the one `read` from the artifact (an ONNX model), with whatever `given` says laid over
    it. `given` may leave out a side, or an entry's `datatype` or `shape`: the model's fill
    them in. Anything it does say must agree with the model: a name the model lacks, another
    datatype, another rank or another fixed dim is an InvalidInput naming the tensor and field.
    """
    if read is None:
        if given is None:
            raise InvalidInput("missing field 'signature'")
        return parse_signature(given)
    if given is None:
        return check_signature(read)
    if not isinstance(given, Mapping):
        raise InvalidInput("signature: must be an object with 'inputs' and 'outputs'")
    merged = {
        side: _merged_side(side, given.get(side), [s.to_json() for s in getattr(read, side)])
        for side in ("inputs", "outputs")
    }
    return parse_signature(merged)


def _merged_side(side: str, given: Any, read: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if given is None:
        return read
    if not isinstance(given, list) or not all(isinstance(s, Mapping) for s in given):
        raise InvalidInput(f"signature: '{side}' must be a list of objects")
    by_name = {entry["name"]: entry for entry in read}
    merged = [_merged_entry(side[:-1], entry, by_name) for entry in given]
    missing = sorted(set(by_name) - {entry["name"] for entry in merged})
    if side == "inputs" and missing:  # the model cannot run without them; outputs may be fewer
        raise InvalidInput(f"signature input '{missing[0]}': the model needs it; declare it too")
    return merged


def _merged_entry(
    where: str, given: Mapping[str, Any], read: Mapping[str, dict[str, Any]]
) -> dict[str, Any]:
    name = given.get("name")
    if not isinstance(name, str) or name not in read:
        raise InvalidInput(
            f"signature {where} {name!r}: the model has no such {where} "
            f"(it has {', '.join(sorted(read))})"
        )
    model = read[name]
    entry = {**model, **given}
    if entry["datatype"] != model["datatype"]:
        raise InvalidInput(f"signature {where} '{name}': 'datatype' is {entry['datatype']}, "
                           f"the model's is {model['datatype']}")
    shape, model_shape = entry["shape"], model["shape"]
    if not isinstance(shape, list) or len(shape) != len(model_shape) or any(
        -1 not in (mine, its) and mine != its for mine, its in zip(shape, model_shape, strict=True)
    ):
        raise InvalidInput(f"signature {where} '{name}': 'shape' {shape} does not fit the "
                           f"model's {model_shape} (-1: any size)")
    return entry
