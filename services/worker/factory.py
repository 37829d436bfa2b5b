"""Choosing a backend for a model version from its `platform`."""

from __future__ import annotations

from collections.abc import Callable

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.types import ModelVersion
from services.worker.backends.base import Backend
from services.worker.backends.torchscript import TorchScriptBackend


def backend_factory(threads: int = 0) -> Callable[[ModelVersion], Backend]:
    """A callable building the backend for a version (TorchScript today)."""

    def build(spec: ModelVersion) -> Backend:
        if spec.platform != "pytorch_torchscript":
            raise InvalidInput(f"platform {spec.platform!r} is not supported by this worker")
        return TorchScriptBackend(
            spec.signature.to_json(), device_policy=spec.device,
            intra_op_threads=threads or None,
        )

    return build
