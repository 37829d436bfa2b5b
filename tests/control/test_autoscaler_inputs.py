"""What the autoscaler reads from the batchers (control/autoscaler/inputs.py): the exact rows in
flight and predicted wait the batchers export (services/batcher/metrics.py), the estimate from
an older batcher that exports neither; and the batchers count it publishes from the load
(`policy.batchers_for`), which the routers and batchers read through `ModelCatalog.batchers`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client import generate_latest

from control.autoscaler.inputs import LoadReader, parse_batcher
from control.autoscaler.policy import batchers_for, parse_spec
from services.batcher.core import Batcher
from services.batcher.metrics import BatcherMetrics, LoadSource
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.trust import MAX_BATCHERS
from services.mesh.domain.types import BatchingPolicy, ModelVersion
from services.mesh.infra.db import create_pool, migrate
from services.mesh.infra.etcd import ConfigCache, connect_client
from tests.batcher.fakes import (
    MODEL,
    SIGNATURE,
    VERSION,
    FakePool,
    TimedWorker,
    catalog_with,
    request,
    submit_all,
)
from tests.control.test_autoscaler import (
    IRIS,
    FakeBatcher,
    Fleet,
    overload_until_a_change,
    serving,
)

Load = list[tuple[str, str, int, float | None]]


def exposition(load: Load, *, queued: int = 0, pending: int = 0) -> str:
    """A batcher's /metrics text with `load` as its load source (and queue and pending)."""
    metrics = BatcherMetrics()
    metrics.watch_load(lambda: load)
    metrics.watch_queues(lambda: [(*IRIS, "realtime", queued)])
    metrics.watch_pending(lambda: [(*IRIS, pending)])
    return generate_latest(metrics.registry).decode()


def test_the_exported_rows_in_flight_and_predicted_wait_are_read_exactly() -> None:
    # 3 requests of 4 rows in a batch: the old estimate (pending - queued) would say 3.
    text = exposition([(*IRIS, 12, 0.25), ("iris", "v2", 0, None)], queued=5, pending=8)
    figures = parse_batcher(text)
    assert (figures[IRIS].inflight, figures[IRIS].predicted_wait) == (12, 0.25)
    assert figures[IRIS].queue_rows == 5
    assert figures[("iris", "v2")].predicted_wait is None  # nothing known: no sample


def test_an_older_batcher_without_the_gauges_falls_back_to_the_estimate() -> None:
    metrics = BatcherMetrics()
    metrics.watch_queues(lambda: [(*IRIS, "realtime", 2)])
    metrics.watch_pending(lambda: [(*IRIS, 5)])
    [(key, figures)] = parse_batcher(generate_latest(metrics.registry).decode()).items()
    assert key == IRIS and (figures.inflight, figures.predicted_wait) == (3, None)


@contextlib.asynccontextmanager
async def batchers_serving(texts: Iterable[str]) -> AsyncIterator[StaticConfig]:
    """One HTTP server per exposition text, listed under `endpoints/batcher/` of a config."""
    config = StaticConfig({})
    async with contextlib.AsyncExitStack() as stack:
        for index, text in enumerate(texts):
            app = web.Application()

            async def metrics(_: web.Request, body: str = text) -> web.Response:
                return web.Response(text=body, content_type="text/plain")

            app.router.add_get("/metrics", metrics)
            runner = web.AppRunner(app)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            config.put(f"endpoints/batcher/b{index}", {"instance": f"b{index}", "http": url})
        yield config


async def test_the_reader_sums_rows_in_flight_and_takes_the_longest_predicted_wait() -> None:
    texts = [exposition([(*IRIS, 12, 0.25)]), exposition([(*IRIS, 4, 0.5)])]
    old = BatcherMetrics()  # a batcher from before the gauges: estimated, 5 - 2 = 3
    old.watch_queues(lambda: [(*IRIS, "realtime", 2)])
    old.watch_pending(lambda: [(*IRIS, 5)])
    texts.append(generate_latest(old.registry).decode())
    async with batchers_serving(texts) as config, aiohttp.ClientSession() as session:
        observed = await LoadReader(config, session).observe(0.0, {IRIS: 8})
    assert observed[IRIS].inflight_rows == 12 + 4 + 3
    assert observed[IRIS].predicted_wait == 0.5 and observed[IRIS].queue_rows == 2


