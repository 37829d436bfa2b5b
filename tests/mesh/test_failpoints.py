from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from services.mesh.domain.errors import InternalError
from services.mesh.infra.failpoints import EXIT_CODE, failpoint, parse_failpoints, set_failpoints


@pytest.fixture
def disarm_after() -> Iterator[None]:
    try:
        yield
    finally:
        set_failpoints("")


def test_parse_failpoints() -> None:
    assert parse_failpoints("") == {}
    assert parse_failpoints(" a.b=exit , c=raise,") == {"a.b": "exit", "c": "raise"}
    for bad in ("a", "a=explode", "=exit"):
        with pytest.raises(ValueError, match="INFERMESH_FAILPOINTS: bad entry"):
            parse_failpoints(bad)


@pytest.mark.usefixtures("disarm_after")
def test_raise_only_at_the_armed_failpoint() -> None:
    failpoint("control.after_commit")  # unarmed: nothing happens
    set_failpoints("control.after_commit=raise")
    failpoint("control.before_commit")
    with pytest.raises(InternalError, match="^failpoint control.after_commit$"):
        failpoint("control.after_commit")


def test_exit_ends_the_process_at_once_with_75() -> None:
    script = (
        "from services.mesh.infra.failpoints import failpoint\n"
        "failpoint('x.other'); print('before', flush=True); failpoint('x.here'); print('after')"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env={"INFERMESH_FAILPOINTS": "x.here=exit"},
        capture_output=True, text=True, timeout=30,
    )
    assert (result.returncode, result.stdout) == (EXIT_CODE, "before\n")


@pytest.mark.usefixtures("disarm_after")
def test_sleep_blocks_the_caller_then_goes_on() -> None:
    assert parse_failpoints("w=sleep:50,v=sleep:0.5") == {"w": "sleep:50", "v": "sleep:0.5"}
    for bad in ("w=sleep", "w=sleep:", "w=sleep:-1", "w=sleep:nan", "w=nap:5"):
        with pytest.raises(ValueError, match="sleep:<ms>"):
            parse_failpoints(bad)
    set_failpoints("worker.run_batch=sleep:30")
    started = time.monotonic()
    failpoint("worker.run_batch")
    assert time.monotonic() - started >= 0.03  # a lower bound: never flaky on a busy machine
