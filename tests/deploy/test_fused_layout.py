"""`infermesh up --fused --processes N --layout fronts|replicas`: the layout setting, how the
cores are shared out between whole fused replicas, and a bad setting named before anything
starts (tests/integration/test_fused.py runs each layout)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli.main import main
from deploy.worker_counts import fused_layout, replica_threads


@pytest.mark.parametrize(("env", "layout"), [
    ({}, "fronts"), ({"INFERMESH_FUSED_LAYOUT": ""}, "fronts"),
    ({"INFERMESH_FUSED_LAYOUT": "fronts"}, "fronts"),
    ({"INFERMESH_FUSED_LAYOUT": "replicas"}, "replicas"),
])
def test_the_layout_setting(env: dict[str, str], layout: str) -> None:
    assert fused_layout(env) == layout


def test_a_bad_layout_is_named() -> None:
    with pytest.raises(ValueError, match="INFERMESH_FUSED_LAYOUT.*fronts, replicas.*'front'"):
        fused_layout({"INFERMESH_FUSED_LAYOUT": "front"})


@pytest.mark.parametrize(("replicas", "cores", "threads"), [
    (2, 2, "1"), (2, 8, "4"), (3, 8, "2"), (4, 2, "1"),
])
def test_replicas_share_the_cores_out(replicas: int, cores: int, threads: str) -> None:
    assert replica_threads({}, replicas, cores) == {"INFERMESH_WORKER_MAX_THREADS": threads}


@pytest.mark.parametrize("env", [
    {"INFERMESH_WORKER_THREADS": "2"}, {"INFERMESH_WORKER_MAX_THREADS": "2"},
])
def test_an_operators_thread_count_stands(env: dict[str, str]) -> None:
    assert replica_threads(env, 2, 8) == {}


def test_one_replica_keeps_every_core() -> None:
    assert replica_threads({}, 1, 8) == {}


@pytest.fixture
def up_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """`infermesh up` writes its flags into os.environ: put both variables back afterwards
    (set first, so that monkeypatch remembers them as absent)."""
    for name in ("INFERMESH_FUSED_LAYOUT", "INFERMESH_FUSED_PROCESSES"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_up_names_a_bad_layout_and_starts_nothing(
    tmp_path: Path, up_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    up_env.setenv("INFERMESH_FUSED_LAYOUT", "sideways")
    state = tmp_path / "state"
    assert main(["up", "--fused", "--processes", "2", "--state-dir", str(state)]) == 2
    err = capsys.readouterr().err
    assert "INFERMESH_FUSED_LAYOUT" in err and "sideways" in err and "Traceback" not in err
    assert not state.exists()


def test_layout_goes_with_fused(tmp_path: Path, up_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match="--layout goes with --fused"):
        main(["up", "--layout", "replicas", "--state-dir", str(tmp_path / "state")])


def test_the_layout_flag_reaches_the_launcher(tmp_path: Path, up_env: pytest.MonkeyPatch) -> None:
    seen: dict[str, str | None] = {}

    def run_up(**_: object) -> int:
        seen["layout"] = os.environ.get("INFERMESH_FUSED_LAYOUT")
        seen["processes"] = os.environ.get("INFERMESH_FUSED_PROCESSES")
        return 0

    up_env.setattr("deploy.launcher.run_up", run_up)
    assert main(["up", "--fused", "--processes", "2", "--layout", "replicas",
                 "--state-dir", str(tmp_path / "state")]) == 0
    assert seen == {"layout": "replicas", "processes": "2"}
