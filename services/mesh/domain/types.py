"""Domain types shared by every hop: requests, responses, batches and the config records.

The config records (`ModelVersion`, `Rollout`) parse the JSON values stored in etcd; their
`to_json` is what the registry and control API publish. Parsing is strict about types so a bad
record is rejected with a message naming the field rather than crashing a service later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.mesh.domain.caching import CachePolicy
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.features import FeatureSpec, feature_spec_of
from services.mesh.domain.tensors import DATATYPES, Tensor

LANES = ("realtime", "bulk", "shadow")


@dataclass(slots=True)
class InferRequest:
    """One inference request as it crosses the data plane."""

    model: str
    inputs: list[Tensor]
    request_id: str
    version: str | None = None
    tenant: str = "anonymous"
    deadline: float | None = None
    """Absolute wall-clock time (`time.time()`) after which the answer is useless."""
    lane: str = "realtime"
    outputs: list[str] | None = None
    """Names of the outputs the caller wants; None means all."""
    parameters: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, str] = field(default_factory=dict)
    """W3C trace context carrier (`traceparent`, `tracestate`)."""
    bucket: int | None = None
    """The rollout bucket the router chose the version by (None: pinned, or not routed yet)."""

    @property
    def rows(self) -> int:
        """Rows in this request (the batch dimension of its first input)."""
        return self.inputs[0].rows if self.inputs else 0


@dataclass(slots=True)
class InferResponse:
    """The answer to one request: the version that served it and its outputs."""

    model: str
    version: str
    request_id: str
    outputs: list[Tensor]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Batch:
    """Requests of one (model, version) joined along dim 0: one tensor per input name."""

    model: str
    version: str
    inputs: list[Tensor]
    rows: list[int]
    """Rows contributed by each member request, in order."""
    trace: dict[str, str] = field(default_factory=dict)
    """W3C trace context of the batch's span (the worker's compute span is its child)."""
    outputs: list[str] | None = None
    """The outputs any member asked for (None: all); the worker drops the rest."""
    deadline: float | None = None
    """The latest of its members' deadlines (`time.time()`), past which nobody waits for any
    of its rows: a worker that has not started it by then drops it (None: no deadline)."""


@dataclass(slots=True)
class BatchResult:
    """A batch's outputs, joined along dim 0 in the order of `Batch.rows`."""

    outputs: list[Tensor]
    device: str = "cpu"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A declared input or output: name, OIP datatype, shape with -1 for dynamic dims."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    feature: FeatureSpec | None = None
    """For an input the router may fill from the online feature store (`domain.features`)."""

    @classmethod
    def from_json(cls, raw: Any, *, where: str) -> TensorSpec:
        if not isinstance(raw, Mapping):
            raise InvalidInput(f"{where}: each entry must be an object")
        name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{where}: 'name' must be a non-empty string")
        if datatype not in DATATYPES:
            raise InvalidInput(f"{where} '{name}': unknown datatype {datatype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and d >= -1 for d in shape
        ):
            raise InvalidInput(f"{where} '{name}': 'shape' must be a list of ints >= -1")
        feature = None
        if raw.get("feature") is not None:
            feature = feature_spec_of(raw["feature"], datatype, tuple(shape),
                                      where=f"{where} '{name}'")
        return cls(name, datatype, tuple(shape), feature)

    def to_json(self) -> dict[str, Any]:
        spec = {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
        return spec if self.feature is None else {**spec, "feature": self.feature.to_json()}


@dataclass(frozen=True, slots=True)
class Signature:
    """A model version's declared inputs and outputs."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Signature:
        inputs = [TensorSpec.from_json(s, where="signature input") for s in raw.get("inputs", [])]
        outputs = [
            TensorSpec.from_json(s, where="signature output") for s in raw.get("outputs", [])
        ]
        if not inputs or not outputs:
            raise InvalidInput("signature: needs at least one input and one output")
        return cls(tuple(inputs), tuple(outputs))

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }


ADMISSION_MODES = ("predictive", "strict", "off")
"""How a batcher admits a request: refuse at once one its latency model says cannot finish
before its deadline (`predictive`: the model times a margin from its recent errors); the
same, judged by the slowest of the recent batches that ran while requests arrived about as
fast as now, stretching the running batch's whole time (`strict`: fewer admitted requests
miss in bursts, fewer are admitted); or queue everything the queue bound takes (`off`)."""


@dataclass(frozen=True, slots=True)
class BatchingPolicy:
    """How the batcher forms batches and admits requests for one version (its queue policy).

    `preferred_batch_sizes`: sizes a batch is formed at when it cannot be full (empty: any).
    `default_timeout_ms`: the deadline of a request that names none (None: no deadline).
    `admission`: one of `ADMISSION_MODES`.
    `batchers`: how many batcher instances share the model's traffic (the top ones by
    rendezvous score on the model name), each with its own share of the version's workers;
    1 keeps the whole model on one batcher, which forms the fullest batches.
    `edge_inflight`: inference requests of the model the nginx edge lets in flight at once
    (None: the edge's default, `INFERMESH_EDGE_MODEL_CONNS`); past it the edge answers 503 +
    Retry-After itself. About the model's throughput x its tightest deadline: more only
    waits in front of the gateway's loop (docs/PERFORMANCE.md). The model's bound is the
    largest its versions declare; the launcher reloads nginx when it changes.
    """

    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 4096
    preferred_batch_sizes: tuple[int, ...] = ()
    default_timeout_ms: float | None = None
    admission: str = "predictive"
    batchers: int = 1
    edge_inflight: int | None = None

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> BatchingPolicy:
        default = cls()
        try:
            timeout = raw.get("default_timeout_ms", default.default_timeout_ms)
            edge_inflight = raw.get("edge_inflight", default.edge_inflight)
            preferred = raw.get("preferred_batch_sizes", default.preferred_batch_sizes)
            if not isinstance(preferred, list | tuple):
                raise ValueError("'preferred_batch_sizes' must be a list of integers")
            policy = cls(
                max_batch_size=int(raw.get("max_batch_size", default.max_batch_size)),
                max_queue_delay_ms=float(
                    raw.get("max_queue_delay_ms", default.max_queue_delay_ms)
                ),
                max_queue_size=int(raw.get("max_queue_size", default.max_queue_size)),
                preferred_batch_sizes=tuple(sorted({int(size) for size in preferred})),
                default_timeout_ms=None if timeout is None else float(timeout),
                admission=str(raw.get("admission", default.admission)),
                batchers=int(raw.get("batchers", default.batchers)),
                edge_inflight=None if edge_inflight is None else int(edge_inflight),
            )
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"batching: {exc}") from None
        if policy.max_batch_size < 1:
            raise InvalidInput("batching: 'max_batch_size' must be >= 1")
        if not 0 <= policy.max_queue_delay_ms <= 60_000:
            raise InvalidInput("batching: 'max_queue_delay_ms' must be within 0..60000")
        if policy.max_queue_size < 1:
            raise InvalidInput("batching: 'max_queue_size' must be >= 1")
        if policy.batchers < 1:
            raise InvalidInput("batching: 'batchers' must be >= 1")
        if policy.edge_inflight is not None and policy.edge_inflight < 1:
            raise InvalidInput("batching: 'edge_inflight' must be >= 1 (or null: the edge's "
                               "default)")
        if any(not 1 <= size <= policy.max_batch_size for size in policy.preferred_batch_sizes):
            raise InvalidInput(
                "batching: 'preferred_batch_sizes' must lie within 1..max_batch_size"
            )
        if policy.default_timeout_ms is not None and not (
            0 < policy.default_timeout_ms <= 3_600_000
        ):
            raise InvalidInput("batching: 'default_timeout_ms' must be within (0, 3600000]")
        if policy.admission not in ADMISSION_MODES:
            raise InvalidInput(
                f"batching: 'admission' must be one of {', '.join(ADMISSION_MODES)}"
            )
        return policy

    def to_json(self) -> dict[str, Any]:
        return {
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_ms": self.max_queue_delay_ms,
            "max_queue_size": self.max_queue_size,
            "preferred_batch_sizes": list(self.preferred_batch_sizes),
            "default_timeout_ms": self.default_timeout_ms,
            "admission": self.admission,
            "batchers": self.batchers,
            "edge_inflight": self.edge_inflight,
        }


DEVICE_POLICIES = ("auto", "cuda", "cpu")
PREDICTION_LOG_POLICIES = ("full", "digest", "none")
WORKER_PLACEMENTS = ("shared", "dedicated")
"""Where a version runs under the launcher: in its model's shared workers, or in workers of
its own (docs/PLACEMENT.md)."""
"""What the prediction log keeps of a version's tensors: all of them, a sha256 each, nothing."""


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """The record under `models/{model}/{version}` in etcd."""

    model: str
    version: str
    signature: Signature
    artifact_uri: str
    sha256: str
    batching: BatchingPolicy = BatchingPolicy()
    device: str = "auto"
    platform: str = "pytorch_torchscript"
    state: str = "ready"
    cpu_fallback: bool = False
    """Whether a CUDA failure (no device, out of memory, device lost) may move the version to
    CPU, with degraded latency; fixed at registration."""
    worker: str = "shared"
    """`shared`: served by its model's workers beside the model's other versions; `dedicated`:
    by workers of its own, which it shares with no other version (one of `WORKER_PLACEMENTS`);
    fixed at registration."""
    prediction_log: str = "digest"
    """How predictions of this version are logged: one of `PREDICTION_LOG_POLICIES`."""
    autoscaling: Mapping[str, Any] | None = None
    """The autoscaler's block (`services.mesh.domain.autoscaling`), with `min_replicas` and
    `max_replicas` filled in; None: the version is not autoscaled (a fixed fleet). Like the
    batching policy, it may change after registration."""
    derived_from: Mapping[str, Any] | None = None
    """For a version the registry derived from another one (int8 from fp32): `{version,
    mode}`; None for an uploaded version."""
    quantization: Mapping[str, Any] | None = None
    """What the registry measured before publishing a derived version: speed-ups at batch 32
    and 1, max/mean absolute error per output against the source (`services.registry.
    quantize`)."""
    cache: CachePolicy | None = None
    """The router's prediction cache policy (`services.mesh.domain.caching`); None: answers
    of this version are never cached. May change after registration."""

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelVersion:
        device = raw.get("device", "auto")
        if device not in DEVICE_POLICIES:
            raise InvalidInput(f"device: must be one of {', '.join(DEVICE_POLICIES)}")
        prediction_log, scaling = raw.get("prediction_log", "digest"), raw.get("autoscaling")
        cpu_fallback = raw.get("cpu_fallback", False)
        if not isinstance(cpu_fallback, bool):
            raise InvalidInput("cpu_fallback: must be true or false")
        if prediction_log not in PREDICTION_LOG_POLICIES:
            raise InvalidInput(
                f"prediction_log: must be one of {', '.join(PREDICTION_LOG_POLICIES)}"
            )
        worker = raw.get("worker", "shared")
        if worker not in WORKER_PLACEMENTS:
            raise InvalidInput(f"worker: must be one of {', '.join(WORKER_PLACEMENTS)}")
        return cls(
            model=str(raw["model"]),
            version=str(raw["version"]),
            signature=Signature.from_json(raw.get("signature", {})),
            artifact_uri=str(raw.get("artifact_uri", "")),
            sha256=str(raw.get("sha256", "")),
            batching=BatchingPolicy.from_json(raw.get("batching", {})),
            device=device,
            platform=str(raw.get("platform", "pytorch_torchscript")),
            state=str(raw.get("state", "ready")),
            cpu_fallback=cpu_fallback,
            worker=worker,
            prediction_log=prediction_log,
            autoscaling=scaling if isinstance(scaling, Mapping) else None,
            derived_from=_mapping_or_none(raw.get("derived_from")),
            quantization=_mapping_or_none(raw.get("quantization")),
            cache=None if raw.get("cache") is None else CachePolicy.from_json(raw["cache"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "signature": self.signature.to_json(),
            "artifact_uri": self.artifact_uri,
            "sha256": self.sha256,
            "batching": self.batching.to_json(),
            "device": self.device,
            "cpu_fallback": self.cpu_fallback,
            **({"worker": self.worker} if self.worker != "shared" else {}),
            "platform": self.platform,
            "state": self.state,
            "prediction_log": self.prediction_log,
            **self._scaling_json(),
            **{key: dict(value) for key, value in (("derived_from", self.derived_from),
                                                   ("quantization", self.quantization))
               if value is not None},
            **({"cache": self.cache.to_json()} if self.cache is not None else {}),
        }

    def _scaling_json(self) -> dict[str, Any]:
        """`autoscaling`, and the `replicas` bounds the launcher's fleet reads, when set."""
        if self.autoscaling is None:
            return {}
        scaling = dict(self.autoscaling)
        bounds = {"min": scaling.get("min_replicas"), "max": scaling.get("max_replicas")}
        return {"autoscaling": scaling,
                "replicas": {k: v for k, v in bounds.items() if v is not None}}


def _mapping_or_none(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None


@dataclass(frozen=True, slots=True)
class Route:
    version: str
    weight: float


@dataclass(frozen=True, slots=True)
class ShadowRoute:
    version: str
    fraction: float


@dataclass(frozen=True, slots=True)
class Rollout:
    """The record under `rollouts/{model}`: which versions serve, by weight."""

    model: str
    routes: tuple[Route, ...]
    sticky_key: str | None = None
    salt: str = ""
    shadow: tuple[ShadowRoute, ...] = ()
    fallback: str | None = None
    epoch: int = 1
    guard: Mapping[str, Any] | None = None
    """The guarded-rollout settings (control plane only; the data plane ignores them)."""

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Rollout:
        routes = tuple(Route(str(r["version"]), float(r["weight"])) for r in raw.get("routes", []))
        shadow = tuple(
            ShadowRoute(str(s["version"]), float(s["fraction"])) for s in raw.get("shadow", [])
        )
        fallback = raw.get("fallback")
        return cls(
            model=str(raw["model"]),
            routes=routes,
            sticky_key=raw.get("sticky_key"),
            salt=str(raw.get("salt", "")),
            shadow=shadow,
            fallback=None if fallback is None else str(fallback),
            epoch=int(raw.get("epoch", 1)),
            guard=raw.get("guard"),
        )

    @classmethod
    def stable(cls, model: str, version: str, *, epoch: int = 1) -> Rollout:
        """All traffic to one version, which is also the fallback."""
        return cls(model, (Route(version, 100.0),), fallback=version, epoch=epoch)

    @property
    def primary(self) -> str | None:
        """The version with the largest weight (ties: the first listed)."""
        if not self.routes:
            return self.fallback
        return max(self.routes, key=lambda r: r.weight).version

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "routes": [{"version": r.version, "weight": r.weight} for r in self.routes],
            "sticky_key": self.sticky_key,
            "salt": self.salt,
            "shadow": [{"version": s.version, "fraction": s.fraction} for s in self.shadow],
            "fallback": self.fallback,
            "epoch": self.epoch,
            **({"guard": dict(self.guard)} if self.guard is not None else {}),
        }
