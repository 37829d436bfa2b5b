"""The edge's per-model bounds, kept equal to the registry's at runtime.

A version's queue policy may name `edge_inflight`: how many inference requests of its model
the nginx edge lets in flight at once (past it nginx answers 503 + Retry-After itself, in C).
The right number is about the model's throughput x its tightest deadline: the mlp's 50 ms class
wants 64, the encoder's 3 s class needs 128 (docs/PERFORMANCE.md, "The edge's bound per model,
from the registry"). The model's bound is the largest its versions declare; a model whose
versions declare none gets the edge's default (`INFERMESH_EDGE_MODEL_CONNS`).

`EdgeBounds` watches the `models/` records (a ConfigView subscriber) and reloads nginx when the
bounds change, one reload at a time, the last wanted state winning; a record that fails the
mesh's trust checks counts as absent (the fleet logs it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from deploy.edge import EdgeConfig
from services.mesh.domain.config import ConfigView
from services.mesh.domain.trust import RECORD_ERRORS, trusted_version

log = logging.getLogger("infermesh.up")

Bounds = tuple[tuple[str, int], ...]
"""(model, bound) pairs, sorted by model: `EdgeConfig.model_bounds`."""


def model_bounds(config: ConfigView) -> Bounds:
    """Per model, the largest `edge_inflight` its version records declare (models whose
    versions declare none are left out)."""
    bounds: dict[str, int] = {}
    for key, record in config.items("models/").items():
        try:
            spec = trusted_version(key, record)
        except RECORD_ERRORS:
            continue
        if spec.batching.edge_inflight is not None:
            bounds[spec.model] = max(spec.batching.edge_inflight, bounds.get(spec.model, 0))
    return tuple(sorted(bounds.items()))


class EdgeBounds:
    """Reloads the edge (`reload(config)`, blocking: run in a thread) whenever the bounds the
    registry declares differ from the ones it runs with."""

    def __init__(
        self, reload: Callable[[EdgeConfig], Any], edge: EdgeConfig, config: ConfigView,
    ) -> None:
        self._reload = reload
        self._applied = edge
        self._config = config
        self._task: asyncio.Task[None] | None = None
        self._failed: Bounds | None = None
        """The bounds whose reload nginx refused last (not retried until they change)."""

    @property
    def applied(self) -> EdgeConfig:
        """The configuration the edge runs with."""
        return self._applied

    def changed(self) -> None:
        """A ConfigView listener: start applying the registry's bounds if they differ."""
        wanted = model_bounds(self._config)
        if wanted in (self._applied.model_bounds, self._failed):
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._apply())

    async def _apply(self) -> None:
        """Reload until the edge runs the bounds last wanted (changes during a reload are
        taken by the next round)."""
        while (wanted := model_bounds(self._config)) not in (self._applied.model_bounds,
                                                              self._failed):
            config = dataclasses.replace(self._applied, model_bounds=wanted)
            try:
                await asyncio.to_thread(self._reload, config)
            except Exception as exc:  # nginx refused it: the running configuration stays
                log.warning("edge: keeping the bounds per model %s: %s",
                            dict(self._applied.model_bounds), exc)
                self._failed = wanted
                return
            self._applied, self._failed = config, None
            log.info("edge: bounds per model now %s (others %d)", dict(wanted),
                     config.model_conns)

    async def aclose(self) -> None:
        """Wait for a reload under way (a reload is not cut off halfway)."""
        if self._task is not None:
            await asyncio.shield(self._task)
