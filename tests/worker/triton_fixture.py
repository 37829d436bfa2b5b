"""A real `tritonserver` for tests: the pytriton venv (made once per machine) and a server.

PyPI's `tritonserver` wheel needs a newer glibc than this Debian; `nvidia-pytriton` bundles a
Triton server (2.51) that runs on CPU. It pins numpy<2 and its Python backend's stub breaks on
a pyenv-built Python, so it lives in its own venv made from Debian's `/usr/bin/python3.11`
(apt `python3.11-venv`), cached outside the repo under `~/.cache/infermesh/` (or
`$XDG_CACHE_HOME`), keyed by the pin. `triton_server.py` runs in it.

Cost: the first run on a machine installs ~370 MB into the venv (24 s here with pip's cache
warm; a download of the wheels on top otherwise); later runs find it and start the server in
~3-5 s. When the venv cannot be made (no `python3.11-venv`, no network) the tests that need it
skip, naming the command that makes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc

PYTRITON_PIN = "nvidia-pytriton==0.7.0"
DEBIAN_PYTHON = Path("/usr/bin/python3.11")
INSTALL_TIMEOUT = 900.0
START_TIMEOUT = 90.0
"""Seconds the server may take to serve the model on a busy 2-core machine (~3 s idle)."""
SERVER_SCRIPT = Path(__file__).with_name("triton_server.py")


def venv_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "infermesh" / PYTRITON_PIN.replace("==", "-") / "venv"


def make_command() -> str:
    """The shell command that makes the venv by hand."""
    venv = venv_dir()
    return f"{DEBIAN_PYTHON} -m venv {venv} && {venv}/bin/pip install '{PYTRITON_PIN}'"


def pytriton_python() -> Path:
    """The pytriton venv's Python, making the venv first if needed (once per machine: a
    `complete` marker says it finished; a lock keeps concurrent sessions from racing);
    `pytest.skip` naming the command when it cannot be made."""
    venv = venv_dir()
    python, complete = venv / "bin" / "python", venv / "complete"
    if complete.exists():
        return python
    if not DEBIAN_PYTHON.exists():
        pytest.skip(f"Triton tests need {DEBIAN_PYTHON} (apt python3.11-venv)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete.exists():
            _make_venv(venv)
            complete.write_text(PYTRITON_PIN + "\n")
    return python


def _make_venv(venv: Path) -> None:
    log = venv.parent / "install.log"
    steps = [[str(DEBIAN_PYTHON), "-m", "venv", "--clear", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", PYTRITON_PIN]]
    with log.open("w") as out:
        for step in steps:
            try:
                code = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=INSTALL_TIMEOUT, check=False).returncode
            except subprocess.TimeoutExpired:
                code = -1
            if code != 0:
                pytest.skip(f"cannot make the pytriton venv (see {log}); to make it: "
                            f"{make_command()}")


def export_mlp_weights(artifact: Path, target: Path) -> Path:
    """The demo mlp's weights (its TorchScript state dict) as an `.npz` for the server."""
    module = torch.jit.load(str(artifact))  # type: ignore[no-untyped-call]
    np.savez(target, **{name: t.detach().numpy() for name, t in module.state_dict().items()})
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TritonServer:
    """A running server: its gRPC endpoint (`host:port`) and its model."""

    url: str
    model: str = "mlp"


@contextlib.contextmanager
def running_triton(weights: Path, workdir: Path) -> Iterator[TritonServer]:
    """Start `triton_server.py` with the demo mlp's `weights`; yield once the model is ready;
    stop it (SIGINT: pytriton stops Triton and cleans up; then SIGKILL to its group)."""
    python = pytriton_python()
    grpc_port = free_port()
    args = [str(python), str(SERVER_SCRIPT), str(weights), "--workspace", str(workdir / "ws"),
            "--grpc-port", str(grpc_port), "--http-port", str(free_port()),
            "--metrics-port", str(free_port())]
    log = workdir / "triton.log"
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        server = TritonServer(f"127.0.0.1:{grpc_port}")
        _await_ready(server, process, log)
        yield server
    finally:
        _stop(process)


def _await_ready(server: TritonServer, process: subprocess.Popen[bytes], log: Path) -> None:
    client = triton_grpc.InferenceServerClient(server.url)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"the Triton server exited ({process.returncode}): "
                                     f"{log.read_text()[-3000:]}")
            with contextlib.suppress(Exception):
                if client.is_model_ready(server.model, client_timeout=1.0):
                    return
            time.sleep(0.2)  # polling a server that is starting: nothing to wait on instead
    finally:
        client.close()
    raise AssertionError(f"waited {START_TIMEOUT:g} s for Triton to serve {server.model}: "
                         f"{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the server's own group: tritonserver, stubs
    process.wait()


if __name__ == "__main__":  # `python -m tests.worker.triton_fixture`: make the venv now
    print(pytriton_python() if DEBIAN_PYTHON.exists() else make_command(), file=sys.stderr)
