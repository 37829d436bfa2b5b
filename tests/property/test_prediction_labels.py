"""Properties of the prediction log's label: a one-row FP32 answer's label is numpy's argmax of
the row, whatever the values (ties, signed zeros, infinities, NaN), and whether the row's bytes
come as bytes or as a view into a link frame (`rows._row_argmax` reads them without numpy)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from services.mesh.domain.tensors import Tensor
from services.predlog.rows import label_of

_SPECIAL = st.sampled_from([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38])
_VALUES = st.one_of(_SPECIAL, st.floats(width=32, allow_nan=True))


@given(st.lists(_VALUES, min_size=1, max_size=40), st.booleans())
def test_a_one_row_label_is_numpys_argmax(values: list[float], as_view: bool) -> None:
    row = np.array([values], dtype="<f4")
    data = row.tobytes()
    # A view at an offset, as the router's tensors are slices of a link message.
    tensor = Tensor("scores", "FP32", row.shape, memoryview(b"xyz" + data)[3:] if as_view
                    else data)
    if len(values) >= 2:
        expected = str(int(row.argmax(axis=-1)[0]))
    else:
        expected = str(row.reshape(-1)[0])  # one column: the value itself, not an index
    assert label_of([tensor]) == expected


@given(st.integers(min_value=2, max_value=8), st.integers(min_value=-5, max_value=5))
def test_a_row_whose_bytes_do_not_match_its_shape_has_no_label(width: int, extra: int) -> None:
    data = np.zeros(width, dtype="<f4").tobytes()
    data = data + bytes(extra) if extra >= 0 else data[:extra]
    tensor = Tensor("scores", "FP32", (1, width), data)
    assert label_of([tensor]) == (str(0) if extra == 0 else None)
