"""The mesh credential of links and registry apps that a test builds in-process.

The real `MeshCredential`, holding one token (no file: its constructor does no I/O). Services
and launchers a test starts as processes use the session's credential file instead
(`mesh_credential_file` in tests/conftest.py, through INFERMESH_MESH_CREDENTIAL_FILE).
"""

from __future__ import annotations

from pathlib import Path

from services.mesh.infra.credentials import MeshCredential
from services.mesh.transport.auth import bearer

TOKEN = "in-process-test-token"
CREDENTIAL = MeshCredential(Path("(in-process tests)"), (TOKEN,), (0, 0))
AUTH = bearer(CREDENTIAL)
"""The header presenting CREDENTIAL, for plain HTTP calls to an internal surface."""
