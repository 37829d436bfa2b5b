"""The backend interface a worker drives, and the errors backends raise.

A backend turns one concatenated batch of numpy arrays into outputs. Its methods are
synchronous: the worker core calls them in a thread, off the event loop.

A signature is the plain dict stored in etcd, e.g.::

    {"inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 32]}],
     "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 2]}]}

Datatypes are Open Inference Protocol names, -1 marks a dynamic dim and the first dim is
the batch dim.

Errors::

    BackendError            the model could not be loaded or run
     └── DeviceUnavailable  the device policy asks for hardware this host lacks
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy.typing as npt

DEVICE_POLICIES = ("auto", "cuda", "cpu")


class BackendError(Exception):
    """A model could not be loaded, warmed up or run."""


class DeviceUnavailable(BackendError):
    """The device policy requires hardware (CUDA) that this host does not have."""


class Backend(Protocol):
    """One loaded model on one device; not thread-safe, called from one thread at a time."""

    @property
    def device(self) -> str:
        """The torch device the model runs on, e.g. ``"cpu"`` or ``"cuda:0"``."""
        ...

    def load(self, artifact: Path) -> None:
        """Load the model file at ``artifact`` onto the device."""
        ...

    def warm_up(self, max_batch_size: int) -> None:
        """Run dummy batches (sizes 1 and ``max_batch_size``) so the first request is fast."""
        ...

    def run_batch(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run one batch: inputs keyed by signature input name, concatenated along dim 0.

        Returns outputs keyed by signature output name, rows aligned with the input rows.
        """
        ...

    def unload(self) -> None:
        """Release the model and the device memory it held."""
        ...
