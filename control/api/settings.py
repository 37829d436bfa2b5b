"""Control API settings, read from `INFERMESH_CONTROL_*` (then `INFERMESH_*`) in `__main__`."""

from __future__ import annotations

import dataclasses

from services.mesh.domain.errors import InvalidInput
from services.mesh.infra.settings import ServiceSettings


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControlSettings(ServiceSettings):
    """Where the control API listens, its database, who may call it and its loop intervals."""

    port: int = 8100
    """HTTP port of the control API (`INFERMESH_CONTROL_PORT`)."""
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    """Postgres DSN (`INFERMESH_DATABASE_URL`); migrations apply on start."""
    admin_tokens: tuple[str, ...] = ()
    """Admin bearer tokens as `name:secret`, comma-separated in the environment
    (`INFERMESH_CONTROL_ADMIN_TOKENS`). The name is recorded as the author of each change."""
    admin_token_file: str = ""
    """A file of more `name:secret` lines (blank lines and `#` comments skipped)."""
    reconcile_interval: float = 10.0
    """Seconds between passes that republish rollouts etcd lacks or holds at an older epoch,
    and tenants, API keys and model limits that etcd holds differently from Postgres."""
    guard_interval: float = 1.0
    """Seconds between evaluations of guarded rollouts."""
    autoscaler_interval: float = 2.0
    """Seconds between autoscaler ticks (versions whose `models/` record has `autoscaling`)."""
    autoscaler_actuator: str = "etcd"
    """`etcd`: publish `scale/` records the local launcher follows; `kubernetes`: also patch
    the scale of each version's worker Deployment."""
    kube_api_url: str = ""
    """Kubernetes API server for the `kubernetes` actuator; empty: the pod's service account."""
    kube_namespace: str = "default"
    """Namespace of the worker Deployments."""
    kube_deployment: str = "infermesh-worker-{model}-{version}"
    """Name template of a version's worker Deployment (made a DNS-1123 label)."""

    def __post_init__(self) -> None:
        if self.autoscaler_actuator not in ("etcd", "kubernetes"):
            raise InvalidInput("setting autoscaler_actuator: must be etcd or kubernetes, not "
                               f"{self.autoscaler_actuator!r}")
