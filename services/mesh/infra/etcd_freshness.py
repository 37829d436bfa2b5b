"""Whether a watched copy of an etcd prefix still follows etcd.

A watch can go quiet without an error. aetcd takes a watch that etcd created and cancelled in
the same answer for a live one, and every watch of a client shares one stream, whose bounded
request queue and lock can leave a new watch waiting forever. On 2026-12-07, after the fault
group paused, then killed and restarted etcd, a batcher never saw a worker that registered
afterwards and logged nothing: its cache looked connected and received no events. A quiet
watch and a quiet prefix look the same from the stream, so `ConfigCache` compares itself now
and then with a cheap read of the prefix (keys and revisions, no values).

The comparison is exact, not a heuristic: a change etcd committed at or before the read's
revision must be in the cache once the events in flight at the read have had time to arrive.
"""

from __future__ import annotations

from collections.abc import Mapping

IN_FLIGHT_GRACE = 1.0
"""Seconds between a read and the comparison: time for events committed before the read,
already on their way over the watch, to reach the cache."""


def unseen_changes(
    read: Mapping[str, int], *, read_revision: int, cached: Mapping[str, int],
    deleted: Mapping[str, int],
) -> list[str]:
    """Keys whose state at `read_revision` the cache does not reflect, sorted.

    `read` maps each key etcd listed at `read_revision` to its modification revision; `cached`
    maps each key the cache holds to the revision it last applied for it, and `deleted` each
    key whose delete it applied to that delete's revision. A key is behind when the cache
    applied nothing for it as recent as what etcd listed; it is gone when the cache holds a
    version etcd had already replaced by a delete at the read."""
    behind = [key for key, revision in read.items()
              if max(cached.get(key, 0), deleted.get(key, 0)) < revision]
    gone = [key for key, revision in cached.items()
            if key not in read and revision <= read_revision]
    return sorted(behind + gone)


def deletes_to_keep(deleted: Mapping[str, int], *, read_revision: int) -> dict[str, int]:
    """The applied deletes a comparison after a read at `read_revision` may still need: those
    after it (a later read lists an older-deleted key with a newer revision, or not at all)."""
    return {key: revision for key, revision in deleted.items() if revision > read_revision}
