"""Turning a TorchScript artifact into an ONNX one for the ``onnxruntime_onnx`` platform.

``torch.onnx.export`` with the TorchScript-based exporter (``dynamo=False``: the torch.export
one refuses a ScriptModule), every input and output with a dynamic batch dim (dim 0) and the
signature's names. A scripted graph with data-dependent control flow cannot be exported as
is: ``nn.TransformerEncoder``'s fast-path checks (``is_autocast_enabled`` in a ``prim::If``)
stop the exporter. Such a model is rebuilt from its eager class with the TorchScript file's
weights and traced instead: named by ``module`` (``package.module:Class``, built with no
arguments), or found among the demo models by the ScriptModule's class name.

Every export is checked before it is kept: ONNX Runtime runs it on the same sample batch as
TorchScript and the largest absolute difference is reported (and must be under
``max_abs_error``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.mesh.domain.types import Signature
from services.worker.backends.base import BackendError, sanitised_reason
from services.worker.backends.onnx import OnnxBackend
from services.worker.backends.specs import BackendTensor, tensors_of

OPSET = 17
SAMPLE_ROWS = 3
MAX_ABS_ERROR = 1e-3


class ConversionError(ValueError):
    """The model could not be exported to ONNX, or the export disagrees with TorchScript."""


@dataclass(frozen=True)
class Conversion:
    """An exported model: where it is, how it was made, how far it is from TorchScript."""

    artifact: Path
    traced_from: str
    """``torchscript`` (the scripted graph) or the eager class it was rebuilt from."""
    max_abs_error: float


def convert_torchscript(
    artifact: Path, signature: Signature, out: Path, *, module: str | None = None,
    max_abs_error: float = MAX_ABS_ERROR,
) -> Conversion:
    """Export the TorchScript file `artifact` (described by `signature`) to `out`, checked
    against TorchScript on a sample batch; ConversionError with one line saying why not."""
    try:
        scripted = torch.jit.load(str(artifact), map_location="cpu").eval()  # type: ignore[no-untyped-call]
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConversionError(f"cannot load TorchScript {artifact.name}: "
                              f"{sanitised_reason(exc)}") from exc
    inputs, outputs = tensors_of(signature)
    sample = [_sample(spec) for spec in inputs]
    # The reference first: exporting runs graph passes over the scripted module in place.
    expected = _reference(scripted, sample)
    candidates = _candidates(scripted, module)
    failures = []
    for name, model in candidates:
        try:
            _export(model, inputs, outputs, sample, out)
        except Exception as exc:  # the exporter raises many types; the next candidate may do
            failures.append(f"{name}: {sanitised_reason(exc)}")
            continue
        error = _max_abs_error(signature, out, inputs, outputs, sample, expected)
        if error > max_abs_error:
            raise ConversionError(f"the ONNX export differs from TorchScript by {error:.3g} "
                                  f"(more than {max_abs_error:g})")
        return Conversion(out, name, error)
    hint = "" if module else "; name its eager class with --module package.module:Class"
    raise ConversionError(f"cannot export to ONNX ({'; '.join(failures)}){hint}")


def _candidates(scripted: torch.jit.ScriptModule, module: str | None) -> list[tuple[str, Any]]:
    """What to export, in order: the named eager class, else the scripted graph and then a
    demo model's eager class of the same name (each eager one with the scripted weights)."""
    if module:
        return [(module, _eager(_class_named(module), scripted))]
    found: list[tuple[str, Any]] = [("torchscript", scripted)]
    from services.worker import demo_models

    demo_class = getattr(demo_models, str(getattr(scripted, "original_name", "")), None)
    if isinstance(demo_class, type) and issubclass(demo_class, torch.nn.Module):
        found.append((f"{demo_class.__module__}:{demo_class.__name__}",
                      _eager(demo_class, scripted)))
    return found


def _class_named(path: str) -> type[torch.nn.Module]:
    module_name, _, class_name = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConversionError(f"module: cannot import {path!r} ({exc})") from None
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module)):
        raise ConversionError(f"module: {path!r} is not a torch.nn.Module class")
    return found


def _eager(cls: type[torch.nn.Module], scripted: torch.jit.ScriptModule) -> torch.nn.Module:
    try:
        model = cls()
        model.load_state_dict(scripted.state_dict())
    except Exception as exc:  # a constructor needing arguments, weights of another shape
        raise ConversionError(f"module: cannot rebuild {cls.__name__} with the TorchScript "
                              f"weights: {sanitised_reason(exc)}") from None
    return model.eval()


def _export(model: Any, inputs: list[BackendTensor], outputs: list[BackendTensor],
            sample: list[np.ndarray], out: Path) -> None:
    names = [spec.name for spec in inputs + outputs]
    with (tempfile.TemporaryDirectory(dir=out.parent) as staging, warnings.catch_warnings(),
          _quiet_stdout()):
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        staged = Path(staging) / out.name
        torch.onnx.export(
            model, tuple(torch.from_numpy(a) for a in sample), str(staged), dynamo=False,
            input_names=[spec.name for spec in inputs],
            output_names=[spec.name for spec in outputs],
            dynamic_axes={name: {0: "batch"} for name in names}, opset_version=OPSET,
        )
        os.replace(staged, out)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """File descriptor 1 to /dev/null: when the exporter fails, its C++ side prints the whole
    graph (thousands of lines) to stdout; the reason is in the exception."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _reference(scripted: torch.jit.ScriptModule, sample: list[np.ndarray]) -> list[np.ndarray]:
    try:
        with torch.no_grad():
            raw = scripted(*(torch.from_numpy(a.copy()) for a in sample))
    except Exception as exc:  # the model's own error, e.g. inputs of another dtype
        raise ConversionError(f"the TorchScript model fails on inputs shaped by the "
                              f"signature: {sanitised_reason(exc)}") from exc
    return [t.numpy() for t in (raw if isinstance(raw, tuple | list) else [raw])]


def _max_abs_error(signature: Signature, onnx_file: Path, inputs: list[BackendTensor],
                   outputs: list[BackendTensor], sample: list[np.ndarray],
                   expected: list[np.ndarray]) -> float:
    backend = OnnxBackend(signature, device_policy="cpu")
    try:
        backend.load(onnx_file)
        got = backend.run_batch({spec.name: a for spec, a in zip(inputs, sample, strict=True)})
    except BackendError as exc:
        raise ConversionError(f"ONNX Runtime cannot run the export: {exc}") from exc
    errors = [np.abs(got[spec.name].astype(np.float64) - want).max()
              for spec, want in zip(outputs, expected, strict=False)]
    return float(max(errors, default=0.0))


def _sample(spec: BackendTensor) -> np.ndarray:
    """A small deterministic batch: normal floats, 0/1 integers (a valid index for any table)."""
    shape = [SAMPLE_ROWS] + [d if d > 0 else 1 for d in spec.shape[1:]]
    rng = np.random.default_rng(0)
    if spec.dtype.kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 2, shape).astype(spec.dtype)
