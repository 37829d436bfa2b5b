"""Properties of frame coalescing: any frames joined and split into messages under a limit
(`frames.split_messages`, what a link's outbox does) come back, message by message, as exactly
the frames sent, in order; no message passes the limit unless it holds one frame alone, and
frames are packed greedily (a message ends only where the next frame would not fit)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from services.mesh.transport import frames
from tests.property.strategies import json_scalars, tensor_lists, text

FrameSpec = tuple[int, int, dict[str, Any], list[bytes]]

frame_specs = st.tuples(
    # Flat metadata: nested JSON is the codec's to test (test_frames); here only sizes matter.
    st.sampled_from(sorted(frames.KINDS)), st.integers(0, 2**32 - 1),
    st.dictionaries(text, json_scalars, max_size=4),
    tensor_lists.map(lambda tensors: [bytes(t.data) for t in tensors])
    | st.lists(st.binary(max_size=600), max_size=3),
)


def _packed(spec: FrameSpec) -> bytes:
    kind, call_id, meta, buffers = spec
    return b"".join(frames.pack(kind, call_id, meta, buffers))


@given(st.lists(frame_specs, min_size=1, max_size=8), st.data())
def test_coalesced_frames_come_back_in_order_within_the_limit(
    specs: list[FrameSpec], data: st.DataObject
) -> None:
    packed = [_packed(spec) for spec in specs]
    # Any limit, or one that frames fill exactly (a run's size): the boundary case.
    runs = [sum(map(len, packed[i:j])) for i in range(len(packed))
            for j in range(i + 1, len(packed) + 1)]
    limit = data.draw(st.integers(1, 4096) | st.sampled_from(runs), label="limit")
    messages = [bytes(m) for m in frames.split_messages(b"".join(packed), limit)]

    got = [
        (frame.kind, frame.call_id, frame.meta, bytes(frame.payload))
        for message in messages for frame in frames.unpack(message)
    ]
    assert got == [(kind, call_id, meta, b"".join(buffers))
                   for kind, call_id, meta, buffers in specs]

    counts = [len(list(frames.unpack(message))) for message in messages]
    assert all(n >= 1 for n in counts)
    assert all(len(m) <= limit or n == 1 for m, n in zip(messages, counts, strict=True))
    # Greedy: each message ends only where the next frame would take it past the limit.
    starts = [sum(counts[:i]) for i in range(len(counts))]
    assert all(len(messages[i]) + len(packed[starts[i + 1]]) > limit
               for i in range(len(messages) - 1))
    if sum(map(len, packed)) <= limit:
        assert len(messages) == 1
