"""A :class:`~services.worker.backends.base.Backend` that forwards batches to a Triton server.

A version with platform ``triton`` is registered like any other: its artifact is a small JSON
*Triton reference*, fetched and sha256-verified by the worker as usual, naming where the model
runs::

    {"url": "127.0.0.1:8001", "model": "mlp", "version": "1"}

``url`` is the server's gRPC endpoint (``host:port`` or ``grpc://host:port``) and must be one
of the worker's ``triton_urls`` (:func:`~services.mesh.domain.trust.check_triton_server`), so a
record cannot send batches to an arbitrary host; ``version`` may be omitted (Triton's policy
picks). Keeping the reference in the artifact, not in a new URI scheme, leaves the registry,
the artifact cache and the worker core unchanged, and the sha256 pins what a version points at.

Why the synchronous ``tritonclient.grpc`` client rather than ``tritonclient.grpc.aio``: the
Backend protocol is synchronous and runs in the worker's one inference thread, where blocking
is what is expected (a torch forward blocks there too). An aio client would need a private
event loop in that thread, and a ``grpc.aio`` channel is bound to the loop it was made on,
while ``load`` runs in another thread than ``run_batch``; grpc.aio on two loops of one process
(the fused gateway serves gRPC on the main one) is a known source of trouble. The sync client
sends the same ModelInfer request (raw tensor contents, per-call deadline) with none of that.

Errors map into the backend tree: gRPC INVALID_ARGUMENT -> InputRejected; a deadline past or
the server unreachable -> BackendError; anything else -> ModelCallFailed; messages are one
sanitised line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import DTYPES
from services.mesh.domain.trust import check_name, check_triton_server
from services.mesh.domain.types import Signature, TensorSpec
from services.worker.backends.base import (
    BackendError,
    InputRejected,
    ModelCallFailed,
    sanitised_reason,
    timed_sweep,
    warmup_sizes,
)

PLATFORM = "triton"


class TritonError(Exception):
    """A Triton server's error text, so that sanitised messages read ``TritonError: ...``."""


@dataclass(frozen=True, slots=True)
class TritonReference:
    """Where a ``triton`` version runs: a server's gRPC ``url``, a model name and version."""

    url: str
    model: str
    version: str = ""

    @classmethod
    def read(cls, artifact: Path, *, allowed: tuple[str, ...]) -> TritonReference:
        """The reference in the JSON file ``artifact``; BackendError naming the bad field."""
        try:
            raw = json.loads(artifact.read_text())
            if not isinstance(raw, dict):
                raise InvalidInput("a Triton reference must be a JSON object")
            version = raw.get("version", "")
            return cls(
                check_triton_server(raw.get("url"), allowed=allowed),
                check_name(raw.get("model"), field="model"),
                "" if version == "" else check_name(str(version), field="version"),
            )
        except (OSError, ValueError, InvalidInput) as exc:
            raise BackendError(f"Triton reference: {exc}") from exc


