"""What `bench.features` serves: the mlp with two of its 32 inputs read from the feature store.

The demo mlp takes one ``features`` [N, 32] input; a signature may fill only a whole input from
the store, and the gateway refuses a request without inputs, so the benchmark wraps the same
3-layer MLP in a TorchScript module with two inputs: ``features`` [N, 30] sent by the caller and
``user`` [N, 2] (``age``, ``spend_30d``) fetched by ``user_id``, concatenated before the MLP.
The model's compute is the demo mlp's; the lookup is the only difference, and the baseline
sends ``user`` itself (a request carrying the input is served as sent, with no lookup).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.mesh import Answer, Mesh, call, ok

MODEL = "mlpfeat"
ENTITY_TYPE = "user"
NAMES = ("age", "spend_30d")
MAX_AGE_S = 3600.0
BULK_CHUNK = 10_000
"""Entities per bulk upsert (the gateway's limit)."""
READY_TIMEOUT_S = 120.0


def build_artifact(path: Path) -> Path:
    """Script the two-input mlp to ``path`` (seeded, so every build is the same model)."""
    import torch
    from torch import nn

    from services.worker.demo_models import MlpClassifier

    class MlpWithUser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = MlpClassifier()

        def forward(self, features: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
            return self.mlp(torch.cat([features, user], dim=1))  # type: ignore[no-any-return]

    torch.manual_seed(0)
    torch.jit.script(MlpWithUser().eval()).save(str(path))  # type: ignore[no-untyped-call]
    return path


def signature() -> dict[str, Any]:
    """``features`` from the caller, ``user`` from the store (defaults 0 when missing)."""
    feature = {"entity_type": ENTITY_TYPE, "entity_key": "user_id", "names": list(NAMES),
               "max_age_s": MAX_AGE_S, "default": [0, 0], "on_missing": "default"}  # fmt: skip
    return {"inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 30]},
                       {"name": "user", "datatype": "FP32", "shape": [-1, 2],
                        "feature": feature}],
            "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 2]}]}  # fmt: skip


def register(mesh: Mesh, artifact: Path) -> None:
    """Upload the artifact, register ``mlpfeat`` version 1, wait until it answers."""
    data = artifact.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    ok(call(mesh.registry, "PUT", "/v1/artifacts", raw=data,
            headers={"X-Infermesh-Sha256": sha256,
                     "Content-Type": "application/octet-stream"}), "upload")  # fmt: skip
    record = {"artifact_sha256": sha256, "signature": signature(),
              "batching": {"max_batch_size": 64, "max_queue_delay_ms": 2.0}}  # fmt: skip
    ok(call(mesh.registry, "PUT", f"/v1/models/{MODEL}/versions/1", record), "register")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (answer := infer(mesh, body("ready", given=True))).status != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{MODEL} not serving after {READY_TIMEOUT_S:.0f}s: {answer}")
        time.sleep(0.5)


def load_entities(mesh: Mesh, ids: list[str], *, event_time: float) -> float:
    """Bulk-upsert ``ids`` (values derived from the index) at ``event_time``; rows/s."""
    began = time.monotonic()
    for start in range(0, len(ids), BULK_CHUNK):
        rows = [{"entity_id": entity, "features": {"age": 20 + i % 50, "spend_30d": i % 97},
                 "event_time": event_time}
                for i, entity in enumerate(ids[start:start + BULK_CHUNK], start)]  # fmt: skip
        ok(call(mesh.gateway, "POST", f"/v1/features/{ENTITY_TYPE}:bulk", {"rows": rows},
                timeout=120.0), "bulk upsert")  # fmt: skip
    return len(ids) / (time.monotonic() - began)


def body(user_id: str, *, given: bool = False) -> bytes:
    """One request for ``user_id``; ``given``: carrying ``user`` too (no lookup)."""
    rng = np.random.default_rng(0)
    inputs = [{"name": "features", "datatype": "FP32", "shape": [1, 30],
               "data": rng.standard_normal(30, dtype=np.float32)}]  # fmt: skip
    if given:
        inputs.append({"name": "user", "datatype": "FP32", "shape": [1, 2], "data": [30, 12]})
    request = {"inputs": inputs, "parameters": {"user_id": user_id}}
    return orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)


def infer(mesh: Mesh, data: bytes) -> Answer:
    return call(mesh.gateway, "POST", f"/v2/models/{MODEL}/infer", raw=data)


def statuses(mesh: Mesh, data: bytes) -> dict[str, str]:
    """The feature statuses one request is answered with (empty: no lookup)."""
    answer = ok(infer(mesh, data), "infer")
    return dict((answer.get("parameters") or {}).get("features") or {})
