"""API keys of the meshes a benchmark started, by gateway URL.

`infermesh up` runs with auth on and writes its demo tenant's key to `<state dir>/demo-key`;
the launchers started by `bench.run_all` remember it here and every load loop sends it, so the
figures include authentication and quota checks as users run them. The registry (an internal
surface) wants the mesh credential instead, `<state dir>/secrets/mesh-credential`:
`remember_registry` notes it for the registry's URL.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

_KEYS: dict[str, str] = {}
_STATE_DIRS: dict[str, Path] = {}


def remember(base_url: str, state_dir: Path) -> None:
    """Note the demo key of the mesh at `base_url`, if its launcher wrote one."""
    key_file = state_dir / "demo-key"
    if key_file.exists():
        _KEYS[base_url.rstrip("/")] = key_file.read_text().strip()


def remember_registry(registry_url: str, state_dir: Path) -> None:
    """Present the mesh credential of the mesh in `state_dir` on every call to its registry."""
    token = mesh_token(state_dir)
    if token is not None:
        _KEYS[registry_url.rstrip("/")] = token
        _STATE_DIRS[registry_url.rstrip("/")] = state_dir


def state_dir_of(registry_url: str) -> Path | None:
    """The state dir of the mesh whose registry is at `registry_url` (for `infermesh models
    ... --state-dir`, which reads the mesh credential there)."""
    return _STATE_DIRS.get(registry_url.rstrip("/"))


def mesh_token(state_dir: Path) -> str | None:
    """The token a caller presents to the mesh in `state_dir` (the credential file's first)."""
    path = state_dir / "secrets" / "mesh-credential"
    if not path.exists():
        return None
    lines = [line.strip() for line in path.read_text().splitlines()]
    return next((line for line in lines if line and not line.startswith("#")), None)


def auth_headers(url: str) -> dict[str, str]:
    """The Authorization header for a URL under a remembered gateway (none if unknown)."""
    for base, key in _KEYS.items():
        if url.startswith(base):
            return {"Authorization": f"Bearer {key}"}
    return {}


def remember_key(base_url: str, key: str) -> None:
    """Send `key` on every request under `base_url` (instead of the demo tenant's)."""
    _KEYS[base_url.rstrip("/")] = key


@dataclass(frozen=True)
class PresentedToken:
    """A mesh credential that only presents one token (what a client of the registry needs)."""

    token: str

    def accepts(self, header_value: str | None) -> bool:
        return hmac.compare_digest(header_value or "", f"Bearer {self.token}")


def registry_credential(registry_url: str) -> PresentedToken:
    """The credential `remember_registry` noted for `registry_url` (empty if none)."""
    header = auth_headers(registry_url).get("Authorization", "")
    return PresentedToken(header.removeprefix("Bearer "))
