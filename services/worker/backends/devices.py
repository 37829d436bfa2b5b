"""Device policy -> torch device name (torch is imported only when a GPU could be chosen)."""

from __future__ import annotations

from services.worker.backends.base import DEVICE_POLICIES, DeviceUnavailable


def resolve_device(policy: str) -> str:
    """Turn a device policy (``auto``, ``cuda`` or ``cpu``) into a torch device name.

    ``auto`` picks ``cuda`` when available, else ``cpu``; ``cuda`` raises
    :class:`DeviceUnavailable` on a host without CUDA.
    """
    if policy not in DEVICE_POLICIES:
        raise ValueError(f"unknown device policy {policy!r}; expected one of {DEVICE_POLICIES}")
    if policy == "cpu":
        return "cpu"
    # Imported here so that backends without torch can share this module cheaply.
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if policy == "cuda":
        raise DeviceUnavailable(
            "device policy 'cuda' requires a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})"
        )
    return "cpu"
