"""A job row at rest (jobs_rows.py): what submission stores decodes to the request it checked
(ids, outputs asked for, parameters, numeric and BYTES tensors), a row stored as JSON before
this format still runs, and a damaged row is an InvalidInput, never a crash of the runner."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from services.gateway.jobs_rows import MAGIC, decode_row, encode_row
from services.gateway.jobs_submission import encode_inline_rows
from services.gateway.rest import decode_infer
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.types import InferRequest
from tests.gateway.echo import echo_config

PAIR: dict[str, Any] = {
    "id": "mine", "outputs": [{"name": "text_echo"}], "parameters": {"priority": 2},
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 2],
                "data": [1.0, 2.5, -3.0, 4.25]},
               {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["é", ""]}]}


def _request(body: dict[str, Any], request_id: str = "") -> InferRequest:
    spec = ModelCatalog(echo_config()).resolve("pair", None)
    return decode_infer(body, model="pair", version="1", request_id=request_id, spec=spec)


def _same(a: InferRequest, b: InferRequest) -> None:
    assert (a.request_id, a.outputs, a.parameters) == (b.request_id, b.outputs, b.parameters)
    assert [(t.name, t.datatype, t.shape, bytes(t.data)) for t in a.inputs] == [
        (t.name, t.datatype, t.shape, bytes(t.data)) for t in b.inputs]


def test_a_stored_row_decodes_to_the_request_checked_at_submission() -> None:
    sent = _request(PAIR)
    stored = encode_row(sent)
    assert stored.startswith(MAGIC)
    _same(decode_row(stored, model="pair", version="1", request_id="job-7"), sent)


def test_a_row_without_an_id_is_named_when_it_runs() -> None:
    body = {k: v for k, v in PAIR.items() if k != "id"}
    stored = encode_row(_request(body))
    decoded = decode_row(stored, model="pair", version=None, request_id="job-7")
    assert (decoded.request_id, decoded.model, decoded.version) == ("job-7", "pair", None)
    _same(decoded, _request(body, request_id="job-7"))


def test_submission_stores_rows_in_this_form() -> None:
    raw = orjson.dumps({"model": "pair", "inputs": [PAIR, PAIR]})
    spec = ModelCatalog(echo_config()).resolve("pair", None)
    rows = encode_inline_rows(raw, spec, 10)
    assert all(r.startswith(MAGIC) for r in rows)
    _same(decode_row(rows[1], model="pair", version="1", request_id="x"), _request(PAIR))


def test_a_row_stored_as_json_still_runs() -> None:
    decoded = decode_row(orjson.dumps(PAIR), model="pair", version="1", request_id="x")
    _same(decoded, _request(PAIR))


@pytest.mark.parametrize("damage", [
    lambda row: row[:8],  # cut in the length
    lambda row: row[:-3],  # payload short of the header's bytes
    lambda row: row + b"xx",  # bytes after the tensors
    lambda row: row.replace(b'"FP32"', b'"FP99"'),
    lambda row: row.replace(b'"tensors"', b'"tensorz"'),
    lambda row: MAGIC + b"\x05\x00\x00\x00{not}",
    lambda row: b'{"inputs": [',
    lambda row: b"[1, 2]",
])
def test_a_damaged_row_is_invalid_input(damage: Callable[[bytes], bytes]) -> None:
    stored = encode_row(_request(PAIR))
    with pytest.raises(InvalidInput):
        decode_row(damage(stored), model="pair", version="1", request_id="x")
