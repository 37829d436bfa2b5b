"""What a batch is made of: the members' joined tensors, its span, its time limit."""

from __future__ import annotations

from services.mesh.domain import tracing
from services.mesh.domain.hops import remaining
from services.mesh.domain.tensors import concat_rows
from services.mesh.domain.types import Batch, InferRequest


def build_batch(model: str, version: str, requests: list[InferRequest]) -> Batch:
    """Join the requests' inputs along dim 0, one tensor per input name."""
    names = [t.name for t in requests[0].inputs]
    by_name = [{t.name: t for t in r.inputs} for r in requests]
    inputs = [concat_rows([tensors[name] for tensors in by_name]) for name in names]
    deadlines = [r.deadline for r in requests]
    return Batch(model, version, inputs, [r.rows for r in requests],
                 outputs=wanted_outputs(requests),
                 deadline=None if None in deadlines else max(d for d in deadlines if d))


def shape_key(request: InferRequest) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """What must match for requests to join one batch: each input's datatype and non-batch
    dimensions, in the order of the input names (the names themselves are the gateway's to
    check: a request naming another input still joins, and fails the batch, not hangs)."""
    ordered = sorted(request.inputs, key=lambda t: t.name)
    return tuple((t.datatype, tuple(t.shape[1:])) for t in ordered)


def wanted_outputs(requests: list[InferRequest]) -> list[str] | None:
    """The union of the outputs the requests name, in first-asked order; None when any asks
    for all of them."""
    wanted: dict[str, None] = {}
    for request in requests:
        if request.outputs is None:
            return None
        wanted.update(dict.fromkeys(request.outputs))
    return list(wanted)


def batch_span(
    model: str, version: str, worker: str, members: list[tuple[tracing.HopSpan, int]],
    rows: int,
) -> tracing.HopSpan:
    """The batch's span, linked to its members' spans (given with their earlier attempts);
    notes each member's place in the batch on the member's span."""
    span = tracing.start_batch("batcher.batch", [member for member, _ in members])
    span.set("infermesh.model", model)
    span.set("infermesh.version", version)
    span.set("infermesh.batch_size", rows)
    span.set("infermesh.batch_requests", len(members))
    span.set("infermesh.worker", worker)
    for position, (member, attempts) in enumerate(members):
        member.set("infermesh.batch_size", rows)
        member.set("infermesh.batch_requests", len(members))
        member.set("infermesh.batch_position", position)
        if attempts:
            member.set("infermesh.attempts", attempts + 1)
    return span


def batch_timeout(deadlines: list[float | None]) -> float | None:
    """Seconds until the last member's deadline (None when any member has none)."""
    if any(d is None for d in deadlines):
        return None
    return remaining(max(d for d in deadlines if d is not None))
