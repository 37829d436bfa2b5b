"""`infermesh models autoscaling MODEL VERSION --min 1 --max 4 ...`: opt a version in to the
autoscaler, or change its `autoscaling` block, through the registry (fields not given stay).

The registry checks the block with the autoscaler's own parser, saves and republishes the
version record; the autoscaler reads it on its next tick, the launcher's fleet its bounds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from cli.common import print_result
from control.registry_client import RegistryClient

Command = Callable[[RegistryClient, argparse.Namespace], Awaitable[int]]

_NUMBERS = {
    "target_wait": "seconds of queue wait (p95) to stay under",
    "rows_per_replica": "rows/s one worker serves (0: learned)",
    "stable_window": "seconds averaged for normal decisions",
    "panic_window": "seconds of the burst window",
    "panic_threshold": "demand x ready capacity that starts a panic",
    "downscale_delay": "seconds demand stays low before a worker is removed",
    "startup_seconds": "expected seconds from start to ready",
    "idle_to_zero": "seconds without traffic before going to zero",
}
"""Float fields of the block, with their help."""


def json_object(text: str) -> dict[str, Any]:
    """A JSON object given on the command line."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def autoscaling_text(record: dict[str, Any]) -> str:
    """The autoscaling block of a version record, one line per field."""
    block = record.get("autoscaling") or {}
    lines = [f"autoscaling of {record['model']} version {record['version']}"]
    lines += [f"  {name:<20}{value}" for name, value in sorted(block.items())]
    return "\n".join(lines)


async def _cmd_models_autoscaling(client: RegistryClient, args: argparse.Namespace) -> int:
    change = dict(args.set or {})
    fields = {"min_replicas": args.min, "max_replicas": args.max, "max_step": args.max_step,
              "scale_to_zero": args.scale_to_zero,
              **{name: getattr(args, name) for name in _NUMBERS}}
    change.update({name: value for name, value in fields.items() if value is not None})
    if not change:
        print("infermesh: error: name at least one field to change (see --help)",
              file=sys.stderr)
        return 2
    print_result(args, await client.change_autoscaling(args.model, args.version, change),
                 autoscaling_text)
    return 0


def add_autoscaling_command(
    models: Any, common: argparse.ArgumentParser,
    with_registry: Callable[[Command], Callable[[argparse.Namespace], int]],
) -> None:
    """`models autoscaling`, on the registry (`common`: its URL and --json options)."""
    command = models.add_parser(
        "autoscaling", parents=[common],
        help="autoscale a version, or change its autoscaling (fields not given stay)",
    )
    command.add_argument("model")
    command.add_argument("version")
    command.add_argument("--min", type=int, metavar="N", help="fewest workers (0: scale to zero)")
    command.add_argument("--max", type=int, metavar="N", help="most workers")
    command.add_argument("--max-step", type=int, metavar="N", help="most workers added at once")
    for name, text in _NUMBERS.items():
        command.add_argument(f"--{name.replace('_', '-')}", type=float, metavar="X", help=text)
    command.add_argument("--scale-to-zero", action=argparse.BooleanOptionalAction, default=None)
    command.add_argument("--set", type=json_object, metavar="JSON",
                         help='fields as a JSON object (null: back to the default), e.g. '
                              '\'{"target_wait": 0.1}\'')
    command.set_defaults(run=with_registry(_cmd_models_autoscaling))
