"""Loading a TorchScript file again without holding the GIL while its weights are read.

`torch.jit.load` holds the GIL from start to end, and most of that time is the copy of the
tensor data: 26 ms for a 47 MB file on this machine, where ONNX Runtime builds a session with
the GIL released (docs/PERFORMANCE.md, "Why hits wait while other versions load"). While it runs,
the worker's event loop and its inference thread stop, so every batch of every other version
waits. A worker that evicts and loads versions again within a memory budget (docs/PLACEMENT.md)
would stall its hot versions on every reload.

So a file's loads in a process are whole, as before, until it loads a second time (evicted and
wanted again, or two versions of one artifact): a file loaded once is the common case, and it
costs nothing more. The second load also keeps two things beside the module it returns:

- a *skeleton*: a deep copy of the module with every parameter and buffer emptied (the copy
  takes a few ms and compiles nothing);
- the weights, written to a file of their own, with an index of name, dtype, shape and offset.

Every later load of the file copies the skeleton and reads each weight into a fresh tensor
with `readinto`, which releases the GIL for each read. Tensor attributes that are neither
parameters nor buffers, and a frozen module's constants, stay in the skeleton whole. Weights
that share storage (tied weights) stay shared.

Only CPU loads of files of at least `SPLIT_FROM_BYTES` split; anything this cannot split
(quantized or sparse tensors, an unwritable temp dir) is logged and loaded whole each time.
The weights files live in one temp directory per process (`infermesh-weights-<pid>-*`),
removed when it exits; one left by a process that was killed is removed by the next process
that splits a file.
"""

from __future__ import annotations

import atexit
import copy
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

SPLIT_FROM_BYTES = 8 << 20
"""Smaller files load whole in a few ms: not worth a second copy on disk."""
PREFIX = "infermesh-weights-"
CHUNK = 8 << 20
"""Bytes per `readinto`: the GIL is taken back between reads."""

_Key = tuple[str, int, int]  # resolved path, size, mtime in ns


@dataclass(frozen=True, slots=True)
class _Weight:
    name: str
    """Dotted attribute path from the root module (`encoder.layers.0.linear1.weight`)."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    alias: str | None
    """The name of an earlier weight this one shares storage with (read once)."""


@dataclass(frozen=True, slots=True)
class _Split:
    skeleton: Any  # a torch.jit.ScriptModule with every weight emptied
    weights: Path
    entries: tuple[_Weight, ...]

    def module(self) -> Any:
        """A new module: the skeleton's copy with every weight read from the file."""
        module = copy.deepcopy(self.skeleton)
        made: dict[str, torch.Tensor] = {}
        with open(self.weights, "rb", buffering=0) as file:
            for entry in self.entries:
                if entry.alias is not None:
                    tensor = made[entry.alias]
                else:
                    tensor = torch.empty(entry.shape, dtype=entry.dtype)
                    if entry.nbytes:
                        _read_into(file, entry.offset, _bytes_of(tensor))
                    made[entry.name] = tensor
                owner, leaf = _owner(module, entry.name)
                setattr(owner, leaf, tensor)
        return module


