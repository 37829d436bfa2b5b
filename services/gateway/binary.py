"""The OIP binary tensor extension: a JSON header followed by raw tensor bytes. Pure functions.

A request whose `Inference-Header-Content-Length` is N carries its JSON header in the first N
bytes of the body; each input with a `binary_data_size` parameter of K takes the next K bytes,
in input order. The tail is sliced with memoryviews, never copied or re-encoded. Outputs are
returned as raw bytes when the request asks (`binary_data` on a requested output, or
`binary_data_output` on the request); the response then carries the same kind of header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.mesh.domain.errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"


def split_body(body: bytes, header_length: str | None) -> tuple[memoryview, memoryview]:
    """The JSON header and the binary tail of a request body (views, no copies)."""
    view = memoryview(body)
    if header_length is None:
        return view, view[len(view):]
    # Digits only, as for Content-Length: int() would also take "1_0", "+3" and "٣", and
    # raise ValueError past 4,300 digits; 19 digits are more than any body has bytes.
    if not (header_length.isascii() and header_length.isdigit() and len(header_length) < 20):
        raise InvalidInput(
            f"{HEADER_LENGTH} must be a non-negative integer, got {header_length[:40]!r}"
        )
    length = int(header_length)
    if length > len(view):
        raise InvalidInput(
            f"{HEADER_LENGTH} {length} is past the end of the {len(view)}-byte body"
        )
    return view[:length], view[length:]


def binary_chunks(inputs: list[Any], tail: memoryview) -> list[memoryview | None]:
    """Each input's slice of the binary tail (None for inputs given as JSON data)."""
    chunks: list[memoryview | None] = []
    offset = 0
    for index, raw in enumerate(inputs):
        size = _binary_data_size(raw, index)
        if size is None:
            chunks.append(None)
            continue
        if offset + size > len(tail):
            raise InvalidInput(
                f"input {_label(raw, index)}: binary_data_size {size} runs past the end of the "
                f"body ({len(tail) - offset} bytes of binary data left)"
            )
        chunks.append(tail[offset:offset + size])
        offset += size
    if offset != len(tail):
        raise InvalidInput(
            f"{len(tail) - offset} bytes of binary data left over after the last input "
            f"(binary_data_size values add up to {offset}, the body has {len(tail)})"
        )
    return chunks


def _binary_data_size(raw: Any, index: int) -> int | None:
    if not isinstance(raw, dict):
        return None
    parameters = raw.get("parameters")
    if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
        return None
    size = parameters["binary_data_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidInput(
            f"input {_label(raw, index)}: binary_data_size must be a non-negative integer, "
            f"got {size!r}"
        )
    if "data" in raw:
        raise InvalidInput(
            f"input {_label(raw, index)}: both 'data' and binary_data_size are given"
        )
    return size


def _label(raw: dict[str, Any], index: int) -> str:
    name = raw.get("name")
    return f"'{name}'" if isinstance(name, str) else f"inputs[{index}]"


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """Which outputs the client wants as raw bytes rather than JSON data."""

    binary_by_default: bool = False
    binary_by_name: dict[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        return self.binary_by_name.get(name, self.binary_by_default)


def output_format(header: dict[str, Any]) -> OutputFormat:
    """The output format a request header asks for (JSON unless it says binary)."""
    parameters = header.get("parameters")
    default = parameters.get("binary_data_output", False) if isinstance(parameters, dict) else False
    if not isinstance(default, bool):
        raise InvalidInput("parameter 'binary_data_output' must be a boolean")
    by_name: dict[str, bool] = {}
    outputs = header.get("outputs")
    for raw in outputs if isinstance(outputs, list) else []:
        wanted = raw.get("parameters") if isinstance(raw, dict) else None
        if not isinstance(wanted, dict) or "binary_data" not in wanted:
            continue
        if not isinstance(wanted["binary_data"], bool):
            raise InvalidInput(f"output '{raw.get('name')}': 'binary_data' must be a boolean")
        by_name[str(raw.get("name"))] = wanted["binary_data"]
    return OutputFormat(default, by_name)
