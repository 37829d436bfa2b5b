"""Canaries and signatures on the running mesh: a compatible canary with its own max_batch_size
serves a 50/50 split under load with each version's own outputs, and a canary whose input
signature differs is refused by the control API, naming it.

mlp version 4 has other weights and max_batch_size 4 (version 1: 64); version 5 declares
`features` [-1, 16] where version 1 has [-1, 32] (tests/integration/rollouts/conftest.py).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.rollouts.conftest import Answer, Client

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning"),
]

REQUESTS = 300


def expected_probs(artifacts: dict[str, Path], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Versions 1 and 4's outputs for `rows`, computed here with torch."""
    expected = {}
    for version in ("1", "4"):
        module = torch.jit.load(str(artifacts[version]))  # type: ignore[no-untyped-call]
        with torch.inference_mode():
            expected[version] = module(torch.from_numpy(rows)).numpy()
    return expected


async def test_a_compatible_canary_with_its_own_max_batch_size_serves_a_split_under_load(
    client: Client, mlp_artifacts: dict[str, Path]
) -> None:
    routes = [{"version": "1", "weight": 50}, {"version": "4", "weight": 50}]
    body = await client.put_rollout({"routes": routes, "salt": "signatures"})
    rows = np.random.default_rng(11).standard_normal((REQUESTS, 32), dtype=np.float32)
    expected = expected_probs(mlp_artifacts, rows)
    await client.wait_for_epoch(body["epoch"], in_a_row=8)

    answers: list[Answer] = await asyncio.gather(*(
        client.infer(user=f"user-{i}", features=rows[i].tolist()) for i in range(REQUESTS)
    ))

    assert [answer.status for answer in answers] == [200] * REQUESTS
    versions = Counter(answer.version for answer in answers)
    # 300 users hashed 50/50: sd = sqrt(300 * 0.25) = 8.7, so more than 60 each is 10 sd
    # below the mean of 150.
    assert set(versions) == {"1", "4"} and min(versions.values()) > REQUESTS // 5
    for index, answer in enumerate(answers):
        data = answer.body["outputs"][0]["data"]
        assert np.allclose(data, expected[answer.version][index], rtol=1e-4, atol=1e-5), (
            index, answer.version)


async def test_a_canary_with_another_input_signature_is_refused_naming_it(
    client: Client,
) -> None:
    routes = [{"version": "1", "weight": 90}, {"version": "5", "weight": 10}]
    status, body = await client.try_rollout({"routes": routes})
    assert status == 400
    assert body == {"error": "rollout for mlp: version 5 input 'features' has shape [-1,16], "
                             "primary version 1 has [-1,32]"}
