"""A local GPU ``tritonserver`` serving one ONNX model, for ``scripts/cuda_check.py``.

The model repository holds the export with ``instance_group [{kind: KIND_GPU}]``, so Triton
refuses to load it rather than fall back to CPU; inputs and outputs come from the ONNX file
(Triton's auto-complete). The server is stopped (SIGINT, then SIGKILL) however the check ends.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from services.mesh.domain.types import Signature
from services.worker.backends.triton import TritonBackend
from services.worker.demo_models import DemoModel

START_TIMEOUT_S = 120.0
CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
instance_group [{{ kind: KIND_GPU, count: 1 }}]
"""


@contextlib.contextmanager
def served_by_triton(
    server: str, onnx_file: Path, demo: DemoModel, workdir: Path
) -> Iterator[TritonBackend]:
    """A loaded Triton backend whose batches run on `server` (the binary) serving `onnx_file`."""
    repository = _repository(onnx_file, demo, workdir)
    grpc, http, metrics = (_free_port() for _ in range(3))
    log = (workdir / "tritonserver.log").open("w")
    process = subprocess.Popen(
        [server, f"--model-repository={repository}", f"--grpc-port={grpc}",
         f"--http-port={http}", f"--metrics-port={metrics}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        url = f"127.0.0.1:{grpc}"
        reference = workdir / "reference.json"
        reference.write_text(json.dumps({"url": url, "model": demo.name}))
        backend = TritonBackend(Signature.from_json(demo.signature), triton_urls=(url,))
        _load_when_ready(backend, reference, process, log_file=workdir / "tritonserver.log")
        yield backend
    finally:
        process.send_signal(2)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _repository(onnx_file: Path, demo: DemoModel, workdir: Path) -> Path:
    repository = workdir / "models"
    version_dir = repository / demo.name / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_file, version_dir / "model.onnx")
    config = CONFIG.format(name=demo.name, max_batch_size=demo.batching["max_batch_size"])
    (repository / demo.name / "config.pbtxt").write_text(config)
    return repository


def _load_when_ready(backend: TritonBackend, reference: Path, process: subprocess.Popen[bytes],
                     *, log_file: Path) -> None:
    """Load the backend once the server serves the model; RuntimeError with the log's tail
    when the server exits or is not ready within START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"tritonserver exited {process.returncode}: {_tail(log_file)}")
        try:
            backend.load(reference)
            return
        except Exception:  # not live or the model not ready yet: poll until the deadline
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def _tail(log_file: Path, lines: int = 5) -> str:
    return " | ".join(log_file.read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
