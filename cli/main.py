"""`infermesh`: the command line of the mesh (`infermesh models register ...`, `infermesh up`).

Each subcommand is one small `_cmd_*` function taking the parsed arguments and returning an
exit status: 0 done, 1 the operation failed (one line on stderr), 2 bad usage. `models
register` and `models batching` (batching.py) talk to the registry; everything else to the
control API (rollouts.py has the rollout commands, tenants.py tenants, keys and model limits,
report.py `report`, trace.py `trace`, common.py what they share).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from cli.autoscaling import add_autoscaling_command
from cli.batching import add_batching_command
from cli.common import (
    Parser,
    control_error_text,
    control_options,
    print_result,
    table,
    with_control,
)
from cli.control_client import ControlClient, ControlError
from cli.convert import add_convert_command
from cli.quantize import add_quantize_command, derived_versions_text
from cli.report import add_report_command
from cli.rollouts import add_rollout_commands
from cli.tenants import add_limit_command, add_tenant_commands
from cli.trace import add_trace_command
from control.registry_client import RegistryClient, RegistryError, register_file
from deploy.worker_counts import FUSED_LAYOUTS
from services.mesh.domain.tensors import DATATYPES
from services.mesh.domain.types import PREDICTION_LOG_POLICIES, WORKER_PLACEMENTS
from services.mesh.infra.credentials import CredentialError, MeshCredential

DEFAULT_REGISTRY = "http://127.0.0.1:8200"
PLATFORMS = ("pytorch_torchscript", "onnxruntime_onnx", "triton")
_PLATFORM_OF_SUFFIX = {".onnx": "onnxruntime_onnx", ".json": "triton"}
"""The platform an extension implies without --platform (a Triton reference is JSON); anything
else is TorchScript, the registry's default. Only ONNX files declare their own signature."""
READS_SIGNATURE = "onnxruntime_onnx"


