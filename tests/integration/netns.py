"""Linux network namespaces as hosts for tests: a private switch, hosts on it, code run inside.

`Fabric.build` makes a namespace that holds nothing but a bridge (the switch: the host's own
network is never touched), then one namespace per host, each joined to the bridge by a veth
pair and given an address on `SUBNET`.0/24 (loopback up too). Namespaces are named
`imesh-{pid}-{host}` after the pid of the test process, so parallel runs never share one and
`remove_stale` can tell a crashed run's leftovers (a dead pid) from a live run's.

Code reaches a host in two ways: a service process started through `ip netns exec`
(`spawn`), or a function run on a thread of its own that joined the host's namespace
(`call_in`): every socket that thread opens, and every process it starts, lives there (a
network namespace belongs to a thread, not to the whole process).

`Fabric.close` kills whatever still runs in the namespaces and deletes them (the veths and the
bridge go with them); it is safe to call on a half-built fabric and more than once.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

from deploy.localdeps import process_gone

T = TypeVar("T")

PREFIX = "imesh-"
SUBNET = "10.77.0"
"""The first three octets of every host's address; private, and only inside the fabric."""
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
REPO = Path(__file__).resolve().parents[2]

_libc = ctypes.CDLL(None, use_errno=True)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run iproute2's `ip` with `args`; CalledProcessError (with its stderr) on failure."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, ["ip", *args],
                                            result.stdout, result.stderr)
    return result


def namespaces_refused() -> str | None:
    """Why this machine cannot build a fabric (no `ip`, no CAP_NET_ADMIN, a kernel without
    network namespaces, veths or bridges), or None when it can."""
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
    except FileNotFoundError:
        return "iproute2's `ip` is not installed (scripts/bootstrap.sh installs it)"
    except subprocess.CalledProcessError as exc:
        return ("network namespaces refused (this needs root, or CAP_SYS_ADMIN and "
                f"CAP_NET_ADMIN, on a kernel with them): `ip netns add`: {exc.stderr.strip()}")
    try:
        ip("-n", probe, "link", "add", "br0", "type", "bridge")
        ip("-n", probe, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
    except subprocess.CalledProcessError as exc:
        return f"the kernel refuses bridges or veth pairs in a namespace: {exc.stderr.strip()}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def kill_everything_in(namespace: str) -> None:
    """SIGKILL every process left in `namespace` and wait until each is gone."""
    listed = ip("netns", "pids", namespace, check=False).stdout.split()
    pids = [int(pid) for pid in listed if pid.isdigit() and int(pid) != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        _wait_gone(pid, timeout=10)


def _wait_gone(pid: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not process_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def remove_stale() -> None:
    """Delete the namespaces (and kill the processes in them) of earlier runs that died
    without cleaning up: those whose test process is gone."""
    if not NETNS_DIR.is_dir():
        return
    for entry in NETNS_DIR.iterdir():
        owner = entry.name.removeprefix(PREFIX).split("-", 1)[0]
        if entry.name.startswith(PREFIX) and owner.isdigit() and process_gone(int(owner)):
            kill_everything_in(entry.name)
            ip("netns", "del", entry.name, check=False)


@dataclass
class Fabric:
    """A switch and the hosts on it; `address[host]` is where peers reach `host`."""

    run_id: str
    address: dict[str, str] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    """Every namespace created so far, the switch first (what `close` deletes)."""

    @classmethod
    def build(cls, hosts: Sequence[str]) -> Fabric:
        """A switch namespace with a bridge and a namespace per host wired to it; on failure
        whatever was made is deleted again."""
        fabric = cls(run_id=f"{PREFIX}{os.getpid()}")
        try:
            switch = fabric._add_namespace("switch")
            ip("-n", switch, "link", "add", "br0", "type", "bridge")
            ip("-n", switch, "link", "set", "br0", "up")
            for number, host in enumerate(hosts, start=1):
                fabric._add_host(host, f"{SUBNET}.{10 * number}")
        except BaseException:
            fabric.close()
            raise
        return fabric

    def namespace(self, host: str) -> str:
        return f"{self.run_id}-{host}"

    def _add_namespace(self, host: str) -> str:
        name = self.namespace(host)
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def _add_host(self, host: str, address: str) -> None:
        name, switch, port = self._add_namespace(host), self.namespace("switch"), f"to-{host}"
        ip("-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
           "netns", name)
        ip("-n", switch, "link", "set", port, "master", "br0", "up")
        ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        self.address[host] = address

    def call_in(self, host: str, function: Callable[[], T]) -> T:
        """`function()` run on a fresh thread inside `host`'s network namespace."""
        return call_in(self.namespace(host), function)

    def spawn(self, host: str, module: str, *, env: dict[str, str],
              log: IO[bytes]) -> subprocess.Popen[bytes]:
        """`python -m module` in `host`'s namespace (`ip netns exec` execs: the process is the
        service itself, a child of this one)."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.namespace(host), sys.executable, "-m", module],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )

    def close(self) -> None:
        """Kill what still runs in each namespace, then delete them all (hosts first)."""
        for name in reversed(self.namespaces):
            kill_everything_in(name)
            ip("netns", "del", name, check=False)
        self.namespaces.clear()


def call_in(namespace: str, function: Callable[[], T]) -> T:
    """`function()` on a thread of its own that joined `namespace` (by name, as `ip netns`
    keeps it); its result, or its exception re-raised here."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def enter_and_call() -> None:
        try:
            _enter(namespace)
            outcome.append(function())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=enter_and_call, name=f"netns {namespace}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _enter(namespace: str) -> None:
    """Move the calling thread into `namespace`'s network (setns(2); os.setns is 3.12+)."""
    fd = os.open(NETNS_DIR / namespace, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns into {namespace}: {os.strerror(error)}")
    finally:
        os.close(fd)
