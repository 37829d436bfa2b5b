"""Choosing a backend for a model version from its `platform`."""

from __future__ import annotations

from collections.abc import Callable

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.types import ModelVersion
from services.worker.backends.base import Backend
from services.worker.backends.torchscript import TorchScriptBackend
from services.worker.backends.triton import PLATFORM as TRITON_PLATFORM
from services.worker.backends.triton import TritonBackend


def backend_factory(
    threads: int = 0, *, max_threads: int = 0, triton_urls: tuple[str, ...] = (),
    triton_timeout: float = 30.0,
) -> Callable[[ModelVersion], Backend]:
    """A callable building the backend for a version: `threads` intra-op threads (0: each
    model's warm-up chooses, up to `max_threads`; 0: every core)."""

    def build(spec: ModelVersion) -> Backend:
        if spec.platform == TRITON_PLATFORM:  # batches go to the Triton server it references
            limit = spec.batching.default_timeout_ms
            timeout = triton_timeout if limit is None else min(triton_timeout, limit / 1000)
            return TritonBackend(spec.signature, triton_urls=triton_urls, timeout=timeout)
        if spec.platform == "onnxruntime_onnx":
            # Imported on first use: a worker serving only TorchScript never loads onnxruntime.
            from services.worker.backends.onnx import OnnxBackend

            return OnnxBackend(
                spec.signature, device_policy=spec.device, cpu_fallback=spec.cpu_fallback,
                intra_op_threads=threads or None, max_threads=max_threads or None,
            )
        if spec.platform != "pytorch_torchscript":
            raise InvalidInput(f"platform {spec.platform!r} is not supported by this worker")
        return TorchScriptBackend(
            spec.signature.to_json(), device_policy=spec.device,
            intra_op_threads=threads or None, max_threads=max_threads or None,
        )

    return build
