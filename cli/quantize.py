"""`infermesh models quantize MODEL VERSION`: an int8 version derived from an ONNX one.

The registry quantizes the artifact, measures it against the fp32 source (speed-up at batch 32
and at one row, max and mean absolute error of every output) and registers it as a new version
with those numbers, even when int8 turns out slower: the verdict line then says to keep fp32.
`infermesh models show` prints the same numbers under the versions table.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from cli.common import print_result
from control.registry_client import RegistryClient

Command = Callable[[RegistryClient, argparse.Namespace], Awaitable[int]]


def _errors(by_output: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.3g}" for name, value in by_output.items())


def measurement_lines(record: dict[str, Any], *, indent: str = "  ") -> list[str]:
    """The measured numbers of a derived version, one line each (none for an uploaded one)."""
    numbers, source = record.get("quantization"), record.get("derived_from")
    if not numbers or not source:
        return []
    rates = numbers.get("rows_per_s_b32", {})
    return [
        f"{indent}derived from  version {source['version']} ({source['mode']})",
        f"{indent}speed-up      {numbers['speedup_b32']:.2f}x at batch 32, "
        f"{numbers['speedup_b1']:.2f}x at 1 row (fp32 {rates.get('fp32', '-')} rows/s, int8 "
        f"{rates.get('int8', '-')} rows/s; {numbers.get('threads', '-')} thread(s))",
        f"{indent}max abs error {_errors(numbers['max_abs_error'])}",
        f"{indent}mean abs err  {_errors(numbers['mean_abs_error'])}",
        f"{indent}verdict       {numbers['verdict']}",
    ]


def quantized_text(record: dict[str, Any]) -> str:
    """A derived version's record as `models quantize` prints it."""
    return "\n".join([
        f"registered {record['model']} version {record['version']}",
        f"  sha256        {record['sha256']}",
        *measurement_lines(record),
    ])


def derived_versions_text(versions: Sequence[dict[str, Any]]) -> list[str]:
    """For `models show`: each derived version's measurement, under its name."""
    lines: list[str] = []
    for record in versions:
        if measured := measurement_lines(record):
            lines += [f"version {record['version']}:", *measured]
    return lines


async def _cmd_models_quantize(client: RegistryClient, args: argparse.Namespace) -> int:
    record = await client.quantize_version(args.model, args.version, mode=args.mode,
                                           new_version=args.new_version)
    print_result(args, record, quantized_text)
    return 0


def add_quantize_command(
    models: Any, common: argparse.ArgumentParser,
    with_registry: Callable[[Command], Callable[[argparse.Namespace], int]],
) -> None:
    """`models quantize`, on the registry (`common`: its URL and --json options)."""
    command = models.add_parser(
        "quantize", parents=[common],
        help="derive an int8 version from an ONNX version, measured against it",
    )
    command.add_argument("model")
    command.add_argument("version", help="the ONNX (fp32) version to quantize")
    command.add_argument("--mode", choices=("int8-dynamic",), default="int8-dynamic")
    command.add_argument("--as", dest="new_version", metavar="VERSION",
                         help="the new version's name (default VERSION-int8)")
    command.set_defaults(run=with_registry(_cmd_models_quantize))
