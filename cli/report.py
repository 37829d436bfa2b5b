"""`infermesh report MODEL`: predictions joined with feedback, per version and bucket band.

    $ infermesh report mlp --since 7d
    report mlp: last 7d, 10 bucket bands
    VERSION  BUCKETS    PREDICTIONS  FEEDBACK  ACCURACY  MEAN SCORE  P50 ms  P99 ms
    1        0-999      1210         301       91.4%     0.820       4.1     12.9
    ...
    2        pinned     12           0         -         -           3.8     5.0

`--json` prints the control API's JSON (`GET /v1/models/{model}/report`) as it is.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from cli.common import control_options, print_result, table, with_control
from cli.control_client import ControlClient

_SINCE = re.compile(r"[0-9]{1,6}[smhdw]")
MAX_BANDS = 100
COLUMNS = ("VERSION", "BUCKETS", "PREDICTIONS", "FEEDBACK", "ACCURACY", "MEAN SCORE",
           "P50 ms", "P99 ms")


def since(text: str) -> str:
    """`30m`, `24h`, `7d`, `2w` (the API checks the upper bound)."""
    if _SINCE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 24h or 7d")
    return text


def bands(text: str) -> int:
    """How many bucket bands: 1 to 100."""
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_BANDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer in [1, {MAX_BANDS}]")
    return int(text)


def _number(value: float | None, form: str) -> str | None:
    return None if value is None else format(value, form)


def _row(row: dict[str, Any]) -> tuple[Any, ...]:
    bucket_range = row["bucket_range"]
    latency = row["latency_ms"]
    accuracy = row["accuracy"]
    return (
        f"{row['version']} (shadow)" if row["shadow"] else row["version"],
        "pinned" if bucket_range is None else f"{bucket_range[0]}-{bucket_range[1]}",
        row["predictions"], row["with_feedback"],
        None if accuracy is None else f"{accuracy * 100:.1f}%",
        _number(row["mean_score"], ".3f"), _number(latency["p50"], ".1f"),
        _number(latency["p99"], ".1f"),
    )


def report_text(body: dict[str, Any]) -> str:
    shadow = ", shadow included" if body["include_shadow"] else ""
    lines = [f"report {body['model']}: last {body['since']}, {body['buckets']} bucket bands"
             f"{shadow}"]
    if not body["rows"]:
        lines.append(f"no predictions of {body['model']} in the last {body['since']}")
    else:
        lines.append(table(COLUMNS, [_row(row) for row in body["rows"]]))
    return "\n".join(lines)


async def _cmd_report(client: ControlClient, args: argparse.Namespace) -> int:
    body = await client.model_report(
        args.model, since=args.since, buckets=args.buckets, include_shadow=args.include_shadow,
        label_kind=args.label_kind, score_kind=args.score_kind,
    )
    print_result(args, body, report_text)
    return 0


def add_report_command(commands: Any) -> None:
    """`report MODEL [--since 24h] [--buckets 10] [--include-shadow] [--json]`."""
    report = commands.add_parser(
        "report", parents=[control_options()],
        help="predictions joined with feedback, per version and bucket band",
    )
    report.add_argument("model")
    report.add_argument("--since", type=since, default="24h",
                        help="how far back: 30m, 24h, 7d, ... (default %(default)s)")
    report.add_argument("--buckets", type=bands, default=10,
                        help="bands the bucket space is cut into, 1 to 100 (default %(default)s)")
    report.add_argument("--include-shadow", action="store_true",
                        help="also report shadow (mirrored) predictions, as rows of their own")
    report.add_argument("--label-kind", help="feedback kind compared for accuracy (default label)")
    report.add_argument("--score-kind", help="feedback kind averaged (default score)")
    report.set_defaults(run=with_control(_cmd_report))
