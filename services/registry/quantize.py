"""int8 versions of ONNX models: quantized, then measured against fp32 before they are published.

`OnnxQuantizer` (the `Quantizer` of `services.registry.ports`) runs ONNX Runtime's dynamic
quantization (int8 weights, activations quantized per batch at run time) and then measures the
result against the fp32 source on the same inputs: the median time of a batch of 32 rows and of
one row under each, and the max and mean absolute error of every output. The numbers are
recorded on the derived version whatever they say, because int8 helps transformer-sized matrix
products and can slow small MLPs (onnxruntime#20052, #12854): the measurement decides, not hope.

The inputs are the warm-up inputs a worker would see, but random (zeros would hide most of the
error): normal floats, and integer ids drawn below the smallest embedding table they index (read
from the graph), so a token-id input never runs past its vocabulary. Everything blocking runs
in a thread, one quantization at a time; ONNX Runtime releases the GIL while it computes, and
its sessions run on `threads` intra-op threads with spinning off, as a worker's would.

No pre-processing pass (`quant_pre_process`) runs first: its symbolic shape inference fails on
the demo encoder exported by torch (a Reshape of non-literal rank), and without it the encoder
still gains about 3x at batch 32 on one thread here (AVX-512 VNNI).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import DTYPES
from services.mesh.domain.types import Signature, TensorSpec
from services.registry.ports import QUANTIZATION_MODES, Quantized

BATCH_ROWS = 32
"""The serving batch the speed-up is measured at (with one row beside it)."""
FREE_DIM = 8
"""The size a dynamic non-batch dimension (a sequence length, say) is measured at."""
ID_CEILING = 2
"""Ids of an integer input that indexes no table in the graph are drawn below this."""
PASS_SECONDS = 0.01
"""A timed pass repeats a fast model's run until it lasts about this long."""
SLOWER = "slower than fp32: keep fp32"

Arrays = dict[str, npt.NDArray[Any]]


