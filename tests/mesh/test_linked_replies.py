"""A peer's answer that does not decode is the peer's fault: an InternalError, never a 400."""

from __future__ import annotations

import pytest

from services.mesh.domain.errors import InternalError
from services.mesh.transport import frames
from services.mesh.transport.linked import _reply


@pytest.mark.parametrize("meta", [{}, {"model": 1}, {"model": "m", "version": "1", "id": "r",
                                                     "tensors": "not a list", "params": {}}])
def test_a_malformed_reply_is_an_internal_error(meta: dict[str, object]) -> None:
    with pytest.raises(InternalError, match="malformed reply"):
        _reply(frames.decode_response, meta, memoryview(b""))
    with pytest.raises(InternalError, match="malformed reply"):
        _reply(frames.decode_batch_result, meta, memoryview(b""))
