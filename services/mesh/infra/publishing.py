"""Publishing epoch-numbered records to etcd without ever going backwards.

Two control-plane writers publish `rollouts/{model}`: the control API after each write and the
registry's (and the control API's) reconcile loops. Each reads Postgres, then writes etcd, so a
slow writer could overwrite a newer record with an older one. `publish_newer` makes the write a
compare-and-swap on the key's etcd `mod_revision`: it only replaces what it read, and only
when what it read is older. A lost race is retried by reading again.
"""

from __future__ import annotations

from typing import Any

import aetcd
import orjson

from services.mesh.domain.errors import Unavailable

ATTEMPTS = 16
"""Lost races tolerated before giving up; each one means another writer published."""


async def publish_newer(
    etcd: aetcd.Client, key: bytes, record: dict[str, Any], *, epoch: int
) -> bool:
    """Put `record` at `key` unless etcd already holds this epoch (same content) or a newer one.

    Returns True when this call wrote the key. A record in etcd with the same epoch but other
    content, an unreadable one, or none at all is replaced. etcd errors propagate as raised
    by aetcd; Unavailable when the key kept changing under us for `ATTEMPTS` tries.
    """
    value = orjson.dumps(record)
    for _ in range(ATTEMPTS):
        current = await etcd.get(key)
        if current is None:
            # Absent: only create it (a concurrent creator makes version > 0).
            condition = etcd.transactions.version(key) == 0
        elif not is_older(current.value, record, epoch):
            return False
        else:
            condition = etcd.transactions.mod(key) == current.mod_revision
        succeeded, _ = await etcd.transaction(
            compare=[condition], success=[etcd.transactions.put(key, value)], failure=[]
        )
        if succeeded:
            return True
    raise Unavailable(f"{key.decode()} changed {ATTEMPTS} times while publishing; try again")


def is_older(published: bytes, record: dict[str, Any], epoch: int) -> bool:
    """Whether the published value should give way to `record` at `epoch`.

    True for a lower epoch, the same epoch with other content, or a value that is not a
    JSON object with an integer `epoch`.
    """
    try:
        current = orjson.loads(published)
        current_epoch = int(current["epoch"])
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
        return True  # garbage in etcd: replace it
    if current_epoch != epoch:
        return current_epoch < epoch
    return bool(current != record)
