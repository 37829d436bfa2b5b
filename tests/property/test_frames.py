"""Properties of the link frame codec: every frame kind round-trips, and no message, however
truncated, corrupted or made up, makes the decoder raise anything but InvalidInput."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.mesh.domain import errors
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import LANES, Batch, BatchResult, InferRequest, InferResponse
from services.mesh.transport import frames
from tests.property.strategies import (
    json_objects,
    json_values,
    names,
    tensor_lists,
    text,
)

call_ids = st.integers(0, 2**32 - 1)
deadlines = st.none() | st.floats(0, 4e9, allow_nan=False)
string_maps = st.dictionaries(text, text, max_size=3)

requests = st.builds(
    InferRequest, model=names, inputs=tensor_lists, request_id=names,
    version=st.none() | names, tenant=names, deadline=deadlines, lane=st.sampled_from(LANES),
    outputs=st.none() | st.lists(names, max_size=3), parameters=json_objects,
    trace=string_maps, bucket=st.none() | st.integers(0, 9999),
)
responses = st.builds(
    InferResponse, model=names, version=names, request_id=names, outputs=tensor_lists,
    parameters=json_objects,
)
batches = st.builds(
    Batch, model=names, version=names, inputs=tensor_lists,
    rows=st.lists(st.integers(0, 64), max_size=4), trace=string_maps,
    outputs=st.none() | st.lists(names, max_size=3),
)
batch_results = st.builds(BatchResult, outputs=tensor_lists, device=names)


def _error_classes(root: type[errors.InfermeshError]) -> list[type[errors.InfermeshError]]:
    found = [root]
    for sub in root.__subclasses__():
        if sub.__module__ == errors.__name__:
            found += _error_classes(sub)
    return found


# The base class shares InternalError's code and comes back as one; every subclass is its own.
ERROR_CLASSES = _error_classes(errors.InfermeshError)[1:]
error_values = st.builds(
    lambda cls, message, retry_after: cls(message, retry_after=retry_after),
    st.sampled_from(ERROR_CLASSES), text, st.none() | st.floats(0, 1e6, allow_nan=False),
)

Codec = tuple[Callable[[Any], tuple[dict[str, Any], frames.Buffers]],
              Callable[[dict[str, Any], memoryview], Any]]
CODECS: dict[str, Codec] = {
    "request": (frames.encode_request, frames.decode_request),
    "response": (frames.encode_response, frames.decode_response),
    "batch": (frames.encode_batch, frames.decode_batch),
    "batch_result": (frames.encode_batch_result, frames.decode_batch_result),
}
DECODERS = [decode for _, decode in CODECS.values()]


def _message(*parts: frames.Buffers) -> bytes:
    return b"".join(bytes(buffer) for part in parts for buffer in part)


def _one_frame(message: bytes) -> frames.Frame:
    [frame] = list(frames.unpack(message))
    return frame


def _frame_parts(message: bytes) -> tuple[dict[str, Any], memoryview]:
    frame = _one_frame(message)
    return frame.meta, frame.payload


def _carried(value: Any) -> list[Tensor]:
    """The tensors a decoded value carries (a request's `outputs` are names, not tensors)."""
    tensors: list[Tensor] = value.inputs if isinstance(value, InferRequest | Batch) else (
        value.outputs)
    return tensors


def _plain(value: Any) -> dict[str, Any]:
    """`value`'s fields, its tensors as (name, datatype, shape, bytes): decoded tensors are
    views into the message, so they compare by content."""
    plain = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    field = "inputs" if isinstance(value, InferRequest | Batch) else "outputs"
    plain[field] = [(t.name, t.datatype, t.shape, bytes(t.data)) for t in _carried(value)]
    return plain


@given(requests, call_ids)
def test_a_request_round_trips(request: InferRequest, call_id: int) -> None:
    frame = _one_frame(_message(frames.pack(frames.CALL, call_id, *frames.encode_request(request))))
    decoded = frames.decode_request(frame.meta, frame.payload)
    assert (frame.kind, frame.call_id) == (frames.CALL, call_id)
    assert _plain(decoded) == _plain(request)


@given(responses, call_ids)
def test_a_response_round_trips(response: InferResponse, call_id: int) -> None:
    message = _message(frames.pack(frames.REPLY, call_id, *frames.encode_response(response)))
    assert _plain(frames.decode_response(*_frame_parts(message))) == _plain(response)


@given(batches, batch_results)
def test_a_batch_and_its_result_round_trip(batch: Batch, result: BatchResult) -> None:
    message = _message(frames.pack(frames.CALL, 1, *frames.encode_batch(batch)))
    assert _plain(frames.decode_batch(*_frame_parts(message))) == _plain(batch)
    message = _message(frames.pack(frames.REPLY, 1, *frames.encode_batch_result(result)))
    assert _plain(frames.decode_batch_result(*_frame_parts(message))) == _plain(result)


@pytest.mark.parametrize("error_class", ERROR_CLASSES, ids=lambda cls: cls.__name__)
@settings(max_examples=25)  # per class
@given(text, st.none() | st.floats(0, 1e6, allow_nan=False), call_ids)
def test_every_error_round_trips_as_its_own_class(
    error_class: type[errors.InfermeshError], message: str, retry_after: float | None,
    call_id: int,
) -> None:
    error = error_class(message, retry_after=retry_after)
    frame = _one_frame(_message(frames.pack(frames.ERROR, call_id, error.to_wire())))
    rebuilt = errors.from_wire(frame.meta)
    assert (frame.kind, frame.call_id) == (frames.ERROR, call_id)
    assert type(rebuilt) is type(error)
    assert (rebuilt.message, rebuilt.retry_after) == (error.message, error.retry_after)


@settings(max_examples=25)
@given(text, st.none() | st.floats(0, 1e6, allow_nan=False), call_ids)
def test_a_refusal_says_how_long_its_version_is_busy_across_a_link(
    message: str, busy_for: float | None, call_id: int,
) -> None:
    error = errors.Overloaded(message, retry_after=1.0, busy_for=busy_for)
    frame = _one_frame(_message(frames.pack(frames.ERROR, call_id, error.to_wire())))
    rebuilt = errors.from_wire(frame.meta)
    assert isinstance(rebuilt, errors.Overloaded) and rebuilt.busy_for == busy_for


STRATEGIES = {"request": requests, "response": responses, "batch": batches,
              "batch_result": batch_results}


@given(st.lists(st.sampled_from(sorted(CODECS)), max_size=4), call_ids, st.data())
def test_frames_back_to_back_come_apart_in_order(
    kinds: list[str], call_id: int, data: st.DataObject
) -> None:
    values = [data.draw(STRATEGIES[kind], label=kind) for kind in kinds]
    ids = [(call_id + i) & 0xFFFFFFFF for i in range(len(values))]
    parts = [frames.pack(frames.REPLY, id_, *CODECS[kind][0](value))
             for id_, kind, value in zip(ids, kinds, values, strict=True)]
    parts.append(frames.pack(frames.CANCEL, call_id, {}))
    got = list(frames.unpack(_message(*parts)))
    assert [(f.kind, f.call_id) for f in got] == [(frames.REPLY, i) for i in ids] + [
        (frames.CANCEL, call_id)]
    for frame, kind, value in zip(got, kinds, values, strict=False):
        assert _plain(CODECS[kind][1](frame.meta, frame.payload)) == _plain(value)


# Decoding bad input. "Decoding" is what a receiving hop does: unpack the message, then read
# each frame with its decoder; every tensor it hands on must then be usable or InvalidInput.


def _decode_everything(message: bytes) -> None:
    """Unpack `message` and try every decoder on every frame; InvalidInput is the only way out."""
    for frame in frames.unpack(message):
        errors.from_wire(frame.meta)
        for decode in DECODERS:
            try:
                decoded = decode(frame.meta, frame.payload)
            except InvalidInput:
                continue
            for tensor in _carried(decoded):
                tensor.check_size()  # a BYTES tensor's elements are counted by its reader
                tensor.array()


def _decodes_or_invalid(message: bytes) -> None:
    try:
        _decode_everything(message)
    except InvalidInput:
        pass


valid_messages = st.one_of(
    st.builds(lambda r, i: _message(frames.pack(frames.CALL, i, *frames.encode_request(r))),
              requests, call_ids),
    st.builds(lambda r, i: _message(frames.pack(frames.REPLY, i, *frames.encode_response(r))),
              responses, call_ids),
    st.builds(lambda b: _message(frames.pack(frames.CALL, 2, *frames.encode_batch(b))), batches),
    st.builds(lambda r: _message(frames.pack(frames.REPLY, 3, *frames.encode_batch_result(r))),
              batch_results),
    st.builds(lambda e: _message(frames.pack(frames.ERROR, 4, e.to_wire())), error_values),
)


@given(st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_are_invalid_input(message: bytes) -> None:
    _decodes_or_invalid(message)


@given(valid_messages, st.data())
def test_a_truncated_frame_is_invalid_input(message: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(1, len(message) - 1), label="cut")
    with pytest.raises(InvalidInput):
        _decode_everything(message[:cut])


@given(valid_messages, st.data())
def test_flipped_bits_decode_or_are_invalid_input(message: bytes, data: st.DataObject) -> None:
    corrupt = bytearray(message)
    positions = st.integers(0, len(corrupt) * 8 - 1)
    for bit in data.draw(st.lists(positions, min_size=1, max_size=4), label="bits"):
        corrupt[bit // 8] ^= 1 << (bit % 8)
    _decodes_or_invalid(bytes(corrupt))


@given(valid_messages, st.binary(min_size=1, max_size=64), st.data())
def test_spliced_bytes_decode_or_are_invalid_input(
    message: bytes, junk: bytes, data: st.DataObject
) -> None:
    at = data.draw(st.integers(0, len(message)), label="at")
    _decodes_or_invalid(message[:at] + junk + message[at:])


@given(st.sampled_from(sorted(CODECS)), st.data())
def test_any_metadata_field_made_wrong_is_invalid_input(kind: str, data: st.DataObject) -> None:
    """A field removed or replaced by any JSON value: decoded as before, or InvalidInput."""
    encode, decode = CODECS[kind]
    meta, buffers = encode(data.draw(STRATEGIES[kind], label="value"))
    key = data.draw(st.sampled_from(sorted(meta)), label="key")
    if data.draw(st.booleans(), label="remove"):
        del meta[key]
    else:
        meta[key] = data.draw(json_values, label="replacement")
    _decodes_or_invalid(_message(frames.pack(frames.CALL, 1, meta, buffers)))


@given(st.sampled_from(sorted(CODECS)), st.data())
def test_any_tensor_descriptor_made_wrong_is_invalid_input(
    kind: str, data: st.DataObject
) -> None:
    encode, _ = CODECS[kind]
    meta, buffers = encode(data.draw(STRATEGIES[kind], label="value"))
    descriptors = meta["tensors"]
    if descriptors:
        index = data.draw(st.integers(0, len(descriptors) - 1), label="tensor")
        field = data.draw(st.integers(0, 4), label="field")
        wrong = data.draw(json_values | st.integers(-3, 300), label="replacement")
        if field == 4:
            descriptors[index] = wrong
        else:
            descriptors[index][field] = wrong
    else:
        meta["tensors"] = data.draw(json_values, label="tensors")
    _decodes_or_invalid(_message(frames.pack(frames.CALL, 1, meta, buffers)))


@given(json_objects, st.binary(max_size=64))
def test_made_up_metadata_is_invalid_input_or_decodes(meta: dict[str, Any], payload: bytes) -> None:
    _decodes_or_invalid(_message(frames.pack(frames.CALL, 1, meta, [payload])))