class TritonBackend:
    """Runs batches of one version on a Triton server (see the module docstring).

    ``timeout`` bounds every call to the server, in seconds.
    """

    def __init__(
        self, signature: Signature, *, triton_urls: tuple[str, ...], timeout: float = 30.0
    ) -> None:
        if not signature.inputs or not signature.outputs:
            raise BackendError("a signature needs at least one input and one output")
        for spec in (*signature.inputs, *signature.outputs):
            if spec.datatype not in DTYPES:
                raise BackendError(f"tensor {spec.name!r}: datatype {spec.datatype!r} is not "
                                   "supported by the Triton backend")
        self._signature = signature
        self._allowed = triton_urls
        self._timeout = timeout
        self._reference: TritonReference | None = None
        self._client: triton_grpc.InferenceServerClient | None = None
        self._max_batch_size = 0

    @property
    def device(self) -> str:
        """``triton``: the device is the server's business."""
        return PLATFORM

    def load(self, artifact: Path) -> None:
        """Read the reference, check the server is live, the model ready and its metadata
        agrees with the signature (BackendError naming the field that differs)."""
        reference = TritonReference.read(artifact, allowed=self._allowed)
        client = triton_grpc.InferenceServerClient(reference.url)
        try:
            self._check_server(client, reference)
        except BaseException:
            client.close()
            raise
        self._reference, self._client = reference, client

    def _check_server(
        self, client: triton_grpc.InferenceServerClient, ref: TritonReference
    ) -> None:
        where = f"Triton server {ref.url}"
        named = f"model {ref.model!r}" + (f" version {ref.version!r}" if ref.version else "")
        if not self._call(lambda: client.is_server_live(client_timeout=self._timeout), where):
            raise BackendError(f"{where} is not live")
        ready = self._call(lambda: client.is_model_ready(
            ref.model, ref.version, client_timeout=self._timeout), where)
        if not ready:
            raise BackendError(f"{named} is not ready at {where}")
        metadata = self._call(lambda: client.get_model_metadata(
            ref.model, ref.version, as_json=True, client_timeout=self._timeout), where)
        config = self._call(lambda: client.get_model_config(
            ref.model, ref.version, as_json=True, client_timeout=self._timeout), where)
        check_metadata(self._signature, metadata, named=named)
        self._max_batch_size = int(config.get("config", {}).get("max_batch_size", 0))

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        """Send zero-filled batches of many sizes up to ``max_batch_size`` through Triton;
        the median seconds per size (:func:`timed_sweep`). BackendError naming
        ``max_batch_size`` when it exceeds the Triton model's own."""
        if max_batch_size > self._max_batch_size:
            raise BackendError(
                f"max_batch_size: {max_batch_size} is more than the Triton model's "
                f"max_batch_size {self._max_batch_size}"
            )
        dummies = {
            size: {spec.name: _zeros(spec, size) for spec in self._signature.inputs}
            for size in warmup_sizes(max_batch_size)
        }
        return timed_sweep(lambda size: self._run_dummy(dummies[size]), list(dummies))

    def _run_dummy(self, inputs: Mapping[str, npt.NDArray[Any]]) -> None:
        self.run_batch(inputs)

    def run_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """One ModelInfer call with every input as raw (binary) tensor contents; outputs as
        numpy arrays, checked against the signature."""
        client, ref = self._loaded()
        requests = [_infer_input(spec, inputs) for spec in self._signature.inputs]
        sizes = {int(r.shape()[0]) for r in requests}
        if len(sizes) != 1:
            raise BackendError(f"inputs disagree on batch size: {sorted(sizes)}")
        [rows] = sizes
        wanted = [triton_grpc.InferRequestedOutput(s.name) for s in self._signature.outputs]
        result = self._call(lambda: client.infer(
            ref.model, requests, model_version=ref.version, outputs=wanted,
            client_timeout=self._timeout), f"Triton server {ref.url}")
        outputs: dict[str, npt.NDArray[Any]] = {}
        for spec in self._signature.outputs:
            array = result.as_numpy(spec.name)
            if array is None:
                raise ModelCallFailed(f"Triton returned no output {spec.name!r}")
            _check_output(spec, array, rows)
            outputs[spec.name] = array
        return outputs

    def unload(self) -> None:
        """Close the gRPC channel; the model stays loaded on the Triton server."""
        if self._client is not None:
            self._client.close()
        self._client = self._reference = None

    def _loaded(self) -> tuple[triton_grpc.InferenceServerClient, TritonReference]:
        if self._client is None or self._reference is None:
            raise BackendError("no model loaded: call load() first")
        return self._client, self._reference

    def _call(self, call: Any, where: str) -> Any:
        """``call()``, with tritonclient's errors mapped into the backend's tree."""
        try:
            return call()
        except InferenceServerException as exc:
            raise _mapped(exc, where=where, timeout=self._timeout) from exc


