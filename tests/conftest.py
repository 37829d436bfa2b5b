"""Shared fixtures: one private etcd and one private Postgres per test session."""

from __future__ import annotations

import asyncio
import inspect
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop
from blockbuster import blockbuster_ctx
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from deploy.localdeps import LocalEtcd, LocalPostgres, start_etcd, start_postgres
from services.mesh.infra import telemetry
from services.mesh.infra.credentials import MeshCredential


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Async tests run on uvloop, as every service does."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True)
def no_blocking_calls_on_the_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail an async test when our code makes a blocking call on the event loop thread."""
    if not inspect.iscoroutinefunction(request.function):
        yield
        return
    with blockbuster_ctx(["services", "control", "deploy"]) as buster:
        # asyncpg looks for ~/.pgpass and certificates when it opens a connection (once per
        # pool connection, never per request).
        for function in buster.functions.values():
            function.can_block_in("asyncpg/connect_utils.py", "_parse_connect_dsn_and_args")
            # The prediction journal appends a small group to the page cache on the loop
            # (`Spool.append_now`: cheaper than the thread hop; issue 13).
            function.can_block_in("services/predlog/spool.py", "_journal_now")
        yield


@pytest.fixture(scope="session", autouse=True)
def mesh_credential_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The mesh credential of the whole session (0600), named in INFERMESH_MESH_CREDENTIAL_FILE
    so every service and launcher started by a test presents and requires it."""
    path = tmp_path_factory.mktemp("mesh-secrets") / "mesh-credential"
    path.write_text(f"# test session\n{uuid.uuid4().hex}\n")
    path.chmod(0o600)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INFERMESH_MESH_CREDENTIAL_FILE", str(path))
        yield path


@pytest.fixture
def mesh_credential(mesh_credential_file: Path) -> MeshCredential:
    """The session's mesh credential, loaded (for links and registry apps built in-process)."""
    return MeshCredential.load(mesh_credential_file)


@pytest.fixture(scope="session")
def local_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """A throwaway etcd shared by the session; isolate tests with ``etcd_prefix``."""
    with start_etcd(tmp_path_factory.mktemp("etcd"), fast=True) as etcd:
        yield etcd


@pytest.fixture(scope="session")
def local_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """A throwaway Postgres cluster shared by the session; use ``database_url`` per test."""
    # Not under pytest's basetemp: another pytest run resets it to 0700, which locks the
    # postgres user out of its own data dir mid-session.
    root = Path(tempfile.mkdtemp(prefix="infermesh-test-pg-"))
    root.chmod(0o755)
    try:
        with start_postgres(root / "data", fast=True) as postgres:
            yield postgres
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def etcd_url(local_etcd: LocalEtcd) -> str:
    """Client URL of the session's etcd, with the root user's credentials (auth is on: the
    suite runs with credentials everywhere, as `infermesh up` does)."""
    return local_etcd.url


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses."""
    return f"/infermesh-test-{uuid.uuid4().hex}/"


@pytest.fixture
def database_url(local_postgres: LocalPostgres) -> str:
    """DSN of a fresh, empty database for this test, as the application role (password auth,
    no superuser)."""
    return local_postgres.create_database(f"test_{uuid.uuid4().hex}")


@pytest.fixture
def recorded_spans() -> Iterator[InMemorySpanExporter]:
    """Tracing into memory for this test, every new trace sampled unless told otherwise."""
    exporter = InMemorySpanExporter()
    telemetry.setup_tracing("test", {"INFERMESH_TRACE_SAMPLE_RATIO": "1"},
                            sinks=[SimpleSpanProcessor(exporter)])
    yield exporter
    telemetry.setup_tracing("test", {})
