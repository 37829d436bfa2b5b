"""TorchScript reloads from a split (skeleton + weights file) instead of `torch.jit.load`."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from services.worker.backends import torchscript_split
from services.worker.backends.torchscript_split import SplitLoads


class Tied(torch.nn.Module):
    """Tied weights, a buffer, a bfloat16 parameter and a plain tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.out = torch.nn.Linear(8, 50, bias=False)
        self.out.weight = self.embed.weight  # tied: one storage, two names
        self.norm = torch.nn.BatchNorm1d(8)  # running_mean / running_var are buffers
        self.low = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16))
        self.scale = torch.tensor(0.5)  # an attribute, neither parameter nor buffer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.embed(ids).mean(dim=1)) + self.low.float()
        result: torch.Tensor = self.out(hidden) * self.scale
        return result


def saved(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = Tied().eval()
    assert model.norm.running_mean is not None
    model.norm.running_mean.normal_()  # buffers that differ from their initial values
    path = folder / "tied.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    return path


def outputs(module: Any) -> torch.Tensor:
    ids = torch.arange(12).reshape(3, 4) % 50
    with torch.inference_mode():
        result: torch.Tensor = module(ids)
    return result


@pytest.fixture
def no_whole_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every `torch.jit.load` call (they still load)."""
    calls: list[str] = []
    real: Any = torch.jit.load

    def load(path: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", load)
    return calls


def test_a_reload_reads_the_split_and_computes_the_same(
    tmp_path: Path, no_whole_loads: list[str],
) -> None:
    path = saved(tmp_path, seed=1)
    loads = SplitLoads(tmp_path / "weights", split_from_bytes=0)
    (tmp_path / "weights").mkdir()
    first = loads.load(path)
    assert not any((tmp_path / "weights").iterdir())  # loaded once: nothing split
    loads.load(path)  # the second load is whole too, and splits
    second = loads.load(path)
    assert no_whole_loads == [str(path)] * 2  # the third came from the split
    [split] = loads._splits.values()  # its skeleton holds no weight, not even a tied one
    assert split is not None
    assert all(t.numel() == 0 for _, t in split.skeleton.named_parameters(remove_duplicate=False))
    torch.testing.assert_close(outputs(second), outputs(first), rtol=0, atol=0)
    assert second.out.weight.data_ptr() == second.embed.weight.data_ptr()  # still tied
    assert second.low.dtype == torch.bfloat16 and torch.equal(second.low, first.low)
    assert torch.equal(second.norm.running_mean, first.norm.running_mean)
    # Each load is its own module: changing one changes nothing in the other.
    with torch.no_grad():
        second.low.zero_()
    assert not torch.equal(loads.load(path).low, second.low)


def test_a_small_file_loads_whole_every_time(tmp_path: Path, no_whole_loads: list[str]) -> None:
    path = saved(tmp_path, seed=1)
    loads = SplitLoads(tmp_path, split_from_bytes=path.stat().st_size + 1)
    for _ in range(3):
        loads.load(path)
    assert no_whole_loads == [str(path)] * 3


def test_a_rewritten_file_loads_its_new_weights(tmp_path: Path) -> None:
    path = saved(tmp_path, seed=1)
    loads = SplitLoads(tmp_path, split_from_bytes=0)
    loads.load(path)
    loads.load(path)
    old = outputs(loads.load(path))
    path.unlink()
    saved(tmp_path, seed=2)
    new = loads.load(path)
    whole = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    torch.testing.assert_close(outputs(new), outputs(whole))
    assert not torch.equal(outputs(new), old)


def test_a_lost_weights_file_means_a_whole_load_again(
    tmp_path: Path, no_whole_loads: list[str],
) -> None:
    path = saved(tmp_path, seed=1)
    folder = tmp_path / "weights"
    folder.mkdir()
    loads = SplitLoads(folder, split_from_bytes=0)
    loads.load(path)
    expected = outputs(loads.load(path))
    [weights] = folder.iterdir()
    weights.unlink()
    torch.testing.assert_close(outputs(loads.load(path)), expected, rtol=0, atol=0)
    assert len(no_whole_loads) == 3


def test_a_module_that_cannot_split_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    def refuse(module: Any, folder: Path) -> None:
        raise ValueError("a quantized tensor")

    monkeypatch.setattr(torchscript_split, "_split", refuse)
    path = saved(tmp_path, seed=1)
    loads = SplitLoads(tmp_path, split_from_bytes=0)
    expected = outputs(torch.jit.load(str(path)))  # type: ignore[no-untyped-call]
    for _ in range(3):
        torch.testing.assert_close(outputs(loads.load(path)), expected, rtol=0, atol=0)
    assert sum("cannot split it (a quantized tensor)" in r.message for r in caplog.records) == 1


def test_a_killed_processs_weights_are_removed_by_the_next_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    orphan = tmp_path / f"{torchscript_split.PREFIX}{dead_pid()}-abc"
    orphan.mkdir()
    (orphan / "x.weights").write_bytes(b"w")
    mine = tmp_path / f"{torchscript_split.PREFIX}{os.getpid()}-def"
    mine.mkdir()
    path = saved(tmp_path, seed=1)
    loads = SplitLoads(split_from_bytes=0)
    for _ in range(3):
        loads.load(path)
    assert not orphan.exists() and mine.exists()


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_two_threads_loading_a_file_again_at_once_split_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_split = torchscript_split._split
    calls: list[threading.Thread] = []
    entered, other_done = threading.Event(), threading.Event()

    def split(module: Any, folder: Path) -> Any:
        calls.append(threading.current_thread())
        entered.set()
        assert other_done.wait(30)  # the other thread's load runs while this one splits
        return real_split(module, folder)

    monkeypatch.setattr(torchscript_split, "_split", split)
    path = saved(tmp_path, seed=1)
    folder = tmp_path / "weights"
    folder.mkdir()
    loads = SplitLoads(folder, split_from_bytes=0)
    loads.load(path)
    splitting = threading.Thread(target=loads.load, args=(path,))
    splitting.start()
    assert entered.wait(30)
    expected = outputs(loads.load(path))  # during the split: whole, and no second split
    other_done.set()
    splitting.join(30)
    assert calls == [splitting] and len(list(folder.iterdir())) == 1
    torch.testing.assert_close(outputs(loads.load(path)), expected, rtol=0, atol=0)
