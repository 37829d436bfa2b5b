"""The mesh credential of a local mesh: made once per state dir, kept in a file.

`infermesh up` hands every service `INFERMESH_MESH_CREDENTIAL_FILE=<state dir>/secrets/
mesh-credential`: internal links and the registry accept only callers presenting a token of it.
An explicit `INFERMESH_MESH_CREDENTIAL_FILE` wins (several hosts of one mesh share one file).
Rotate by putting a new token on the first line, waiting for the services to pick it up (a
second), then removing the old one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

CREDENTIAL_FILE = Path("secrets") / "mesh-credential"


def ensure_mesh_credential(state_dir: Path) -> Path:
    """The path of `<state dir>/secrets/mesh-credential`, made (dir 0700, file 0600, one random
    token) when missing; an existing file is kept (blocking: call before the loop)."""
    path = state_dir / CREDENTIAL_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    return path