class OnnxQuantizer:
    """Dynamic int8 quantization of ONNX artifacts, measured on `threads` intra-op threads,
    `passes` timed runs per batch size (the median counts)."""

    def __init__(
        self, *, threads: int = 1, passes: int = 5, seed: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._threads = threads
        self._passes = passes
        self._seed = seed
        self._clock = clock
        # One at a time: two concurrent measurements would slow each other and lie.
        self._lock = asyncio.Lock()

    async def quantize(self, source: Path, signature: Signature, *, mode: str) -> Quantized:
        """The int8 artifact of the fp32 model at `source`, and its measurement against it."""
        if mode not in QUANTIZATION_MODES:
            raise InvalidInput(f"mode: must be one of {', '.join(QUANTIZATION_MODES)}")
        async with self._lock:
            return await asyncio.to_thread(self._quantize, source, signature)

    def _quantize(self, source: Path, signature: Signature) -> Quantized:
        model = _load(source)
        bounds = id_bounds(model.graph)  # before quantizing, which may rewrite the graph
        with tempfile.TemporaryDirectory(prefix="infermesh-int8-") as scratch:
            target = Path(scratch) / "model.int8.onnx"
            # Per-channel scales keep a column of small weights from sharing the range of a
            # column of large ones: the error drops for the same speed on VNNI-less CPUs too.
            quantize_dynamic(model, target, per_channel=True, weight_type=QuantType.QInt8)
            artifact = target.read_bytes()
        rng = np.random.default_rng(self._seed)
        batches = {rows: sample_inputs(signature, rows, rng, bounds=bounds)
                   for rows in (BATCH_ROWS, 1)}
        fp32 = _session(source.read_bytes(), self._threads)
        int8 = _session(artifact, self._threads)
        return Quantized(artifact, self._measure(fp32, int8, batches, signature))

    def _measure(
        self, fp32: ort.InferenceSession, int8: ort.InferenceSession,
        batches: Mapping[int, Arrays], signature: Signature,
    ) -> dict[str, Any]:
        names = [spec.name for spec in signature.outputs]
        reference = _run(fp32, names, batches[BATCH_ROWS])
        candidate = _run(int8, names, batches[BATCH_ROWS])
        seconds = {label: {rows: self._median(session, names, inputs)
                           for rows, inputs in batches.items()}
                   for label, session in (("fp32", fp32), ("int8", int8))}
        speedup = {rows: seconds["fp32"][rows] / seconds["int8"][rows] for rows in batches}
        errors = {name: np.abs(candidate[name].astype(np.float64)
                               - reference[name].astype(np.float64)) for name in names}
        return {
            "speedup_b32": round(speedup[BATCH_ROWS], 3),
            "speedup_b1": round(speedup[1], 3),
            "max_abs_error": {name: float(err.max(initial=0.0)) for name, err in errors.items()},
            "mean_abs_error": {name: float(err.mean()) if err.size else 0.0
                               for name, err in errors.items()},
            "rows_per_s_b32": {label: round(BATCH_ROWS / s[BATCH_ROWS], 1)
                               for label, s in seconds.items()},
            "threads": self._threads,
            "passes": self._passes,
            "verdict": verdict(speedup[BATCH_ROWS], speedup[1]),
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def _median(self, session: ort.InferenceSession, names: list[str], inputs: Arrays) -> float:
        """Median seconds per run; a pass repeats the run until it lasts about `PASS_SECONDS`,
        so a model that answers in microseconds is not timed by the clock's jitter."""
        started = self._clock()
        _run(session, names, inputs)  # untimed: first-run allocations and kernel choice
        repeat = max(1, min(1000, int(PASS_SECONDS / max(self._clock() - started, 1e-6))))
        times = []
        for _ in range(self._passes):
            started = self._clock()
            for _ in range(repeat):
                _run(session, names, inputs)
            times.append((self._clock() - started) / repeat)
        return max(statistics.median(times), 1e-9)


def verdict(speedup_b32: float, speedup_b1: float) -> str:
    """What the numbers say to do: int8 earns its place only by being faster at batch 32."""
    if speedup_b32 < 1.0:
        return SLOWER
    one_row = "" if speedup_b1 >= 1.0 else f" (slower at 1 row: {speedup_b1:.2f}x)"
    return f"faster than fp32: {speedup_b32:.2f}x at batch {BATCH_ROWS}{one_row}"


def id_bounds(graph: onnx.GraphProto) -> dict[str, int]:
    """For each graph input used (directly or through a Cast) as the indices of a Gather
    over a constant table, the smallest such table's row count: ids must stay below it."""
    tables = {init.name: int(init.dims[0]) for init in graph.initializer if init.dims}
    sources = {node.output[0]: node.input[0] for node in graph.node
               if node.op_type == "Cast" and node.input and node.output}
    bounds: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in tables:
            continue
        name = sources.get(node.input[1], node.input[1])
        bounds[name] = min(bounds.get(name, tables[node.input[0]]), tables[node.input[0]])
    return bounds


def sample_inputs(
    signature: Signature, rows: int, rng: np.random.Generator, *, bounds: Mapping[str, int]
) -> Arrays:
    """Random inputs of `rows` rows shaped from the signature (dim 0 is the batch)."""
    return {spec.name: _sample(spec, rows, rng, bounds.get(spec.name, ID_CEILING))
            for spec in signature.inputs}


def _sample(
    spec: TensorSpec, rows: int, rng: np.random.Generator, ceiling: int
) -> npt.NDArray[Any]:
    if spec.datatype not in DTYPES:
        raise InvalidInput(f"signature: input '{spec.name}' is {spec.datatype}; only numeric "
                           "inputs can be measured for quantization")
    dtype = DTYPES[spec.datatype]
    shape = tuple(rows if i == 0 and d == -1 else FREE_DIM if d == -1 else d
                  for i, d in enumerate(spec.shape))
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.integers(0, max(1, ceiling), shape).astype(dtype)


def _load(source: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(source))
    except Exception as exc:  # onnx raises DecodeError and friends for a file not ONNX
        raise InvalidInput(f"artifact: not a readable ONNX model ({type(exc).__name__})") from None


def _session(model: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, names: list[str], inputs: Arrays) -> Arrays:
    try:
        outputs = session.run(names, dict(inputs))
    except Exception as exc:  # onnxruntime's errors carry the graph; one line is enough
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise InvalidInput(f"signature: the model does not run on inputs shaped from the "
                           f"version's signature ({reason})") from None
    return dict(zip(names, (np.asarray(out) for out in outputs), strict=True))
