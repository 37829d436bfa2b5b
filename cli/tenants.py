"""`infermesh tenants ...`, `infermesh keys ...` and `infermesh models limit`, via the control API.

`keys issue` prints the new key alone on stdout (so `KEY=$(infermesh keys issue acme)` works)
and a reminder on stderr: the control API keeps only a hash, so the key is never shown again.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from cli.common import Parser, control_options, print_result, table, with_control
from cli.control_client import ControlClient, ControlError

TENANT_FLAGS = (
    ("rate", "rate"), ("burst", "burst"), ("max_concurrency", "max_concurrency"),
    ("priority", "priority_class"), ("weight", "weight"),
)
"""(argument, field) of the tenant options that map one to one onto record fields."""

# -- argument types ----------------------------------------------------------------------


def positive_number(text: str) -> float | int:
    """A number > 0 (whole numbers as ints, so records read `100`, not `100.0`)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    return int(value) if value.is_integer() else value


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def model_list(text: str) -> list[str]:
    """`mlp,encoder`: the models a tenant may call."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like mlp,encoder")
    return names


def key_id(text: str) -> str:
    """A key id, also taken from the key's prefix (`imk_<id>`) or from the whole key."""
    return text.split("_")[1] if text.startswith("imk_") else text


# -- output ------------------------------------------------------------------------------


def _models(record: dict[str, Any]) -> str:
    allowed = record.get("allowed_models")
    return "all" if allowed is None else (", ".join(allowed) or "none")


def tenant_text(record: dict[str, Any]) -> str:
    status = "  (disabled: requests are refused)" if record.get("disabled") else ""
    lines = [
        f"tenant {record['name']}{status}",
        f"  rate             {record['rate']:g}/s, burst {record['burst']}",
        f"  max concurrency  {record['max_concurrency']}",
        f"  models           {_models(record)}",
        f"  priority         {record['priority_class']}, weight {record['weight']:g}",
    ]
    lines += [f"  {label:<15}  {record[field]}" for label, field in
              (("created", "created_at"), ("updated", "updated_at")) if record.get(field)]
    return "\n".join(lines)


def tenants_text(records: Sequence[dict[str, Any]]) -> str:
    if not records:
        return "no tenants"
    rows = [
        (r["name"], f"{r['rate']:g}/s", r["burst"], r["max_concurrency"], r["priority_class"],
         f"{r['weight']:g}", _models(r), "disabled" if r.get("disabled") else "active")
        for r in records
    ]
    headers = ("NAME", "RATE", "BURST", "CONCURRENCY", "PRIORITY", "WEIGHT", "MODELS", "STATUS")
    return table(headers, rows)


def keys_text(keys: Sequence[dict[str, Any]], tenant: str) -> str:
    if not keys:
        return f"no API keys for {tenant}"
    rows = [
        (k["key_id"], k["prefix"],
         f"revoked {k['revoked_at']} by {k['revoked_by']}" if k.get("revoked_at") else "active",
         k["created_at"], k["created_by"], k["note"])
        for k in keys
    ]
    return table(("KEY ID", "PREFIX", "STATUS", "CREATED", "BY", "NOTE"), rows)


def limits_text(record: dict[str, Any]) -> str:
    cap = record.get("max_concurrency")
    if cap is None:
        return f"model {record['model']}: no concurrency limit"
    return f"model {record['model']}: at most {cap} requests in flight (all tenants)"


# -- subcommands -------------------------------------------------------------------------


def _tenant_fields(args: argparse.Namespace) -> dict[str, Any]:
    body = {field: getattr(args, flag) for flag, field in TENANT_FLAGS
            if getattr(args, flag) is not None}
    if args.all_models:
        body["allowed_models"] = None
    elif args.models is not None:
        body["allowed_models"] = args.models
    return body


async def _cmd_create(client: ControlClient, args: argparse.Namespace) -> int:
    record = await client.create_tenant({"name": args.name, **_tenant_fields(args)})
    print_result(args, record, tenant_text)
    return 0


async def _cmd_update(client: ControlClient, args: argparse.Namespace) -> int:
    changes = _tenant_fields(args)
    if not changes:
        print("infermesh tenants update: error: nothing to change (give --rate, --burst, "
              "--max-concurrency, --models, --all-models, --priority or --weight)",
              file=sys.stderr)
        return 2
    print_result(args, await client.update_tenant(args.name, changes), tenant_text)
    return 0


async def _cmd_list(client: ControlClient, args: argparse.Namespace) -> int:
    print_result(args, await client.list_tenants(), tenants_text)
    return 0


async def _cmd_show(client: ControlClient, args: argparse.Namespace) -> int:
    print_result(args, await client.get_tenant(args.name), tenant_text)
    return 0


async def _cmd_disable(client: ControlClient, args: argparse.Namespace) -> int:
    print_result(args, await client.disable_tenant(args.name), tenant_text)
    return 0


async def _cmd_enable(client: ControlClient, args: argparse.Namespace) -> int:
    print_result(args, await client.update_tenant(args.name, {"disabled": False}), tenant_text)
    return 0


