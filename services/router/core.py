"""The router core: resolves the version of each request and forwards it. No HTTP in here."""

from __future__ import annotations

from services.mesh import telemetry
from services.mesh.catalog import ModelCatalog
from services.mesh.hops import InferTarget
from services.mesh.types import InferRequest, InferResponse
from services.router.policy import choose_version

_TRACER = "infermesh.router"


class Router:
    """Chooses a version from the rollout record (unless pinned) and forwards to a batcher."""

    def __init__(self, catalog: ModelCatalog, batcher: InferTarget) -> None:
        self._catalog = catalog
        self._batcher = batcher

    async def infer(self, request: InferRequest) -> InferResponse:
        """Route and forward one request; the response names the version that served."""
        with telemetry.span_from(request.trace, "router.route", _TRACER) as span:
            parameters: dict[str, object] = {}
            if request.version is None:
                rollout = self._catalog.rollout(request.model)
                sticky = self._sticky_value(request, rollout.sticky_key)
                choice = choose_version(
                    rollout, sticky,
                    is_ready=lambda v: self._catalog.ready_workers(request.model, v) > 0,
                )
                request.version = choice.version
                parameters = {"bucket": choice.bucket, "rollout_epoch": rollout.epoch}
                if choice.fallback:
                    parameters["fallback"] = True
            else:
                self._catalog.version(request.model, request.version)
            span.set_attribute("infermesh.version", request.version)
            request.trace = telemetry.inject()
            response = await self._batcher.infer(request)
        response.parameters.update(parameters)
        return response

    @staticmethod
    def _sticky_value(request: InferRequest, sticky_key: str | None) -> str:
        if sticky_key:
            value = request.parameters.get(sticky_key)
            if value is not None:
                return str(value)
        return request.request_id
