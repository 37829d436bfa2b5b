"""Sticky assignment from one view: right after a rollout change sets a header as the sticky key,
every user stays on one version, because the router that picks the version also picks the
sticky value (the gateway forwards the candidate headers whatever its own rollout copy says).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from tests.integration.rollouts.conftest import Client

pytestmark = pytest.mark.timeout(300)

USERS = [f"user-{i}" for i in range(500)]
REQUESTS = 2_000


async def test_no_user_moves_between_versions_right_after_a_header_becomes_the_sticky_key(
    client: Client,
) -> None:
    routes = [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]
    unsticky = await client.put_rollout({"routes": routes, "sticky_key": None,
                                         "salt": "one-view"})
    # Eight in a row: both routers answer with the unsticky epoch before the change.
    await client.wait_for_epoch(unsticky["epoch"], in_a_row=8)
    sticky = await client.put_rollout({"routes": routes, "sticky_key": "x-user-id"})
    await client.wait_for_epoch(sticky["epoch"], user="probe", header="x-user-id")

    users = iter(USERS[i % len(USERS)] for i in range(REQUESTS))
    served: dict[str, set[str]] = defaultdict(set)
    statuses: list[int] = []

    async def loop() -> None:
        for user in users:
            answer = await client.infer(user=user, header="x-user-id")
            statuses.append(answer.status)
            served[user].add(answer.version)

    await asyncio.gather(*(loop() for _ in range(32)))
    assert statuses == [200] * REQUESTS
    assert set(served) == set(USERS)
    moved = {user: versions for user, versions in served.items() if len(versions) > 1}
    assert moved == {}
    assert {version for versions in served.values() for version in versions} == {"1", "2"}
