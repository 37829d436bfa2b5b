"""A model report's query string as a `ReportQuery`; every error names the parameter."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from services.gateway.feedback import KIND
from services.mesh.domain.errors import InvalidInput

MAX_BANDS = 100
MAX_SINCE = timedelta(days=366)
PARAMETERS = ("since", "buckets", "include_shadow", "label_kind", "score_kind")
_DURATION = re.compile(r"([0-9]{1,6})([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TRUE, _FALSE = ("", "1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True, slots=True)
class ReportQuery:
    """What a report covers, from the query string."""

    since: str = "24h"
    """As given: 30m, 24h, 7d, ..."""
    window: timedelta = timedelta(hours=24)
    buckets: int = 10
    """Bands the bucket space [0, 10000) is cut into."""
    include_shadow: bool = False
    label_kind: str = "label"
    score_kind: str = "score"

    def to_json(self) -> dict[str, Any]:
        return {"since": self.since, "buckets": self.buckets,
                "include_shadow": self.include_shadow, "label_kind": self.label_kind,
                "score_kind": self.score_kind}


def parse_report_query(params: Mapping[str, str]) -> ReportQuery:
    """A ReportQuery from query parameters; InvalidInput names the parameter at fault."""
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise InvalidInput(f"{unknown[0]}: unknown parameter (allowed: {', '.join(PARAMETERS)})")
    since = params.get("since", "24h")
    return ReportQuery(
        since=since, window=parse_since(since), buckets=_buckets(params.get("buckets")),
        include_shadow=_flag("include_shadow", params.get("include_shadow")),
        label_kind=_kind("label_kind", params.get("label_kind", "label")),
        score_kind=_kind("score_kind", params.get("score_kind", "score")),
    )


def parse_since(text: str) -> timedelta:
    """`30m`, `24h`, `7d`, `2w` (or seconds: `90s`) as a timedelta, up to 366 days."""
    match = _DURATION.fullmatch(text.strip())
    window = None
    if match is not None:
        window = timedelta(seconds=int(match.group(1)) * _SECONDS[match.group(2)])
    if window is None or not timedelta(0) < window <= MAX_SINCE:
        raise InvalidInput(
            f"since: must be a duration like 30m, 24h or 7d, at most 366d; got {text!r}"
        )
    return window


def _buckets(raw: str | None) -> int:
    if raw is None:
        return 10
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_BANDS:
        raise InvalidInput(f"buckets: must be an integer in [1, {MAX_BANDS}], got {raw!r}")
    return int(raw)


def _flag(name: str, raw: str | None) -> bool:
    if raw is None:
        return False
    value = raw.strip().lower()  # a bare `?include_shadow` reads "": true
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidInput(f"{name}: must be true or false, got {raw!r}")


def _kind(name: str, raw: str) -> str:
    if KIND.fullmatch(raw) is None:
        raise InvalidInput(f"{name}: must match [a-z][a-z0-9_.-]{{0,63}}, got {raw!r}")
    return raw
