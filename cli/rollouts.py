"""`infermesh rollout show|set|shadow|history` and `infermesh rollback`, via the control API.

Writes are conditional: `rollout set` and `rollout shadow` read the current rollout first and
send its epoch as If-Match, so a change made meanwhile (by a person or the guard) fails with
412 instead of being overwritten.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import orjson

from cli.common import Parser, control_options, print_result, table, with_control
from cli.control_client import ControlClient, ControlError

# -- argument types ----------------------------------------------------------------------


def _assignment(text: str, example: str) -> tuple[str, float]:
    version, sep, number = text.partition("=")
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if not sep or not version or value != value:  # NaN: not a number
        raise argparse.ArgumentTypeError(f"{text!r} is not VERSION=NUMBER, e.g. {example}")
    return version, value


def route_weight(text: str) -> tuple[str, float]:
    """`v1=90`: a version and its weight (>= 0)."""
    version, weight = _assignment(text, "v1=90")
    if weight < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight must be >= 0")
    return version, weight


def shadow_fraction(text: str) -> tuple[str, float]:
    """`v2=0.25`: a version and the fraction of requests mirrored to it, in (0, 1]."""
    version, fraction = _assignment(text, "v2=0.25")
    if not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the fraction must be in (0, 1]")
    return version, fraction


def guard_json(text: str) -> dict[str, Any]:
    """A guard block as a JSON object, e.g. '{"min_samples": 100}'."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def step_list(text: str) -> list[float]:
    """`5,25,50,100`: canary weights for the guard to advance through."""
    try:
        return [_number(float(part)) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 5,25,50,100") from None


def _number(value: float) -> float:
    """Whole numbers as ints, so records read `90`, not `90.0`."""
    return int(value) if value.is_integer() else value


# -- output ------------------------------------------------------------------------------


def routes_summary(routes: Sequence[dict[str, Any]], key: str = "weight") -> str:
    """`v1=90 v2=10` (or `none`)."""
    return " ".join(f"{r['version']}={r[key]:g}" for r in routes) or "none"


def rollout_text(record: dict[str, Any]) -> str:
    guard = record.get("guard")
    guard_text = " ".join(f"{k}={orjson.dumps(v).decode()}" for k, v in guard.items()) if (
        guard) else "none"
    updated = f"  updated {record['updated_at']}" if record.get("updated_at") else ""
    lines = [
        f"rollout {record['model']}  epoch {record['epoch']}{updated}",
        f"  routes      {routes_summary(record['routes'])}",
        f"  fallback    {record.get('fallback') or '-'}",
        f"  sticky key  {record.get('sticky_key') or '-'}",
        f"  salt        {record.get('salt') or '-'}",
        f"  shadow      {routes_summary(record.get('shadow') or [], 'fraction')}",
        f"  guard       {guard_text}",
    ]
    return "\n".join(lines)


def history_text(body: dict[str, Any]) -> str:
    if not body["history"]:
        return f"no rollout history for {body['model']}"
    rows = [
        (entry["epoch"], entry["created_at"], entry["author"],
         routes_summary(entry["record"]["routes"]), entry.get("reason") or "")
        for entry in body["history"]
    ]
    return table(("EPOCH", "WHEN", "AUTHOR", "ROUTES", "REASON"), rows)


# -- subcommands -------------------------------------------------------------------------


async def _cmd_show(client: ControlClient, args: argparse.Namespace) -> int:
    print_result(args, await client.get_rollout(args.model), rollout_text)
    return 0


async def _current(client: ControlClient, model: str) -> dict[str, Any] | None:
    """The current rollout, or None when the model has none yet."""
    try:
        return await client.get_rollout(model)
    except ControlError as exc:
        if exc.status == 404:
            return None
        raise


def _guard(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.guard is None and args.steps is None:
        return None
    guard = dict(args.guard or {})
    if args.steps is not None:
        guard["steps"] = args.steps
    return guard


def _set_body(args: argparse.Namespace, current: dict[str, Any]) -> dict[str, Any]:
    """The new routes; sticky key, salt and shadow kept unless given, the fallback kept while
    it is still routed; a guard only when asked for."""
    body: dict[str, Any] = {
        "routes": [{"version": v, "weight": _number(w)} for v, w in args.routes],
        "sticky_key": current.get("sticky_key") if args.sticky_key is None else args.sticky_key,
        "salt": current.get("salt", "") if args.salt is None else args.salt,
        "shadow": current.get("shadow", []),
    }
    if args.fallback is not None:
        body["fallback"] = args.fallback
    elif current.get("fallback") in {v for v, _ in args.routes}:
        body["fallback"] = current["fallback"]
    if (guard := _guard(args)) is not None:
        body["guard"] = guard
    if args.reason:
        body["reason"] = args.reason
    return body


async def _cmd_set(client: ControlClient, args: argparse.Namespace) -> int:
    current = await _current(client, args.model) or {}
    if_match = args.if_match if args.if_match is not None else current.get("epoch")
    record = await client.set_rollout(args.model, _set_body(args, current), if_match=if_match)
    print_result(args, record, rollout_text)
    return 0


async def _cmd_shadow(client: ControlClient, args: argparse.Namespace) -> int:
    current = await client.get_rollout(args.model)
    shadow = [] if args.off else [{"version": v, "fraction": f} for v, f in args.shadow]
    body = {key: current.get(key) for key in ("routes", "sticky_key", "salt", "fallback")}
    body["shadow"] = shadow
    if current.get("guard"):
        body["guard"] = current["guard"]
    if args.reason:
        body["reason"] = args.reason
    record = await client.set_rollout(args.model, body, if_match=current["epoch"])
    print_result(args, record, rollout_text)
    return 0


async def _cmd_history(client: ControlClient, args: argparse.Namespace) -> int:
    print_result(args, await client.history(args.model, limit=args.limit), history_text)
    return 0


async def _cmd_rollback(client: ControlClient, args: argparse.Namespace) -> int:
    record = await client.rollback(args.model, epoch=args.to_epoch, reason=args.reason)
    print_result(args, record, lambda r: f"rolled back {args.model}\n{rollout_text(r)}")
    return 0


# -- parser ------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _add_set(rollout: Any, common: argparse.ArgumentParser) -> None:
    put = rollout.add_parser("set", parents=[common], help="set a model's weighted routes")
    put.add_argument("model")
    put.add_argument("routes", nargs="+", type=route_weight, metavar="VERSION=WEIGHT")
    put.add_argument("--sticky-key", help="request field hashed to keep a user on one version")
    put.add_argument("--salt", help="changes which users land on which version")
    put.add_argument("--fallback", help="version taking traffic when a routed one has no worker")
    put.add_argument("--guard", type=guard_json, metavar="JSON",
                     help="guard the rollout (without --guard or --steps it is unguarded)")
    put.add_argument("--steps", type=step_list, metavar="W1,W2,...",
                     help="canary weights the guard advances through, e.g. 5,25,50,100")
    put.add_argument("--reason", help="recorded in the rollout history")
    put.add_argument("--if-match", type=int, metavar="EPOCH",
                     help="only if the rollout is still at EPOCH (default: the one just read)")
    put.set_defaults(run=with_control(_cmd_set))


def _add_shadow(rollout: Any, common: argparse.ArgumentParser) -> None:
    shadow = rollout.add_parser("shadow", parents=[common], help="mirror traffic to versions")
    shadow.add_argument("model")
    targets = shadow.add_mutually_exclusive_group(required=True)
    targets.add_argument("shadow", nargs="*", type=shadow_fraction, default=[],
                         metavar="VERSION=FRACTION")
    targets.add_argument("--off", action="store_true", help="stop mirroring")
    shadow.add_argument("--reason", help="recorded in the rollout history")
    shadow.set_defaults(run=with_control(_cmd_shadow))


def add_rollout_commands(commands: Any) -> None:
    """`rollout show|set|shadow|history` and `rollback`."""
    common = control_options()
    rollout = commands.add_parser("rollout", help="show and change rollouts").add_subparsers(
        dest="rollout_command", required=True, parser_class=Parser
    )
    show = rollout.add_parser("show", parents=[common], help="show a model's rollout")
    show.add_argument("model")
    show.set_defaults(run=with_control(_cmd_show))
    _add_set(rollout, common)
    _add_shadow(rollout, common)
    history = rollout.add_parser("history", parents=[common], help="past rollouts, newest first")
    history.add_argument("model")
    history.add_argument("--limit", type=_positive_int)
    history.set_defaults(run=with_control(_cmd_history))
    back = commands.add_parser("rollback", parents=[common], help="restore an earlier rollout")
    back.add_argument("model")
    back.add_argument("--to-epoch", type=_positive_int, metavar="N",
                      help="the epoch to restore (default: the one before the current)")
    back.add_argument("--reason", help="recorded in the rollout history")
    back.set_defaults(run=with_control(_cmd_rollback))
