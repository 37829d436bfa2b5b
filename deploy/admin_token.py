"""The control API's admin token for a local mesh: made once per state dir, kept in a file.

`infermesh up` passes it to the control API as `INFERMESH_CONTROL_ADMIN_TOKENS=<user>:<secret>`
and the CLI reads the secret from `<state dir>/control-token`, so operators on this machine
need no setup while the API still refuses anyone without the file. An explicit
`INFERMESH_CONTROL_ADMIN_TOKENS` wins and no file is written.
"""

from __future__ import annotations

import getpass
import os
import secrets
from pathlib import Path

TOKEN_FILE = "control-token"


def control_tokens(state_dir: Path) -> str:
    """The `name:secret` list for the control API (blocking file I/O: call before the loop)."""
    explicit = os.environ.get("INFERMESH_CONTROL_ADMIN_TOKENS")
    if explicit:
        return explicit
    return f"{getpass.getuser()}:{local_secret(state_dir)}"


def local_secret(state_dir: Path) -> str:
    """The secret in `<state dir>/control-token`, created (mode 0600) when missing."""
    path = state_dir / TOKEN_FILE
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        secret = ""
    if not secret:
        secret = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
    return secret


def first_secret(tokens: str) -> str:
    """The secret of the first `name:secret` entry (what the launcher itself calls with)."""
    return tokens.split(",")[0].partition(":")[2].strip()
