"""Where a webhook may go: a URL on the tenant's allowlist that never reaches inside the mesh.

A webhook URL comes from a tenant, and the mesh POSTs to it from inside the network, so without
checks it is a server-side request forgery: `http://169.254.169.254/` (cloud metadata),
`http://localhost:8100/` (the control API), `http://10.0.0.7/`. The rules:

- the scheme is http or https, and the URL has a host;
- the host is on the tenant's `webhook_allowlist`: an exact host (`hooks.example.com`,
  `127.0.0.1`), a suffix entry (`*.example.com` matches `a.example.com`, not `example.com`), or
  `*` (any host);
- every address the host resolves to is public (`ipaddress`: not loopback, link-local, private,
  multicast, unspecified or reserved), unless the allowlist names that exact host: naming
  `127.0.0.1` or `hooks.internal` is the tenant's operator saying "yes, that one".

The check runs at job creation (`check_target_async`, DNS off the event loop) and again at every
delivery, because DNS may answer differently later (rebinding); the dispatcher then connects only
to the addresses this module returned (`PinnedResolver`), never to a fresh lookup.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.mesh.domain.errors import InvalidInput

FIELD = "webhook.url"
SCHEMES = {"http": 80, "https": 443}
MAX_URL = 2048

SyncResolve = Callable[[str, int], list[str]]
AsyncResolve = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class Target:
    """A checked webhook target: where to connect, and the only addresses allowed."""

    url: str
    host: str
    port: int
    addresses: tuple[str, ...]


def check_target(
    url: str, allowlist: Sequence[str], *, resolve: SyncResolve | None = None
) -> Target:
    """The checked target of `url`; InvalidInput naming `webhook.url` when it may not be used.
    Resolves the host with a blocking getaddrinfo: on an event loop use `check_target_async`."""
    host, port = _parse(url)
    explicit = _allowed(host, allowlist)
    addresses = (resolve or _getaddrinfo)(host, port)
    return _checked(url, host, port, addresses, explicit=explicit)


async def check_target_async(
    url: str, allowlist: Sequence[str], *, resolve: AsyncResolve | None = None
) -> Target:
    """`check_target` with the DNS lookup off the event loop (the loop's getaddrinfo)."""
    host, port = _parse(url)
    explicit = _allowed(host, allowlist)
    addresses = await (resolve or _getaddrinfo_async)(host, port)
    return _checked(url, host, port, addresses, explicit=explicit)


def _parse(url: str) -> tuple[str, int]:
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise InvalidInput(f"{FIELD}: must be an http(s) URL of at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"{FIELD}: not a valid URL ({exc})") from None
    if parts.scheme not in SCHEMES:
        raise InvalidInput(f"{FIELD}: the scheme must be https or http, got {parts.scheme!r}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InvalidInput(f"{FIELD}: the URL has no host")
    return host, port or SCHEMES[parts.scheme]


def _allowed(host: str, allowlist: Sequence[str]) -> bool:
    """Whether `host` is on the allowlist, and True when an entry names it exactly."""
    matched = False
    for raw in allowlist:
        entry = raw.lower().rstrip(".").strip("[]")
        if entry == host:
            return True
        if entry == "*" or (entry.startswith("*.") and host.endswith(entry[1:])):
            matched = True
    if not matched:
        raise InvalidInput(
            f"{FIELD}: host {host!r} is not on the tenant's webhook_allowlist"
        )
    return False


def _checked(
    url: str, host: str, port: int, addresses: Sequence[str], *, explicit: bool
) -> Target:
    if not addresses:
        raise InvalidInput(f"{FIELD}: host {host!r} does not resolve")
    if not explicit:
        for address in addresses:
            reason = _internal(address)
            if reason:
                raise InvalidInput(
                    f"{FIELD}: host {host!r} resolves to {address}, a {reason} address; only an "
                    "allowlist entry naming this exact host permits that"
                )
    return Target(url, host, port, tuple(dict.fromkeys(addresses)))


def _internal(address: str) -> str | None:
    """What kind of non-public address this is, or None when it is a public one."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for reason, hit in (
        ("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
        ("private", ip.is_private), ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified), ("reserved", ip.is_reserved),
        ("non-global", not ip.is_global),
    ):
        if hit:
            return reason
    return None


def _getaddrinfo(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InvalidInput(f"{FIELD}: host {host!r} does not resolve") from None
    return [str(info[4][0]) for info in infos]


async def _getaddrinfo_async(host: str, port: int) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InvalidInput(f"{FIELD}: host {host!r} does not resolve") from None
    return [str(info[4][0]) for info in infos]


MAX_ALLOWLIST = 50
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_ENTRY = re.compile(rf"^(?:\*|(?:\*\.)?{_LABEL}(?:\.{_LABEL})*)$")


def parse_allowlist(raw: object, *, field: str = "webhook_allowlist") -> tuple[str, ...]:
    """A tenant's webhook allowlist from a request body: hosts (names or IP literals),
    `*.domain` suffixes or `*`, lowercased; InvalidInput naming the entry otherwise."""
    if not isinstance(raw, list) or len(raw) > MAX_ALLOWLIST:
        raise InvalidInput(f"{field}: must be a list of at most {MAX_ALLOWLIST} hosts")
    entries: list[str] = []
    for i, entry in enumerate(raw):
        host = entry.strip().lower().rstrip(".") if isinstance(entry, str) else ""
        if not _is_ip(host.strip("[]")) and not (len(host) <= 253 and _ENTRY.match(host)):
            raise InvalidInput(
                f"{field}[{i}]: must be a host name, an IP address, '*.domain' or '*', "
                f"got {entry!r}"[:200]
            )
        entries.append(host.strip("[]"))
    return tuple(dict.fromkeys(entries))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
