"""Integration fixtures: the real launcher (`infermesh up`) running every service as a process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy.localdeps import LocalEtcd, LocalPostgres, free_port
from tests.waiting import wait_for_sync


@dataclass
class RunningMesh:
    """A launcher process and what a client needs to reach it."""

    process: subprocess.Popen[str]
    state_dir: Path
    gateway: str
    registry: str
    grpc: str
    """The gateway's gRPC address, host:port."""
    prefix: str
    env: dict[str, str]
    edge_port: int = 0
    """The nginx HTTP/2 edge's h2c port (REST and gRPC)."""
    control: str = ""
    """The control API's base URL."""
    output: list[str] = field(default_factory=list)

    def control_token(self) -> str:
        """The admin secret `infermesh up` wrote for the control API."""
        return (self.state_dir / "control-token").read_text().strip()

    def api_key(self) -> str:
        """The demo tenant's API key `infermesh up` wrote (auth on, the default)."""
        return (self.state_dir / "demo-key").read_text().strip()

    def auth(self) -> dict[str, str]:
        """The Authorization header of the demo tenant."""
        return {"Authorization": f"Bearer {self.api_key()}"}

    def curl_line(self) -> str:
        return next(line.strip() for line in self.output if line.strip().startswith("curl "))

    def stop(self, timeout: float = 60.0) -> int:
        """Ctrl-C the launcher and wait for it to exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout)


def mesh_processes(marker: str) -> list[int]:
    """Pids of live processes whose environment carries `marker` (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if "State:\tZ" in (entry / "status").read_text():
                continue
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def start_mesh(state_dir: Path, *, fused: bool, env: dict[str, str]) -> RunningMesh:
    """Run `infermesh up` and wait (up to 240 s) for its banner."""
    gateway_port, registry_port, grpc_port, edge_port, control_port = (
        free_port() for _ in range(5)
    )
    prefix = env.get("INFERMESH_ETCD_PREFIX", f"/infermesh-it-{uuid.uuid4().hex[:8]}/")
    full_env = {
        **os.environ, **env, "INFERMESH_ETCD_PREFIX": prefix,
        "INFERMESH_GATEWAY_HTTP_PORT": str(gateway_port),
        "INFERMESH_GATEWAY_GRPC_PORT": str(grpc_port), "INFERMESH_EDGE_PORT": str(edge_port),
        "INFERMESH_REGISTRY_PORT": str(registry_port), "INFERMESH_TEST_MARKER": prefix,
        "INFERMESH_CONTROL_PORT": str(control_port),
    }
    args = [sys.executable, "-m", "cli", "up", "--state-dir", str(state_dir)]
    process = subprocess.Popen(
        [*args, *(["--fused"] if fused else [])], env=full_env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    mesh = RunningMesh(process, state_dir, f"http://127.0.0.1:{gateway_port}",
                       f"http://127.0.0.1:{registry_port}", f"127.0.0.1:{grpc_port}",
                       prefix, full_env, edge_port, f"http://127.0.0.1:{control_port}")
    up = threading.Event()
    threading.Thread(target=_pump, args=(mesh, up), daemon=True).start()
    try:
        came_up = up.wait(240)
    except BaseException:  # pytest-timeout, Ctrl-C: never leave a mesh running behind
        _stop_quietly(mesh)
        raise
    if not came_up:
        _stop_quietly(mesh)
        pytest.fail("infermesh up did not come up:\n" + "".join(mesh.output[-40:]))
    return mesh


def _stop_quietly(mesh: RunningMesh) -> None:
    """Ctrl-C the launcher; kill its whole mesh (every process with its marker) if that
    is not enough within 15 s."""
    try:
        mesh.stop(timeout=15)
    except subprocess.TimeoutExpired:
        for pid in [mesh.process.pid, *mesh_processes(mesh.prefix)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _pump(mesh: RunningMesh, up: threading.Event) -> None:
    assert mesh.process.stdout is not None
    for line in mesh.process.stdout:
        mesh.output.append(line)
        if line.strip().startswith("curl "):  # the banner's last line: all of it is in
            up.set()


def stop_and_check(mesh: RunningMesh) -> None:
    """Ctrl-C must stop everything the launcher started."""
    assert mesh.stop() == 0, "".join(mesh.output[-40:])
    wait_for_sync(lambda: mesh_processes(mesh.prefix), lambda left: left == [], timeout=10,
                  what="every process of the mesh to exit (observed: pids left)")


@contextmanager
def mesh_on_session_deps(
    name: str, local_etcd: LocalEtcd, local_postgres: LocalPostgres,
    tmp_path_factory: pytest.TempPathFactory, **env: str,
) -> Iterator[RunningMesh]:
    """`infermesh up` on the session's etcd and a fresh database; stopped and checked after."""
    database = local_postgres.create_database(f"{name}_{uuid.uuid4().hex}")
    running = start_mesh(
        tmp_path_factory.mktemp(name), fused=False,
        env={"INFERMESH_ETCD_URL": local_etcd.url, "INFERMESH_DATABASE_URL": database, **env},
    )
    try:
        yield running
    finally:
        stop_and_check(running)
