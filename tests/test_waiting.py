"""The shared wait helper: returns what satisfied the condition, or fails saying what it saw."""

from __future__ import annotations

import itertools

import pytest

from tests.waiting import wait_for, wait_for_sync


async def test_it_returns_the_first_value_that_satisfies_the_condition() -> None:
    counter = itertools.count()

    async def observe() -> int:
        return next(counter)

    assert await wait_for(observe, lambda n: n >= 3, timeout=5, what="three", interval=0) == 3


async def test_on_timeout_it_names_what_it_waited_for_and_the_last_value() -> None:
    expected = r"waited 0\.1 s for the moon; last observed: 'cheese'"
    with pytest.raises(AssertionError, match=expected):
        await wait_for(lambda: "cheese", lambda v: v == "moon", timeout=0.1, what="the moon")


def test_the_sync_form_waits_the_same_way() -> None:
    counter = itertools.count()
    assert wait_for_sync(lambda: next(counter), timeout=5, what="a truthy count", interval=0) == 1
    with pytest.raises(AssertionError, match="last observed: 0"):
        wait_for_sync(lambda: 0, timeout=0.05, what="zero to become truthy")
