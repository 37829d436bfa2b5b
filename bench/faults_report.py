"""The fault group's table (`INFERMESH_FAULT_REPORT=<path>`, JSON) as Markdown for
docs/RELIABILITY.md.

    INFERMESH_FAULT_REPORT=/tmp/faults.json make test PYTEST_ARGS="-m faults"
    .venv/bin/python -m bench.faults_report /tmp/faults.json
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

_HEADER = (
    "| fault | sent | ok | failed (by status) | hung | slow or unclear failures "
    "| lost log rows | seconds to recover |\n"
    "|---|---:|---:|---|---:|---:|---:|---:|"
)


def render(report: dict[str, Any]) -> str:
    """The Markdown table of a fault report, with a line saying when and where it ran."""
    lines = [
        f"Run {report['date']} on {report['cpus']} CPUs; every request had a "
        f"{report['deadline_s']:g} s deadline.",
        "",
        _HEADER,
    ]
    lines += [_row(row) for row in report["rows"]]
    return "\n".join(lines) + "\n"


def _row(row: dict[str, Any]) -> str:
    failed = ", ".join(f"{count} × {kind}" for kind, count in sorted(row["failed"].items()))
    recover = row["seconds_to_recover"]
    cells = [
        row["fault"], str(row["sent"]), str(row["ok"]), failed or "none", str(row["hung"]),
        str(row["slow_failures"] + row["unclear_failures"]), str(row["lost_log_rows"]),
        "not recovered" if recover is None else f"{recover:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.faults_report REPORT.json", file=sys.stderr)
        return 2
    print(render(orjson.loads(Path(argv[0]).read_bytes())), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
