"""Whether versions of one model can stand in for each other: pure functions, no I/O.

The gateway validates a request routed by a rollout against the rollout's primary version (the
heaviest route, `Rollout.primary`), before the router picks the version that serves it. That is
sound only when every version the rollout can send the request to accepts what the primary
accepts and answers what the primary answers. Two signatures are *compatible* when

- they declare the same input names, each with the same datatype, rank and non-batch dims
  (dim 0 is the batch; a -1 must meet a -1: a version that is narrower where the other is
  dynamic would fail requests the other accepts);
- they declare the same output names, each with the same datatype (output shapes are not
  compared: a client reads them from the response, and they may be data-dependent).

The relation is symmetric on purpose: the primary is whichever route weighs most, which changes
as a canary is ramped, and a gateway whose view of the rollout lags may validate against the
previous primary; a one-way rule would refuse a ramp halfway. `max_batch_size` may differ: it is
a batching knob, and the batcher runs a request larger than its version's limit alone.

`request_misfit` / `require_fit` are the per-request check the router runs against the version
it chose, for whatever the control API could not refuse (a gateway whose view lags behind a full
switch to a new signature, a rollout written before this check existed).
"""

from __future__ import annotations

from collections.abc import Mapping

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.types import (
    InferRequest,
    ModelVersion,
    Rollout,
    Signature,
    TensorSpec,
)


def incompatibility(
    primary: Signature, other: Signature, *, primary_name: str = "the primary"
) -> str | None:
    """How `other` disagrees with `primary`, None when they are compatible.

    The text reads after a version's name, e.g. "input 'features' has shape [-1,16], the
    primary has [-1,32]"; `primary_name` replaces "the primary".
    """
    return _disagreement(primary.inputs, other.inputs, "input", primary_name, shapes=True) or (
        _disagreement(primary.outputs, other.outputs, "output", primary_name, shapes=False)
    )


def rollout_incompatibility(rollout: Rollout, signatures: Mapping[str, Signature]) -> str | None:
    """The first routed, shadow or fallback version of `rollout` incompatible with its primary.

    E.g. "rollout for mlp: version 9 input 'features' has shape [-1,16], primary version 1 has
    [-1,32]". Versions missing from `signatures` are not judged (the caller checks existence).
    """
    primary = rollout.primary
    if primary is None or primary not in signatures:
        return None
    named = [r.version for r in rollout.routes] + [s.version for s in rollout.shadow]
    if rollout.fallback is not None:
        named.append(rollout.fallback)
    for version in dict.fromkeys(named):
        if version == primary or version not in signatures:
            continue
        found = incompatibility(signatures[primary], signatures[version],
                                primary_name=f"primary version {primary}")
        if found is not None:
            return f"rollout for {rollout.model}: version {version} {found}"
    return None


def request_misfit(
    request: InferRequest, signature: Signature, *, version_name: str = "this version"
) -> str | None:
    """Why `request` (validated elsewhere against another version) cannot run on a version
    with `signature`: an input or requested output it lacks, or a datatype or shape it does
    not accept; None when it fits. Cheap: no tensor data is touched. The batch size is not
    judged (see the module docstring)."""
    for tensor in request.inputs:
        spec = _named(signature.inputs, tensor.name)
        if spec is None:
            return f"input '{tensor.name}' is not an input of {version_name}"
        if tensor.datatype != spec.datatype:
            return (f"input '{tensor.name}': datatype {tensor.datatype}, {version_name} "
                    f"takes {spec.datatype}")
        if not _fits(tensor.shape, spec.shape):
            return (f"input '{tensor.name}': shape {_dims(tensor.shape)}, {version_name} "
                    f"takes {_dims(spec.shape)}")
    if len(request.inputs) != len(signature.inputs):
        given = {t.name for t in request.inputs}
        missing = next((s.name for s in signature.inputs
                        if s.name not in given and s.feature is None), None)
        if missing is not None:  # an input naming features is the router's to fill
            return f"input '{missing}' is required by {version_name}"
    for wanted in request.outputs or ():
        if _named(signature.outputs, wanted) is None:
            return f"output '{wanted}' is not an output of {version_name}"
    return None


def require_fit(request: InferRequest, version: ModelVersion) -> None:
    """InvalidInput naming the field when `request` cannot run on `version` (the router's
    check of the version it chose against what the gateway validated)."""
    misfit = request_misfit(
        request, version.signature, version_name=f"version {version.version} of {version.model}"
    )
    if misfit is not None:
        raise InvalidInput(misfit)


def _disagreement(
    primary: tuple[TensorSpec, ...], other: tuple[TensorSpec, ...], kind: str,
    primary_name: str, *, shapes: bool,
) -> str | None:
    for spec in primary:
        theirs = _named(other, spec.name)
        if theirs is None:
            return f"lacks {kind} '{spec.name}', which {primary_name} has"
        if theirs.datatype != spec.datatype:
            return (f"{kind} '{spec.name}' has datatype {theirs.datatype}, "
                    f"{primary_name} has {spec.datatype}")
        if shapes and (len(theirs.shape) != len(spec.shape) or theirs.shape[1:] != spec.shape[1:]):
            return (f"{kind} '{spec.name}' has shape {_dims(theirs.shape)}, "
                    f"{primary_name} has {_dims(spec.shape)}")
    for spec in other:
        if _named(primary, spec.name) is None:
            return f"has {kind} '{spec.name}', which {primary_name} lacks"
    return None


def _named(specs: tuple[TensorSpec, ...], name: str) -> TensorSpec | None:
    for spec in specs:
        if spec.name == name:
            return spec
    return None


def _fits(shape: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    return len(shape) == len(declared) and all(
        want in (-1, got) for want, got in zip(declared, shape, strict=True)
    )


def _dims(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
