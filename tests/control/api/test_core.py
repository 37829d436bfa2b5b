from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import orjson
import pytest

from control.api.core import RolloutStore, StaleEpoch
from services.mesh.domain.errors import InternalError, InvalidInput, NotFound, Unavailable
from services.mesh.domain.types import Rollout
from services.mesh.infra.etcd import connect_client
from services.mesh.infra.failpoints import set_failpoints
from tests.control.api.conftest import ControlHarness, canary


@pytest.fixture
def after_commit_raises() -> Iterator[None]:
    set_failpoints("control.after_commit=raise")
    try:
        yield
    finally:
        set_failpoints("")


async def test_apply_writes_postgres_history_and_etcd(control: ControlHarness) -> None:
    rollout = await control.store.apply(
        "iris", canary(10, reason="canary 2"), author="alice", if_match=None
    )
    assert rollout.epoch == 2 and rollout.fallback == "1"  # the route with the largest weight
    assert rollout.salt == "iris" and rollout.sticky_key is None and rollout.shadow == ()
    state = await control.store.get("iris")
    assert state.rollout == rollout and state.updated_at
    assert await control.saved_epoch() == 2
    assert await control.published() == rollout.to_json()
    history = await control.store.history("iris")
    assert [(h.epoch, h.author, h.reason) for h in history] == [
        (2, "alice", "canary 2"), (1, "registry", "first version"),
    ]
    assert history[0].record == rollout.to_json()


async def test_epochs_increase_and_unset_fields_keep_their_values(
    control: ControlHarness,
) -> None:
    body = canary(10, sticky_key="user", salt="s1",
                  shadow=[{"version": "3", "fraction": 0.5}], fallback="2")
    first = await control.store.apply("iris", body, author="alice", if_match=None)
    second = await control.store.apply("iris", canary(50), author="alice", if_match=None)
    assert (first.epoch, second.epoch) == (2, 3)
    assert (second.sticky_key, second.salt) == ("user", "s1")  # carried over
    assert second.shadow == () and second.fallback == "1"  # not carried over: defaults
    assert (await control.published())["epoch"] == 3


async def test_a_stale_if_match_writes_nothing(control: ControlHarness) -> None:
    await control.store.apply("iris", canary(10), author="alice", if_match=1)
    with pytest.raises(StaleEpoch, match="at epoch 2, not 1") as caught:
        await control.store.apply("iris", canary(50), author="bob", if_match=1)
    assert caught.value.current == 2
    assert await control.saved_epoch() == 2
    assert [h.author for h in await control.store.history("iris")] == ["alice", "registry"]
    assert (await control.published())["routes"][1]["weight"] == 10


async def test_concurrent_writes_with_one_if_match_have_one_winner(
    control: ControlHarness,
) -> None:
    results = await asyncio.gather(
        *(control.store.apply("iris", canary(w), author=f"w{w}", if_match=1) for w in (10, 20)),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, Rollout)]
    lost = [r for r in results if isinstance(r, StaleEpoch)]
    assert len(won) == 1 and len(lost) == 1
    assert won[0].epoch == 2 and await control.published() == won[0].to_json()
    assert len(await control.store.history("iris")) == 2


async def test_an_invalid_write_names_the_field_and_writes_nothing(
    control: ControlHarness,
) -> None:
    body = {"routes": [{"version": "1", "weight": 50}, {"version": "9", "weight": 50}]}
    with pytest.raises(InvalidInput) as caught:
        await control.store.apply("iris", body, author="alice", if_match=None)
    assert caught.value.message == "routes[1].version: version '9' of model 'iris' does not exist"
    assert await control.saved_epoch() == 1
    assert (await control.published())["epoch"] == 1


async def test_guard_is_validated_and_stored_as_given(control: ControlHarness) -> None:
    guard = {"steps": [25, 50, 100], "min_samples": 10}
    rollout = await control.store.apply(
        "iris", canary(5, guard=guard), author="alice", if_match=None
    )
    assert rollout.guard == guard and (await control.published())["guard"] == guard
    # An empty guard means "all defaults"; it is stored resolved so it is not lost.
    await control.store.apply("iris", canary(5, guard={}), author="alice", if_match=None)
    stored = (await control.store.get("iris")).rollout.guard
    assert stored is not None and (stored["canary"], stored["baseline"]) == ("2", "1")
    assert [r.epoch for r in await control.store.guarded()] == [3]


