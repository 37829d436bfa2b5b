"""The local mesh credential: made once per state dir, private, kept across restarts."""

from __future__ import annotations

import stat
from pathlib import Path

from deploy.secrets import ensure_mesh_credential
from services.mesh.infra.credentials import MeshCredential


def test_made_private_once_and_kept(tmp_path: Path) -> None:
    path = ensure_mesh_credential(tmp_path)
    assert path == tmp_path / "secrets" / "mesh-credential"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = MeshCredential.load(path).token
    assert len(token) >= 32
    assert ensure_mesh_credential(tmp_path) == path
    assert MeshCredential.load(path).token == token
