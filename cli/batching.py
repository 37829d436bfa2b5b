"""`infermesh models batching MODEL VERSION --max-batch-size N ...`: change a version's queue
policy at runtime through the registry (the fields not given stay as they are).

The registry saves and republishes the version record; the batchers and gateways watching it
apply the new policy within a moment, without a restart.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from cli.common import print_result
from control.registry_client import RegistryClient
from services.mesh.domain.types import ADMISSION_MODES

Command = Callable[[RegistryClient, argparse.Namespace], Awaitable[int]]

_OPTIONS = {
    "max_batch_size": "max_batch_size", "max_queue_delay_ms": "max_queue_delay_ms",
    "preferred": "preferred_batch_sizes", "max_queue_size": "max_queue_size",
    "default_timeout_ms": "default_timeout_ms", "admission": "admission",
    "edge_inflight": "edge_inflight",
}
"""Command-line destination → batching field."""

_UNSET: Any = object()
"""The default of every option: only the options given are sent (None clears a timeout)."""


def size_list(text: str) -> list[int]:
    """`4,8,16` as a list of batch sizes."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of sizes like 4,8,16") from None
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be >= 1")
    return sizes


def timeout_ms(text: str) -> float | None:
    """Milliseconds, or `none` for no default deadline."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of ms or 'none'") from None


def inflight_bound(text: str) -> int | None:
    """A count >= 1, or `default` for the edge's own bound."""
    if text.lower() == "default":
        return None
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count or 'default'") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1 (or 'default')")
    return count


def batching_text(record: dict[str, Any]) -> str:
    """The queue policy of a version record, one line per field."""
    policy = record["batching"]
    preferred = ",".join(map(str, policy["preferred_batch_sizes"])) or "any"
    timeout = policy["default_timeout_ms"]
    inflight = policy.get("edge_inflight")
    return "\n".join([
        f"queue policy of {record['model']} version {record['version']}",
        f"  max batch size      {policy['max_batch_size']}",
        f"  max queue delay     {policy['max_queue_delay_ms']:g} ms",
        f"  preferred sizes     {preferred}",
        f"  max queue size      {policy['max_queue_size']} rows",
        f"  default timeout     {'none' if timeout is None else f'{timeout:g} ms'}",
        f"  admission           {policy['admission']}",
        f"  edge in flight      {'the edge default' if inflight is None else inflight}",
    ])


async def _cmd_models_batching(client: RegistryClient, args: argparse.Namespace) -> int:
    change = {
        field: getattr(args, dest) for dest, field in _OPTIONS.items()
        if getattr(args, dest) is not _UNSET
    }
    if not change:
        print("infermesh: error: name at least one field to change (see --help)",
              file=sys.stderr)
        return 2
    print_result(args, await client.change_batching(args.model, args.version, change),
                 batching_text)
    return 0



def add_batching_command(
    models: Any, common: argparse.ArgumentParser,
    with_registry: Callable[[Command], Callable[[argparse.Namespace], int]],
) -> None:
    """`models batching`, on the registry (`common`: its URL and --json options)."""
    command = models.add_parser(
        "batching", parents=[common],
        help="change a version's queue policy at runtime (fields not given stay)",
    )
    command.add_argument("model")
    command.add_argument("version")
    command.add_argument("--max-batch-size", type=int, default=_UNSET, metavar="N")
    command.add_argument("--max-queue-delay-ms", type=float, default=_UNSET, metavar="MS")
    command.add_argument("--preferred", type=size_list, default=_UNSET, metavar="4,8,...",
                         help="preferred batch sizes")
    command.add_argument("--max-queue-size", type=int, default=_UNSET, metavar="ROWS")
    command.add_argument("--default-timeout-ms", type=timeout_ms, default=_UNSET,
                         metavar="MS|none", help="deadline of a request that names none")
    command.add_argument("--admission", choices=ADMISSION_MODES, default=_UNSET)
    command.add_argument("--edge-inflight", type=inflight_bound, default=_UNSET,
                         metavar="N|default",
                         help="the model's inference requests the edge lets in flight")
    command.set_defaults(run=with_registry(_cmd_models_batching))
