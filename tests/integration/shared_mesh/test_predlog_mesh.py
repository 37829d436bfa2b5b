"""The mesh as processes: every prediction served lands in `predictions` (the `--fused` case
is `tests/integration/test_predlog_fused.py`)."""

from __future__ import annotations

from tests.integration.conftest import RunningMesh
from tests.integration.predlog_checks import check_each_prediction_is_logged


async def test_each_prediction_is_logged_with_its_version_tenant_bucket_and_trace(
    mesh: RunningMesh,
) -> None:
    await check_each_prediction_is_logged(mesh)