async def _cmd_issue(client: ControlClient, args: argparse.Namespace) -> int:
    issued = await client.issue_key(args.tenant, note=args.note)
    print(orjson.dumps(issued, option=orjson.OPT_INDENT_2).decode() if args.json
          else issued["key"])
    print(f"API key {issued['key_id']} for tenant {issued['tenant']}: "
          "store it now: it is not shown again", file=sys.stderr)
    return 0


async def _cmd_keys(client: ControlClient, args: argparse.Namespace) -> int:
    print_result(args, await client.list_keys(args.tenant), lambda k: keys_text(k, args.tenant))
    return 0


async def _cmd_revoke(client: ControlClient, args: argparse.Namespace) -> int:
    info = await client.revoke_key(args.key_id)
    print_result(args, info, lambda k: (
        f"revoked API key {k['key_id']} of tenant {k['tenant']} at {k['revoked_at']}"))
    return 0


async def _cmd_limit(client: ControlClient, args: argparse.Namespace) -> int:
    if args.clear:
        record = await client.clear_model_limits(args.model)
    elif args.max_concurrency is not None:
        record = await client.set_model_limits(args.model, max_concurrency=args.max_concurrency)
    else:
        try:
            record = await client.get_model_limits(args.model)
        except ControlError as exc:
            if exc.status != 404 or "no limits" not in exc.message:
                raise
            record = {"model": args.model, "max_concurrency": None}
    print_result(args, record, limits_text)
    return 0


# -- parser ------------------------------------------------------------------------------


def _add_tenant_flags(parser: argparse.ArgumentParser, *, rate_required: bool) -> None:
    parser.add_argument("--rate", type=positive_number, required=rate_required,
                        help="requests per second, fleet-wide")
    parser.add_argument("--burst", type=positive_int,
                        help="requests at once after an idle spell (default: the rate, rounded up)")
    parser.add_argument("--max-concurrency", type=positive_int, help="requests in flight at once")
    models = parser.add_mutually_exclusive_group()
    models.add_argument("--models", type=model_list, metavar="M1,M2",
                        help="the only models the tenant may call (default: every model)")
    models.add_argument("--all-models", action="store_true", help="allow every model again")
    parser.add_argument("--priority", choices=("realtime", "bulk"), help="the batcher lane")
    parser.add_argument("--weight", type=positive_number,
                        help="share of a busy model's batches relative to other tenants")


def _add_tenants(commands: Any, common: argparse.ArgumentParser) -> None:
    tenants = commands.add_parser("tenants", help="create and change tenants").add_subparsers(
        dest="tenants_command", required=True, parser_class=Parser
    )
    create = tenants.add_parser("create", parents=[common], help="create a tenant")
    create.add_argument("name")
    _add_tenant_flags(create, rate_required=True)
    create.set_defaults(run=with_control(_cmd_create))
    update = tenants.add_parser("update", parents=[common], help="change a tenant's quotas")
    update.add_argument("name")
    _add_tenant_flags(update, rate_required=False)
    update.set_defaults(run=with_control(_cmd_update))
    listing = tenants.add_parser("list", parents=[common], help="list tenants")
    listing.set_defaults(run=with_control(_cmd_list))
    for name, command, about in (
        ("show", _cmd_show, "show a tenant"),
        ("disable", _cmd_disable, "refuse a tenant's requests (its keys stay)"),
        ("enable", _cmd_enable, "serve a disabled tenant again"),
    ):
        sub = tenants.add_parser(name, parents=[common], help=about)
        sub.add_argument("name")
        sub.set_defaults(run=with_control(command))


def _add_keys(commands: Any, common: argparse.ArgumentParser) -> None:
    keys = commands.add_parser("keys", help="issue and revoke API keys").add_subparsers(
        dest="keys_command", required=True, parser_class=Parser
    )
    issue = keys.add_parser("issue", parents=[common], help="issue a key (shown only once)")
    issue.add_argument("tenant")
    issue.add_argument("--note", default="", help="who or what will use the key")
    issue.set_defaults(run=with_control(_cmd_issue))
    listing = keys.add_parser("list", parents=[common], help="a tenant's keys (no secrets)")
    listing.add_argument("tenant")
    listing.set_defaults(run=with_control(_cmd_keys))
    revoke = keys.add_parser("revoke", parents=[common], help="revoke a key at once")
    revoke.add_argument("key_id", type=key_id, metavar="KEY_ID",
                        help="the key id (or its imk_<id> prefix)")
    revoke.set_defaults(run=with_control(_cmd_revoke))


def add_tenant_commands(commands: Any) -> None:
    """`tenants create|list|show|update|disable|enable` and `keys issue|list|revoke`."""
    common = control_options()
    _add_tenants(commands, common)
    _add_keys(commands, common)


def add_limit_command(models: Any, common: argparse.ArgumentParser) -> None:
    """`models limit MODEL [--max-concurrency N | --clear]` (neither: show the limit)."""
    limit = models.add_parser("limit", parents=[common],
                              help="show, set or clear a model's concurrency limit")
    limit.add_argument("model")
    change = limit.add_mutually_exclusive_group()
    change.add_argument("--max-concurrency", type=positive_int, metavar="N",
                        help="requests for the model in flight at once, all tenants together")
    change.add_argument("--clear", action="store_true", help="remove the limit")
    limit.set_defaults(run=with_control(_cmd_limit))
