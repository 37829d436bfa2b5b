"""TLS with client certificates (mTLS) for the internal surfaces, when a deployment wants it.

With `tls_cert`, `tls_key` and `tls_ca` set, an internal service (router, batcher, worker,
registry) serves over TLS and accepts only clients whose certificate `tls_ca` signed; its own
clients (link pools, registry and artifact calls) present the same certificate and verify the
server against `tls_ca`. The mesh credential is still required on top: a certificate says
"a host of this mesh", the credential "a process given the mesh secret".
"""

from __future__ import annotations

import ssl

from services.mesh.infra.settings import ServiceSettings

INTERNAL_SERVICES = frozenset({"router", "batcher", "worker", "registry"})
"""Services whose whole HTTP surface is internal; the gateway and the control API face
users and keep their own TLS termination (the edge)."""


def enabled(settings: ServiceSettings) -> bool:
    """Whether `settings` configure mTLS; raises ValueError when only part of it is set."""
    parts = (settings.tls_cert, settings.tls_key, settings.tls_ca)
    if any(parts) and not all(parts):
        raise ValueError("mTLS needs all of tls_cert, tls_key and tls_ca (or none)")
    return all(parts)


def server_context(settings: ServiceSettings) -> ssl.SSLContext:
    """A server context that requires a client certificate signed by `tls_ca` (blocking)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=settings.tls_ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def client_context(settings: ServiceSettings) -> ssl.SSLContext:
    """A client context that verifies servers against `tls_ca` and presents our certificate
    (blocking)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.tls_ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context
