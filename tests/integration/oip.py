"""Helpers for integration tests: OIP requests and the in-process reference model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import torch


def mlp_input(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 32), dtype=np.float32)


def encoder_input(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 30522, (rows, 64), dtype=np.int64)


def infer_body(name: str, array: np.ndarray, **extra: Any) -> bytes:
    datatype = {"float32": "FP32", "int64": "INT64"}[str(array.dtype)]
    tensor = {"name": name, "datatype": datatype, "shape": list(array.shape),
              "data": array.reshape(-1).tolist()}
    return orjson.dumps({"inputs": [tensor], **extra})


async def post_infer(
    session: aiohttp.ClientSession, url: str, body: bytes, *,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Content-Type": "application/json", **(headers or {})}
    async with session.post(url, data=body, headers=headers) as r:
        return r.status, orjson.loads(await r.read()), {k.lower(): v for k, v in r.headers.items()}


def output_array(response: dict[str, Any], index: int = 0) -> np.ndarray:
    output = response["outputs"][index]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def reference(state_dir: Path, model: str, array: np.ndarray) -> np.ndarray:
    """The demo model's TorchScript file called in-process on the same input."""
    module = torch.jit.load(str(state_dir / "demo-models" / f"{model}.pt"))  # type: ignore[no-untyped-call]
    with torch.inference_mode():
        result: np.ndarray = module(torch.from_numpy(array)).numpy()
    return result