async def test_unknown_models_are_not_found(control: ControlHarness) -> None:
    with pytest.raises(NotFound, match="model 'nope' not found"):
        await control.store.get("nope")
    with pytest.raises(NotFound):
        await control.store.apply("nope", canary(), author="alice", if_match=None)
    with pytest.raises(NotFound):
        await control.store.history("nope")
    with pytest.raises(NotFound):
        await control.store.rollback("nope", to_epoch=None, author="alice")
    await control.registry.registry.create_model("empty")
    with pytest.raises(NotFound, match="has no rollout yet"):
        await control.store.get("empty")
    assert await control.store.history("empty") == []


async def test_rollback_restores_the_previous_epoch_without_its_guard(
    control: ControlHarness,
) -> None:
    guarded = await control.store.apply("iris", canary(10, guard={}), author="alice", if_match=None)
    await control.store.apply("iris", canary(50), author="alice", if_match=None)
    back = await control.store.rollback("iris", to_epoch=None, author="bob")
    assert back.epoch == 4 and back.routes == guarded.routes and back.guard is None
    assert await control.published() == back.to_json()
    latest = (await control.store.history("iris", limit=1))[0]
    assert (latest.author, latest.reason) == ("bob", "rollback to epoch 2")
    assert await control.store.guarded() == []


async def test_rollback_to_a_named_epoch(control: ControlHarness) -> None:
    await control.store.apply("iris", canary(10), author="alice", if_match=None)
    back = await control.store.rollback("iris", to_epoch=1, author="bob", reason="bad canary")
    assert back == dataclasses.replace(Rollout.stable("iris", "1"), epoch=3)
    assert (await control.store.history("iris"))[0].reason == "bad canary"
    with pytest.raises(NotFound, match="epoch 9 of model 'iris' not found"):
        await control.store.rollback("iris", to_epoch=9, author="bob")


async def test_rollback_needs_an_earlier_epoch(control: ControlHarness) -> None:
    with pytest.raises(InvalidInput, match="^epoch: model 'iris' has no epoch before 1"):
        await control.store.rollback("iris", to_epoch=None, author="bob")


async def test_set_rollout_assigns_the_epoch_and_honours_if_match(
    control: ControlHarness,
) -> None:
    wanted = dataclasses.replace(Rollout.stable("iris", "2"), epoch=99, salt="s")
    saved = await control.store.set_rollout(wanted, author="guard", reason="step", if_match=1)
    assert saved == dataclasses.replace(wanted, epoch=2)
    assert (await control.store.history("iris"))[0].reason == "step"
    with pytest.raises(StaleEpoch):
        await control.store.set_rollout(wanted, author="guard", reason="step", if_match=1)
    bad = dataclasses.replace(wanted, fallback="9")
    with pytest.raises(InvalidInput, match="^fallback:"):
        await control.store.set_rollout(bad, author="guard", reason="", if_match=None)


@pytest.mark.usefixtures("after_commit_raises")
async def test_reconcile_publishes_a_write_that_was_not_published(
    control: ControlHarness,
) -> None:
    with pytest.raises(InternalError, match="failpoint control.after_commit"):
        await control.store.apply("iris", canary(10), author="alice", if_match=None)
    assert await control.saved_epoch() == 2
    assert (await control.published())["epoch"] == 1
    assert await control.store.reconcile() == 1
    assert (await control.published())["epoch"] == 2
    assert await control.store.reconcile() == 0


async def test_reconcile_restores_a_deleted_key_and_never_regresses(
    control: ControlHarness,
) -> None:
    rollout = await control.store.apply("iris", canary(10), author="alice", if_match=None)
    await control.registry.etcd.delete_prefix(control.registry.prefix.encode())
    assert await control.store.reconcile() == 1
    assert await control.published() == rollout.to_json()
    newer = {**rollout.to_json(), "epoch": 9}
    key = (control.registry.prefix + "rollouts/iris").encode()
    await control.registry.etcd.put(key, orjson.dumps(newer))
    assert await control.store.reconcile() == 0
    assert await control.published() == newer


async def test_a_failed_publish_is_unavailable_but_saved(
    control: ControlHarness, etcd_prefix: str
) -> None:
    nowhere = connect_client("http://127.0.0.1:9")  # discard port: nothing listens
    try:
        store = RolloutStore(control.registry.pool, nowhere, etcd_prefix=etcd_prefix)
        with pytest.raises(Unavailable, match="^saved as epoch 2, but publishing to etcd failed"):
            await store.apply("iris", canary(10), author="alice", if_match=None)
    finally:
        await nowhere.close()
    assert await control.saved_epoch() == 2
    assert await control.store.reconcile() == 1


async def test_models_read_the_same_as_the_registry(control: ControlHarness) -> None:
    registry = control.registry.registry
    assert await control.store.list_models() == await registry.list_models()
    assert await control.store.get_model("iris") == await registry.get_model("iris")
