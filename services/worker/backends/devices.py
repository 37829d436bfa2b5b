"""Device policy -> torch device name (torch is imported only when a GPU could be chosen).

A version's ``device`` policy (``auto``, ``cuda``, ``cpu``) picks its first device;
``cpu_fallback`` says whether a CUDA failure may move it to CPU. :func:`choose_device` is
that decision as a pure function; the worker core applies the same rule to failures met
later (out of memory at load or on a batch), classified by
:func:`~services.worker.backends.base.cuda_failure`.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.worker.backends.base import DEVICE_POLICIES, DeviceUnavailable


@dataclass(frozen=True, slots=True)
class DeviceChoice:
    """Where a version runs: ``cuda`` or ``cpu``, and why CPU when CUDA was asked for."""

    device: str
    fallback: str | None = None
    """Set when the policy asked for CUDA and CPU was chosen instead (``cpu_fallback``)."""


def choose_device(
    policy: str, *, cpu_fallback: bool, cuda_available: bool, why_not: str = ""
) -> DeviceChoice:
    """The device for `policy` on a host with or without CUDA (`why_not`: what the probe
    said when it has none). ``auto`` takes CPU without CUDA, as a choice, not a fallback;
    ``cuda`` without CUDA falls back when `cpu_fallback`, else raises DeviceUnavailable."""
    if policy not in DEVICE_POLICIES:
        raise ValueError(f"unknown device policy {policy!r}; expected one of {DEVICE_POLICIES}")
    if policy == "cpu":
        return DeviceChoice("cpu")
    if cuda_available:
        return DeviceChoice("cuda")
    if policy == "auto":
        return DeviceChoice("cpu")
    reason = (f"cuda unavailable: device policy 'cuda' needs a CUDA GPU, but "
              f"{why_not or 'this host has none'}")
    if cpu_fallback:
        return DeviceChoice("cpu", fallback=reason)
    raise DeviceUnavailable(reason)


def resolve_device(policy: str, *, cpu_fallback: bool = False) -> str:
    """Turn a device policy (``auto``, ``cuda`` or ``cpu``) into a torch device name.

    ``auto`` picks ``cuda`` when available, else ``cpu``; ``cuda`` raises
    :class:`DeviceUnavailable` on a host without CUDA unless `cpu_fallback`.
    """
    if policy == "cpu":
        return choose_device(policy, cpu_fallback=cpu_fallback, cuda_available=False).device
    # Imported here so that backends without torch can share this module cheaply.
    import torch

    why_not = (f"torch.cuda.is_available() is False (torch {torch.__version__}, "
               f"built for CUDA {torch.version.cuda})")
    return choose_device(
        policy, cpu_fallback=cpu_fallback, cuda_available=torch.cuda.is_available(),
        why_not=why_not,
    ).device
