"""Reading a worker's warm-up timings out of its endpoint record (the linked handle's source)."""

from __future__ import annotations

from typing import Any

import pytest

from services.mesh.domain.hops import warmup_timings_from_record


def test_timings_are_read_per_version_with_integer_rows() -> None:
    record = {"models": ["mlp/1", "mlp/2"],
              "warmup": {"mlp/1": {"1": 0.0003, "8": 0.0009}, "mlp/2": {"1": 0.5}}}
    assert warmup_timings_from_record(record, "mlp", "1") == {1: 0.0003, 8: 0.0009}
    assert warmup_timings_from_record(record, "mlp", "2") == {1: 0.5}
    assert warmup_timings_from_record(record, "mlp", "3") == {}


@pytest.mark.parametrize("record", [
    None, {}, {"warmup": None}, {"warmup": ["mlp/1"]}, {"warmup": {"mlp/1": [0.1]}},
])
def test_an_old_or_malformed_record_has_no_timings(record: Any) -> None:
    assert warmup_timings_from_record(record, "mlp", "1") == {}


def test_malformed_entries_are_skipped() -> None:
    record = {"warmup": {"mlp/1": {"1": 0.001, "two": 0.002, "4": "slow", "8": None}}}
    assert warmup_timings_from_record(record, "mlp", "1") == {1: 0.001}
