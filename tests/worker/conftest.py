"""Worker fixtures: the demo models, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.worker.demo_models import DemoModel, build_demo_models


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoModel]:
    """The demo models by name, built into a session-wide temporary directory."""
    outdir: Path = tmp_path_factory.mktemp("demo_models")
    return {model.name: model for model in build_demo_models(outdir)}
