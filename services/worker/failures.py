"""What the worker tells a caller when a version cannot load or a batch fails: one line from
the error tree (services/mesh/domain/errors.py), never a backend's raw text."""

from __future__ import annotations

from services.mesh.domain.errors import InternalError, InvalidInput, ModelFailed
from services.mesh.domain.types import Batch, ModelVersion
from services.worker.backends.base import (
    BackendError,
    InputRejected,
    ModelCallFailed,
    model_call_failed,
)


def cuda_refusal(spec: ModelVersion, reason: str) -> str:
    """Why a version that may not leave CUDA is not served: its policy and the failure."""
    return (f"{spec.model}/{spec.version} cannot run on CUDA ({reason}) and may not fall back "
            f"to CPU: device policy '{spec.device}' with cpu_fallback false; register a version "
            "with cpu_fallback true to serve it from CPU")


def batch_error(batch: Batch, exc: Exception) -> InternalError | InvalidInput:
    """What a caller is told when running `batch` raised `exc`: the model's error line only,
    no traceback or path (the whole traceback goes to the log)."""
    if not isinstance(exc, BackendError):  # another backend's raw error: never its text as is
        exc = model_call_failed(exc)
    if isinstance(exc, InputRejected):
        return InvalidInput(f"the model rejected the input: {exc}")
    if isinstance(exc, ModelCallFailed):
        return ModelFailed(f"the model failed: {exc}")
    return InternalError(f"model {batch.model} version {batch.version} failed: {exc}")
