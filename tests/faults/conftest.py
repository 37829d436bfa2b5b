"""The fault group: one mesh on a private etcd and Postgres, and the table it fills.

The etcd and Postgres here are the group's own: pausing, killing or stopping them never
touches the session's, which other tests share. The mesh and its dependencies are started once
for the whole package (a mesh start costs 25-40 s on a busy 2-core machine): every fault ends
with the mesh serving again (each test first waits for a 200) and the supervisor has replaced
whatever a fault killed. The modules run in their usual order: the two-worker test, which
starts a worker of its own, comes after the faults that pause and kill etcd. It once failed
there (2026-12-07): a batcher's etcd watch had gone quiet without an error and it never linked
the new worker. `ConfigCache` now finds such a watch by comparing itself with etcd
(tests/mesh/test_etcd_stall.py), so the order stays as a check that it does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deploy.localdeps import start_etcd, start_postgres
from tests.faults.injectors import FaultBed, PrivateDeps
from tests.faults.load import DEADLINE
from tests.faults.summary import FaultRow, write_table
from tests.integration.conftest import mesh_on_session_deps

REPORT_ENV = "INFERMESH_FAULT_REPORT"
"""Also write the fault table (JSON) to the path this names, when set."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: processes, etcd and Postgres killed or paused under load "
        "(tests/faults; select with -m faults)",
    )


@pytest.fixture(scope="package")
def fault_deps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateDeps]:
    """A private etcd and Postgres; the ones running at the end (restarted or not) stop."""
    # Not under pytest's basetemp: another pytest run resets it to 0700 (see tests/conftest).
    pg_root = Path(tempfile.mkdtemp(prefix="infermesh-faults-pg-"))
    pg_root.chmod(0o755)
    try:
        with start_etcd(tmp_path_factory.mktemp("faults-etcd"), fast=True) as etcd:
            deps = PrivateDeps(etcd, start_postgres(pg_root / "data", fast=True))
            try:
                yield deps
            finally:
                deps.postgres.stop()
                deps.etcd.stop()
    finally:
        shutil.rmtree(pg_root, ignore_errors=True)


@pytest.fixture(scope="package")
def fault_bed(
    fault_deps: PrivateDeps, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FaultBed]:
    """`infermesh up` (services as processes, auth on) on the private etcd and Postgres."""
    with mesh_on_session_deps("faults", fault_deps.etcd, fault_deps.postgres,
                              tmp_path_factory) as mesh:
        yield FaultBed(mesh, fault_deps)


@pytest.fixture(scope="session")
def fault_table(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[FaultRow]]:
    """Rows the tests append; written as JSON under the basetemp (and to
    `$INFERMESH_FAULT_REPORT`) once the session is done. One table for every module of the
    group: a table per module would overwrite the others' at the same paths."""
    rows: list[FaultRow] = []
    yield rows
    paths = [tmp_path_factory.getbasetemp() / "faults" / "fault-table.json"]
    if os.environ.get(REPORT_ENV):
        paths.append(Path(os.environ[REPORT_ENV]))
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "deadline_s": DEADLINE}
    write_table(rows, *paths, meta=meta)
