"""The `demo` tenant and its API key for a local mesh, so the banner's curl line just works.

`infermesh up` (with auth on, the default) creates the tenant through the control API when it
is missing and keeps one active key for it in `<state dir>/demo-key` (mode 0600): a key from
an earlier run is reused while the control API still lists it, else a new one is issued.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp

KEY_FILE = "demo-key"
DEMO_TENANT = {
    "name": "demo", "rate": 5000, "burst": 1000, "max_concurrency": 512, "weight": 1,
}


class DemoTenantError(RuntimeError):
    """The control API refused to set up the demo tenant."""


async def ensure_demo_key(
    session: aiohttp.ClientSession, control: str, token: str, state_dir: Path
) -> str:
    """The demo tenant's API key (created, or reused from the state dir)."""
    headers = {"Authorization": f"Bearer {token}"}
    path = state_dir / KEY_FILE
    await _ensure_tenant(session, control, headers)
    key = await asyncio.to_thread(_read, path)
    if key and await _is_active(session, control, headers, key):
        return key
    async with session.post(f"{control}/v1/tenants/demo/keys", headers=headers,
                            json={"note": "infermesh up demo key"}) as response:
        body = await _body(response, "issuing the demo key")
    key = str(body["key"])
    await asyncio.to_thread(_write_private, path, key)
    return key


async def _ensure_tenant(
    session: aiohttp.ClientSession, control: str, headers: dict[str, str]
) -> None:
    async with session.get(f"{control}/v1/tenants/demo", headers=headers) as response:
        if response.status == 200:
            return
    async with session.post(f"{control}/v1/tenants", headers=headers,
                            json=DEMO_TENANT) as response:
        await _body(response, "creating the demo tenant")


async def _is_active(
    session: aiohttp.ClientSession, control: str, headers: dict[str, str], key: str
) -> bool:
    async with session.get(f"{control}/v1/tenants/demo/keys", headers=headers) as response:
        body = await _body(response, "listing the demo keys")
    return any(key.startswith(entry["prefix"] + "_") and not entry.get("revoked_at")
               for entry in body["keys"])


async def _body(response: aiohttp.ClientResponse, doing: str) -> dict[str, Any]:
    if response.status >= 300:
        raise DemoTenantError(f"{doing}: {response.status} {await response.text()}")
    body: dict[str, Any] = await response.json()
    return body


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def _write_private(path: Path, key: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
