"""Deterministic Open Inference Protocol v2 request bodies for the demo models.

One body is encoded once and reused for every request, so the load generator spends no CPU
building payloads. The ``id`` field is optional in OIP and is left out for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a demo model's signature: name, OIP datatype and per-row width."""

    name: str
    datatype: str
    width: int


@dataclass(frozen=True)
class PayloadSpec:
    """What a request to a demo model carries and what it answers with."""

    model: str
    input: TensorSpec
    output: TensorSpec
    high: int | None = None
    """Exclusive upper bound for integer inputs (token ids); ``None`` for float inputs."""


PAYLOAD_SPECS: dict[str, PayloadSpec] = {
    "mlp": PayloadSpec(
        model="mlp",
        input=TensorSpec("features", "FP32", 32),
        output=TensorSpec("probs", "FP32", 2),
    ),
    "encoder": PayloadSpec(
        model="encoder",
        input=TensorSpec("input_ids", "INT64", 64),
        output=TensorSpec("embedding", "FP32", 384),
        high=30522,
    ),
}

NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "FP32": np.float32,
    "FP64": np.float64,
    "INT32": np.int32,
    "INT64": np.int64,
}


def payload_spec(model: str) -> PayloadSpec:
    """Return the payload spec for ``model``, naming the known models if it is unknown."""
    try:
        return PAYLOAD_SPECS[model]
    except KeyError:
        known = ", ".join(sorted(PAYLOAD_SPECS))
        raise ValueError(f"unknown demo model {model!r} (known: {known})") from None


def input_array(model: str, rows: int, *, seed: int = 0) -> np.ndarray:
    """Return a seeded ``[rows, width]`` input array for ``model``."""
    spec = payload_spec(model)
    rng = np.random.default_rng(seed)
    shape = (rows, spec.input.width)
    if spec.high is not None:
        return rng.integers(0, spec.high, size=shape, dtype=np.int64)
    return rng.standard_normal(shape, dtype=np.float32)


def request_body(
    model: str, rows: int = 1, *, seed: int = 0, request_id: str | None = None
) -> bytes:
    """Return an OIP v2 ``infer`` request body (JSON bytes) for ``rows`` rows of ``model``."""
    spec = payload_spec(model)
    array = input_array(model, rows, seed=seed)
    body: dict[str, object] = {
        "inputs": [
            {
                "name": spec.input.name,
                "datatype": spec.input.datatype,
                "shape": list(array.shape),
                "data": array.reshape(-1),
            }
        ]
    }
    if request_id is not None:
        body = {"id": request_id, **body}
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def infer_path(model: str) -> str:
    """Return the OIP v2 infer path for ``model``."""
    return f"/v2/models/{model}/infer"
