"""Private etcd and Postgres instances for the local launcher and for test fixtures.

Each instance lives in a data directory of its own, listens on 127.0.0.1 (and on ``host`` when
one is given: a network namespace's address, tests/integration/netns.py), and runs in its own
process group so that Ctrl-C in a terminal does not reach it before ``stop()``.
Starting again on an existing data directory reuses its contents (``make up`` is idempotent),
and a server left running by a killed launcher is stopped before the new one starts.

Both run with credentials (docs/SECURITY.md): etcd with auth on, a ``root`` user and one user
per service (``deploy/etcd_users.py``); Postgres with ``scram-sha-256`` and an application role
that owns the app database but is no superuser. Passwords live in a secrets directory, by
default ``<data dir>/../secrets`` (``<state dir>/secrets`` for ``infermesh up``), files 0600.
"""

from __future__ import annotations

import contextlib
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Self
from urllib.parse import quote

from deploy.etcd_users import ROOT, ensure_secret, etcd_passwords, provision

_START_TIMEOUT = 20.0
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie awaiting its reaper counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} still running {timeout} s after stop")
        time.sleep(0.01)


def _private_log(path: Path) -> IO[bytes]:
    """``path`` opened for appending, created 0600."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _ContextStop:
    """Mixin: ``with`` support that calls ``stop()`` on exit."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- etcd


class LocalEtcd(_ContextStop):
    """A running single-member etcd with auth on.

    ``url`` carries the root user's credentials (for operators and tests), ``url_for(user)``
    a service user's, and ``endpoint`` none (health checks)."""

    def __init__(
        self, process: subprocess.Popen[bytes], log: IO[bytes], data_dir: Path, port: int,
        *, passwords: dict[str, str] | None = None, host: str = "127.0.0.1",
    ):
        self.process = process
        self.data_dir = data_dir
        self.port = port
        self.host = host
        """The address clients dial (`url_for`); `endpoint` stays on loopback."""
        self.endpoint = f"http://127.0.0.1:{port}"
        self.passwords = dict(passwords or {})
        self._log = log

    @property
    def url(self) -> str:
        """Client URL with the root user's credentials."""
        return self.url_for(ROOT)

    def url_for(self, user: str) -> str:
        """Client URL with `user`'s credentials (a service name, ``fused`` or ``root``)."""
        return f"http://{user}:{quote(self.passwords[user], safe='')}@{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """Process id of the etcd server."""
        return self.process.pid

    def stop(self) -> None:
        """Terminate etcd and wait for it to exit; calling it again does nothing."""
        if self.process.poll() is None:
            _terminate_group(self.process)
        self._log.close()
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "etcd.pid").unlink()


def _terminate_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _kill_stale_etcd(data_dir: Path) -> None:
    """Stop an etcd a killed launcher left running on this data directory."""
    pid_file = data_dir / "etcd.pid"
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"etcd" not in cmdline or str(data_dir / "data").encode() not in cmdline:
        return
    os.kill(pid, signal.SIGTERM)
    _wait_gone(pid)


def _etcd_command(data_dir: Path, port: int, peer_port: int, fast: bool,
                  host: str = "127.0.0.1") -> list[str]:
    client, peer = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
    advertised = f"http://{host}:{port}"
    flags = {
        "--name": "infermesh",
        "--data-dir": str(data_dir / "data"),
        "--listen-client-urls": client if advertised == client else f"{client},{advertised}",
        "--advertise-client-urls": advertised,
        "--listen-peer-urls": peer,
        "--initial-advertise-peer-urls": peer,
        "--initial-cluster": f"infermesh={peer}",
    }
    command = ["etcd", *(part for flag in flags.items() for part in flag)]
    if fast:
        # Throwaway etcds: the cheapest bcrypt, so that each user and each authentication
        # costs ~1 ms instead of ~50 ms (passwords are random 24-byte tokens either way).
        # Test-only timings: a single member elects itself in ~0.1 s instead of ~1 s.
        command += ["--bcrypt-cost=4", "--heartbeat-interval=10", "--election-timeout=100"]
    return command


def _etcd_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return b'"true"' in response.read()
    except (urllib.error.URLError, OSError):
        return False


def start_etcd(
    data_dir: Path, *, port: int | None = None, fast: bool = False,
    prefix: str = "/infermesh/", secrets_dir: Path | None = None, host: str = "127.0.0.1",
) -> LocalEtcd:
    """Start etcd on ``data_dir``, wait until it reports healthy (RuntimeError otherwise), and
    make sure auth is on with the users of ``deploy/etcd_users.py`` on the mesh ``prefix``.
    It listens on loopback and on ``host``, the address its URLs name."""
    data_dir = data_dir.resolve()
    passwords = etcd_passwords(secrets_dir or data_dir.parent / "secrets")
    data_dir.mkdir(parents=True, exist_ok=True)
    _kill_stale_etcd(data_dir)
    port = port or free_port()
    if not _port_free(port):
        raise RuntimeError(f"etcd client port {port} is already in use")
    env = dict(os.environ)
    if platform.machine() == "aarch64":
        env["ETCD_UNSUPPORTED_ARCH"] = "arm64"
    log_path = data_dir / "etcd.log"
    log = _private_log(log_path)
    process = subprocess.Popen(
        _etcd_command(data_dir, port, free_port(), fast, host),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    etcd = LocalEtcd(process, log, data_dir, port, passwords=passwords, host=host)
    (data_dir / "etcd.pid").write_text(str(process.pid))
    deadline = time.monotonic() + _START_TIMEOUT
    while not _etcd_healthy(etcd.endpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            etcd.stop()
            raise RuntimeError(
                f"etcd did not become healthy on {etcd.endpoint}:\n{_log_tail(log_path)}")
        time.sleep(0.02)
    try:
        provision(etcd.endpoint, prefix, passwords)
    except (RuntimeError, OSError):
        etcd.stop()
        raise
    return etcd


# ----------------------------------------------------------------------- Postgres


def _pg_bin() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not candidates:
        raise RuntimeError("no /usr/lib/postgresql/*/bin found; run scripts/bootstrap.sh")
    return candidates[-1]


def _as_root() -> bool:
    return os.geteuid() == 0


def _pg_run(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a Postgres server binary, as the postgres user when we are root."""
    prefix = ["runuser", "-u", "postgres", "--"] if _as_root() else []
    return subprocess.run(
        [*prefix, str(_pg_bin() / args[0]), *args[1:]],
        cwd=cwd,
        check=check,
        capture_output=True,
        text=True,
    )


