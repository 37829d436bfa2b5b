"""Settings: frozen dataclasses read from the environment, in `__main__` only.

A field `foo` of the gateway's settings reads `INFERMESH_GATEWAY_FOO`, then the shared
`INFERMESH_FOO` (so `INFERMESH_ETCD_URL` reaches every service), then its default.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from services.mesh.domain.errors import InvalidInput

S = TypeVar("S")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    """What every service needs: where etcd is and where to listen."""

    etcd_url: str = "http://127.0.0.1:2379"
    """etcd client URL (`INFERMESH_ETCD_URL`)."""
    etcd_prefix: str = "/infermesh/"
    """Key prefix of this mesh in etcd; several meshes can share one etcd."""
    host: str = "127.0.0.1"
    """Address to listen on and to advertise to peers."""
    port: int = 0
    """HTTP port (links, /metrics, health); 0 picks a free one, advertised through etcd."""
    instance: str = ""
    """Instance id in `endpoints/{service}/{instance}`; defaults to host-pid."""
    drain_timeout: float = 10.0
    """Seconds to wait for in-flight requests on SIGTERM."""
    handoff_timeout: float = 30.0
    """Seconds a draining worker (SIGTERM) waits for a ready replacement of each of its
    versions before it deregisters anyway; the launcher starts one at once."""
    mesh_credential_file: str = ""
    """File of mesh tokens, one a line (`INFERMESH_MESH_CREDENTIAL_FILE`, mode 0600): the first
    is presented on link upgrades and registry calls, any is accepted. Required by every
    service; `infermesh up` makes one in `<state dir>/secrets/mesh-credential`."""
    max_frame_bytes: int = 64 << 20
    """Largest link message (a batch of frames) accepted or sent; a larger one closes that link.
    Must be at least the largest valid batch: the max_batch_size bound times a row's bytes."""
    tls_cert: str = ""
    """PEM certificate of this instance; with `tls_key` and `tls_ca`, internal services (router,
    batcher, worker, registry) serve over TLS and link clients present it (mTLS)."""
    tls_key: str = ""
    """PEM private key of `tls_cert`."""
    tls_ca: str = ""
    """PEM CA bundle that signs every instance's certificate: servers require client
    certificates it signs, clients verify servers with it."""

    @property
    def instance_id(self) -> str:
        return self.instance or f"{socket.gethostname()}-{os.getpid()}"


def _coerce(name: str, raw: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    try:
        if kind is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if kind in (int, float, str):
            return kind(raw)
        if typing.get_origin(kind) is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError:
        raise InvalidInput(f"setting {name}: cannot read {raw!r} as {kind.__name__}") from None
    raise TypeError(f"setting {name}: unsupported type {kind}")


def load_settings(cls: type[S], service: str, env: Mapping[str, str] | None = None) -> S:
    """Build `cls` from `INFERMESH_{SERVICE}_{FIELD}` / `INFERMESH_{FIELD}` variables."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        for name in (f"INFERMESH_{service.upper()}_{field.name.upper()}",
                     f"INFERMESH_{field.name.upper()}"):
            if name in env:
                values[field.name] = _coerce(name, env[name], hints[field.name])
                break
    return cls(**values)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
