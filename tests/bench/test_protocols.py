"""Pure pieces of bench.protocols: binary body, h2load log parsing and its window."""

from __future__ import annotations

import numpy as np
import orjson

from bench.protocols import BIG, H2Record, binary_body, parse_h2load_log, window_result


def test_binary_body_is_header_then_raw_tensor() -> None:
    array = np.arange(8, dtype=np.float32).reshape(1, 8)
    body, header_length = binary_body(BIG, array)
    header = orjson.loads(body[:header_length])
    assert header["inputs"][0]["parameters"] == {"binary_data_size": 32}
    assert header["inputs"][0]["shape"] == [1, 8]
    assert header["parameters"] == {"binary_data_output": True}
    assert np.frombuffer(body[header_length:], dtype=np.float32).tolist() == list(range(8))


def test_h2load_log_and_window() -> None:
    text = "1000000\t200\t500\n1600000\t200\t1000\n1700000\t503\t100\n2400000\t200\t900000\n\n"
    records = parse_h2load_log(text)
    assert records[0] == H2Record(1_000_000, 200, 500)
    result = window_result(records, warmup=0.5, duration=1.0, tool="rest-json", model="mlp",
                           url="u", concurrency=1)  # fmt: skip
    # Window [1.5 s, 2.5 s]: the first is warm-up, the last ends after the window.
    assert (result.requests, result.errors, result.rps) == (2, 1, 1.0)
    assert result.latency.p50 == 1.0
    assert result.error_samples == ["HTTP 503"]


def test_content_length_ignores_inference_header_content_length() -> None:
    from bench.rawhttp import _content_length

    head = b"http/1.1 200 ok\r\ninference-header-content-length: 12\r\ncontent-length: 99"
    assert _content_length(head) == 99
    assert _content_length(b"http/1.1 200 ok\r\ncontent-length: 5\r\nx: y") == 5
