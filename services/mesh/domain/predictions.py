"""What the router hands its served predictions to: the `PredictionRecorder` interface.

The router core and its shadow mirror call `record()` and nothing else; the implementation,
`services.predlog.log.PredictionLog` (a buffer, Postgres and a spool on disk), is chosen and
owned by the router's wiring. `policy_of` is the lookup both callers make first: how much of a
version's tensors to keep, one of `PREDICTION_LOG_POLICIES` (`FULL`, `DIGEST`, `NONE`).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import NotFound
from services.mesh.domain.types import InferRequest, InferResponse

FULL, DIGEST, NONE = "full", "digest", "none"
"""The `prediction_log` policies of a model version (`types.PREDICTION_LOG_POLICIES`)."""


class PredictionRecorder(Protocol):
    """Takes served predictions off the request path (the prediction log, or a fake)."""

    def record(
        self, request: InferRequest, response: InferResponse, *, received: float,
        latency: float, policy: str, shadow: bool = False, request_id: str | None = None,
    ) -> Awaitable[None] | None:
        """Log one served prediction; must return at once and never raise.

        `received` is the wall-clock time the router received the request, `latency` the
        seconds it took to answer, `policy` the served version's policy (`policy_of`); a shadow
        answer passes `shadow=True` and the primary request's id as `request_id`. What it
        returns, when not None, is done once the prediction is durable (on local disk): the
        router awaits it before it answers, so a killed router has lost nothing it answered.
        """
        ...


def policy_of(catalog: ModelCatalog, model: str, version: str) -> str:
    """The `prediction_log` policy of a version; digest if it left the catalog meanwhile."""
    try:
        return catalog.version(model, version).prediction_log
    except NotFound:
        return DIGEST
