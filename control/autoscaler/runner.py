"""The autoscaler loop: observe each autoscaled version, ask its policy, act on changes.

One control API replica scales at a time: the one holding a Postgres session advisory lock
(`Leadership`, as the guard, on a key of its own). A version is autoscaled when its
`models/{model}/{version}` record has an `autoscaling` or a `replicas` field (opt-in: a mesh
that never asks keeps the launcher's fixed fleet).

Each tick (every ~2 s) feeds every autoscaled version's `ScalePolicy` one `Observation`
(control/autoscaler/inputs.py) and asks it for a `Decision`. When the desired count differs
from the one in effect, the change is recorded first (Postgres `scale_decisions`, with the
reason and the inputs; control-plane writes go to Postgres first), then published
(`scale/{model}/{version}` in etcd, with the batchers the version spreads over:
`policy.batchers_for`), then handed to the engine (Kubernetes) when there is one.
A tick never raises for one version: a spec that does not parse skips that version (warned
once), a failed write or actuation is logged and retried on the next tick.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aetcd
import aiohttp
import asyncpg
from kubernetes_asyncio.config import ConfigException

from control.autoscaler.actuators import (
    DEPLOYMENT_TEMPLATE,
    ActuationFailed,
    Actuator,
    EtcdActuator,
    KubeActuator,
    open_kube_api,
)
from control.autoscaler.inputs import (
    LoadReader,
    VersionKey,
    max_batch_size,
    scale_batchers,
    scale_replicas,
)
from control.autoscaler.metrics import AutoscalerMetrics
from control.autoscaler.policy import (
    Decision,
    Observation,
    ScalePolicy,
    ScaleSpec,
    batchers_for,
    parse_spec,
)
from control.guard.runner import Leadership
from services.mesh.domain.config import ConfigView
from services.mesh.domain.errors import InvalidInput

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same for every control API replica.
AUTOSCALER_LOCK = 0x1F_E5_5C_A1
MODELS = "models/"

INSERT_DECISION = """
INSERT INTO scale_decisions (model, version, previous, desired, reason, inputs)
VALUES ($1, $2, $3, $4, $5, $6)
"""


@dataclass(frozen=True, slots=True)
class TickReport:
    """What one tick saw and decided."""

    leader: bool
    decisions: dict[VersionKey, Decision] = field(default_factory=dict)
    """Per autoscaled version whose spec parsed."""
    changed: dict[VersionKey, int] = field(default_factory=dict)
    """Versions whose new desired count was recorded this tick."""


class Autoscaler:
    """Feeds batcher load to per-version policies and publishes their decisions."""

    def __init__(self, config: ConfigView, session: aiohttp.ClientSession, pool: asyncpg.Pool,
                 board: EtcdActuator, *, engine: Actuator | None = None,
                 metrics: AutoscalerMetrics | None = None, scrape_timeout: float = 0.5) -> None:
        self._config = config
        self._session = session
        self._pool = pool
        self._board = board
        self._engine = engine
        self._metrics = metrics or AutoscalerMetrics()
        self._scrape_timeout = scrape_timeout
        self._leadership = Leadership(pool, key=AUTOSCALER_LOCK, name="autoscaler",
                                      duty="scales model versions")
        self._reader = LoadReader(config, session, scrape_timeout=scrape_timeout)
        self._policies: dict[VersionKey, ScalePolicy] = {}
        self._specs: dict[VersionKey, ScaleSpec] = {}
        self._recorded: dict[VersionKey, int] = {}
        """The latest desired count written to `scale_decisions` by this leader."""
        self._applied: dict[VersionKey, int] = {}
        """The latest desired count published (and actuated) without error."""
        self._spread: dict[VersionKey, int] = {}
        """The latest batchers count published, see `policy.batchers_for`."""
        self._unparsed: set[tuple[str, str, str]] = set()
        self._leading = False
        self._closed = False

    async def tick(self, now: float) -> TickReport:
        """One round at time `now` (the loop's clock): lead, observe, decide, act."""
        if self._closed:
            raise RuntimeError("the autoscaler is closed")
        if not await self._leadership.hold():
            self._leading = False
            return TickReport(leader=False)
        if not self._leading:  # a new lead starts from what etcd says, with fresh windows
            self._leading = True
            self._reader = LoadReader(self._config, self._session,
                                      scrape_timeout=self._scrape_timeout)
            self._policies, self._specs, self._recorded, self._applied = {}, {}, {}, {}
            self._spread = {}
        records = self._autoscaled()
        observed = await self._reader.observe(
            now, {key: max_batch_size(record) for key, record in records.items()})
        report = TickReport(leader=True)
        for key, record in records.items():
            try:
                await self._decide(key, record, observed[key], now, report)
            except ActuationFailed as exc:
                log.error("autoscaler: %s/%s: %s; trying again next tick", *key, exc)
            except Exception:
                log.exception("autoscaler: deciding for %s/%s failed", *key)
        return report

    async def aclose(self) -> None:
        """Give up the lead; the autoscaler cannot tick again."""
        self._closed = True
        await self._leadership.aclose()

    def _autoscaled(self) -> dict[VersionKey, Mapping[str, Any]]:
        """The `models/` records that opted in, by (model, version)."""
        found: dict[VersionKey, Mapping[str, Any]] = {}
        for key, record in self._config.items(MODELS).items():
            model, _, version = key.removeprefix(MODELS).partition("/")
            if isinstance(record, Mapping) and ("autoscaling" in record or "replicas" in record):
                found[(model, version)] = record
        for gone in self._policies.keys() - found.keys():
            del self._policies[gone]
        return found

    async def _decide(self, key: VersionKey, record: Mapping[str, Any], obs: Observation,
                      now: float, report: TickReport) -> None:
        policy = self._policy(key, record)
        if policy is None:
            return
        policy.observe(obs)
        decision = report.decisions[key] = policy.decide(now)
        self._metrics.desired.labels(*key).set(decision.desired)
        previous = self._in_effect(key, obs)
        spread = batchers_for(decision.desired,
                              workers_per_batcher=self._specs[key].workers_per_batcher)
        if decision.desired == previous and spread == self._spread_in_effect(key):
            self._applied[key] = previous
            return
        if decision.desired != previous and self._recorded.get(key) != decision.desired:
            await self._record(key, previous, decision, obs)
            report.changed[key] = decision.desired
        await self._board.publish(*key, decision.desired, reason=decision.reason,
                                  batchers=spread)
        self._spread[key] = spread
        if self._engine is not None:
            await self._engine.apply(*key, decision.desired)
        self._applied[key] = decision.desired
        log.info("autoscaler: %s/%s: %d -> %d replicas over %d batchers: %s", *key, previous,
                 decision.desired, spread, decision.reason)

    def _in_effect(self, key: VersionKey, obs: Observation) -> int:
        """The count now asked for: ours, else the published record's, else what runs."""
        if key in self._applied:
            return self._applied[key]
        published = scale_replicas(self._config, *key)
        return published if published is not None else obs.ready + obs.starting

    def _spread_in_effect(self, key: VersionKey) -> int:
        """The batchers count now published: ours, else the record's (1 without one)."""
        return self._spread.get(key) or scale_batchers(self._config, *key)

    def _policy(self, key: VersionKey, record: Mapping[str, Any]) -> ScalePolicy | None:
        try:
            spec = parse_spec(record)
        except InvalidInput as exc:
            if (*key, exc.message) not in self._unparsed:  # warn once per problem
                self._unparsed.add((*key, exc.message))
                log.warning("autoscaler: skipping %s/%s: %s", *key, exc.message)
            return None
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policies[key] = ScalePolicy(spec)
        elif self._specs.get(key) != spec:
            policy.update_spec(spec)
        self._specs[key] = spec
        return policy

    async def _record(self, key: VersionKey, previous: int, decision: Decision,
                      obs: Observation) -> None:
        inputs = {"observation": dataclasses.asdict(obs), "policy": dict(decision.inputs),
                  "panicking": decision.panicking}
        async with self._pool.acquire(timeout=5) as conn:
            await conn.execute(INSERT_DECISION, *key, previous, decision.desired,
                               decision.reason, inputs, timeout=5)
        self._recorded[key] = decision.desired
        if decision.desired != previous:
            direction = "up" if decision.desired > previous else "down"
            self._metrics.decisions.labels(*key, direction).inc()


async def run_autoscaler(autoscaler: Autoscaler, *, interval: float) -> None:
    """Tick every `interval` seconds until cancelled (leading when the lock is free); closes
    `autoscaler` on the way out."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                await autoscaler.tick(loop.time())
            except Exception:
                log.exception("autoscaler: tick failed; trying again in %g s", interval)
            await asyncio.sleep(interval)
    finally:
        await autoscaler.aclose()


async def autoscale(config: ConfigView, session: aiohttp.ClientSession, pool: asyncpg.Pool,
                    etcd: aetcd.Client, *, etcd_prefix: str, interval: float,
                    metrics: AutoscalerMetrics, engine: str = "etcd", kube_api_url: str = "",
                    kube_namespace: str = "default",
                    kube_deployment: str = DEPLOYMENT_TEMPLATE) -> None:
    """Run the autoscaler until cancelled: `scale/` records in etcd, and with `engine`
    "kubernetes" the worker Deployments' scale too."""
    api = None
    if engine == "kubernetes":
        try:
            api = await open_kube_api(kube_api_url)
        except (ConfigException, OSError) as exc:
            log.error("autoscaler: not started: no Kubernetes API (set kube_api_url, or run "
                      "in a pod with a service account): %s", exc)
            return
    try:
        kube = None if api is None else KubeActuator(api, namespace=kube_namespace,
                                                     template=kube_deployment)
        board = EtcdActuator(etcd, etcd_prefix=etcd_prefix)
        await run_autoscaler(Autoscaler(config, session, pool, board, engine=kube,
                                        metrics=metrics), interval=interval)
    finally:
        if api is not None:
            await api.close()
