"""`python -m control.api` as a process: a crash between commit and publish, then recovery."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from deploy.localdeps import free_port
from services.mesh.infra.etcd import ConfigCache
from services.mesh.infra.failpoints import EXIT_CODE
from tests.control.api.conftest import ControlHarness, canary

TOKEN = "ops-secret"
START_TIMEOUT = 20.0


def control_env(**overrides: str) -> dict[str, str]:
    """The environment minus any INFERMESH_* setting of the caller's, plus `overrides`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INFERMESH_")}
    return {**clean, "INFERMESH_LOG_LEVEL": "INFO", **overrides}


class ControlProcess:
    """One `python -m control.api` process whose stderr is kept for failure messages."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def wait_serving(self) -> None:
        """Read stderr until the "serving on" line; fail with the output otherwise."""
        assert self.process.stderr is not None
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                line = (await self.process.stderr.readline()).decode()
                if not line:
                    pytest.fail("control API exited before serving:\n" + "".join(self.lines))
                self.lines.append(line)
                if "serving on" in line:
                    return

    async def exit_code(self) -> int:
        async with asyncio.timeout(START_TIMEOUT):
            return await self.process.wait()


StartControl = Callable[..., Awaitable[tuple[ControlProcess, str]]]
"""Start the control API with extra environment; returns it (serving) and its base URL."""


@pytest.fixture
async def start_control(
    control: ControlHarness, database_url: str, etcd_url: str, etcd_prefix: str
) -> AsyncIterator[StartControl]:
    started: list[ControlProcess] = []
    port = free_port()

    async def start(**env: str) -> tuple[ControlProcess, str]:
        full = control_env(
            INFERMESH_ETCD_URL=etcd_url, INFERMESH_DATABASE_URL=database_url,
            INFERMESH_ETCD_PREFIX=etcd_prefix, INFERMESH_CONTROL_PORT=str(port),
            INFERMESH_CONTROL_ADMIN_TOKENS=f"ops:{TOKEN}", **env,
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "control.api", env=full,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        started.append(ControlProcess(process))
        await started[-1].wait_serving()
        return started[-1], f"http://127.0.0.1:{port}"

    yield start
    for running in started:
        if running.process.returncode is None:
            running.process.kill()
            await running.process.wait()


async def test_a_crash_after_commit_is_published_on_restart(
    control: ControlHarness, start_control: StartControl
) -> None:
    crashing, url = await start_control(INFERMESH_FAILPOINTS="control.after_commit=exit")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):  # the process dies mid-request
            await session.put(f"{url}/v1/rollouts/iris", json=canary(10), headers=headers)
    assert await crashing.exit_code() == EXIT_CODE
    assert await control.saved_epoch() == 2  # committed ...
    assert (await control.published())["epoch"] == 1  # ... but not published

    restarted, url = await start_control()
    # The start-up reconcile runs before the API serves, so etcd is repaired by now.
    published = await control.published()
    assert published == (await control.store.get("iris")).rollout.to_json()
    assert published["epoch"] == 2
    async with aiohttp.ClientSession() as session:
        response = await session.get(f"{url}/v1/rollouts/iris", headers=headers)
        assert response.headers["ETag"] == '"2"'
    restarted.process.send_signal(signal.SIGTERM)
    assert await restarted.exit_code() == 0


def test_without_an_admin_token_it_refuses_to_start_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "control.api"], env=control_env(INFERMESH_CONTROL_PORT="0"),
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("infermesh control: no admin token configured")
    assert result.stderr.count("\n") == 1


def test_a_malformed_token_is_named_without_its_secret() -> None:
    env = control_env(INFERMESH_CONTROL_ADMIN_TOKENS="ops:fine,leaky-secret-value")
    result = subprocess.run(
        [sys.executable, "-m", "control.api"], env=env, capture_output=True, text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr == "infermesh control: admin_tokens: entry 2 is not name:secret\n"


async def test_tenancy_is_reconciled_at_start_and_then_in_the_loop(
    control: ControlHarness, start_control: StartControl
) -> None:
    etcd, prefix = control.registry.etcd, control.registry.prefix
    tenant = await control.tenants.create_tenant({"name": "acme", "rate": 5}, author="ops")
    await etcd.delete(f"{prefix}tenants/acme".encode())  # a publish that never happened
    await etcd.put(f"{prefix}apikeys/ffffffffffff".encode(), b'{"tenant": "acme"}')  # stale

    running, url = await start_control(INFERMESH_CONTROL_RECONCILE_INTERVAL="0.2")
    assert await control.registry.etcd_json("tenants/acme") == tenant.to_json()
    assert await control.registry.etcd_json("apikeys/ffffffffffff") is None
    cache = ConfigCache(etcd, prefix)
    await cache.start()
    try:
        deleted = await etcd.delete(f"{prefix}tenants/acme".encode())
        assert deleted is not None
        # Put back by the loop: the cache holds it again at a revision after the delete.
        await cache.wait_for(
            lambda: cache.revision > deleted.header.revision
            and cache.get("tenants/acme") == tenant.to_json(), timeout=5,
        )
    finally:
        await cache.aclose()
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        response = await session.post(f"{url}/v1/tenants/acme/keys", headers=headers)
        assert response.status == 201 and response.headers["Cache-Control"] == "no-store"
    running.process.send_signal(signal.SIGTERM)
    assert await running.exit_code() == 0
