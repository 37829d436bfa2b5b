"""Rollouts against the running mesh: weighted sticky split, live weight changes, rollback,
shadow, fallback and the guard, driven through the control API of `infermesh up`.

One mesh (two router replicas, tests/integration/rollouts/conftest.py) serves every test here;
each test writes the rollout it needs. Version 2 of mlp has other weights than version 1;
version 3 fails every real request.
"""

from __future__ import annotations

import asyncio
import getpass
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.mesh.domain.types import Rollout
from services.mesh.infra.etcd import connect_client
from services.router.policy import shadow_targets
from tests.integration.conftest import RunningMesh, mesh_processes
from tests.integration.rollouts.conftest import Answer, Client
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)


async def load(client: Client, count: int, *, concurrency: int = 24,
               **kwargs: Any) -> list[Answer]:
    """`count` requests, `concurrency` at a time."""
    answers: list[Answer] = []
    remaining = iter(range(count))

    async def loop() -> None:
        for _ in remaining:
            answers.append(await client.infer(**kwargs))

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return answers


async def load_until(client: Client, stop: asyncio.Event, answers: list[Answer], *,
                     concurrency: int = 8) -> list[Answer]:
    """Requests with random sticky keys until `stop` is set, each answer appended to
    `answers` as it arrives (a test watches them there)."""

    async def loop() -> None:
        while not stop.is_set():
            answers.append(await client.infer(user=uuid.uuid4().hex))

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return answers


def service_pids(mesh: RunningMesh, module: str, *, models: str | None = None) -> list[int]:
    """Pids of the mesh's `python -m <module>` processes (workers: of `models` only)."""
    found = []
    for pid in mesh_processes(mesh.prefix):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if module.encode() not in cmdline:
            continue
        if models is None or f"INFERMESH_WORKER_MODELS={models}".encode() in environ:
            found.append(pid)
    return found


