"""Properties of the OIP binary tensor extension (`Inference-Header-Content-Length`): bodies
built as tritonclient builds them decode to the tensors they carry, responses the gateway
encodes split back into their tensors, and no header length or body raises anything but
InvalidInput."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from services.gateway import binary, rest
from services.gateway.binary import OutputFormat
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import InferResponse
from tests.property.strategies import json_objects, json_values, names, tensors, text

# A dict keyed by name keeps the names distinct.
named_tensors = st.dictionaries(names, st.booleans(), min_size=1, max_size=3).flatmap(
    lambda by_name: st.tuples(*(st.tuples(tensors(name), st.just(as_binary))
                                for name, as_binary in by_name.items()))
)
header_lengths = st.none() | st.integers(-5, 600).map(str) | text | st.sampled_from(
    ["", " 12", "1_0", "+3", "0x10", "1e2", "٣", "9" * 5000]
)


def _triton_body(inputs: tuple[tuple[Tensor, bool], ...]) -> tuple[bytes, str]:
    """A request body as tritonclient's `InferInput.set_data_from_numpy(binary_data=...)`
    builds it: each binary input names its size in the JSON header, its raw bytes follow in
    input order; the others carry their elements as a flat JSON list."""
    entries, tail = [], []
    for tensor, as_binary in inputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": list(tensor.shape)}
        if as_binary:
            entry["parameters"] = {"binary_data_size": len(tensor.data)}
            tail.append(bytes(tensor.data))
        else:
            entry["data"] = _json_data(tensor)
        entries.append(entry)
    header = orjson.dumps({"inputs": entries})
    return header + b"".join(tail), str(len(header))


def _json_data(tensor: Tensor) -> list[Any]:
    flat: list[Any] = tensor.array().reshape(-1).tolist()
    if tensor.datatype == "BYTES":
        return [item.decode() for item in flat]
    return flat


def _json_safe(inputs: tuple[tuple[Tensor, bool], ...]) -> bool:
    """Whether each JSON-coded input can be: finite floats, UTF-8 BYTES elements."""
    for tensor, as_binary in inputs:
        if as_binary:
            continue
        flat = tensor.array().reshape(-1).tolist()
        if tensor.datatype == "BYTES" and not all(_utf8(item) for item in flat):
            return False
        if tensor.datatype.startswith("FP") and not all(abs(x) < float("inf") for x in flat):
            return False
    return True


def _utf8(item: bytes) -> bool:
    try:
        item.decode()
    except UnicodeDecodeError:
        return False
    return True


def _decode(body: bytes, header_length: str | None) -> list[Tensor]:
    request, _ = rest.decode_infer_body(body, header_length=header_length, model="m",
                                        version=None, request_id="r")
    return request.inputs


@given(named_tensors)
def test_a_tritonclient_body_decodes_to_its_tensors(
    inputs: tuple[tuple[Tensor, bool], ...]
) -> None:
    if not _json_safe(inputs):
        inputs = tuple((tensor, True) for tensor, _ in inputs)
    body, header_length = _triton_body(inputs)
    got = _decode(body, header_length)
    assert [(t.name, t.datatype, t.shape) for t in got] == [
        (t.name, t.datatype, t.shape) for t, _ in inputs]
    for decoded, (tensor, as_binary) in zip(got, inputs, strict=True):
        if as_binary or tensor.datatype != "FP16":
            assert bytes(decoded.data) == bytes(tensor.data)
        else:  # JSON carries an FP16 value as the float64 it widens to; it rounds back exactly
            assert decoded.array().tobytes() == tensor.array().tobytes()


@given(named_tensors, st.booleans())
def test_a_binary_response_splits_back_into_its_outputs(
    outputs: tuple[tuple[Tensor, bool], ...], by_default: bool
) -> None:
    response = InferResponse(model="m", version="1", request_id="r",
                             outputs=[tensor for tensor, _ in outputs])
    wanted = OutputFormat(by_default, {t.name: as_binary for t, as_binary in outputs})
    body, header_length = rest.encode_infer_parts(response, wanted)
    header, tail = binary.split_body(body, None if header_length is None else str(header_length))
    entries = orjson.loads(header)["outputs"]
    chunks = binary.binary_chunks(entries, tail)
    for entry, chunk, (tensor, as_binary) in zip(entries, chunks, outputs, strict=True):
        assert (entry["name"], entry["shape"]) == (tensor.name, list(tensor.shape))
        assert (chunk is not None) == as_binary
        if chunk is not None:
            assert bytes(chunk) == bytes(tensor.data)


def _decodes_or_invalid(body: bytes, header_length: str | None) -> None:
    try:
        _decode(body, header_length)
    except InvalidInput:
        pass


@given(st.binary(max_size=300), header_lengths)
def test_any_body_and_header_length_decode_or_are_invalid_input(
    body: bytes, header_length: str | None
) -> None:
    _decodes_or_invalid(body, header_length)


@given(named_tensors, st.data())
def test_a_wrong_header_length_or_binary_size_is_invalid_input_or_decodes(
    inputs: tuple[tuple[Tensor, bool], ...], data: st.DataObject
) -> None:
    body, length = _triton_body(tuple((tensor, True) for tensor, _ in inputs))
    header_length: str | None = length
    if data.draw(st.booleans(), label="change the header length"):
        header_length = data.draw(header_lengths, label="header length")
    else:
        cut = data.draw(st.integers(0, len(body)), label="cut")
        body = body[:cut] + data.draw(st.binary(max_size=16), label="junk")
    _decodes_or_invalid(body, header_length)


@given(st.lists(json_values | st.fixed_dictionaries(
    {"name": names}, optional={"parameters": json_objects | st.fixed_dictionaries(
        {"binary_data_size": json_values | st.integers(-2, 40)}), "data": json_values},
), max_size=4), st.binary(max_size=64))
def test_any_binary_data_sizes_slice_the_tail_or_are_invalid_input(
    inputs: list[Any], tail: bytes
) -> None:
    try:
        chunks = binary.binary_chunks(inputs, memoryview(tail))
    except InvalidInput:
        return
    assert sum(len(c) for c in chunks if c is not None) == len(tail)


@given(json_objects | st.fixed_dictionaries({}, optional={
    "parameters": json_objects | st.fixed_dictionaries({"binary_data_output": json_values}),
    "outputs": st.lists(json_values | st.fixed_dictionaries(
        {"name": json_values, "parameters": json_objects | st.fixed_dictionaries(
            {"binary_data": json_values})}), max_size=3),
}))
def test_any_output_format_request_is_read_or_invalid_input(header: dict[str, Any]) -> None:
    try:
        wanted = binary.output_format(header)
    except InvalidInput:
        return
    assert isinstance(wanted.binary_by_default, bool)


@given(st.binary(max_size=64), header_lengths)
def test_a_header_length_is_taken_only_as_ascii_digits_within_the_body(
    body: bytes, header_length: str | None
) -> None:
    """As for Content-Length: "1_0", "+3", " 12" or "٣" are refused, not read as numbers."""
    digits = header_length is not None and header_length.isascii() and header_length.isdigit()
    try:
        header, tail = binary.split_body(body, header_length)
    except InvalidInput:
        assert header_length is not None
        assert not digits or len(header_length) > 19 or int(header_length) > len(body)
        return
    assert header_length is None or digits
    assert bytes(header) + bytes(tail) == body
    assert len(header) == (len(body) if header_length is None else int(header_length))
