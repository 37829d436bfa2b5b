"""Stand-ins the worker tests share: an artifact store for backends that load nothing."""

from __future__ import annotations

from pathlib import Path

from services.mesh.domain.types import ModelVersion


class NoArtifacts:
    """Artifacts for stub backends, which never read the path they are given."""

    async def fetch(self, spec: ModelVersion) -> Path:
        return Path("/dev/null")