class LoadSpy(BatcherMetrics):
    """Batcher metrics that remember the load sources the core registers."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[LoadSource] = []

    def watch_load(self, source: LoadSource) -> None:
        self.sources.append(source)
        super().watch_load(source)


async def test_the_batcher_core_exports_its_rows_in_flight_and_predicted_wait() -> None:
    metrics = LoadSpy()
    worker = TimedWorker(warmup={1: 0.01, 16: 0.04})
    batcher = Batcher(catalog_with(BatchingPolicy(max_batch_size=16, max_queue_delay_ms=1)),
                      FakePool(worker), metrics=metrics, pipeline_depth=1)
    assert metrics.sources, "the batcher core registers its load with watch_load"
    batcher.start()
    worker.hold()
    try:
        tasks = [asyncio.create_task(batcher.infer(request(0.0, rows=3)))]
        await worker.next_batch()
        tasks += await submit_all(batcher, [request(1.0, rows=5)])
        figures = parse_batcher(generate_latest(metrics.registry).decode())
        assert (figures[(MODEL, VERSION)].inflight, figures[(MODEL, VERSION)].queue_rows) \
            == (3, 5)
        wait = figures[(MODEL, VERSION)].predicted_wait
        assert wait is not None and wait > 0
        worker.release()
        await asyncio.gather(*tasks)
        assert parse_batcher(generate_latest(metrics.registry).decode())[
            (MODEL, VERSION)].inflight == 0
    finally:
        worker.release()
        await batcher.aclose()


# -- the batchers count from the load -------------------------------------------------------

@pytest.mark.parametrize(("desired", "per_batcher", "expected"), [
    (0, 4, 1), (1, 4, 1), (4, 4, 1), (5, 4, 2), (8, 4, 2), (9, 4, 3), (3, 1, 3),
    (10_000, 1, MAX_BATCHERS),
])
def test_one_batcher_per_workers_per_batcher_desired_workers(
    desired: int, per_batcher: int, expected: int,
) -> None:
    assert batchers_for(desired, workers_per_batcher=per_batcher) == expected


def test_workers_per_batcher_defaults_to_four_and_a_bad_one_is_named() -> None:
    assert parse_spec({}).workers_per_batcher == 4
    assert parse_spec({"autoscaling": {"workers_per_batcher": 2}}).workers_per_batcher == 2
    for bad in (0, 1.5, "2", True):
        with pytest.raises(InvalidInput, match=r"^autoscaling\.workers_per_batcher must be an "
                                               r"integer >= 1"):
            parse_spec({"autoscaling": {"workers_per_batcher": bad}})


async def test_a_scale_up_past_one_batchers_workers_spreads_the_model(
    etcd_url: str, etcd_prefix: str, database_url: str,
) -> None:
    """With one worker per batcher, the autoscaler's scale-up publishes as many batchers as
    workers, and the catalog the routers and batchers read spreads the model over them."""
    batcher = FakeBatcher()
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(serving(batcher))
        etcd = connect_client(etcd_url)
        stack.push_async_callback(etcd.close)
        version = ModelVersion(*IRIS, SIGNATURE, "file:///dev/null", "0" * 64,
                               batching=BatchingPolicy(max_batch_size=8)).to_json()
        records = {
            "models/iris/v1": {**version, "autoscaling": {
                "min_replicas": 1, "max_replicas": 4, "workers_per_batcher": 1}},
            "endpoints/worker/w1": {"instance": "w1", "models": ["iris/v1"]},
            "endpoints/batcher/b1": {"instance": "b1", "http": url},
        }
        for key, record in records.items():
            await etcd.put(f"{etcd_prefix}{key}".encode(), orjson.dumps(record))
        config = ConfigCache(etcd, etcd_prefix)
        await config.start()
        stack.push_async_callback(config.aclose)
        pool = await create_pool(database_url)
        stack.push_async_callback(pool.close)
        await migrate(pool)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        fleet = Fleet(batcher, config, etcd, etcd_prefix, pool, session, database_url)
        autoscaler = fleet.autoscaler()
        stack.push_async_callback(autoscaler.aclose)

        desired = (await overload_until_a_change(fleet, autoscaler)).changed[IRIS]
        published = await fleet.scale_record()
        assert isinstance(published, dict) and published["batchers"] == desired > 1
        catalog = ModelCatalog(config)
        changed = asyncio.Event()
        config.subscribe(changed.set)  # after the catalog's: it has refreshed when this fires
        async with asyncio.timeout(10):  # until the config cache has seen the record
            while catalog.batchers(*IRIS) != desired:
                await changed.wait()
                changed.clear()
