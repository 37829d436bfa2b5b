"""`--fused`: every prediction served lands in `predictions` (the mesh as processes is
checked on the shared mesh, `shared_mesh/test_predlog_mesh.py`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from deploy.localdeps import LocalEtcd, LocalPostgres
from tests.integration.conftest import RunningMesh, start_mesh, stop_and_check
from tests.integration.predlog_checks import check_each_prediction_is_logged


@pytest.fixture(scope="module")
def fused_mesh(
    local_etcd: LocalEtcd, local_postgres: LocalPostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningMesh]:
    """`infermesh up --fused` on the session's etcd and a fresh database, auth off."""
    database = local_postgres.create_database(f"fused_{uuid.uuid4().hex}")
    running = start_mesh(tmp_path_factory.mktemp("fused"), fused=True, env={
        "INFERMESH_ETCD_URL": local_etcd.url, "INFERMESH_DATABASE_URL": database,
        "INFERMESH_GATEWAY_AUTH": "0",
    })
    try:
        yield running
    finally:
        stop_and_check(running)


async def test_each_prediction_is_logged_with_its_version_tenant_bucket_and_trace(
    fused_mesh: RunningMesh,
) -> None:
    await check_each_prediction_is_logged(fused_mesh)
