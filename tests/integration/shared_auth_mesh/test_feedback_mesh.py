"""Feedback against the running mesh (auth on, as `infermesh up` runs by default): inference
requests with known request ids, feedback posted for some of them (over HTTP/1.1 and through
the HTTP/2 edge), and the control API's report and `infermesh report` showing the predictions
(written by the routers' prediction log, asynchronously) with their feedback joined.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import httpx
import orjson
import pytest

from cli.main import main
from tests.integration.conftest import RunningMesh
from tests.integration.oip import infer_body, mlp_input, output_array, post_infer
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)

REPORT_WAIT = 20.0
"""Seconds the prediction log may take to show the predictions."""


async def _feedback(
    session: aiohttp.ClientSession, mesh: RunningMesh, body: dict[str, Any], *,
    headers: dict[str, str],
) -> tuple[int, dict[str, Any]]:
    async with session.post(f"{mesh.gateway}/v1/feedback", json=body,
                            headers=headers) as response:
        return response.status, await response.json()


async def _totals(session: aiohttp.ClientSession, mesh: RunningMesh) -> dict[str, Any]:
    """The mlp report's rows summed: predictions, label and score feedback, and the rows."""
    headers = {"Authorization": f"Bearer {mesh.control_token()}"}
    async with session.get(f"{mesh.control}/v1/models/mlp/report",
                           headers=headers) as response:
        report = await response.json()
        assert response.status == 200, report
    rows = report["rows"]
    return {key: sum(row[key] for row in rows)
            for key in ("predictions", "with_label_feedback", "with_score_feedback")} | {
        "rows": rows}


async def _wait_for_report(
    session: aiohttp.ClientSession, mesh: RunningMesh, wanted: dict[str, int]
) -> dict[str, Any]:
    return await wait_for(
        lambda: _totals(session, mesh),
        lambda totals: all(totals[key] >= count for key, count in wanted.items()),
        timeout=REPORT_WAIT, what=f"the report to show {wanted}",
    )


def _weighted(rows: list[dict[str, Any]], field: str, weight: str) -> float:
    """`field` over all rows, each row's value weighted by its `weight` count."""
    counted = [row for row in rows if row[weight]]
    total: float = sum(row[field] * row[weight] for row in counted)
    count: int = sum(row[weight] for row in counted)
    return total / count


async def test_feedback_joins_its_prediction_in_the_report(
    mesh: RunningMesh, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = [f"fb-{uuid.uuid4().hex[:12]}-{n}" for n in range(6)]
    predicted: list[int] = []
    async with aiohttp.ClientSession() as session:
        for n, request_id in enumerate(ids):
            status, body, headers = await post_infer(
                session, f"{mesh.gateway}/v2/models/mlp/infer",
                infer_body("features", mlp_input(1, seed=n)),
                headers={**mesh.auth(), "X-Request-Id": request_id},
            )
            assert status == 200 and headers["x-request-id"] == request_id
            predicted.append(int(output_array(body).argmax()))

        no_key = await _feedback(session, mesh, {"request_id": ids[0], "label": 0}, headers={})
        assert no_key[0] == 401
        # Two right (as an integer and as text), one wrong: accuracy 2/3.
        labels = (predicted[0], str(predicted[1]), f"not-{predicted[2]}")
        for request_id, label in zip(ids[:3], labels, strict=True):
            answer = await _feedback(session, mesh, {"request_id": request_id, "label": label},
                                     headers=mesh.auth())
            assert answer == (200, {"request_id": request_id, "kind": "label", "stored": True})
        for request_id, score in zip(ids[3:5], (1.0, 0.5), strict=True):
            answer = await _feedback(session, mesh, {"request_id": request_id, "score": score},
                                     headers=mesh.auth())
            assert answer[0] == 200

        async with httpx.AsyncClient(http1=False, http2=True) as edge:  # the nginx edge
            via_edge = await edge.post(f"http://127.0.0.1:{mesh.edge_port}/v1/feedback",
                                       json={"request_id": ids[5], "score": 0},
                                       headers=mesh.auth())
        assert via_edge.http_version == "HTTP/2" and via_edge.status_code == 200, via_edge.text

        totals = await _wait_for_report(session, mesh, {"predictions": len(ids)})
        assert (totals["with_label_feedback"], totals["with_score_feedback"]) == (3, 3)
        assert _weighted(totals["rows"], "accuracy", "with_label_feedback") == pytest.approx(2 / 3)
        assert _weighted(totals["rows"], "mean_score", "with_score_feedback") == pytest.approx(0.5)

    argv = ["report", "mlp", "--control", mesh.control, "--token", mesh.control_token()]
    assert await asyncio.to_thread(main, [*argv, "--json"]) == 0
    printed = orjson.loads(capsys.readouterr().out)
    assert sum(row["with_label_feedback"] for row in printed["rows"]) == 3
    assert await asyncio.to_thread(main, argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "report mlp: last 24h, 10 bucket bands"
    assert table[1].split()[:4] == ["VERSION", "BUCKETS", "PREDICTIONS", "FEEDBACK"]