def tensor_spec(text: str) -> dict[str, Any]:
    """Parse `name:DTYPE:d1,d2` (-1 for a dynamic dim, nothing after the colon for a scalar)."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[0]:
        raise argparse.ArgumentTypeError(f"{text!r} is not name:DTYPE:d1,d2")
    name, datatype, dims = parts[0], parts[1].upper(), parts[2]
    if datatype not in DATATYPES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown datatype {parts[1]!r} (one of {', '.join(DATATYPES)})"
        )
    try:
        shape = [int(d) for d in dims.split(",")] if dims.strip() else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: dims must be integers like 1,3,-1") from None
    if any(d < -1 for d in shape):
        raise argparse.ArgumentTypeError(f"{text!r}: dims must be >= -1")
    return {"name": name, "datatype": datatype, "shape": shape}


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    return path


# -- output ------------------------------------------------------------------------------


def _specs(specs: Sequence[dict[str, Any]]) -> str:
    return " ".join(f"{s['name']}:{s['datatype']}[{','.join(map(str, s['shape']))}]" for s in specs)


def _version_text(record: dict[str, Any]) -> str:
    batching = record["batching"]
    return "\n".join([
        f"registered {record['model']} version {record['version']} ({record['platform']})",
        f"  sha256    {record['sha256']}",
        f"  artifact  {record['artifact_uri']}",
        f"  inputs    {_specs(record['signature']['inputs'])}",
        f"  outputs   {_specs(record['signature']['outputs'])}",
        f"  batching  max {batching['max_batch_size']}, delay {batching['max_queue_delay_ms']} ms",
        f"  device    {record['device']}"
        + (", CPU fallback allowed" if record.get("cpu_fallback") else ""),
        f"  logging   {record.get('prediction_log', 'digest')}",
        f"  workers   {record.get('worker', 'shared')}",
    ])


def _models_text(models: list[dict[str, Any]]) -> str:
    if not models:
        return "no models registered"
    rows = [(m["name"], m["versions"], m["latest"], m["serving"], m["description"]) for m in models]
    return table(("NAME", "VERSIONS", "LATEST", "SERVING", "DESCRIPTION"), rows)


def _model_text(model: dict[str, Any]) -> str:
    about = f": {model['description']}" if model["description"] else ""
    lines = [f"model {model['name']}{about}"]
    rows = [
        (v["version"], v["device"], v["batching"]["max_batch_size"], v["sha256"][:12],
         _specs(v["signature"]["inputs"]), _specs(v["signature"]["outputs"]))
        for v in model["versions"]
    ]
    lines.append(table(("VERSION", "DEVICE", "MAX BATCH", "SHA256", "INPUTS", "OUTPUTS"), rows))
    rollout = model.get("rollout")
    if rollout:
        routes = ", ".join(f"{r['version']} {r['weight']:g}%" for r in rollout["routes"])
        epoch, fallback = rollout["epoch"], rollout["fallback"]
        lines.append(f"rollout (epoch {epoch}): {routes}; fallback {fallback}")
    lines += derived_versions_text(model["versions"])
    return "\n".join(lines)


# -- subcommands -------------------------------------------------------------------------

Command = Callable[[RegistryClient, argparse.Namespace], Awaitable[int]]


def _with_registry(command: Command) -> Callable[[argparse.Namespace], int]:
    async def call(args: argparse.Namespace, credential: MeshCredential) -> int:
        async with aiohttp.ClientSession() as session:
            client = RegistryClient(session, args.registry, credential=credential)
            return await command(client, args)

    def run(args: argparse.Namespace) -> int:
        path = os.environ.get("INFERMESH_MESH_CREDENTIAL_FILE") or str(
            Path(args.state_dir) / "secrets" / "mesh-credential"
        )
        try:
            credential = MeshCredential.load(path)
        except CredentialError as exc:
            print(f"error: {exc} (the registry needs the mesh credential: set "
                  f"INFERMESH_MESH_CREDENTIAL_FILE or --state-dir)", file=sys.stderr)
            return 2
        return asyncio.run(call(args, credential))

    return run


async def _cmd_models_register(client: RegistryClient, args: argparse.Namespace) -> int:
    batching: dict[str, Any] = {}
    if args.max_batch_size is not None:
        batching["max_batch_size"] = args.max_batch_size
    if args.max_queue_delay_ms is not None:
        batching["max_queue_delay_ms"] = args.max_queue_delay_ms
    platform = args.platform or _PLATFORM_OF_SUFFIX.get(args.artifact.suffix, PLATFORMS[0])
    given = {side: specs for side, specs in (("inputs", args.input), ("outputs", args.output))
             if specs}
    if platform != READS_SIGNATURE and len(given) < 2:
        print(f"infermesh: error: argument --input and --output: required for platform "
              f"{platform} (only an {READS_SIGNATURE} artifact declares its own)", file=sys.stderr)
        return 2
    record = await register_file(
        client, args.name, args.version, args.artifact, given or None,
        batching=batching or None, device=args.device, prediction_log=args.prediction_log,
        platform=platform, cpu_fallback=args.cpu_fallback, worker=args.worker,
    )
    print_result(args, record, _version_text)
    return 0


async def _cmd_models_list(client: ControlClient, args: argparse.Namespace) -> int:
    print_result(args, await client.list_models(), _models_text)
    return 0


async def _cmd_models_show(client: ControlClient, args: argparse.Namespace) -> int:
    print_result(args, await client.get_model(args.name), _model_text)
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from deploy.launcher import run_up  # heavy: only `up` needs the launcher

    if args.no_auth:
        os.environ["INFERMESH_GATEWAY_AUTH"] = "0"
    if args.processes is not None:
        if not args.fused or args.processes < 1:
            raise SystemExit("infermesh up: --processes N (N >= 1) goes with --fused")
        os.environ["INFERMESH_FUSED_PROCESSES"] = str(args.processes)
    if args.layout is not None:
        if not args.fused:
            raise SystemExit("infermesh up: --layout goes with --fused")
        os.environ["INFERMESH_FUSED_LAYOUT"] = args.layout

    code: int = run_up(state_dir=Path(args.state_dir), fused=args.fused, demo=not args.no_demo)
    return code


# -- parser ------------------------------------------------------------------------------


def _registry_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry", default=os.environ.get("INFERMESH_REGISTRY_URL", DEFAULT_REGISTRY),
        help="registry URL (env INFERMESH_REGISTRY_URL, default %(default)s)",
    )
    common.add_argument(
        "--state-dir", default=".infermesh",
        help="state dir of `infermesh up`, whose secrets/mesh-credential the registry wants "
             "(env INFERMESH_MESH_CREDENTIAL_FILE names the file instead; default %(default)s)",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return common


def _add_models(commands: Any) -> None:
    common = _registry_options()
    models = commands.add_parser("models", help="register and inspect models").add_subparsers(
        dest="models_command", required=True, parser_class=Parser
    )
    register = models.add_parser("register", parents=[common], help="register a model version")
    register.add_argument("name")
    register.add_argument("--version", required=True)
    register.add_argument("--artifact", required=True, type=_existing_file)
    register.add_argument("--input", action="append", type=tensor_spec, metavar="NAME:DTYPE:DIMS",
                          help="required unless the artifact is ONNX (read from the model)")
    register.add_argument("--output", action="append", type=tensor_spec, metavar="NAME:DTYPE:DIMS")
    register.add_argument("--platform", choices=PLATFORMS,
                          help="how workers run the artifact (default from its extension: .onnx "
                               "onnxruntime_onnx, .json triton, else pytorch_torchscript)")
    register.add_argument("--max-batch-size", type=int)
    register.add_argument("--max-queue-delay-ms", type=float)
    register.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    register.add_argument("--cpu-fallback", action=argparse.BooleanOptionalAction, default=False,
                          help="a CUDA failure moves the version to CPU (default: it fails)")
    register.add_argument(
        "--worker", choices=WORKER_PLACEMENTS, default="shared",
        help="shared: served by the model's workers beside its other versions; dedicated: "
             "workers of its own (default %(default)s)",
    )
    register.add_argument(
        "--prediction-log", choices=PREDICTION_LOG_POLICIES, default="digest",
        help="what the prediction log keeps of each request's tensors (default %(default)s)",
    )
    register.set_defaults(run=_with_registry(_cmd_models_register))
    add_batching_command(models, common, _with_registry)
    add_autoscaling_command(models, common, _with_registry)
    add_convert_command(models, common, _with_registry)
    add_quantize_command(models, common, _with_registry)
    control = control_options()
    listing = models.add_parser("list", parents=[control], help="list models")
    listing.set_defaults(run=with_control(_cmd_models_list))
    show = models.add_parser("show", parents=[control], help="show a model's versions and rollout")
    show.add_argument("name")
    show.set_defaults(run=with_control(_cmd_models_show))
    add_limit_command(models, control)


def _add_up(commands: Any) -> None:
    up = commands.add_parser("up", help="run the whole mesh locally")
    up.add_argument("--state-dir", default=".infermesh", help="default %(default)s")
    up.add_argument("--fused", action="store_true", help="run the data plane in one process")
    up.add_argument("--processes", type=int, default=None, metavar="N",
                    help="with --fused: N processes (one batcher and worker in the first; the "
                    "others run gateway and router on the gateway's shared ports, and so does "
                    "the first when N is 2); default 1")
    up.add_argument("--layout", choices=FUSED_LAYOUTS, default=None,
                    help="with --fused --processes N: 'fronts' (default) as above; 'replicas': "
                    "N whole fused processes on the shared ports, each batching and running "
                    "the models for the connections it takes (quicker for a small model, "
                    "smaller batches for a large one)")
    up.add_argument("--no-demo", action="store_true", help="do not register the demo models")
    up.add_argument("--no-auth", action="store_true",
                    help="dev mode: the gateway takes requests without an API key and applies "
                    "no quotas (demos only; the banner says so loudly)")
    up.set_defaults(run=_cmd_up)


def build_parser() -> argparse.ArgumentParser:
    """The `infermesh` argument parser; each subcommand sets `run`."""
    parser = Parser(prog="infermesh", description="infermesh: an ML inference mesh")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_models(commands)
    add_rollout_commands(commands)
    add_tenant_commands(commands)
    add_report_command(commands)
    add_trace_command(commands)
    _add_up(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `infermesh` command line; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage error (2) or --help (0): already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        code: int = args.run(args)
    except RegistryError as exc:
        print(f"infermesh: error: {exc.message}", file=sys.stderr)
        return 1
    except ControlError as exc:
        print(f"infermesh: error: {control_error_text(exc, args)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"infermesh: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code

