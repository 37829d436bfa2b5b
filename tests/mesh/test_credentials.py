"""The mesh credential file: what it accepts, rotation without a restart, refused modes."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from services.mesh.infra.credentials import CredentialError, MeshCredential
from tests.waiting import wait_for


def write(path: Path, *lines: str, mode: int = 0o600) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    path.chmod(mode)
    return path


def test_first_token_is_presented_and_every_token_accepted(tmp_path: Path) -> None:
    path = write(tmp_path / "cred", "# rotated on 2026-12-06", "", "new-token", "old-token")
    credential = MeshCredential.load(path)
    assert credential.token == "new-token"
    assert credential.accepts("Bearer new-token")
    assert credential.accepts("bearer old-token")
    for refused in (None, "", "Bearer", "Bearer wrong", "Basic new-token", "new-token",
                    "Bearer new-token-and-more", "Bearer # rotated on 2026-12-06"):
        assert not credential.accepts(refused), refused


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "cred", "token", mode=mode)
    with pytest.raises(CredentialError, match="chmod 600"):
        MeshCredential.load(path)


def test_a_missing_or_empty_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="cannot read"):
        MeshCredential.load(tmp_path / "absent")
    with pytest.raises(CredentialError, match="no token"):
        MeshCredential.load(write(tmp_path / "empty", "# nothing yet", ""))
    with pytest.raises(CredentialError, match="INFERMESH_MESH_CREDENTIAL_FILE"):
        MeshCredential.load("")


async def test_rotation_is_followed_without_a_restart(tmp_path: Path) -> None:
    path = write(tmp_path / "cred", "old-token")
    credential = await asyncio.to_thread(MeshCredential.load, path)
    credential.start(interval=0.05)
    try:
        # Step 1: the new token on top; both are accepted, the new one presented.
        write(path, "new-token", "old-token")
        await wait_for(lambda: credential.accepts("Bearer new-token"), lambda ok: ok,
                       timeout=30, what="the new token accepted after the file changed")
        assert credential.token == "new-token"
        assert credential.accepts("Bearer old-token")
        # Step 2: the old token removed; refused from then on.
        write(path, "new-token")
        await wait_for(lambda: credential.accepts("Bearer old-token"), lambda ok: not ok,
                       timeout=30, what="the old token refused after its removal")
        assert credential.accepts("Bearer new-token")
    finally:
        await credential.aclose()


async def test_a_botched_edit_keeps_the_tokens_loaded(tmp_path: Path) -> None:
    path = write(tmp_path / "cred", "token")
    credential = await asyncio.to_thread(MeshCredential.load, path)
    write(path, "# everything commented out", mode=0o644)
    os.utime(path, ns=(1, 1))  # a different stamp whatever the clock's resolution
    assert not await asyncio.to_thread(credential.reload)
    assert credential.accepts("Bearer token")
