"""What each process `infermesh up` starts may know: least privilege, as one pure function.

Every child gets the launcher's common environment minus its secrets, then only the secrets its
service uses: its own etcd user's URL, the database URL where it keeps durable state (never the
batcher or the workers), the admin tokens in the control API alone. Each binds the address of
its surface: public (gateway, edge), internal (router, batcher, workers, registry) or admin
(control API), from `INFERMESH_PUBLIC_HOST`, `INFERMESH_INTERNAL_HOST`, `INFERMESH_ADMIN_HOST`
(each 127.0.0.1 unless set). docs/SECURITY.md draws the whole trust model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

SECRET_VARS = ("INFERMESH_CONTROL_ADMIN_TOKENS", "INFERMESH_DATABASE_URL", "INFERMESH_ETCD_URL")
"""Never passed on as they are: each child gets its own value, or none."""

USES_DATABASE = frozenset({"registry", "control", "router", "gateway", "fused"})
"""Registry and control API (source of truth), router (prediction log), gateway (feedback)."""

SURFACE = {
    "gateway": "public", "fused": "public", "control": "admin",
    "registry": "internal", "router": "internal", "batcher": "internal", "worker": "internal",
}


@dataclass(frozen=True)
class BindHosts:
    """The address each surface listens on."""

    public: str = "127.0.0.1"
    internal: str = "127.0.0.1"
    admin: str = "127.0.0.1"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BindHosts:
        return cls(**{surface: env.get(f"INFERMESH_{surface.upper()}_HOST") or "127.0.0.1"
                      for surface in ("public", "internal", "admin")})

    def of(self, service: str) -> str:
        host: str = getattr(self, SURFACE[service])
        return host


def dial(host: str) -> str:
    """Where this machine reaches a server bound to `host` (a wildcard: loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


@dataclass(frozen=True)
class ChildSecrets:
    """The secrets the launcher holds, to hand out one service at a time."""

    etcd_url: str
    """The etcd URL of a service that has no user of its own (an external etcd: every one)."""
    database_url: str
    admin_tokens: str
    etcd_urls: Mapping[str, str] | None = None
    """etcd URL per service, each with that service's own user (the private etcd)."""

    def etcd_for(self, service: str) -> str:
        return (self.etcd_urls or {}).get(service, self.etcd_url)


def service_of(child: str) -> str:
    """The service a child runs, from its name (`router-1`, `worker-mlp-1` ...)."""
    return child.split("-", 1)[0]


def child_env(
    service: str, common: Mapping[str, str], secrets: ChildSecrets, hosts: BindHosts
) -> dict[str, str]:
    """The whole environment of a `service` child (pure: no I/O)."""
    env = {name: value for name, value in common.items() if name not in SECRET_VARS}
    env["INFERMESH_ETCD_URL"] = secrets.etcd_for(service)
    if service in USES_DATABASE:
        env["INFERMESH_DATABASE_URL"] = secrets.database_url
    if service == "control":
        env["INFERMESH_CONTROL_ADMIN_TOKENS"] = secrets.admin_tokens
    # fused runs every data-plane service in one process, on the public surface.
    host_var = "INFERMESH_HOST" if service == "fused" else f"INFERMESH_{service.upper()}_HOST"
    env[host_var] = hosts.of(service)
    return env
