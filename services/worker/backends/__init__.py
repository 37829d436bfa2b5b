"""Model backends: the :class:`Backend` interface and its TorchScript implementation."""

from services.worker.backends.base import Backend, BackendError, DeviceUnavailable, resolve_device
from services.worker.backends.torchscript import TorchScriptBackend

__all__ = ["Backend", "BackendError", "DeviceUnavailable", "TorchScriptBackend", "resolve_device"]
