"""Request ids a client may choose, checked once at the gateway before any work. Pure.

A client names its request with the `X-Request-Id` header, the OIP body's `id` (JSON, or the
binary extension's JSON header) or gRPC's `ModelInferRequest.id`. The id is echoed in the
`X-Request-Id` response header, set on spans and written to the prediction log, so it must fit
all three: at most `MAX_REQUEST_ID` characters of printable ASCII (0x20 to 0x7e), with no
space at either end. Spaces inside are allowed (HTTP carries them unchanged); control
characters (CR, LF, NUL), non-ASCII text and bytes that are not UTF-8 are not.
"""

from __future__ import annotations

from services.mesh.domain.errors import InvalidInput

MAX_REQUEST_ID = 128
"""The longest request id a client may send, in characters."""


def is_printable_ascii(value: str) -> bool:
    """True when every character of `value` is printable ASCII (0x20 to 0x7e)."""
    return value.isascii() and value.isprintable()


def check_request_id(value: str, *, field: str) -> str:
    """`value` when it is a usable request id; InvalidInput naming `field` otherwise.

    `field` is how the client sent it, such as "id" or "X-Request-Id header".
    """
    if not value or len(value) > MAX_REQUEST_ID:
        raise InvalidInput(
            f"{field}: must be 1 to {MAX_REQUEST_ID} characters, got {len(value)}"
        )
    if not is_printable_ascii(value):
        position, char = next((i, c) for i, c in enumerate(value) if not is_printable_ascii(c))
        raise InvalidInput(
            f"{field}: must be printable ASCII (0x20 to 0x7e), character {position + 1} "
            f"is {_describe(char)}"
        )
    if value != value.strip(" "):
        raise InvalidInput(f"{field}: must not start or end with a space")
    return value


def _describe(char: str) -> str:
    # aiohttp hands a header's non-UTF-8 bytes over as lone surrogates (surrogateescape).
    if 0xDC80 <= ord(char) <= 0xDCFF:
        return f"the byte 0x{ord(char) - 0xDC00:02x}, which is not UTF-8"
    return repr(char)