async def keep_down(mesh: RunningMesh, models: str, *, seconds: float) -> None:
    """A crash loop: SIGKILL every worker of `models` the launcher restarts, for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for pid in service_pids(mesh, "services.worker", models=models):
            os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.05)


async def wait_worker_serving(mesh: RunningMesh, version: str) -> None:
    """Until a live worker process of mlp/`version` has registered itself as ready.

    A readiness probe is not enough after a SIGKILL: the dead worker's leased record lingers
    until its lease expires, while its replacement is still loading.
    """
    etcd = connect_client(mesh.env["INFERMESH_ETCD_URL"])

    async def live_and_registered() -> tuple[set[str], set[str]]:
        """(pids of live mlp/`version` workers, pids in records serving mlp/`version`)"""
        live = {str(pid) for pid in service_pids(mesh, "services.worker", models=f"mlp/{version}")}
        records = await etcd.get_prefix(f"{mesh.prefix}endpoints/worker/".encode())
        serving = {orjson.loads(kv.value)["instance"].rsplit("-", 1)[-1] for kv in records
                   if f"mlp/{version}" in orjson.loads(kv.value).get("models", [])}
        return live, serving

    try:
        await wait_for(live_and_registered, lambda seen: bool(seen[0] & seen[1]), timeout=120,
                       what=f"a live worker registered as serving mlp/{version} "
                            "(observed: live pids, registered pids)")
    finally:
        await etcd.close()


async def router_urls(mesh: RunningMesh) -> list[str]:
    etcd = connect_client(mesh.env["INFERMESH_ETCD_URL"])
    try:
        records = await etcd.get_prefix(f"{mesh.prefix}endpoints/router/".encode())
        return [orjson.loads(kv.value)["http"] for kv in records]
    finally:
        await etcd.close()


async def shadow_counts(session: aiohttp.ClientSession, mesh: RunningMesh) -> Counter[str]:
    """Summed over every router: primary requests and shadow requests by outcome."""
    counts: Counter[str] = Counter()
    for url in await router_urls(mesh):
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "infermesh_router_requests_total":
                    counts["primary"] += int(sample.value)
                elif sample.name == "infermesh_shadow_requests_total":
                    counts[f"shadow_{sample.labels['outcome']}"] += int(sample.value)
    return counts


# -- the tests ---------------------------------------------------------------------------


async def test_a_90_10_split_is_sticky_across_replicas_and_restarts(
    client: Client, rollout_mesh: RunningMesh
) -> None:
    await client.put_rollout({"routes": [{"version": "1", "weight": 90},
                                         {"version": "2", "weight": 10}],
                              "sticky_key": "user", "salt": "split-test"})
    users = [uuid.uuid4().hex for _ in range(5000)]
    pool = iter(users + users)  # every user twice: both router replicas see most of them
    seen: dict[str, set[str]] = {}

    async def one_user_loop() -> None:
        for user in pool:
            answer = await client.infer(user=user)
            assert answer.status == 200, answer.body
            seen.setdefault(user, set()).add(answer.version)

    await asyncio.gather(*(one_user_loop() for _ in range(24)))
    assert all(len(versions) == 1 for versions in seen.values())
    share = sum(1 for v in seen.values() if v == {"2"}) / len(users)
    # Version 2 owns exactly 10 % of the buckets and random users hash uniformly into them:
    # binomial, sd = sqrt(0.1 * 0.9 / 5000) = 0.0042; 0.02 is 4.7 sd (P(outside) ~ 3e-6).
    assert 0.08 <= share <= 0.12

    routers = service_pids(rollout_mesh, "services.router")
    assert len(routers) == 2
    for pid in routers:
        os.kill(pid, signal.SIGTERM)
    await _wait_for_new_routers(rollout_mesh, old=set(routers))
    sample = random.Random(5).sample(users, 400)
    for user in sample:  # this time through the header, not the parameter
        answer = await client.infer(user=user, header=True)
        assert answer.status == 200, answer.body
        assert {answer.version} == seen[user]


async def _wait_for_new_routers(mesh: RunningMesh, *, old: set[int]) -> None:
    async def routers() -> tuple[set[int], list[str]]:
        return set(service_pids(mesh, "services.router")), await router_urls(mesh)

    await wait_for(
        routers, lambda seen: len(seen[0]) == 2 and not seen[0] & old and len(seen[1]) == 2,
        timeout=90, what=f"two new router processes (not {old}), two router records",
    )


def sent_after(answers: list[Answer], moment: float) -> list[Answer]:
    """The answers, so far, to requests sent at `moment` or later."""
    return [a for a in list(answers) if a.sent >= moment]


async def test_a_weight_change_and_a_rollback_apply_within_a_second_without_errors(
    client: Client,
) -> None:
    first = await client.put_rollout({"routes": [{"version": "1", "weight": 100}],
                                      "reason": "baseline"})
    stop = asyncio.Event()
    answers: list[Answer] = []
    traffic = asyncio.create_task(load_until(client, stop, answers))
    # Enough answers to see both versions after the change: at 50/50, 40 answers all of one
    # version has probability 2 * 0.5**40.
    enough = 40
    try:
        await wait_for(lambda: [a.parameters.get("rollout_epoch") for a in answers],
                       lambda epochs: first["epoch"] in epochs, timeout=60,
                       what="traffic served under the baseline")
        changed = await client.put_rollout({"routes": [{"version": "1", "weight": 50},
                                                       {"version": "2", "weight": 50}],
                                            "reason": "canary at 50"})
        changed_at = time.monotonic()  # acknowledged: the second starts now
        await wait_for(lambda: len(sent_after(answers, changed_at + 1.0)),
                       lambda count: count >= enough, timeout=60,
                       what=f"{enough} answers to requests sent a second after the change")
        rolled_at = time.monotonic()
        rolled = await client.control("POST", "/v1/rollouts/mlp/rollback",
                                      json={"reason": "too risky"})
        rollback_acked = time.monotonic()
        await wait_for(lambda: len(sent_after(answers, rollback_acked + 1.0)),
                       lambda count: count >= enough, timeout=60,
                       what=f"{enough} answers to requests sent a second after the rollback")
    finally:
        stop.set()
        await traffic

    assert [a for a in answers if a.status != 200] == []
    assert changed["epoch"] == first["epoch"] + 1 and rolled["epoch"] == changed["epoch"] + 1
    assert rolled["routes"] == first["routes"]
    # Every request sent a second after a change was acknowledged was routed by it, on both
    # routers. Between the change and the rollback, only requests answered before the
    # rollback was even sent count: a later one may have been routed by the rollback.
    after_change = [a for a in answers if a.sent >= changed_at + 1.0 and a.done < rolled_at]
    after_rollback = sent_after(answers, rollback_acked + 1.0)
    assert len(after_change) >= enough and len(after_rollback) >= enough
    assert {a.parameters["rollout_epoch"] for a in after_change} == {changed["epoch"]}
    assert {a.version for a in after_change} == {"1", "2"}
    assert {a.parameters["rollout_epoch"] for a in after_rollback} == {rolled["epoch"]}
    assert {a.version for a in after_rollback} == {"1"}

    history = (await client.control("GET", "/v1/rollouts/mlp/history"))["history"]
    top = {entry["epoch"]: entry for entry in history[:2]}
    assert top[changed["epoch"]]["author"] == getpass.getuser()
    assert top[changed["epoch"]]["reason"] == "canary at 50"
    assert top[rolled["epoch"]]["author"] == getpass.getuser()
    assert top[rolled["epoch"]]["record"]["routes"] == first["routes"]


async def test_shadow_gets_its_fraction_and_never_touches_client_responses(
    client: Client, rollout_mesh: RunningMesh
) -> None:
    put = await client.put_rollout({"routes": [{"version": "1", "weight": 100}],
                                    "shadow": [{"version": "2", "fraction": 0.25}]})
    rollout = Rollout.from_json(put)
    pinned = await client.infer(version="1")  # pinned: never mirrored
    before = await shadow_counts(client.session, rollout_mesh)
    probes: list[Answer] = []

    async def probe() -> Answer:
        probes.append(await client.infer())
        return probes[-1]

    await wait_for(probe, lambda a: a.parameters.get("rollout_epoch") == put["epoch"],
                   timeout=60, what="an answer routed by the shadow rollout")
    answers = probes + await load(client, 2000)

    assert {a.status for a in answers} == {200}
    assert {a.version for a in answers} == {"1"}
    assert all(a.body["outputs"] == pinned.body["outputs"] for a in answers)
    # Which requests the rollout mirrors is a hash of their ids (the answers name them), so
    # the mirrors to expect are known exactly; they finish off the response path, later.
    routed = [a for a in answers if a.parameters["rollout_epoch"] == put["epoch"]]
    expected = sum(1 for a in routed if shadow_targets(rollout, a.body["id"]))

    def mirrored(counts: Counter[str]) -> int:
        """Mirrors finished since `before`: answered, failed or dropped."""
        return sum(counts[k] - before[k] for k in counts if k.startswith("shadow_"))

    after = await wait_for(
        lambda: shadow_counts(client.session, rollout_mesh),
        lambda counts: mirrored(counts) >= expected, timeout=60,
        what=f"{expected} mirrors counted in the routers' infermesh_shadow_requests_total",
    )
    assert mirrored(after) == expected
    assert after["primary"] - before["primary"] >= len(answers)
    assert after["shadow_failure"] == before["shadow_failure"]
    # Ids hashed at fraction 0.25 are binomial: sd = sqrt(0.25 * 0.75 / n), 0.0097 for
    # n = 2000; within 5 sd (P(outside) ~ 6e-7).
    assert len(routed) >= 1000, f"only {len(routed)} requests were routed by the rollout"
    margin = 5 * math.sqrt(0.25 * 0.75 / len(routed))
    assert abs(expected / len(routed) - 0.25) <= margin, (expected, len(routed))

    for pid in service_pids(rollout_mesh, "services.worker", models="mlp/2"):
        os.kill(pid, signal.SIGKILL)
    answers = await load(client, 600)
    assert {a.status for a in answers} == {200}
    assert all(a.body["outputs"] == pinned.body["outputs"] for a in answers)
    await wait_worker_serving(rollout_mesh, "2")


async def test_a_canary_whose_worker_is_down_sends_its_traffic_to_the_fallback(
    client: Client, rollout_mesh: RunningMesh
) -> None:
    await wait_worker_serving(rollout_mesh, "2")
    put = await client.put_rollout({"routes": [{"version": "1", "weight": 50},
                                               {"version": "2", "weight": 50}], "fallback": "1"})
    stop = asyncio.Event()
    answers: list[Answer] = []
    traffic = asyncio.create_task(load_until(client, stop, answers))
    try:
        await wait_for(lambda: [(a.version, a.parameters.get("rollout_epoch")) for a in answers],
                       lambda seen: ("2", put["epoch"]) in seen, timeout=60,
                       what="version 2 serving its half of the split")
        for pid in service_pids(rollout_mesh, "services.worker", models="mlp/2"):
            os.kill(pid, signal.SIGTERM)
        await keep_down(rollout_mesh, "mlp/2", seconds=6.0)  # longer than the batcher's grace
    finally:
        stop.set()
        await traffic
    assert [a.body for a in answers if a.status != 200] == []
    assert any(a.parameters.get("fallback") for a in answers)
    await wait_worker_serving(rollout_mesh, "2")


async def test_the_guard_rolls_back_a_failing_canary_and_says_why(client: Client) -> None:
    put = await client.put_rollout({
        "routes": [{"version": "1", "weight": 70}, {"version": "3", "weight": 30}],
        "fallback": "1",
        "guard": {"window_s": 10, "min_samples": 20, "max_error_rate_delta": 0.05},
    })
    stop = asyncio.Event()
    traffic = asyncio.create_task(load_until(client, stop, [], concurrency=4))
    try:
        current = await wait_for(lambda: client.control("GET", "/v1/rollouts/mlp"),
                                 lambda now: now["epoch"] > put["epoch"], timeout=60,
                                 what="the guard to write a newer epoch", interval=0.25)
    finally:
        stop.set()
        await traffic
    assert current["routes"] == [{"version": "1", "weight": 100.0}]
    assert "guard" not in current or current["guard"] is None
    [latest] = (await client.control("GET", "/v1/rollouts/mlp/history",
                                     params={"limit": "1"}))["history"]
    assert latest["author"] == "guard"
    assert "error rate" in latest["reason"] and "%" in latest["reason"]


def test_the_cli_sets_shows_and_rolls_back(rollout_mesh: RunningMesh) -> None:
    env = {**rollout_mesh.env, "INFERMESH_CONTROL_URL": rollout_mesh.control,
           "INFERMESH_CONTROL_TOKEN": rollout_mesh.control_token()}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "cli", *args], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    cli("rollout", "set", "mlp", "1=80", "2=20", "--reason", "from the cli")
    shown = orjson.loads(cli("rollout", "show", "mlp", "--json"))
    assert shown["routes"] == [{"version": "1", "weight": 80.0}, {"version": "2", "weight": 20.0}]
    assert "from the cli" in cli("rollout", "history", "mlp")
    cli("rollback", "mlp")
    shown = orjson.loads(cli("rollout", "show", "mlp", "--json"))
    assert shown["epoch"] > 0 and shown["routes"] != [
        {"version": "1", "weight": 80.0}, {"version": "2", "weight": 20.0}
    ]
