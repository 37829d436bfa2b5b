"""Users and roles of a private etcd: a `root` user, and one user per service that may write
only the prefixes that service writes (every service reads the whole mesh prefix).

Provisioning talks to etcd's JSON gateway (`/v3/auth/...`) with the standard library, before
any event loop runs. It is idempotent: on an etcd that already has auth on, it authenticates
as root and adds only the roles and users that are missing. Passwords live in files
`<secrets dir>/etcd-<user>` (mode 0600, in a 0700 directory), made once and kept.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = "root"

WRITES: Mapping[str, tuple[str, ...]] = {
    "gateway": ("endpoints/gateway/",),
    "router": ("endpoints/router/",),
    "batcher": ("endpoints/batcher/",),
    "worker": ("endpoints/worker/",),
    "registry": ("models/", "rollouts/", "endpoints/registry/"),
    "control": ("rollouts/", "tenants/", "apikeys/", "limits/", "scale/", "endpoints/control/"),
    "launcher": (),
}
"""Sub-prefixes of the mesh prefix each service's role may write (docs/SECURITY.md)."""

ROLES_OF: Mapping[str, tuple[str, ...]] = {
    **{service: (service,) for service in WRITES},
    "fused": ("gateway", "router", "batcher", "worker"),
}
"""The roles each etcd user holds: one per service; the fused data plane holds four."""


def ensure_secret(path: Path) -> str:
    """The secret in `path`, created (0600, its directory 0700) when missing or empty."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        secret = ""
    if not secret:
        secret = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
    return secret


def etcd_passwords(secrets_dir: Path) -> dict[str, str]:
    """Every etcd user's password (root included), made when missing."""
    return {user: ensure_secret(secrets_dir / f"etcd-{user}") for user in (ROOT, *ROLES_OF)}


def provision(endpoint: str, prefix: str, passwords: Mapping[str, str]) -> None:
    """Make etcd at `endpoint` hold every role and user above and have auth on."""
    gateway = _Gateway(endpoint)
    enabled = gateway.authenticate(ROOT, passwords[ROOT])
    roles = set(gateway.call("role/list").get("roles", []))
    users = set(gateway.call("user/list").get("users", []))
    for role in (ROOT, *WRITES):
        if role not in roles:
            gateway.call("role/add", name=role)
            for perm_type, key in _permissions(role, prefix):
                gateway.call("role/grant", name=role, perm={
                    "permType": perm_type, "key": _b64(key), "range_end": _b64(_end(key))})
    for user, granted in ((ROOT, (ROOT,)), *ROLES_OF.items()):
        if user not in users:
            gateway.call("user/add", name=user, password=passwords[user])
            for role in granted:
                gateway.call("user/grant", user=user, role=role)
    if not enabled:
        gateway.call("enable")


def _permissions(role: str, prefix: str) -> list[tuple[str, bytes]]:
    if role == ROOT:
        return []  # etcd's root role may do anything
    return [("READ", prefix.encode()),
            *(("READWRITE", f"{prefix}{sub}".encode()) for sub in WRITES[role])]


def _end(key: bytes) -> bytes:
    """The first key after every key starting with `key` (etcd's prefix range end)."""
    return key[:-1] + bytes([key[-1] + 1])


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class _Gateway:
    """etcd's `/v3/auth/*` JSON endpoints, with a root token once auth is on."""

    def __init__(self, endpoint: str) -> None:
        self._endpoint = endpoint
        self._token = ""

    def authenticate(self, user: str, password: str) -> bool:
        """Take a token; False when auth is not enabled yet (nothing to authenticate to)."""
        try:
            self._token = self.call("authenticate", name=user, password=password)["token"]
        except RuntimeError as exc:
            if "authentication is not enabled" in str(exc):
                return False
            raise RuntimeError(
                f"etcd refused the root password from the secrets dir: {exc}") from exc
        return True

    def call(self, path: str, **body: Any) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self._endpoint}/v3/auth/{path}", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json",
                     **({"Authorization": self._token} if self._token else {})})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answer: dict[str, Any] = json.loads(response.read() or b"{}")
                return answer
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise RuntimeError(f"etcd /v3/auth/{path}: {detail}") from exc
