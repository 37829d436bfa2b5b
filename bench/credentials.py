"""API keys of the meshes a benchmark started, by gateway URL.

`infermesh up` runs with auth on and writes its demo tenant's key to `<state dir>/demo-key`;
the launchers started by `bench.run_all` remember it here and every load loop sends it, so the
figures include authentication and quota checks as users run them.
"""

from __future__ import annotations

from pathlib import Path

_KEYS: dict[str, str] = {}


def remember(base_url: str, state_dir: Path) -> None:
    """Note the demo key of the mesh at `base_url`, if its launcher wrote one."""
    key_file = state_dir / "demo-key"
    if key_file.exists():
        _KEYS[base_url.rstrip("/")] = key_file.read_text().strip()


def auth_headers(url: str) -> dict[str, str]:
    """The Authorization header for a URL under a remembered gateway (none if unknown)."""
    for base, key in _KEYS.items():
        if url.startswith(base):
            return {"Authorization": f"Bearer {key}"}
    return {}


def remember_key(base_url: str, key: str) -> None:
    """Send `key` on every request under `base_url` (instead of the demo tenant's)."""
    _KEYS[base_url.rstrip("/")] = key
