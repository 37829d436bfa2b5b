"""The gateway core: model metadata, readiness and validated inference. No HTTP in here."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from services.gateway.validation import validate_request
from services.mesh import telemetry
from services.mesh.catalog import ModelCatalog
from services.mesh.errors import InvalidInput
from services.mesh.hops import InferTarget
from services.mesh.types import InferRequest, InferResponse, ModelVersion

_TRACER = "infermesh.gateway"
SERVER_NAME = "infermesh"
SERVER_VERSION = "0.1.0"
"""What the OIP server metadata endpoints report."""

HeaderLookup = Callable[[str], str | None]
"""A request header (REST) or metadata (gRPC) value by name, None when absent."""


class Gateway:
    """Validates requests against signatures and hands them to the router."""

    def __init__(
        self, catalog: ModelCatalog, router: InferTarget, *, default_timeout: float = 30.0
    ) -> None:
        self._catalog = catalog
        self._router = router
        self._default_timeout = default_timeout

    @staticmethod
    def new_request_id() -> str:
        """128 random bits as 32 hex digits (a uuid4's entropy at a quarter of its cost)."""
        return os.urandom(16).hex()

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """True when every model with a rollout has a ready worker for its primary version."""
        for rollout in self._catalog.rollouts():
            model = rollout.model
            if rollout.primary and not self._catalog.ready_workers(model, rollout.primary):
                return False
        return True

    def model_metadata(self, model: str, version: str | None) -> ModelVersion:
        """The version named, or the one a request without a version is validated against."""
        return self._catalog.resolve(model, version)

    def model_versions(self, model: str) -> list[str]:
        return [v.version for v in self._catalog.versions(model)]

    def model_ready(self, model: str, version: str | None) -> bool:
        spec = self._catalog.resolve(model, version)
        return self._catalog.ready_workers(model, spec.version) > 0

    async def infer(
        self, request: InferRequest, *, header: HeaderLookup | None = None
    ) -> InferResponse:
        """Validate, stamp deadline and trace context, forward; raises InfermeshError.

        `header` looks up the rollout's sticky key among the request's headers (or gRPC
        metadata) when the request's parameters do not carry it.
        """
        spec = self._catalog.resolve(request.model, request.version)
        validate_request(request, spec.signature, max_rows=spec.batching.max_batch_size)
        self._stamp_deadline(request)
        if header is not None and request.version is None:
            self._sticky_from_header(request, header)
        with telemetry.span("gateway.infer", _TRACER) as span:
            span.set_attribute("infermesh.model", request.model)
            span.set_attribute("infermesh.request_id", request.request_id)
            request.trace = telemetry.inject()
            response = await self._router.infer(request)
        if request.outputs is not None:
            wanted = set(request.outputs)
            response.outputs = [t for t in response.outputs if t.name in wanted]
        response.request_id = request.request_id
        return response

    def _sticky_from_header(self, request: InferRequest, header: HeaderLookup) -> None:
        sticky_key = self._catalog.rollout(request.model).sticky_key
        if sticky_key and sticky_key not in request.parameters:
            value = header(sticky_key)
            if value is not None:
                request.parameters[sticky_key] = value

    def _stamp_deadline(self, request: InferRequest) -> None:
        timeout = request.parameters.get("timeout")
        if timeout is not None:
            if not isinstance(timeout, int | float) or timeout <= 0:
                raise InvalidInput("parameter 'timeout': must be a positive number of seconds")
        deadline = time.time() + float(timeout or self._default_timeout)
        request.deadline = deadline if request.deadline is None else min(request.deadline, deadline)
