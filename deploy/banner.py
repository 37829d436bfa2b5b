"""What `infermesh up` prints once the mesh is ready: endpoints, credentials, a curl line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deploy.admin_token import TOKEN_FILE
from deploy.demo_tenant import KEY_FILE
from deploy.edge import EdgeConfig

OFF = ("0", "false", "no", "off")
"""Values of `INFERMESH_GATEWAY_AUTH` that turn auth off."""


@dataclass(frozen=True)
class BannerFacts:
    fused: bool
    gateway_port: int
    grpc_port: int
    registry_port: int
    control_port: int
    state_dir: Path
    etcd_url: str
    edge: EdgeConfig | None
    """The edge, when it was started."""
    auth: bool
    traces: str = ""
    """Where spans go: the local span directory, or the OTLP endpoint."""


def banner(facts: BannerFacts) -> str:
    gateway = f"http://127.0.0.1:{facts.gateway_port}"
    features = ",".join(["0.5"] * 32)
    body = ('{"inputs":[{"name":"features","datatype":"FP32","shape":[1,32],'
            f'"data":[{features}]}}]}}')
    key = facts.state_dir / KEY_FILE
    credentials = f"-H \"Authorization: Bearer $(cat {key})\" " if facts.auth else ""
    return "\n".join([
        f"infermesh is up ({'fused' if facts.fused else 'mesh'} mode); Ctrl-C stops it"
        + ("." if facts.fused else "; SIGHUP restarts its workers one at a time."),
        *_auth_lines(facts.auth, key),
        f"  gateway (OIP v2 REST)  {gateway}",
        f"  gateway (OIP v2 gRPC)  127.0.0.1:{facts.grpc_port}",
        *_edge_lines(facts.edge),
        f"  registry               http://127.0.0.1:{facts.registry_port}",
        f"  control API            http://127.0.0.1:{facts.control_port}"
        f"  (token: {facts.state_dir / TOKEN_FILE}; `infermesh rollout show mlp`)",
        f"  etcd                   {facts.etcd_url}",
        f"  logs                   {facts.state_dir / 'logs'}",
        *_trace_lines(facts.traces),
        "try:",
        f"  curl -s -X POST {gateway}/v2/models/mlp/infer {credentials}"
        f"-H 'Content-Type: application/json' -d '{body}'",
    ])


def _auth_lines(auth: bool, key: Path) -> list[str]:
    if auth:
        return [f"  API key of tenant 'demo'  {key}  (`infermesh tenants` / `keys` for more)"]
    rule = "!" * 78
    return [rule, "!! AUTH IS OFF (INFERMESH_GATEWAY_AUTH=0): anyone who can reach the gateway",
            "!! can call every model, with no tenant quotas. For demos on a laptop only.", rule]


def _trace_lines(traces: str) -> list[str]:
    if not traces:
        return []
    if traces.startswith(("http://", "https://")):
        return [f"  traces                 OTLP to {traces}"]
    return [f"  traces                 {traces}  (`infermesh trace REQUEST_ID` for a waterfall;"
            " sampled requests, failed ones, and any sent with"
            " `traceparent: 00-<32 hex>-<16 hex>-01`)"]


def _edge_lines(edge: EdgeConfig | None) -> list[str]:
    if edge is None:
        return []
    lines = [f"  edge (HTTP/2 h2c: REST + gRPC)  127.0.0.1:{edge.h2c_port}"]
    if edge.tls_port and edge.certificate:
        lines.append(f"  edge (HTTP/2 TLS: REST + gRPC)  127.0.0.1:{edge.tls_port}")
    return lines
