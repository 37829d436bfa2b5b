"""The config view the data plane reads: etcd's watched cache in production, a static one in
tests and tools. Pure: `ConfigCache` (services/mesh/infra/etcd.py) fills a `LocalConfig` from
etcd watches."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

Listener = Callable[[], None]


class ConfigView(Protocol):
    """What the data plane reads config through: a ConfigCache, or a StaticConfig in tests."""

    def get(self, key: str) -> Any | None: ...

    def items(self, subprefix: str) -> dict[str, Any]: ...

    def subscribe(self, listener: Listener) -> None: ...


class LocalConfig:
    """Config values held in memory, readable at any time, with change listeners."""

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        self._values: dict[str, Any] = dict(values or {})
        self._listeners: list[Listener] = []

    def get(self, key: str) -> Any | None:
        """The decoded value at `key` (relative to the prefix), or None."""
        return self._values.get(key)

    def items(self, subprefix: str) -> dict[str, Any]:
        """Every key under `subprefix`, relative to the prefix."""
        return {k: v for k, v in self._values.items() if k.startswith(subprefix)}

    def subscribe(self, listener: Listener) -> None:
        """Call `listener()` after every change applied."""
        self._listeners.append(listener)

    def _call_listeners(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("config listener failed")


class StaticConfig(LocalConfig):
    """An in-memory ConfigView: the fake of etcd for core unit tests and tools."""

    def put(self, key: str, value: Any) -> None:
        """Set a key and notify listeners, as a watch event would."""
        self._values[key] = value
        self._call_listeners()

    def delete(self, key: str) -> None:
        self._values.pop(key, None)
        self._call_listeners()
