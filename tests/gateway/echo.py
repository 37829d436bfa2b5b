"""A gateway over an in-memory catalog and a router that echoes each input back as an output.

Model `echo` takes `features` (FP32, any 2-d shape); model `pair` takes `features` (FP32,
[-1, 2]) and `text` (BYTES, [-1]). Each input `x` comes back as output `x_echo`, same bytes.
"""

from __future__ import annotations

from typing import Any

from services.gateway.access import Access
from services.gateway.core import Gateway
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import (
    InferRequest,
    InferResponse,
    Signature,
    TensorSpec,
)
from tests.fakes import model_records

SIGNATURES = {
    "echo": Signature(
        inputs=(TensorSpec("features", "FP32", (-1, -1)),),
        outputs=(TensorSpec("features_echo", "FP32", (-1, -1)),),
    ),
    "pair": Signature(
        inputs=(TensorSpec("features", "FP32", (-1, 2)), TensorSpec("text", "BYTES", (-1,))),
        outputs=(TensorSpec("features_echo", "FP32", (-1, 2)),
                 TensorSpec("text_echo", "BYTES", (-1,))),
    ),
}


class EchoRouter:
    """Returns every input as `<name>_echo`, sharing its bytes, from `version` (default: the
    pinned one, else "1") with `parameters` as a router would set them (bucket, epoch, ...)."""

    def __init__(self) -> None:
        self.seen: list[InferRequest] = []
        self.version: str | None = None
        self.parameters: dict[str, Any] = {}

    async def infer(self, request: InferRequest) -> InferResponse:
        self.seen.append(request)
        outputs = [Tensor(f"{t.name}_echo", t.datatype, t.shape, t.data) for t in request.inputs]
        version = self.version or request.version or "1"
        return InferResponse(request.model, version, "router-id", outputs,
                             parameters=dict(self.parameters))


def echo_config() -> StaticConfig:
    """Both models at version 1, stable, with a ready worker."""
    values: dict[str, object] = {"endpoints/worker/w1": {"models": ["echo/1", "pair/1"]}}
    for model, signature in SIGNATURES.items():
        values |= model_records(model, signature)
    return StaticConfig(values)


def echo_gateway(router: EchoRouter) -> Gateway:
    """The echo models behind a gateway with auth off."""
    config = echo_config()
    return Gateway(ModelCatalog(config), router, access=Access(config, auth=False))