def _mapped(exc: InferenceServerException, *, where: str, timeout: float) -> BackendError:
    status = str(exc.status() or "")
    reason = sanitised_reason(TritonError(exc.message() or status or "no message"))
    if status.endswith("INVALID_ARGUMENT"):
        return InputRejected(reason)
    if status.endswith("DEADLINE_EXCEEDED"):
        return BackendError(f"{where} did not answer within {timeout:g} s")
    if status.endswith("UNAVAILABLE"):
        return BackendError(f"{where} is unavailable: {reason}")
    return ModelCallFailed(reason)


def check_metadata(signature: Signature, metadata: Mapping[str, Any], *, named: str) -> None:
    """BackendError naming the first tensor whose name, datatype or shape at Triton
    (``metadata``, ModelMetadata as JSON) disagrees with ``signature``.

    Each signature tensor must exist at Triton with the same datatype and rank; a dim
    Triton fixes must be fixed to the same size in the signature. Every Triton input must be
    in the signature (Triton would refuse a request without it); extra outputs are ignored.
    """
    for side, specs in (("input", signature.inputs), ("output", signature.outputs)):
        served = {t.get("name"): t for t in metadata.get(f"{side}s", [])}
        for spec in specs:
            tensor = served.get(spec.name)
            if tensor is None:
                raise BackendError(
                    f"{side} {spec.name!r}: {named} at Triton has no such {side} "
                    f"(it has {sorted(str(name) for name in served)})"
                )
            _check_tensor(spec, tensor, where=f"{side} {spec.name!r}")
    missing = sorted({str(t.get("name")) for t in metadata.get("inputs", [])}
                     - {spec.name for spec in signature.inputs})
    if missing:
        raise BackendError(f"input {missing[0]!r}: {named} at Triton needs it; the signature "
                           "does not declare it")


def _check_tensor(spec: TensorSpec, tensor: Mapping[str, Any], *, where: str) -> None:
    if tensor.get("datatype") != spec.datatype:
        raise BackendError(f"{where}: datatype {tensor.get('datatype')} at Triton, "
                           f"{spec.datatype} in the signature")
    shape = [int(dim) for dim in tensor.get("shape", [])]
    if len(shape) != len(spec.shape) or any(
        served not in (-1, declared) for served, declared in zip(shape, spec.shape, strict=True)
    ):
        raise BackendError(f"{where}: shape {shape} at Triton, {list(spec.shape)} in the "
                           "signature")


def _zeros(spec: TensorSpec, rows: int) -> npt.NDArray[Any]:
    dims = [rows] + [d if d > 0 else 1 for d in spec.shape[1:]]
    return np.zeros(dims, dtype=DTYPES[spec.datatype])


def _infer_input(
    spec: TensorSpec, inputs: Mapping[str, npt.NDArray[Any]]
) -> triton_grpc.InferInput:
    if spec.name not in inputs:
        raise BackendError(f"missing input {spec.name!r}; got {sorted(inputs)}")
    try:
        array = np.asarray(inputs[spec.name]).astype(
            DTYPES[spec.datatype], casting="safe", copy=False)
    except TypeError as exc:
        raise BackendError(f"input {spec.name!r}: {exc}") from exc
    request = triton_grpc.InferInput(spec.name, list(array.shape), spec.datatype)
    request.set_data_from_numpy(np.ascontiguousarray(array))  # raw_input_contents
    return request


def _check_output(spec: TensorSpec, array: npt.NDArray[Any], rows: int) -> None:
    expected = (rows, *spec.shape[1:])
    if len(array.shape) != len(expected) or any(
        want not in (-1, got) for want, got in zip(expected, array.shape, strict=True)
    ):
        raise BackendError(
            f"output {spec.name!r} has shape {list(array.shape)}, expected {list(expected)}"
        )
    if array.dtype != DTYPES[spec.datatype]:
        raise BackendError(
            f"output {spec.name!r} has dtype {array.dtype}, signature says {spec.datatype}"
        )
