"""Waiting for something observable to happen, with a deadline (tests/README.md, "Rules").

A test that sleeps and then asserts passes on an idle machine and fails on a busy one; a test
that polls the condition it needs (a metric, an etcd key, a Postgres row, a response naming the
new rollout epoch) with a deadline waits as long as the machine needs and no longer. On timeout
the failure names what was awaited and the last value seen, so a slow machine and a broken
feature can be told apart.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


def _truthy(value: object) -> bool:
    return bool(value)


def _timed_out(what: str, timeout: float, value: object) -> AssertionError:
    shown = repr(value)
    if len(shown) > 2000:
        shown = f"{shown[:2000]}... ({len(shown)} characters)"
    return AssertionError(f"waited {timeout:g} s for {what}; last observed: {shown}")


@overload
async def wait_for(
    observe: Callable[[], Awaitable[T]], until: Callable[[T], bool] = ..., *,
    timeout: float, what: str, interval: float = ...,
) -> T: ...


@overload
async def wait_for(
    observe: Callable[[], T], until: Callable[[T], bool] = ..., *,
    timeout: float, what: str, interval: float = ...,
) -> T: ...


async def wait_for(
    observe: Callable[[], Any], until: Callable[[Any], bool] = _truthy, *,
    timeout: float, what: str, interval: float = 0.05,
) -> Any:
    """Call `observe()` (sync or async) every `interval` seconds until `until(value)` holds;
    return that value. After `timeout` seconds, raise AssertionError naming `what` and the
    last value observed. An exception raised by `observe` propagates at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = observe()
        if inspect.isawaitable(value):
            value = await value
        if until(value):
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, value)
        await asyncio.sleep(interval)


def wait_for_sync(
    observe: Callable[[], T], until: Callable[[T], bool] = _truthy, *,
    timeout: float, what: str, interval: float = 0.05,
) -> T:
    """`wait_for` for synchronous tests (blocks the calling thread)."""
    deadline = time.monotonic() + timeout
    while True:
        value = observe()
        if until(value):
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, value)
        time.sleep(interval)
