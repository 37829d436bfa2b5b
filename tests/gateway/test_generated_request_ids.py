"""Ids the gateway makes up for requests that bring none: 32 hex digits that a client may also
send (`check_request_id`), unique within a process, across processes, restarts and forks, and
made without a system call per request (os.urandom releases the GIL on the loop's hot path)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from services.gateway.core import Gateway
from services.mesh.domain.ids import check_request_id

HEX32 = re.compile(r"[0-9a-f]{32}")

# Makes ids, forks, and both sides go on making 1,000 each (a child that kept its parent's
# prefix and counter would repeat the parent's next ids); run twice, it is also a restart.
PRINT_IDS = """
import os, sys
from services.gateway.core import Gateway
before = [Gateway.new_request_id() for _ in range(100)]
child = os.fork()
ids = [Gateway.new_request_id() for _ in range(1000)]
if child == 0:
    sys.stdout.write("child " + " ".join(ids) + "\\n")
    sys.stdout.flush()
    os._exit(0)
os.waitpid(child, 0)
sys.stdout.write("parent " + " ".join(before + ids) + "\\n")
"""


def test_ids_are_usable_request_ids_and_never_repeat_in_a_process() -> None:
    ids = [Gateway.new_request_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for request_id in (ids[0], ids[-1]):
        assert HEX32.fullmatch(request_id) and check_request_id(request_id, field="id")


def test_ids_need_no_system_call_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_urandom(size: int) -> bytes:
        raise AssertionError("os.urandom called for a request id")

    monkeypatch.setattr(os, "urandom", no_urandom)
    assert len({Gateway.new_request_id() for _ in range(1000)}) == 1000


def _ids_of_one_run() -> dict[str, list[str]]:
    done = subprocess.run([sys.executable, "-c", PRINT_IDS], capture_output=True, text=True,
                          check=True, timeout=60)  # fmt: skip
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    return {who: ids.split() for who, ids in lines.items()}


def test_ids_are_unique_across_processes_restarts_and_forks() -> None:
    first, second = _ids_of_one_run(), _ids_of_one_run()
    groups = [first["parent"], first["child"], second["parent"], second["child"],
              [Gateway.new_request_id() for _ in range(1000)]]  # fmt: skip
    every_id = [request_id for group in groups for request_id in group]
    assert [len(group) for group in groups] == [1100, 1000, 1100, 1000, 1000]
    assert len(set(every_id)) == len(every_id)
    assert all(HEX32.fullmatch(request_id) for request_id in every_id)
