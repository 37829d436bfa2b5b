"""Baseline: a plain aiohttp server that runs the model inline on the event loop.

This is the thing infermesh is compared against: no batching, no worker threads, no mesh. The
forward pass deliberately blocks the loop; that is what a naive single-process server does.

    python -m bench.plain_server --model mlp --port 8500
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import orjson
import torch
import uvloop
from aiohttp import web

from bench.models import DEFAULT_CACHE_DIR, LoadedModel, load_model
from bench.payloads import NUMPY_DTYPES

MODEL = web.AppKey("model", LoadedModel)
OIP_DATATYPES = {np.dtype(v): k for k, v in NUMPY_DTYPES.items()}


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps({"error": message}), content_type="application/json"
    )


def decode_input(model: LoadedModel, request: dict[str, object]) -> torch.Tensor:
    """Turn the first OIP input tensor into a torch tensor; raise ``ValueError`` if malformed."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs or not isinstance(inputs[0], dict):
        raise ValueError("request needs a non-empty 'inputs' list")
    tensor = inputs[0]
    if tensor.get("name") != model.input_name:
        raise ValueError(f"expected input {model.input_name!r}, got {tensor.get('name')!r}")
    dtype = NUMPY_DTYPES.get(str(tensor.get("datatype")))
    if dtype is None:
        raise ValueError(f"unsupported datatype {tensor.get('datatype')!r}")
    array = np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])
    return torch.from_numpy(array)


def encode_output(model: LoadedModel, request: dict[str, object], output: torch.Tensor) -> bytes:
    """Encode ``output`` as an OIP v2 infer response."""
    array = np.ascontiguousarray(output.numpy())
    response: dict[str, object] = {
        "model_name": model.name,
        "model_version": "1",
        "outputs": [
            {
                "name": model.output_name,
                "datatype": OIP_DATATYPES[array.dtype],
                "shape": list(array.shape),
                "data": array.reshape(-1),
            }
        ],
    }
    if "id" in request:
        response["id"] = request["id"]
    return orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)


async def infer(request: web.Request) -> web.Response:
    """POST /v2/models/{model}/infer: decode, forward inline, encode."""
    model = request.app[MODEL]
    if request.match_info["model"] != model.name:
        return _error(404, f"model {request.match_info['model']!r} is not served here")
    try:
        payload = orjson.loads(await request.read())
        features = decode_input(model, payload)
    except (orjson.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
        return _error(400, str(exc))
    with torch.inference_mode():
        output = model.module(features)  # inline on the loop on purpose: this is the baseline
    return web.Response(body=encode_output(model, payload, output), content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    """GET /v2/health/ready and /v2/health/live: the model is loaded before the app starts."""
    return web.Response(status=200)


def create_app(model: LoadedModel) -> web.Application:
    """Build the baseline app serving ``model``."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[MODEL] = model
    app.router.add_post("/v2/models/{model}/infer", infer)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/health/live", ready)
    return app


def main(argv: list[str] | None = None) -> None:
    """Load the model and serve it until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m bench.plain_server", description=__doc__)
    parser.add_argument("--model", default="mlp", help="demo model name (mlp, encoder)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--artifact", type=Path, help="TorchScript file instead of the demo one")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, cache_dir=args.cache_dir, artifact=args.artifact)
    web.run_app(
        create_app(model),
        host=args.host,
        port=args.port,
        access_log=None,
        loop=uvloop.new_event_loop(),
        print=lambda _: print(
            f"plain_server: {args.model} on http://{args.host}:{args.port}", flush=True
        ),
    )


if __name__ == "__main__":
    main()
