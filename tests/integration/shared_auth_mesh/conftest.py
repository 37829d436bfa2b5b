"""One mesh with auth on (as `infermesh up` runs by default) for every module in this package,
started once.

A mesh start costs 25-40 s on a busy 2-core machine. These modules only serve requests, add
tenants and keys of their own (fresh names), post feedback and, for one test, run a second
gateway replica that they stop again; none restarts, kills or reconfigures what the others
use, so they share one. What each asserts is its own: its tenants' counters and quotas, the
feedback it posted (the tenancy tests post none). The second gateway deregisters when it
stops; the tenancy module runs last by name anyway. The package keeps them contiguous: the
mesh stops when its last module ends, before any other module starts a mesh of its own beside
it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deploy.localdeps import LocalEtcd, LocalPostgres
from tests.integration.conftest import RunningMesh, mesh_on_session_deps


@pytest.fixture(scope="package")
def mesh(
    local_etcd: LocalEtcd, local_postgres: LocalPostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningMesh]:
    """The full mesh (separate processes, the HTTP/2 edge in front) on the session's etcd and
    a fresh database, auth on: the demo tenant's key and the control API's admin token are
    under its state dir."""
    with mesh_on_session_deps("authmesh", local_etcd, local_postgres,
                              tmp_path_factory) as running:
        yield running