def _make_traversable(path: Path, uid: int, gid: int) -> None:
    """Give ``uid`` search permission on every ancestor of ``path`` that lacks it."""
    for parent in reversed(path.parents):
        st = parent.stat()
        if st.st_mode & 0o001:
            continue
        if (st.st_uid == uid and st.st_mode & 0o100) or (st.st_gid == gid and st.st_mode & 0o010):
            continue
        # Search only (o+x), never read: e.g. pytest's 0700 /tmp/pytest-of-root.
        parent.chmod(st.st_mode | 0o001)


def _prepare_pg_dir(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data_dir.chmod(0o700)
    if _as_root():
        postgres = pwd.getpwnam("postgres")
        _make_traversable(data_dir, postgres.pw_uid, postgres.pw_gid)
        os.chown(data_dir, postgres.pw_uid, postgres.pw_gid)


def _recover_pid_file(data_dir: Path) -> None:
    """Stop a server left running on ``data_dir``, or drop its stale postmaster.pid."""
    pid_file = data_dir / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    # A SIGKILLed postmaster may linger as a zombie, which pg_ctl still takes for a live server.
    if not process_gone(pid):
        _pg_run(
            "pg_ctl", "-D", str(data_dir), "-m", "fast", "-w", "stop", cwd=data_dir, check=False
        )
        _wait_gone(pid)
    pid_file.unlink(missing_ok=True)


APP_ROLE = "infermesh"
"""The application's Postgres role: owns the app databases, runs migrations, no superuser."""


class LocalPostgres(_ContextStop):
    """A running private Postgres cluster with password auth. ``dsn`` points at the ``infermesh``
    database as the application role; ``superuser_dsn`` at ``postgres`` as the superuser."""

    def __init__(self, data_dir: Path, port: int, socket_dir: Path, *, superuser_password: str = "",
                 app_password: str = "", host: str = "127.0.0.1"):
        self.data_dir = data_dir
        self.port = port
        self.host = host
        """The address the DSNs name (the superuser's psql stays on loopback)."""
        self.superuser_password = superuser_password
        self.app_password = app_password
        self.dsn = self._dsn(APP_ROLE, app_password, APP_ROLE)
        self.superuser_dsn = self._dsn("postgres", superuser_password, "postgres")
        self.pid: int | None = None  # the postmaster's, once started
        self._socket_dir = socket_dir
        self._stopped = False

    def _dsn(self, role: str, password: str, database: str) -> str:
        return f"postgresql://{role}:{quote(password, safe='')}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database called ``name``, owned by the application role, and return
        its DSN (as that role)."""
        if not _IDENTIFIER.match(name):
            raise ValueError(f"not a plain SQL identifier: {name!r}")
        self.superuser_sql(f'CREATE DATABASE "{name}" OWNER {APP_ROLE}')
        return self._dsn(APP_ROLE, self.app_password, name)

    def superuser_sql(self, script: str, **variables: str) -> str:
        """Run ``script`` through psql as the superuser; its output (RuntimeError on error)."""
        connection = f"-h 127.0.0.1 -p {self.port} -U postgres -d postgres -X -q -At".split()
        names = [part for key, value in variables.items() for part in ("-v", f"{key}={value}")]
        result = subprocess.run(
            ["psql", *connection, "-v", "ON_ERROR_STOP=1", *names], input=script,
            capture_output=True, text=True,
            env={**os.environ, "PGPASSWORD": self.superuser_password},
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql as superuser failed: {result.stderr.strip()}")
        return result.stdout

    def stop(self) -> None:
        """Stop the server (fast shutdown) and wait for it; calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        data = str(self.data_dir)
        _pg_run("pg_ctl", "-D", data, "-m", "fast", "-w", "stop", cwd=self.data_dir, check=False)
        # pg_ctl returns once postmaster.pid is gone, a moment before the process itself exits.
        if self.pid is not None:
            _wait_gone(self.pid)
        shutil.rmtree(self._socket_dir, ignore_errors=True)


def _server_options(port: int, socket_dir: Path, fast: bool, host: str = "127.0.0.1") -> str:
    listen = "127.0.0.1" if host == "127.0.0.1" else f"127.0.0.1,{host}"
    options = f"-p {port} -k {socket_dir} -c listen_addresses={listen}"
    if fast:
        # Throwaway test clusters only: durability traded for speed.
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    return options


def _make_socket_dir() -> Path:
    # Short path under /tmp: unix socket paths are limited to ~107 bytes.
    socket_dir = Path(tempfile.mkdtemp(prefix="infermesh-pg-"))
    if _as_root():
        postgres = pwd.getpwnam("postgres")
        os.chown(socket_dir, postgres.pw_uid, postgres.pw_gid)
    return socket_dir


_APP_SETUP = f"""
SELECT format('CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L',
              :'app_password')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') \\gexec
SELECT format('ALTER ROLE {APP_ROLE} PASSWORD %L', :'app_password') \\gexec
SELECT 'CREATE DATABASE {APP_ROLE} OWNER {APP_ROLE}'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{APP_ROLE}') \\gexec
"""


def start_postgres(
    data_dir: Path, *, port: int | None = None, fast: bool = False,
    secrets_dir: Path | None = None, host: str = "127.0.0.1",
) -> LocalPostgres:
    """Start (initialising if needed) a Postgres cluster in ``data_dir`` and wait until ready;
    the superuser and the application role have passwords from ``secrets_dir``. With a
    ``host`` other than loopback it listens there too, for clients on that host's subnets."""
    data_dir = data_dir.resolve()
    secrets_dir = secrets_dir or data_dir.parent / "secrets"
    initialised = (data_dir / "PG_VERSION").exists()
    if initialised and not (secrets_dir / "postgres-superuser").exists():
        raise RuntimeError(f"{data_dir} was initialised without a password (before password "
                           f"auth); remove it to start afresh")
    superuser = ensure_secret(secrets_dir / "postgres-superuser")
    app = ensure_secret(secrets_dir / "postgres-app")
    _prepare_pg_dir(data_dir)
    if not initialised:
        _initdb(data_dir, superuser)
    if host != "127.0.0.1":
        _allow_samenet(data_dir)
    _recover_pid_file(data_dir)
    port = port or free_port()
    socket_dir = _make_socket_dir()
    postgres = LocalPostgres(data_dir, port, socket_dir, superuser_password=superuser,
                             app_password=app, host=host)
    try:
        options = _server_options(port, socket_dir, fast, host)
        log = str(data_dir / "server.log")
        _checked(data_dir, "pg_ctl", "-D", str(data_dir), "-l", log, "-w", "-t", "30",
                 "-o", options, "start")
        postgres.superuser_sql(_APP_SETUP, app_password=app)
    except RuntimeError:
        postgres.stop()
        raise
    postgres.pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    return postgres


def _initdb(data_dir: Path, superuser_password: str) -> None:
    """A new cluster with password (scram-sha-256) auth on every connection, local ones too."""
    scratch = _make_socket_dir()  # private to us (and postgres, when we are root)
    pwfile = scratch / "pwfile"
    try:
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(superuser_password + "\n")
        if _as_root():
            postgres = pwd.getpwnam("postgres")
            os.chown(pwfile, postgres.pw_uid, postgres.pw_gid)
        flags = (f"-U postgres --auth=scram-sha-256 --pwfile={pwfile} -E UTF8 "
                 "--locale=C.UTF-8 --no-sync").split()
        _checked(data_dir, "initdb", "-D", str(data_dir), *flags)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_SAMENET = "host all all samenet scram-sha-256\n"


def _allow_samenet(data_dir: Path) -> None:
    """Let clients on the server's own subnets in, with a password (initdb allows loopback)."""
    hba = data_dir / "pg_hba.conf"
    if _SAMENET not in hba.read_text():
        with hba.open("a") as handle:
            handle.write(_SAMENET)


def _checked(data_dir: Path, *args: str) -> None:
    """Run a server binary; on failure raise RuntimeError with its output and the server log."""
    result = _pg_run(*args, cwd=data_dir, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{args[0]} failed ({result.returncode}) for {data_dir}:\n"
            f"{result.stdout}{result.stderr}\n{_log_tail(data_dir / 'server.log')}"
        )
