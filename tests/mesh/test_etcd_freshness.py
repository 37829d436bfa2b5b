"""The comparison that tells a stalled config watch from a quiet prefix."""

from __future__ import annotations

from services.mesh.infra.etcd_freshness import deletes_to_keep, unseen_changes


def test_a_cache_that_applied_everything_up_to_the_read_is_fresh() -> None:
    assert unseen_changes({"a": 3, "b": 7}, read_revision=9, cached={"a": 3, "b": 7},
                          deleted={"c": 8}) == []


def test_changes_after_the_read_are_not_misses() -> None:
    # b changed, c appeared and a went after the read (revision 9): the cache is ahead.
    assert unseen_changes({"a": 3, "b": 7}, read_revision=9, cached={"b": 10, "c": 11},
                          deleted={"a": 12}) == []


def test_a_key_the_cache_never_saw_or_saw_an_older_version_of_is_missed() -> None:
    assert unseen_changes({"a": 3, "b": 7, "w": 8}, read_revision=9, cached={"a": 3, "b": 5},
                          deleted={}) == ["b", "w"]


def test_a_key_deleted_before_the_read_but_still_cached_is_missed() -> None:
    assert unseen_changes({"a": 3}, read_revision=9, cached={"a": 3, "gone": 4},
                          deleted={}) == ["gone"]


def test_an_older_delete_does_not_hide_a_newer_put() -> None:
    assert unseen_changes({"a": 8}, read_revision=9, cached={}, deleted={"a": 5}) == ["a"]


def test_only_deletes_after_the_read_are_kept() -> None:
    assert deletes_to_keep({"a": 5, "b": 9, "c": 10}, read_revision=9) == {"c": 10}
