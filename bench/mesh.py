"""A running mesh as the issue-19 benchmarks see it (`bench.features`, `bench.cache`,
`bench.jobs`): where its services listen, JSON calls to them, their Prometheus counters, and
an open loop of h2load processes, each with its own body.

Why several h2load processes: h2load sends one body per process (``-d``), and what varies per
request in these benchmarks (the entity id of a feature lookup) lives in the body's
``parameters``; one process per body, at an equal share of the rate, varies it over a small set.
"""

from __future__ import annotations

import argparse
import re
import secrets
import signal
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from bench.credentials import auth_headers, remember_key, state_dir_of
from bench.goodput import unlimited_tenant
from bench.h2load import Arrivals, Response, parse_log, run_together, started_requests
from bench.run_all import start_launcher

SERVING = re.compile(rb"serving on (http://\S+)")
IDLE_S = 10
"""h2load gives up a connection silent this long (a hung server ends the run, not the bench)."""


@dataclass(frozen=True)
class Mesh:
    """An ``infermesh up`` started by a benchmark; requests go as a tenant that never hits a
    quota (``bench.goodput.unlimited_tenant``)."""

    gateway: str
    registry: str
    state_dir: Path

    def service_url(self, log_name: str) -> str:
        """Where a service (``router``, ``worker-mlp``) listens, from its log's first line."""
        log = self.state_dir / "logs" / f"{log_name}.log"
        found = SERVING.search(log.read_bytes()) if log.exists() else None
        if found is None:
            raise RuntimeError(f"{log} names no address (is the service running?)")
        return found.group(1).decode()


def start_mesh(
    stack: ExitStack, args: argparse.Namespace, logs: Path, ports: tuple[int, int]
) -> Mesh:
    """``infermesh up`` on ``ports`` (gateway, registry; control API on registry - 100),
    stopped when ``stack`` closes, with an unlimited tenant whose key every call sends."""
    token = secrets.token_urlsafe(16)
    gateway = start_launcher(stack, args, logs, "mesh", ports=ports,
                             extra_env={"INFERMESH_CONTROL_ADMIN_TOKENS": f"bench:{token}"})
    registry = f"http://127.0.0.1:{ports[1]}"
    remember_key(gateway, unlimited_tenant(f"http://127.0.0.1:{ports[1] - 100}", token))
    state_dir = state_dir_of(registry)
    if state_dir is None:
        raise RuntimeError("the launcher wrote no mesh credential")
    return Mesh(gateway, registry, state_dir)


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so the mesh started is stopped."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, headers, body parsed as JSON (``None`` if empty or not JSON)."""

    status: int
    headers: dict[str, str]
    body: Any


def call(base: str, method: str, path: str, body: object = None, *, timeout: float = 30.0,
         raw: bytes | None = None, headers: dict[str, str] | None = None) -> Answer:  # fmt: skip
    """A JSON call (``raw``: bytes as they are) with the credential remembered for ``base``.
    Redirects are not followed: a job's 303 is an answer here."""
    data = raw if raw is not None else (None if body is None else orjson.dumps(body))
    request = urllib.request.Request(
        base + path, method=method, data=data,
        headers={"Content-Type": "application/json", **auth_headers(base), **(headers or {})},
    )  # fmt: skip
    try:
        with _NO_REDIRECTS.open(request, timeout=timeout) as response:
            return Answer(response.status, dict(response.headers), _json(response.read()))
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, dict(exc.headers), _json(exc.read()))


def ok(answer: Answer, what: str) -> Any:
    """The body of a 2xx answer; else an error naming ``what`` and the answer."""
    if not 200 <= answer.status < 300:
        raise RuntimeError(f"{what}: {answer.status} {str(answer.body)[:500]}")
    return answer.body


class _KeepRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_NO_REDIRECTS = urllib.request.build_opener(_KeepRedirects)


def _json(data: bytes) -> Any:
    try:
        return orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        return None


def metric_total(url: str, sample: str, **labels: str) -> float:
    """The sum of ``sample`` (a full sample name, e.g. ``..._total``) over the series at
    ``url``/metrics whose labels include ``labels``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10.0) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == sample and labels.items() <= s.labels.items())  # fmt: skip


@dataclass(frozen=True)
class OpenRun:
    """What the h2load processes of one open loop logged, and what they cost."""

    responses: list[Response]
    client_cpu_s: float
    unanswered: int
    """Requests started but never answered before the run ended."""


def open_loop(
    url: str, bodies: Sequence[bytes], *, rate: float, connections: int, seconds: float,
    logs: Path, name: str,
) -> OpenRun:
    """``rate`` req/s in all to ``url`` for ``seconds``: one h2load process per body, each at
    an equal share over ``connections / len(bodies)`` HTTP/1.1 connections sending on an even
    grid (``bench.h2load.Arrivals``). h2load's summaries land in ``logs/{name}-N.out``."""
    share, per_process = rate / len(bodies), max(1, connections // len(bodies))
    period_ms = max(1, round(per_process / share * 1000))
    headers = ["Content-Type: application/json",
               *(f"{k}: {v}" for k, v in auth_headers(url).items())]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="infermesh-open-") as tmp:
        commands, summaries, tsvs = [], [], []
        for index, body in enumerate(bodies):
            arrivals = Arrivals.plan(share, period_ms=period_ms, duty=1.0, seconds=seconds)
            script, data = Path(tmp) / f"{index}.script", Path(tmp) / f"{index}.json"
            script.write_text(arrivals.timing_script(url))
            data.write_bytes(body)
            tsvs.append(Path(tmp) / f"{index}.tsv")
            summaries.append(logs / f"{name}-{index}.out")
            commands.append(arrivals.command(script, data, tsvs[-1], headers, idle_s=IDLE_S))
        cpu = run_together(commands, summaries, timeout=seconds + 120)
        responses = [r for tsv in tsvs for r in parse_log(tsv.read_text())]
    started = sum(started_requests(path.read_text()) for path in summaries)
    return OpenRun(responses, cpu, started - len(responses))
