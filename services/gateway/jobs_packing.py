"""Packing a job's rows: consecutive rows that could share a batch travel as one request.

A job row is one OIP request, usually of one row. Sent one by one, each costs a full request's
CPU at every hop (HTTP-free, but still a frame, a task, a span and a log row per hop) while
the model's work for it is a few microseconds: a 100,000-row job then takes the CPU that
realtime traffic beside it needs. Joined along the batch dimension, 32 rows cost one request
at the gateway, router and batcher, and the batch the worker runs is the same. This is what
batch-transform services do with their mini-batches (SageMaker's `MaxBatchSize`).

Rows join only when nothing about them differs but their data: same input names, datatypes
and non-batch dimensions, same outputs asked for, same parameters (so the same sticky key,
timeout and the like). A version that fetches online features (per-request entity ids) or
caches answers (per-request keys) is never packed: its rows keep their own requests. What a
caller can see stays the same: each row's result is its own response, under its own id. What
changes: the rows of a pack share a trace, a prediction-log entry and a rollout draw (a canary
split is drawn per pack, so its shares hold over many packs, not within one).
"""

from __future__ import annotations

from collections.abc import Hashable

import orjson

from services.mesh.domain.tensors import concat_rows, split_rows
from services.mesh.domain.types import InferRequest, InferResponse, ModelVersion


def packable(spec: ModelVersion) -> bool:
    """Whether rows of this version may share a request (no features, no cache)."""
    return spec.cache is None and all(s.feature is None for s in spec.signature.inputs)


def _key(request: InferRequest) -> Hashable | None:
    """What must be equal for two rows to share a request; None: this row travels alone."""
    if any(not t.shape or t.shape[0] != request.rows for t in request.inputs):
        return None  # no common batch dimension to join along
    try:
        parameters = orjson.dumps(request.parameters, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
    tensors = tuple((t.name, t.datatype, t.shape[1:]) for t in request.inputs)
    outputs = None if request.outputs is None else tuple(request.outputs)
    return tensors, outputs, parameters


def packs(requests: list[InferRequest], max_rows: int) -> list[list[InferRequest]]:
    """The requests in groups that may each travel as one request of at most `max_rows` rows,
    in the order of their first member; a group of one travels as it is."""
    groups: list[list[InferRequest]] = []
    open_by_key: dict[Hashable, tuple[list[InferRequest], int]] = {}
    for request in requests:
        key = _key(request)
        if key is None or request.rows >= max_rows:
            groups.append([request])
            continue
        found = open_by_key.get(key)
        if found is not None and found[1] + request.rows <= max_rows:
            found[0].append(request)
            open_by_key[key] = (found[0], found[1] + request.rows)
            continue
        group = [request]
        groups.append(group)
        open_by_key[key] = (group, request.rows)
    return groups


def join(group: list[InferRequest], request_id: str) -> InferRequest:
    """One request carrying every row of `group` (all of one `_key`), under `request_id`."""
    first = group[0]
    if len(group) == 1:
        return first
    by_name = [{t.name: t for t in r.inputs} for r in group]
    return InferRequest(
        model=first.model, version=first.version, request_id=request_id,
        inputs=[concat_rows([tensors[t.name] for tensors in by_name]) for t in first.inputs],
        outputs=first.outputs, parameters=dict(first.parameters),
    )


def unpack(response: InferResponse, group: list[InferRequest]) -> list[InferResponse]:
    """Each member's own response out of the response to their joined request."""
    if len(group) == 1:
        return [response]
    rows = [r.rows for r in group]
    pieces = [split_rows(t, rows) for t in response.outputs]
    return [
        InferResponse(response.model, response.version, member.request_id,
                      [parts[i] for parts in pieces], dict(response.parameters))
        for i, member in enumerate(group)
    ]