class SplitLoads:
    """TorchScript CPU loads in one process: whole the first time, from a split after."""

    def __init__(self, directory: Path | None = None, *,
                 split_from_bytes: int = SPLIT_FROM_BYTES) -> None:
        self._directory = directory
        self._split_from = split_from_bytes
        self._splits: dict[_Key, _Split | None] = {}  # None: tried, cannot split
        self._seen: set[_Key] = set()  # loaded whole once
        self._lock = threading.Lock()

    def load(self, path: Path) -> Any:
        """The module saved at `path`, on CPU (raises what `torch.jit.load` raises)."""
        key = _key(path)
        with self._lock:
            split = self._splits.get(key)
        if split is not None:
            try:
                return split.module()
            except (OSError, RuntimeError, KeyError) as exc:  # its weights file went away
                log.warning("loading %s whole again: its split failed (%s)", path, exc)
                with self._lock:
                    self._splits.pop(key, None)
        module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
        with self._lock:
            split_now = key in self._seen and key[1] >= self._split_from
            split_now = split_now and key not in self._splits
            if split_now:  # one split per file, even when two threads load it at once
                self._splits[key] = None
            self._seen.add(key)
        if split_now:
            try:
                made = _split(module, self._folder())
            except Exception as exc:  # noqa: BLE001 - whole loads still work; say why once
                log.warning("%s will load whole each time: cannot split it (%s)", path, exc)
            else:
                with self._lock:
                    self._splits[key] = made
        return module

    def _folder(self) -> Path:
        with self._lock:
            if self._directory is None:
                _remove_orphans(Path(tempfile.gettempdir()))
                self._directory = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
                atexit.register(shutil.rmtree, self._directory, True)
            return self._directory


def _remove_orphans(parent: Path) -> None:
    """Remove the weights directories of processes that no longer run (killed: no atexit)."""
    for folder in parent.glob(f"{PREFIX}*-*"):
        pid = folder.name.removeprefix(PREFIX).partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _split(module: Any, folder: Path) -> _Split:
    """Write `module`'s weights to a file in `folder` and keep its emptied deep copy;
    `module` itself is left as it was."""
    named = _weights(module)
    entries: list[_Weight] = []
    first: dict[tuple[Any, ...], str] = {}
    descriptor, name = tempfile.mkstemp(dir=folder, suffix=".weights")
    weights = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as file:
            for dotted, tensor in named:
                if tensor.device.type != "cpu" or tensor.layout != torch.strided:
                    raise ValueError(f"{dotted}: a {tensor.device} {tensor.layout} tensor")
                same = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                        tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
                shape = tuple(tensor.shape)
                if same in first:
                    entries.append(_Weight(dotted, tensor.dtype, shape, 0, 0, first[same]))
                    continue
                first[same] = dotted
                data = _bytes_of(tensor.detach().contiguous())
                entries.append(_Weight(dotted, tensor.dtype, shape, file.tell(), data.nbytes,
                                       None))
                file.write(data.data)
        originals = [(*_owner(module, dotted), tensor) for dotted, tensor in named]
        try:
            for owner, leaf, tensor in originals:
                setattr(owner, leaf, torch.empty(0, dtype=tensor.dtype))
            skeleton = copy.deepcopy(module)
        finally:
            for owner, leaf, tensor in originals:
                setattr(owner, leaf, tensor)
    except BaseException:
        weights.unlink(missing_ok=True)
        raise
    return _Split(skeleton, weights, tuple(entries))


def _weights(module: Any) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer by dotted name, each name once (tied weights under each of
    their names: left out, one would stay whole in the skeleton, untied)."""
    found: dict[str, torch.Tensor] = {}
    for dotted, tensor in [*module.named_parameters(remove_duplicate=False),
                           *module.named_buffers(remove_duplicate=False)]:
        found.setdefault(dotted, tensor)
    return list(found.items())


def _owner(module: Any, dotted: str) -> tuple[Any, str]:
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    return module, leaf


def _bytes_of(tensor: torch.Tensor) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """The bytes of a contiguous tensor as a numpy view (any dtype, bfloat16 included)."""
    array: np.ndarray[Any, np.dtype[np.uint8]] = tensor.reshape(-1).view(torch.uint8).numpy()
    return array


def _read_into(file: Any, offset: int, target: np.ndarray[Any, np.dtype[np.uint8]]) -> None:
    view = target.data.cast("B")
    file.seek(offset)
    done = 0
    while done < len(view):
        got = file.readinto(view[done:done + CHUNK])
        if not got:
            raise OSError(f"weights file ends {len(view) - done} bytes early")
        done += got


def _key(path: Path) -> _Key:
    resolved = path.resolve()
    stat = resolved.stat()
    return str(resolved), stat.st_size, stat.st_mtime_ns
