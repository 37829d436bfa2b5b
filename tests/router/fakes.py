"""In-process fakes and config records for the router's core and adapter tests."""

from __future__ import annotations

import asyncio

import numpy as np

from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import InfermeshError
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    InferRequest,
    InferResponse,
    ModelVersion,
    Rollout,
    Route,
    ShadowRoute,
    Signature,
    TensorSpec,
)

SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 2)),), outputs=(TensorSpec("x", "FP32", (-1, 2)),)
)
PRIMARY_ROWS = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], dtype=np.float32)
SHADOW_ROWS = np.array([[0.2, 0.8], [0.1, 0.9], [0.6, 0.4]], dtype=np.float32)


class FakeBatcher:
    """Echoes inputs (or answers `outputs[version]`); holds a lane while `held[lane]` is unset;
    raises `errors[version]`; records the ids of requests cancelled while held."""

    def __init__(self) -> None:
        self.seen: list[InferRequest] = []
        self.held: dict[str, asyncio.Event] = {}
        self.errors: dict[str, InfermeshError] = {}
        self.outputs: dict[str, list[Tensor]] = {}
        self.cancelled: list[str] = []
        self.holding = asyncio.Event()
        """Set once a request waits on a held lane."""

    async def infer(self, request: InferRequest) -> InferResponse:
        self.seen.append(request)
        assert request.version is not None
        gate = self.held.get(request.lane)
        if gate is not None:
            self.holding.set()
            try:
                await gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(request.request_id)
                raise
        if request.version in self.errors:
            raise self.errors[request.version]
        outputs = self.outputs.get(request.version, request.inputs)
        return InferResponse(request.model, request.version, request.request_id, outputs)

    def lane(self, lane: str) -> list[InferRequest]:
        return [r for r in self.seen if r.lane == lane]


def rollout(fraction: float = 1.0, *, routes: tuple[Route, ...] = (Route("1", 100.0),),
            shadow_version: str = "3") -> Rollout:
    shadow = (ShadowRoute(shadow_version, fraction),) if fraction else ()
    return Rollout("m", routes, sticky_key="user", salt="pepper", shadow=shadow, fallback="1",
                   epoch=4)


def make_config(record: Rollout) -> StaticConfig:
    config = StaticConfig({"rollouts/m": record.to_json()})
    for version in ("1", "2", "3"):
        spec = ModelVersion("m", version, SIGNATURE, "file:///dev/null", "0" * 64)
        config.put(f"models/m/{version}", spec.to_json())
        config.put(f"endpoints/worker/w{version}", {"models": [f"m/{version}"]})
    return config


def request(request_id: str = "req-1", *, version: str | None = None,
            rows: np.ndarray = PRIMARY_ROWS, **parameters: object) -> InferRequest:
    return InferRequest(
        model="m", inputs=[Tensor.from_array("x", rows)], request_id=request_id,
        version=version, deadline=1e12, parameters=dict(parameters),
    )
