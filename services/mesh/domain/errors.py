"""The one error tree of infermesh. It knows nothing of HTTP or gRPC.

    InfermeshError
    ├── InvalidInput          the caller sent something wrong (names the field)
    │   └── Conflict          it names something that exists already, differently
    ├── NotFound              unknown model or version
    ├── Unauthenticated       missing or unknown credentials
    ├── PermissionDenied      credentials valid, action not allowed
    ├── PreconditionFailed    a conditional write lost a race (a stale If-Match epoch)
    ├── Overloaded            queue full or deadline cannot be met (retry_after, busy_for)
    │   └── QuotaExceeded     the tenant is over its quota (retry_after)
    ├── DeadlineExceeded      the request's deadline passed
    ├── Unavailable           no ready peer or worker right now
    │   └── LinkClosed        a link broke with the request in flight
    └── InternalError         a bug or a model failure; the message is safe to show
        └── ModelFailed       the model call raised on a batch; no one input is to blame

Each adapter maps these to status codes in exactly one table. Errors cross links as a `code`
and a `message` and are rebuilt on the other side by `from_wire`.
"""

from __future__ import annotations

from typing import Any, ClassVar


class InfermeshError(Exception):
    """Base of every error infermesh raises on purpose."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.trace_id: str | None = None
        """The trace of the request that failed (set by the gateway, for the error response)."""

    def to_wire(self) -> dict[str, Any]:
        """The error as a small JSON-able dict, for a link frame."""
        wire: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.retry_after is not None:
            wire["retry_after"] = self.retry_after
        return wire


class InvalidInput(InfermeshError):
    code = "invalid_input"


class Conflict(InvalidInput):
    code = "conflict"


class NotFound(InfermeshError):
    code = "not_found"


class Unauthenticated(InfermeshError):
    code = "unauthenticated"


class PermissionDenied(InfermeshError):
    code = "permission_denied"


class PreconditionFailed(InfermeshError):
    code = "precondition_failed"


class Overloaded(InfermeshError):
    code = "overloaded"

    def __init__(
        self, message: str, *, retry_after: float | None = None, busy_for: float | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.busy_for = busy_for
        """Set on a batcher's refusal by its latency model: seconds until the refused request
        would have been answered, by the prediction that refused it. A request of the same
        tenant and lane for the same version, due no sooner and before then, has at least
        its rows ahead of it: by the same prediction it would be refused too, and the
        gateway refuses it without forwarding it (`services.gateway.overload`)."""

    def to_wire(self) -> dict[str, Any]:
        wire = super().to_wire()
        if self.busy_for is not None:
            wire["busy_for"] = self.busy_for
        return wire


class QuotaExceeded(Overloaded):
    code = "quota_exceeded"


class DeadlineExceeded(InfermeshError):
    code = "deadline_exceeded"


class Unavailable(InfermeshError):
    code = "unavailable"


class LinkClosed(Unavailable):
    code = "link_closed"


class InternalError(InfermeshError):
    code = "internal"


class ModelFailed(InternalError):
    """The model call raised on a batch. The batcher re-runs the batch in halves to find the
    requests at fault; the message is the model's error, sanitised (no traceback, no paths)."""

    code = "model_failed"


_BY_CODE: dict[str, type[InfermeshError]] = {
    cls.code: cls
    for cls in (
        InvalidInput, Conflict, NotFound, Unauthenticated, PermissionDenied, PreconditionFailed,
        Overloaded, QuotaExceeded, DeadlineExceeded, Unavailable, LinkClosed, InternalError,
        ModelFailed,
    )
}


def from_wire(wire: dict[str, Any]) -> InfermeshError:
    """Rebuild an error received over a link."""
    cls = _BY_CODE.get(str(wire.get("code")), InternalError)
    retry_after = wire.get("retry_after")
    error = cls(str(wire.get("message", "unknown error")), retry_after=retry_after)
    busy_for = wire.get("busy_for")
    if isinstance(error, Overloaded) and isinstance(busy_for, int | float) and busy_for >= 0:
        error.busy_for = float(busy_for)
    return error
