"""`cpu_fallback` on a version: a JSON boolean, checked at registration and on the record."""

from __future__ import annotations

from typing import Any

import pytest

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.types import ModelVersion, Signature
from services.registry.validation import parse_cpu_fallback

SIGNATURE = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
             "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]}


@pytest.mark.parametrize("raw", ["true", "false", 1, 0, None, [True]])
def test_cpu_fallback_must_be_a_boolean(raw: Any) -> None:
    with pytest.raises(InvalidInput, match="^cpu_fallback: must be true or false"):
        parse_cpu_fallback(raw)


def test_cpu_fallback_round_trips_through_the_record_and_defaults_to_false() -> None:
    version = ModelVersion("m", "1", Signature.from_json(SIGNATURE), "uri", "0" * 64,
                           device="cuda", cpu_fallback=parse_cpu_fallback(True))
    assert ModelVersion.from_json(version.to_json()).cpu_fallback is True
    without = {k: v for k, v in version.to_json().items() if k != "cpu_fallback"}
    assert ModelVersion.from_json(without).cpu_fallback is False
    with pytest.raises(InvalidInput, match="^cpu_fallback"):
        ModelVersion.from_json({**version.to_json(), "cpu_fallback": "yes"})
