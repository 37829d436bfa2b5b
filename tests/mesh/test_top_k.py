"""A hot model spread over its top k batchers (services/mesh/transport/spread.py): the ranking,
the split of a version's workers, the per-version `batchers` setting, and `pick_by_key(k=)` on
a pool of real links."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.trust import MAX_BATCHERS, check_batching
from services.mesh.domain.types import BatchingPolicy, Signature, TensorSpec
from services.mesh.transport import frames
from services.mesh.transport.links import LinkClient, LinkServer
from services.mesh.transport.peers import LinkPool, rendezvous_score
from services.mesh.transport.spread import WorkerShare, rank, split
from services.registry.validation import parse_batching, parse_batching_change
from tests.credentials import CREDENTIAL
from tests.fakes import model_records

NAMES = st.text(alphabet="abcdefgh0123456789-", min_size=1, max_size=12)
INSTANCES = st.lists(NAMES, min_size=1, max_size=12, unique=True)
KEYS = [f"model-{i}" for i in range(600)]
BOUNDED = settings(max_examples=60, deadline=None, derandomize=True, database=None)
"""Few examples, no per-example deadline: the suite runs on a busy two-core machine."""


def todays_choice(key: str, instances: list[str]) -> str:
    """What `pick_by_key` chose before k existed: the first instance with the best score."""
    best = instances[0]
    for instance in instances[1:]:
        if rendezvous_score(key, instance) > rendezvous_score(key, best):
            best = instance
    return best


# -- the ranking ----------------------------------------------------------------------------

@BOUNDED
@given(key=NAMES, instances=INSTANCES)
def test_the_top_of_the_ranking_is_todays_choice(key: str, instances: list[str]) -> None:
    assert rank(key, instances)[0] == todays_choice(key, instances)
    assert sorted(rank(key, instances)) == sorted(instances)


@BOUNDED
@given(instances=INSTANCES, newcomer=NAMES, k=st.integers(1, 4))
def test_a_new_peer_only_ever_joins_a_keys_top_k(
    instances: list[str], newcomer: str, k: int
) -> None:
    if newcomer in instances:
        return
    for key in KEYS[:50]:
        before, after = rank(key, instances)[:k], rank(key, [*instances, newcomer])[:k]
        assert set(after) - set(before) <= {newcomer}
        assert [i for i in after if i != newcomer] == before[: len(after) - (newcomer in after)]


@pytest.mark.parametrize("n", [2, 4, 8])
def test_adding_a_peer_moves_at_most_a_fair_share_of_keys(n: int) -> None:
    instances = [f"batcher-{i}" for i in range(n)]
    moved = [key for key in KEYS
             if rank(key, instances)[0] != rank(key, [*instances, "batcher-new"])[0]]
    assert all(rank(key, [*instances, "batcher-new"])[0] == "batcher-new" for key in moved)
    assert len(moved) <= len(KEYS) / n  # 1/(n+1) expected; every moved key went to the newcomer


# -- the split of a version's workers -------------------------------------------------------

@BOUNDED
@given(members=INSTANCES, owners=INSTANCES)
def test_the_split_is_balanced_total_and_independent_of_order(
    members: list[str], owners: list[str]
) -> None:
    owned = split(members, owners)
    assert set(owned) == set(members) and set(owned.values()) <= set(owners)
    loads = [list(owned.values()).count(owner) for owner in owners]
    assert max(loads) - min(loads) <= 1
    assert split(list(reversed(members)), owners) == owned


@BOUNDED
@given(members=INSTANCES, owner=NAMES)
def test_one_owner_owns_every_member(members: list[str], owner: str) -> None:
    assert split(members, [owner]) == {member: owner for member in members}


def spread_config(batchers: int, *, listed: tuple[str, ...] = ("b1", "b2")) -> StaticConfig:
    records = model_records("m", Signature(
        inputs=(TensorSpec("x", "FP32", (-1, 2)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),)
    ))
    records["models/m/1"]["batching"]["batchers"] = batchers  # type: ignore[index]
    for name in listed:
        records[f"endpoints/batcher/{name}"] = {"instance": name, "link": f"ws://{name}/link"}
    return StaticConfig(records)


WORKERS = ["w1", "w2", "w3", "w4"]


def test_two_batchers_split_four_workers_two_and_two() -> None:
    config = spread_config(2)
    catalog = ModelCatalog(config)
    shares = [WorkerShare(config, instance=name, batchers=catalog.batchers).mine("m", "1", WORKERS)
              for name in ("b1", "b2")]
    assert shares[0] is not None and shares[1] is not None
    assert len(shares[0]) == len(shares[1]) == 2 and shares[0] | shares[1] == set(WORKERS)


def test_one_batcher_or_none_of_ours_means_every_worker() -> None:
    config = spread_config(1, listed=("b1", "b2", "b3"))
    catalog = ModelCatalog(config)
    assert WorkerShare(config, instance="b1", batchers=catalog.batchers).mine(
        "m", "1", WORKERS) is None
    record = config.get("models/m/1")
    assert isinstance(record, dict)
    config.put("models/m/1", {**record, "batching": {"batchers": 2}})
    top = rank("m", ["b1", "b2", "b3"])[:2]
    outsider = next(name for name in ("b1", "b2", "b3") if name not in top)
    share = WorkerShare(config, instance=outsider, batchers=catalog.batchers)
    assert share.mine("m", "1", WORKERS) is None  # a router ran ahead of this batcher's view
    # Fewer workers than batchers: the one left without a worker keeps them all.
    shares = [WorkerShare(config, instance=name, batchers=catalog.batchers).mine("m", "1", ["w1"])
              for name in top]
    assert sorted(shares, key=lambda s: s is None) == [frozenset({"w1"}), None]


def test_a_batcher_leaving_hands_its_workers_to_the_one_left() -> None:
    config = spread_config(2)
    catalog = ModelCatalog(config)
    share = WorkerShare(config, instance="b1", batchers=catalog.batchers)
    assert share.mine("m", "1", WORKERS) != frozenset(WORKERS)
    config.delete("endpoints/batcher/b2")
    config.put("endpoints/batcher/b3", {"instance": "b3"})  # listed without a link: not a peer
    assert share.mine("m", "1", WORKERS) == frozenset(WORKERS)


# -- the setting ----------------------------------------------------------------------------

def test_the_setting_defaults_to_one_and_travels_in_the_record() -> None:
    assert BatchingPolicy().batchers == 1
    assert BatchingPolicy.from_json({}).batchers == 1
    policy = BatchingPolicy.from_json({"batchers": 3})
    assert BatchingPolicy.from_json(policy.to_json()) == policy
    catalog = ModelCatalog(spread_config(3))
    assert (catalog.batchers("m", "1"), catalog.batchers("m", "9"), catalog.batchers("x", None)) \
        == (3, 1, 1)


@pytest.mark.parametrize("batchers", [0, -1, MAX_BATCHERS + 1])
def test_a_setting_out_of_bounds_is_refused_naming_the_field(batchers: int) -> None:
    with pytest.raises(InvalidInput, match="^batching: 'batchers' must be"):
        check_batching(replace(BatchingPolicy(), batchers=batchers))
    with pytest.raises(InvalidInput, match="^batching: 'batchers' must be"):
        parse_batching({"batchers": batchers})


@pytest.mark.parametrize("value", ["2", 2.5, True, None])
def test_a_setting_of_the_wrong_type_is_refused_naming_the_field(value: Any) -> None:
    with pytest.raises(InvalidInput, match="^batching: 'batchers' must be an integer"):
        parse_batching({"batchers": value})
    with pytest.raises(InvalidInput, match="^batching: 'batchers' must be an integer"):
        parse_batching_change(BatchingPolicy(), {"batchers": value})


def test_the_setting_changes_at_runtime_like_the_queue_policy() -> None:
    current = BatchingPolicy(max_batch_size=16)
    changed = parse_batching_change(current, {"batchers": 4})
    assert changed == replace(current, batchers=4)
    assert check_batching(replace(current, batchers=MAX_BATCHERS)).batchers == MAX_BATCHERS


# -- pick_by_key(k=) over real links ---------------------------------------------------------

class Held:
    """Link peers that hold every call until released, counting the calls that arrived."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = 0
        self.changed = asyncio.Event()

    async def handle(
        self, meta: dict[str, Any], payload: memoryview
    ) -> tuple[dict[str, Any], frames.Buffers]:
        self.arrived += 1
        self.changed.set()
        await self.release.wait()
        return {}, []

    async def until_arrived(self, calls: int) -> None:
        async with asyncio.timeout(30):
            while self.arrived < calls:
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def peers(config: StaticConfig, names: list[str]) -> AsyncIterator[Held]:
    """Link servers for `names`, listed under `endpoints/batcher/`; one shared `Held`."""
    held = Held()
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(held.release.set)
        for name in names:
            server = LinkServer(held.handle, name=name, credential=CREDENTIAL)
            app = web.Application()
            app.router.add_get("/link", server.handle)
            runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            stack.push_async_callback(server.aclose)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            config.put(f"endpoints/batcher/{name}", {
                "instance": name, "link": f"ws://127.0.0.1:{runner.addresses[0][1]}/link"})
        yield held


