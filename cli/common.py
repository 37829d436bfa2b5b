"""What every `infermesh` subcommand shares: the parser class, output, the control API options.

The control API's URL comes from `--control`, `INFERMESH_CONTROL_URL` or the default; its
token from `--token`, `INFERMESH_CONTROL_TOKEN` or the file `<state-dir>/control-token`
(which `infermesh up` writes; it holds just the secret).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import orjson

from cli.control_client import ControlClient, ControlError

DEFAULT_CONTROL = "http://127.0.0.1:8100"
DEFAULT_STATE_DIR = ".infermesh"
TOKEN_FILE = "control-token"


class Parser(argparse.ArgumentParser):
    """Reports usage errors in one line (exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows under headers, columns padded to line up."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def print_result(args: argparse.Namespace, body: Any, text: Callable[[Any], str]) -> None:
    """`body` as indented JSON with --json, else as `text(body)`."""
    print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() if args.json else text(body))


def control_options() -> argparse.ArgumentParser:
    """The options of every command that talks to the control API (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--control", default=os.environ.get("INFERMESH_CONTROL_URL", DEFAULT_CONTROL),
        help="control API URL (env INFERMESH_CONTROL_URL, default %(default)s)",
    )
    common.add_argument(
        "--token", default=os.environ.get("INFERMESH_CONTROL_TOKEN"),
        help=f"control API token (env INFERMESH_CONTROL_TOKEN, else <state-dir>/{TOKEN_FILE})",
    )
    common.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help="where `infermesh up` keeps its state (default %(default)s)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    return common


def control_token(args: argparse.Namespace) -> str | None:
    """--token / INFERMESH_CONTROL_TOKEN, else the state dir's token file, else None."""
    if args.token:
        token: str = args.token
        return token
    try:
        return (Path(args.state_dir) / TOKEN_FILE).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


ControlCommand = Callable[[ControlClient, argparse.Namespace], Awaitable[int]]


def with_control(command: ControlCommand) -> Callable[[argparse.Namespace], int]:
    """Run `command` with a client of the control API named by the arguments."""

    async def call(args: argparse.Namespace, token: str | None) -> int:
        async with aiohttp.ClientSession() as session:
            return await command(ControlClient(session, args.control, token=token), args)

    # The token file is read before the loop starts: no file I/O on the event loop.
    return lambda args: asyncio.run(call(args, control_token(args)))


def control_error_text(exc: ControlError, args: argparse.Namespace) -> str:
    """The one line printed for a failed control API call, with a hint where one helps."""
    text = str(exc)
    if exc.status == 401:
        text += (f" (pass --token, set INFERMESH_CONTROL_TOKEN or write it to "
                 f"{Path(getattr(args, 'state_dir', DEFAULT_STATE_DIR)) / TOKEN_FILE})")
    elif exc.status == 412 and "epoch" in exc.body:
        model = getattr(args, "model", "MODEL")
        text += f" (current epoch {exc.body['epoch']}: see `infermesh rollout show {model}`)"
    return text
