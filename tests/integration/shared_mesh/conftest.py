"""One dev-mode mesh (auth off) for every module in this package, started once.

A mesh start costs 25-40 s on a busy 2-core machine; these modules only serve requests, add
versions and restart a killed router (`test_mesh`) and read back the prediction rows of their
own request ids (`test_predlog_mesh`), so they share one. The handoff test keeps a mesh of its
own: its SIGHUP to the launcher would replace the versions the others add. The package keeps
them contiguous: the mesh stops when its last module ends, before any other module starts a
mesh of its own beside it.
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
    """The full mesh (separate processes) on the session's etcd and a fresh database, in dev
    mode (auth off: these tests drive stock clients; the tenancy tests cover auth)."""
    with mesh_on_session_deps("mesh", local_etcd, local_postgres, tmp_path_factory,
                              INFERMESH_GATEWAY_AUTH="0") as running:
        yield running
