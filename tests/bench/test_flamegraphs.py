"""bench.flamegraphs: it hands `bench.cpu_per_request.start_system` every setting that reads
(it once failed on the first system, `args.protocols` missing), and names its files by format."""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

import pytest

from bench import cpu_per_request, flamegraphs
from tests.bench.launches import fake_launches


def test_every_system_starts_from_the_settings_flamegraphs_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed: list[argparse.Namespace] = []

    def record(system: str, args: argparse.Namespace) -> list[Path]:
        handed.append(args)
        return []

    monkeypatch.setattr(flamegraphs, "record", record)
    assert flamegraphs.main(["--out", str(tmp_path), "--systems", "mesh,plain",
                             "--format", "raw", "--infermesh", "/bin/true"]) == 0
    assert len(handed) == 2
    started = fake_launches(monkeypatch)
    with ExitStack() as stack:
        for system, args in zip(("mesh", "plain"), handed, strict=True):
            assert cpu_per_request.start_system(stack, system, args, tmp_path)
    [(system, env)] = started
    assert system == "mesh" and "INFERMESH_EDGE" not in env  # REST straight to the gateway
    assert handed[0].format == "raw" and flamegraphs.FORMATS["raw"] == "txt"
    assert handed[0].infermesh == "/bin/true"


def test_seconds_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        flamegraphs.main(["--seconds", "0"])
