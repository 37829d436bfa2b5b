"""Failpoints: named spots where a fault test can stop or break a process, like etcd's gofail.

Production code calls `failpoint("control.after_commit")` at the exact point a crash is most
interesting (here: after the Postgres commit, before the etcd publish). Nothing happens unless
the process was started with `INFERMESH_FAILPOINTS`, a comma-separated list of `name=action`:

- `exit`: log one line and `os._exit(75)` at once (no cleanup, no flush: a crash);
- `raise`: raise `InternalError("failpoint <name>")` (the caller's error handling runs).

The variable is read once, at import; an unarmed failpoint costs one frozenset lookup.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from services.mesh.domain.errors import InternalError

log = logging.getLogger(__name__)

ENV = "INFERMESH_FAILPOINTS"
EXIT_CODE = 75
ACTIONS = ("exit", "raise")


def parse_failpoints(spec: str) -> dict[str, str]:
    """`"a=exit,b=raise"` as `{"a": "exit", "b": "raise"}`; ValueError names a bad entry."""
    armed: dict[str, str] = {}
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        name, _, action = entry.partition("=")
        if not name.strip() or action.strip() not in ACTIONS:
            raise ValueError(
                f"{ENV}: bad entry {entry!r}; expected name=action with action one of "
                + ", ".join(ACTIONS)
            )
        armed[name.strip()] = action.strip()
    return armed


_actions: Mapping[str, str] = parse_failpoints(os.environ.get(ENV, ""))
_armed: frozenset[str] = frozenset(_actions)


def set_failpoints(spec: str) -> None:
    """Replace the armed failpoints (for in-process tests; processes use the variable)."""
    global _actions, _armed
    _actions = parse_failpoints(spec)
    _armed = frozenset(_actions)


def failpoint(name: str) -> None:
    """Do whatever `INFERMESH_FAILPOINTS` says for `name`; nothing when it is not armed."""
    if name not in _armed:
        return
    if _actions[name] == "exit":
        log.critical("failpoint %s: exiting with status %d", name, EXIT_CODE)
        os._exit(EXIT_CODE)
    raise InternalError(f"failpoint {name}")