async def all_open(pool: LinkPool, names: set[str]) -> None:
    changed = asyncio.Event()
    pool.subscribe(changed.set)
    async with asyncio.timeout(30):
        while {record["instance"] for _, record in pool.links()} != names:
            changed.clear()
            await changed.wait()


def link_of(pool: LinkPool, name: str) -> LinkClient:
    return next(link for link, record in pool.links() if record["instance"] == name)


async def test_pick_by_key_spreads_over_the_top_k_by_calls_in_flight() -> None:
    config = StaticConfig({})
    names = ["b1", "b2", "b3", "b4"]
    async with aiohttp.ClientSession() as session, peers(config, names) as held:
        pool = LinkPool(session, config, "batcher", credential=CREDENTIAL)
        pool.start()
        try:
            await all_open(pool, set(names))
            first, second, *_ = rank("m", names)
            assert pool.pick_by_key("m") is link_of(pool, first)
            assert pool.pick_by_key("m", k=2) is link_of(pool, first)  # a tie: the better rank
            picked, calls = [], []
            for sent in range(1, 5):
                link = pool.pick_by_key("m", k=2)
                picked.append(link)
                calls.append(asyncio.ensure_future(link.call({}, [])))
                await held.until_arrived(sent)
            top_two = [link_of(pool, first), link_of(pool, second)]
            assert picked == top_two * 2  # the least busy of the two, the better on a tie
            assert pool.pick_by_key("m") is link_of(pool, first)  # k=1 ignores the load
            # The top peer leaves: its keys go to the next in rank, at once.
            config.delete(f"endpoints/batcher/{first}")
            assert pool.pick_by_key("m") is link_of(pool, second)
            held.release.set()
            await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await pool.aclose()


# -- k from the load: the autoscaler's `scale/` record ----------------------------------------

def test_a_scale_records_batchers_raise_k_never_lower_it() -> None:
    config = spread_config(2)
    catalog = ModelCatalog(config)
    config.put("scale/m/1", {"replicas": 12, "reason": "load", "batchers": 3})
    assert catalog.batchers("m", "1") == 3  # the load asks for more than the setting
    config.put("scale/m/1", {"replicas": 1, "reason": "idle", "batchers": 1})
    assert catalog.batchers("m", "1") == 2  # never fewer than the setting
    config.put("scale/m/1", {"replicas": 1, "batchers": MAX_BATCHERS + 10})
    assert catalog.batchers("m", "1") == MAX_BATCHERS
    for bad in ("3", 2.5, True, None):
        config.put("scale/m/1", {"replicas": 1, "batchers": bad})
        assert catalog.batchers("m", "1") == 2
    config.put("scale/x/1", {"replicas": 9, "batchers": 3})
    assert catalog.batchers("x", "1") == 1  # a version not known here
