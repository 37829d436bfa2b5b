from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import Tensor
from services.mesh.domain.types import Batch, BatchResult, InferRequest, InferResponse
from services.mesh.transport import frames


def _message(*parts: frames.Buffers) -> bytes:
    return b"".join(b for part in parts for b in part)


def _one(kind: int, call_id: int, encoded: tuple[dict[str, Any], frames.Buffers]) -> frames.Frame:
    meta, buffers = encoded
    [frame] = list(frames.unpack(_message(frames.pack(kind, call_id, meta, buffers))))
    assert frame.kind == kind and frame.call_id == call_id
    return frame


def _tensors() -> list[Tensor]:
    return [
        Tensor.from_array("pixels", np.arange(24, dtype=np.float32).reshape(2, 3, 4)),
        Tensor.from_array("ids", np.array([[7], [-3]], dtype=np.int64)),
        Tensor.from_array("text", np.array([b"hello", b""], dtype=object)),
    ]


def _assert_same_tensors(got: list[Tensor], want: list[Tensor]) -> None:
    assert [(t.name, t.datatype, t.shape) for t in got] == [
        (t.name, t.datatype, t.shape) for t in want
    ]
    for g, w in zip(got, want, strict=True):
        assert isinstance(g.data, memoryview)
        assert bytes(g.data) == bytes(w.data)


def test_infer_request_round_trips() -> None:
    request = InferRequest(
        model="resnet", inputs=_tensors(), request_id="req-1", version="3", tenant="acme",
        deadline=1234.5, lane="bulk", outputs=["probs"], parameters={"top_k": 5},
        trace={"traceparent": "00-abc-def-01"}, bucket=4242,
    )
    frame = _one(frames.CALL, 17, frames.encode_request(request))
    decoded = frames.decode_request(frame.meta, frame.payload)
    _assert_same_tensors(decoded.inputs, request.inputs)
    decoded.inputs = request.inputs
    assert decoded == request
    np.testing.assert_array_equal(decoded.inputs[0].array(), request.inputs[0].array())


def test_infer_request_defaults_round_trip() -> None:
    request = InferRequest(model="m", inputs=[], request_id="r")
    frame = _one(frames.CALL, 1, frames.encode_request(request))
    assert frames.decode_request(frame.meta, frame.payload) == request


def test_infer_response_round_trips() -> None:
    response = InferResponse(
        model="resnet", version="3", request_id="req-1", outputs=_tensors(),
        parameters={"cached": False},
    )
    frame = _one(frames.REPLY, 0xFFFFFFFF, frames.encode_response(response))
    decoded = frames.decode_response(frame.meta, frame.payload)
    _assert_same_tensors(decoded.outputs, response.outputs)
    assert (decoded.model, decoded.version, decoded.request_id, decoded.parameters) == (
        "resnet", "3", "req-1", {"cached": False},
    )


def test_batch_and_batch_result_round_trip() -> None:
    batch = Batch(
        model="resnet", version="3", inputs=_tensors(), rows=[1, 1],
        trace={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )
    frame = _one(frames.CALL, 5, frames.encode_batch(batch))
    decoded = frames.decode_batch(frame.meta, frame.payload)
    _assert_same_tensors(decoded.inputs, batch.inputs)
    assert (decoded.model, decoded.version, decoded.rows, decoded.trace) == (
        "resnet", "3", [1, 1],
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )

    result = BatchResult(outputs=_tensors()[:2], device="cuda:0")
    frame = _one(frames.REPLY, 5, frames.encode_batch_result(result))
    decoded_result = frames.decode_batch_result(frame.meta, frame.payload)
    _assert_same_tensors(decoded_result.outputs, result.outputs)
    assert decoded_result.device == "cuda:0"


def test_decoded_tensors_are_views_into_the_message() -> None:
    request = InferRequest(model="m", inputs=_tensors()[:2], request_id="r")
    meta, buffers = frames.encode_request(request)
    message = bytearray(_message(frames.pack(frames.CALL, 1, meta, buffers)))
    [frame] = frames.unpack(message)  # type: ignore[arg-type]
    decoded = frames.decode_request(frame.meta, frame.payload)
    assert decoded.inputs[1].array().tolist() == [[7], [-3]]
    # Zero copy: changing the message changes the decoded tensor.
    offset = len(message) - len(bytes(request.inputs[1].data))
    message[offset] = 9
    assert decoded.inputs[1].array().tolist() == [[9], [-3]]


def test_several_frames_in_one_message() -> None:
    responses = [
        InferResponse(model="m", version=str(i), request_id=f"r{i}", outputs=_tensors()[i:])
        for i in range(3)
    ]
    parts = [frames.pack(frames.REPLY, 100 + i, *frames.encode_response(r)) for i, r in
             enumerate(responses)]
    parts.append(frames.pack(frames.CANCEL, 7, {}))
    got = list(frames.unpack(_message(*parts)))
    assert [(f.kind, f.call_id) for f in got] == [
        (frames.REPLY, 100), (frames.REPLY, 101), (frames.REPLY, 102), (frames.CANCEL, 7),
    ]
    for frame, response in zip(got[:3], responses, strict=True):
        decoded = frames.decode_response(frame.meta, frame.payload)
        assert decoded.version == response.version
        _assert_same_tensors(decoded.outputs, response.outputs)
    assert got[3].meta == {} and len(got[3].payload) == 0


def test_empty_message_has_no_frames() -> None:
    assert list(frames.unpack(b"")) == []


def test_truncated_header_is_invalid_input() -> None:
    whole = _message(frames.pack(frames.CALL, 1, {"op": "infer"}))
    with pytest.raises(InvalidInput, match="truncated header"):
        list(frames.unpack(whole + whole[:10]))


@pytest.mark.parametrize("cut", [1, 5, 20])
def test_lengths_past_the_end_are_invalid_input(cut: int) -> None:
    request = InferRequest(model="m", inputs=_tensors(), request_id="r")
    whole = _message(frames.pack(frames.CALL, 1, *frames.encode_request(request)))
    with pytest.raises(InvalidInput, match="run past the end"):
        list(frames.unpack(whole[:-cut]))


def test_metadata_that_is_not_json_is_invalid_input() -> None:
    bad = frames.HEADER.pack(frames.CALL, 0, 0, 1, 4, 0) + b"{bad"
    with pytest.raises(InvalidInput, match="metadata is not JSON"):
        list(frames.unpack(bad))
