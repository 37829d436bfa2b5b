"""`infermesh models convert MODEL VERSION`: an ONNX version made from a TorchScript one.

The command downloads the version's artifact (its sha256 checked), exports it to ONNX here
(`services.worker.onnx_export`: dynamic batch dim, the signature's names, checked against
TorchScript on a sample batch), uploads the file and registers it as a new version (default
``VERSION-onnx``) with platform ``onnxruntime_onnx`` and the source's signature, queue policy,
device, CPU fallback and logging. The registry reads the ONNX model's own signature and refuses
the version if the two disagree. Routing traffic to it is a rollout, as for any new version.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cli.common import print_result
from control.registry_client import RegistryClient
from services.mesh.domain.errors import InvalidInput
from services.mesh.infra.digests import sha256_of

Command = Callable[[RegistryClient, argparse.Namespace], Awaitable[int]]
ONNX_PLATFORM = "onnxruntime_onnx"


def converted_text(result: dict[str, Any]) -> str:
    """What `models convert` prints."""
    record = result["version"]
    return "\n".join([
        f"registered {record['model']} version {record['version']} ({record['platform']}) "
        f"from version {result['source']}",
        f"  sha256        {record['sha256']}",
        f"  exported from {result['traced_from']}",
        f"  max abs error {result['max_abs_error']:.3g} against TorchScript on a sample batch",
    ])


async def _cmd_models_convert(client: RegistryClient, args: argparse.Namespace) -> int:
    detail = await client.get_model(args.model)
    source = next((v for v in detail["versions"] if v["version"] == args.version), None)
    if source is None:
        print(f"infermesh: error: model {args.model} has no version {args.version}",
              file=sys.stderr)
        return 1
    if source["platform"] != "pytorch_torchscript":
        print(f"infermesh: error: version {args.version} is {source['platform']}; only "
              "pytorch_torchscript versions convert", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="infermesh-convert-") as workdir:
        script, onnx_file = Path(workdir) / "model.pt", Path(workdir) / "model.onnx"
        await client.download_artifact(source["sha256"], script)
        if await asyncio.to_thread(sha256_of, script) != source["sha256"]:
            print("infermesh: error: the downloaded artifact does not match its sha256",
                  file=sys.stderr)
            return 1
        try:
            conversion = await asyncio.to_thread(_convert, script, source["signature"],
                                                 onnx_file, args.module)
        except (ValueError, InvalidInput) as exc:  # ConversionError, a bad signature: one line
            print(f"infermesh: error: {exc}", file=sys.stderr)
            return 1
        uploaded = await client.upload_artifact(onnx_file)
    record = await client.register_version(
        args.model, args.as_version or f"{args.version}-onnx",
        artifact_sha256=uploaded["sha256"], signature=source["signature"],
        batching=source["batching"], device=source["device"], platform=ONNX_PLATFORM,
        prediction_log=source.get("prediction_log", "digest"),
        cpu_fallback=source.get("cpu_fallback", False),
    )
    result = {"version": record, "source": args.version, "traced_from": conversion[0],
              "max_abs_error": conversion[1]}
    print_result(args, result, converted_text)
    return 0


def _convert(script: Path, signature: dict[str, Any], out: Path,
             module: str | None) -> tuple[str, float]:
    # Imported here: torch and the exporter load in seconds, which no other command needs.
    from services.mesh.domain.types import Signature
    from services.worker.onnx_export import convert_torchscript

    done = convert_torchscript(script, Signature.from_json(signature), out, module=module)
    return done.traced_from, done.max_abs_error


def add_convert_command(
    models: Any, common: argparse.ArgumentParser,
    with_registry: Callable[[Command], Callable[[argparse.Namespace], int]],
) -> None:
    """`models convert`, on the registry (`common`: its URL and --json options)."""
    command = models.add_parser(
        "convert", parents=[common],
        help="export a TorchScript version to ONNX and register it as a new version",
    )
    command.add_argument("model")
    command.add_argument("version")
    command.add_argument("--as", dest="as_version", metavar="VERSION",
                         help="the new version's name (default VERSION-onnx)")
    command.add_argument("--module", metavar="PACKAGE.MODULE:CLASS",
                         help="the model's eager class (built with no arguments), for a "
                              "scripted graph with control flow the exporter cannot follow")
    command.set_defaults(run=with_registry(_cmd_models_convert))
