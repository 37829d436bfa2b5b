"""Failpoints: named spots where a fault test can stop or break a process, like etcd's gofail.

Production code calls `failpoint("control.after_commit")` at the exact point a crash is most
interesting (here: after the Postgres commit, before the etcd publish). Nothing happens unless
the process was started with `INFERMESH_FAILPOINTS`, a comma-separated list of `name=action`:

- `exit`: log one line and `os._exit(75)` at once (no cleanup, no flush: a crash);
- `raise`: raise `InternalError("failpoint <name>")` (the caller's error handling runs);
- `sleep:<ms>`: block the calling thread for that many milliseconds, then go on. Called in a
  worker's inference thread (`worker.run_batch`), it models a slow model: with a max batch
  size of 1 and `sleep:50`, a worker serves ~20 requests/s whatever the CPU, so the
  autoscaling tests and bench can make more workers really add capacity on a busy machine.

The variable is read once, at import; an unarmed failpoint costs one frozenset lookup.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping

from services.mesh.domain.errors import InternalError

log = logging.getLogger(__name__)

ENV = "INFERMESH_FAILPOINTS"
EXIT_CODE = 75
ACTIONS = ("exit", "raise", "sleep:<ms>")


def parse_failpoints(spec: str) -> dict[str, str]:
    """`"a=exit,b=sleep:50"` as `{"a": "exit", "b": "sleep:50"}`; ValueError names a bad
    entry."""
    armed: dict[str, str] = {}
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        name, _, action = entry.partition("=")
        if not name.strip() or not _known(action.strip()):
            raise ValueError(
                f"{ENV}: bad entry {entry!r}; expected name=action with action one of "
                + ", ".join(ACTIONS)
            )
        armed[name.strip()] = action.strip()
    return armed


def _known(action: str) -> bool:
    if action in ("exit", "raise"):
        return True
    kind, _, millis = action.partition(":")
    try:
        return kind == "sleep" and math.isfinite(float(millis)) and float(millis) >= 0
    except ValueError:
        return False


_actions: Mapping[str, str] = parse_failpoints(os.environ.get(ENV, ""))
_armed: frozenset[str] = frozenset(_actions)


def set_failpoints(spec: str) -> None:
    """Replace the armed failpoints (for in-process tests; processes use the variable)."""
    global _actions, _armed
    _actions = parse_failpoints(spec)
    _armed = frozenset(_actions)


def armed(name: str) -> bool:
    """Whether `name` is armed (a caller may then avoid a path a failpoint would stall)."""
    return name in _armed


def failpoint(name: str) -> None:
    """Do whatever `INFERMESH_FAILPOINTS` says for `name`; nothing when it is not armed."""
    if name not in _armed:
        return
    action = _actions[name]
    if action == "exit":
        log.critical("failpoint %s: exiting with status %d", name, EXIT_CODE)
        os._exit(EXIT_CODE)
    if action.startswith("sleep:"):
        time.sleep(float(action.removeprefix("sleep:")) / 1000)
        return
    raise InternalError(f"failpoint {name}")
