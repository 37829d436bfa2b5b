"""Signing and verifying webhook messages the Standard Webhooks way.

A message is signed over `{webhook-id}.{webhook-timestamp}.{body}` with HMAC-SHA256 keyed by the
secret's bytes (the base64 after `whsec_`), and the `webhook-signature` header carries
space-separated `v1,<base64>` entries so a sender can rotate secrets by signing with both.
`verify` is what a receiver runs; the tests run it against the spec's published test vector,
so a receiver using any of the spec's libraries accepts what `sign` produces.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24
"""192 random bits: the spec allows 24 to 64 bytes."""
VERSION = "v1"
DEFAULT_TOLERANCE = 300
"""Seconds a timestamp may be off in either direction (the spec's 5 minutes): an old message
replayed later is refused even with a good signature."""


class InvalidSignature(Exception):
    """A message that must not be trusted: the reason says which check failed."""


def new_secret() -> str:
    """A fresh signing secret, `whsec_<base64 of 24 random bytes>`: show it once."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of `secret` (the bytes after `whsec_`); ValueError when malformed."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a webhook secret is whsec_ followed by base64") from exc
    if not key:
        raise ValueError("a webhook secret is whsec_ followed by base64")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value, `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return f"{VERSION},{base64.b64encode(digest).decode()}"


def headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Every header a delivery carries."""
    return {
        "webhook-id": msg_id, "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
        "content-type": "application/json",
    }


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, *,
    tolerance: int = DEFAULT_TOLERANCE, now: Callable[[], float] = time.time,
) -> None:
    """Returns when `body` with `headers` was signed with `secret` within `tolerance` seconds
    of `now()`; raises InvalidSignature otherwise. Header names are matched case-insensitively
    (a plain dict from any HTTP library works)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = lowered.get("webhook-id")
    stamp = lowered.get("webhook-timestamp")
    presented = lowered.get("webhook-signature")
    if not msg_id or not stamp or not presented:
        raise InvalidSignature("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise InvalidSignature("webhook-timestamp is not an integer") from None
    current = now()
    if timestamp < current - tolerance:
        raise InvalidSignature("webhook-timestamp is too old")
    if timestamp > current + tolerance:
        raise InvalidSignature("webhook-timestamp is too far in the future")
    expected = sign(secret, msg_id, timestamp, body).partition(",")[2]
    for entry in presented.split(" "):
        version, _, signature = entry.partition(",")
        if version == VERSION and hmac.compare_digest(signature, expected):
            return
    raise InvalidSignature("no matching signature")
