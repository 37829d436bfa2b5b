"""The same closed-loop load over every protocol the gateway speaks, direct and through the edge.

    python -m bench.protocols [--duration 10] [--concurrency 16]
        [--out bench/results/protocols-DATE.json]

Starts ``infermesh up`` on its own ports (gateway 8020, gRPC 8021, edge 8082, registry 8220),
registers ``big`` (an identity TorchScript module on one FP32 [1, 262144] row = 1 MiB) at
runtime, and waits until it is ready. Then, for ``mlp`` (1 row) and ``big`` (1 row), a closed
loop at ``--concurrency`` over:

- direct (HTTP/1.1 and gRPC ports of the gateway): ``rest-json`` and ``rest-binary``
  (`bench.rawhttp.RawClient`, one keep-alive connection per sender, pre-built body),
  ``grpc`` (grpc.aio unary ModelInfer with ``raw_input_contents``, one channel, C tasks) and
  ``grpc-stream`` (one ModelStreamInfer stream with C requests in flight, matched by id);
- edge (nginx, HTTP/2 h2c prior knowledge): ``rest-json`` and ``rest-binary`` with h2load
  (one connection, C streams: ``-c 1 -m C``) and ``grpc`` (same client, edge address).

Every body is built once. Prints a Markdown table and the ratios against REST JSON per model
and setup (targets: >= 1.0 for mlp, >= 2.0 for big), writes ``.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter, process_time

import grpc
import numpy as np
import orjson
import uvloop
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.credentials import state_dir_of
from bench.loadgen import _Window
from bench.payloads import PAYLOAD_SPECS, PayloadSpec, TensorSpec, infer_path
from bench.rawhttp import RawClient
from bench.report import Run, write_report
from bench.result import ErrorLog, LoadResult, Percentiles
from bench.run_all import start_launcher

GATEWAY_PORT, GRPC_PORT, EDGE_PORT, REGISTRY_PORT = 8020, 8021, 8082, 8220
BIG_WIDTH = 262144
"""FP32 elements per row of ``big``: 1 MiB."""
BIG = PayloadSpec("big", TensorSpec("x", "FP32", BIG_WIDTH), TensorSpec("y", "FP32", BIG_WIDTH))
SPECS = {"mlp": PAYLOAD_SPECS["mlp"], "big": BIG}
MAX_MESSAGE = 64 << 20
TOOLS = ("rest-json", "rest-binary", "grpc", "grpc-stream")
TARGETS = {"mlp": 1.0, "big": 2.0}
"""Minimum ratio against REST JSON each faster protocol should reach, per model."""

_Send = Callable[[], Awaitable[str | None]]


# --- payloads -----------------------------------------------------------------------------


def input_array(spec: PayloadSpec, rows: int = 1, *, seed: int = 0) -> np.ndarray:
    """Seeded FP32 ``[rows, width]`` input."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, spec.input.width), dtype=np.float32)


def json_body(spec: PayloadSpec, array: np.ndarray) -> bytes:
    """OIP v2 JSON infer body."""
    tensor = {"name": spec.input.name, "datatype": spec.input.datatype,
              "shape": list(array.shape), "data": array.reshape(-1)}  # fmt: skip
    return orjson.dumps({"inputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY)


def binary_body(spec: PayloadSpec, array: np.ndarray) -> tuple[bytes, int]:
    """Binary-extension infer body (JSON header, then the raw tensor) and the header length.

    Asks for binary outputs too (``binary_data_output``).
    """
    raw = np.ascontiguousarray(array).tobytes()
    header = orjson.dumps({
        "inputs": [{"name": spec.input.name, "datatype": spec.input.datatype,
                    "shape": list(array.shape), "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    })  # fmt: skip
    return header + raw, len(header)


def grpc_request(spec: PayloadSpec, array: np.ndarray) -> service_pb2.ModelInferRequest:
    """ModelInferRequest with the tensor in ``raw_input_contents``."""
    request = service_pb2.ModelInferRequest(model_name=spec.model)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = spec.input.name, spec.input.datatype
    tensor.shape.extend(array.shape)
    request.outputs.add().name = spec.output.name
    request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request


# --- h2load -------------------------------------------------------------------------------


@dataclass(frozen=True)
class H2Record:
    """One line of h2load's ``--log-file``: start (µs since epoch), status, duration (µs)."""

    start_us: int
    status: int
    duration_us: int


def parse_h2load_log(text: str) -> list[H2Record]:
    """Parse h2load's tab-separated per-request log (extra columns are ignored)."""
    records = []
    for line in text.splitlines():
        columns = line.split("\t")
        if len(columns) >= 3 and columns[0].strip():
            records.append(H2Record(int(columns[0]), int(columns[1]), int(columns[2])))
    return records


def window_result(
    records: Sequence[H2Record], *, warmup: float, duration: float, tool: str, model: str,
    url: str, concurrency: int,
) -> LoadResult:
    """Summarise the requests that started and ended inside ``[t0 + warmup, + duration]``,
    ``t0`` being the first request's start: the same window rule as ``bench.loadgen``."""
    if not records:
        nan = Percentiles.of([])
        return LoadResult(tool=tool, mode="closed", model=model, url=url, duration_s=duration,
                          requests=0, errors=0, rps=0.0, latency=nan, concurrency=concurrency,
                          error_samples=["h2load logged no request"])  # fmt: skip
    start = min(r.start_us for r in records) + warmup * 1e6
    end = start + duration * 1e6
    latencies: list[float] = []
    errors = ErrorLog()
    requests = 0
    for record in records:
        if record.start_us >= start and record.start_us + record.duration_us <= end:
            requests += 1
            if record.status == 200:
                latencies.append(record.duration_us / 1e6)
            else:
                errors.add(f"HTTP {record.status}")
    return LoadResult(
        tool=tool, mode="closed", model=model, url=url, duration_s=duration, requests=requests,
        errors=errors.count, rps=len(latencies) / duration, latency=Percentiles.of(latencies),
        concurrency=concurrency, error_samples=errors.samples,
    )


def run_h2load(
    url: str, body: bytes, headers: dict[str, str], *, tool: str, model: str, concurrency: int,
    duration: float, warmup: float, workdir: Path,
) -> LoadResult:
    """h2load over one h2c connection with ``concurrency`` streams; figures from its log."""
    data, log = workdir / f"{tool}-{model}.body", workdir / f"{tool}-{model}.h2log"
    data.write_bytes(body)
    command = ["h2load", "-c", "1", "-m", str(concurrency),
               "-D", f"{round((warmup + duration) * 1000)}ms", "-d", str(data),
               "--log-file", str(log)]  # fmt: skip
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    done = subprocess.run([*command, url], capture_output=True, text=True, check=False)
    if done.returncode != 0 or not log.exists():
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stdout}{done.stderr}")
    result = window_result(
        parse_h2load_log(log.read_text()), warmup=warmup, duration=duration, tool=tool,
        model=model, url=url, concurrency=concurrency,
    )  # fmt: skip
    log.unlink()
    return result


# --- Python closed loops ------------------------------------------------------------------


async def closed_loop(
    send: _Send, *, tool: str, model: str, url: str, concurrency: int, duration: float,
    warmup: float,
) -> LoadResult:
    """``concurrency`` senders, each awaiting ``send()`` back to back."""
    cpu_at, start = process_time(), perf_counter() + warmup
    window = _Window(start=start, end=start + duration)

    async def sender() -> None:
        while (sent := perf_counter()) < window.end:
            error = await send()
            done = perf_counter()
            if sent >= window.start and done <= window.end:
                window.record(sent, done, error)

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return _finish(window, cpu_at, warmup, tool=tool, model=model, url=url,
                   concurrency=concurrency)  # fmt: skip


def _finish(
    window: _Window, cpu_at: float, warmup: float, *, tool: str, model: str, url: str,
    concurrency: int,
) -> LoadResult:
    result = window.result(tool=tool, mode="closed", model=model, url=url, rows=1)
    result.client_cpu = (process_time() - cpu_at) / (window.end - window.start + warmup)
    result.concurrency = concurrency
    return result


async def rest_loop(
    url: str, body: bytes, headers: dict[str, str] | None, content_type: str, *, tool: str,
    model: str, concurrency: int, duration: float, warmup: float,
) -> LoadResult:
    """REST over HTTP/1.1 keep-alive (`RawClient`), one connection per sender."""
    client = RawClient(url, body, content_type=content_type, headers=headers)

    async def send() -> str | None:
        try:
            status, answer = await client.post()
        except Exception as exc:  # a failed request, never a crashed run
            return f"{type(exc).__name__}: {exc}"
        return None if status == 200 else f"HTTP {status}: {answer[:200]!r}"

    try:
        return await closed_loop(send, tool=tool, model=model, url=url, concurrency=concurrency,
                                 duration=duration, warmup=warmup)  # fmt: skip
    finally:
        client.close()


def _channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ])  # fmt: skip


async def grpc_loop(
    target: str, request: service_pb2.ModelInferRequest, *, tool: str, model: str,
    concurrency: int, duration: float, warmup: float,
) -> LoadResult:
    """Unary ModelInfer: ``concurrency`` tasks on one channel."""
    async with _channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def send() -> str | None:
            try:
                await stub.ModelInfer(request, timeout=30.0)
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
            return None

        return await closed_loop(send, tool=tool, model=model, url=target,
                                 concurrency=concurrency, duration=duration,
                                 warmup=warmup)  # fmt: skip


async def grpc_stream_loop(
    target: str, request: service_pb2.ModelInferRequest, *, model: str, concurrency: int,
    duration: float, warmup: float,
) -> LoadResult:
    """One ModelStreamInfer stream kept at ``concurrency`` requests in flight.

    Each answer (matched to its request by id) lets the writer send the next request, until the
    window closes; then the stream is half-closed and drained.
    """
    cpu_at, start = process_time(), perf_counter() + warmup
    window = _Window(start=start, end=start + duration)
    sent_at: dict[str, float] = {}
    tokens: asyncio.Queue[None] = asyncio.Queue()
    for _ in range(concurrency):
        tokens.put_nowait(None)
    async with _channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer()

        async def writer() -> None:
            number = 0
            while True:
                await tokens.get()
                if perf_counter() >= window.end:
                    break
                number += 1
                request.id = str(number)
                sent_at[request.id] = perf_counter()
                await call.write(request)
            await call.done_writing()

        async def reader() -> None:
            async for answer in call:
                done = perf_counter()
                sent = sent_at.pop(answer.infer_response.id, None)
                if sent is None:
                    window.errors.add(f"answer with unknown id {answer.infer_response.id!r}")
                    continue
                if sent >= window.start and done <= window.end:
                    window.record(sent, done, answer.error_message or None)
                tokens.put_nowait(None)

        await asyncio.gather(writer(), reader())
    return _finish(window, cpu_at, warmup, tool="grpc-stream", model=model, url=target,
                   concurrency=concurrency)  # fmt: skip


# --- the mesh -----------------------------------------------------------------------------


def build_big(path: Path) -> None:
    """TorchScript identity ``y = x * 1.0`` (a fresh tensor) saved at ``path``."""
    import torch

    class Identity(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 1.0

    torch.jit.save(torch.jit.script(Identity()), str(path))


def register_big(args: argparse.Namespace, artifact: Path, gateway: str) -> None:
    """Register ``big`` with the registry and wait until the gateway says it is ready."""
    command = [args.infermesh, "models", "register", "big", "--version", "1",
               "--artifact", str(artifact), "--input", f"x:FP32:-1,{BIG_WIDTH}",
               "--output", f"y:FP32:-1,{BIG_WIDTH}", "--max-batch-size", "4",
               "--registry", f"http://127.0.0.1:{args.registry_port}"]  # fmt: skip
    state_dir = state_dir_of(f"http://127.0.0.1:{args.registry_port}")
    command += [] if state_dir is None else ["--state-dir", str(state_dir)]
    subprocess.run(command, check=True, capture_output=True)
    deadline = time.monotonic() + args.ready_timeout
    while True:
        try:
            with urllib.request.urlopen(f"{gateway}/v2/models/big/ready", timeout=2.0) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"big not ready after {args.ready_timeout:.0f}s")
        time.sleep(0.5)


# --- report -------------------------------------------------------------------------------


@dataclass
class ProtocolReport:
    """Every run of one invocation, and the ratios against REST JSON."""

    command: str
    started: datetime
    concurrency: int
    runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def find(self, setup: str, model: str, tool: str) -> LoadResult | None:
        """The run of ``tool`` for ``model`` through ``setup``."""
        for run in self.runs:
            if (run.setup, run.result.model, run.result.tool) == (setup, model, tool):
                return run.result
        return None

    def ratios(self) -> list[tuple[str, str, str, float]]:
        """(model, setup, tool, req/s of tool ÷ req/s of rest-json) for every pair measured."""
        found = []
        for model in SPECS:
            for setup in ("direct", "edge"):
                base = self.find(setup, model, "rest-json")
                for tool in TOOLS[1:]:
                    top = self.find(setup, model, tool)
                    if base and base.rps and top:
                        found.append((model, setup, tool, top.rps / base.rps))
        return found

    def markdown(self) -> str:
        """The table and the ratios, ready for docs/PERFORMANCE.md."""
        lines = [
            f"Protocols, closed loop c={self.concurrency}, 1 row per request "
            f"(`big`: FP32 [1, {BIG_WIDTH}] = 1 MiB in and out). `{self.command}`, "
            f"{self.started:%Y-%m-%d %H:%M} UTC, load average before: {_loadavg()}.",
            "",
            "| model | setup | protocol | req/s | p50 ms | p99 ms | errors | client CPU |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for run in self.runs:
            r = run.result
            cpu = "n/a" if r.client_cpu is None else f"{r.client_cpu:.0%}"
            lines.append(f"| {r.model} | {run.setup} | {r.tool} | {r.rps:,.0f} | "
                         f"{r.latency.p50:.2f} | {r.latency.p99:.2f} | {r.errors} | {cpu} |")
        lines += ["", "| model | setup | ratio | value | target | met |",
                  "|---|---|---|---:|---:|---|"]
        for model, setup, tool, value in self.ratios():
            target = TARGETS[model]
            met = "yes" if value >= target else "**no**"
            lines.append(f"| {model} | {setup} | {tool} ÷ rest-json | {value:.2f} | "
                         f"≥ {target:.1f} | {met} |")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "command": self.command, "started": self.started.isoformat(),
            "concurrency": self.concurrency, "notes": self.notes,
            "runs": [{"setup": run.setup, **run.result.to_dict()} for run in self.runs],
            "ratios": [{"model": m, "setup": s, "tool": t, "ratio_vs_rest_json": round(v, 4)}
                       for m, s, t, v in self.ratios()],
        }  # fmt: skip


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# --- main ---------------------------------------------------------------------------------


def measure_model(
    report: ProtocolReport, args: argparse.Namespace, model: str, workdir: Path
) -> None:
    """Every protocol for ``model``, direct then through the edge."""
    spec = SPECS[model]
    array = input_array(spec)
    as_json = json_body(spec, array)
    binary, header_length = binary_body(spec, array)
    binary_headers = {"Inference-Header-Content-Length": str(header_length)}
    request = grpc_request(spec, array)
    c, d, w = args.concurrency, args.duration, args.warmup
    direct = f"http://127.0.0.1:{args.gateway_port}{infer_path(model)}"
    edge = f"http://127.0.0.1:{args.edge_port}{infer_path(model)}"
    grpc_direct, grpc_edge = f"127.0.0.1:{args.grpc_port}", f"127.0.0.1:{args.edge_port}"

    def record(setup: str, result: LoadResult) -> None:
        report.runs.append(Run(setup, result))
        print(f"{setup}: {result.summary_line()}", flush=True)

    record("direct", uvloop.run(rest_loop(
        direct, as_json, None, "application/json", tool="rest-json", model=model,
        concurrency=c, duration=d, warmup=w)))
    record("direct", uvloop.run(rest_loop(
        direct, binary, binary_headers, "application/octet-stream", tool="rest-binary",
        model=model, concurrency=c, duration=d, warmup=w)))
    record("direct", uvloop.run(grpc_loop(
        grpc_direct, request, tool="grpc", model=model, concurrency=c, duration=d, warmup=w)))
    record("direct", uvloop.run(grpc_stream_loop(
        grpc_direct, request, model=model, concurrency=c, duration=d, warmup=w)))
    record("edge", run_h2load(
        edge, as_json, {"content-type": "application/json"}, tool="rest-json", model=model,
        concurrency=c, duration=d, warmup=w, workdir=workdir))
    record("edge", run_h2load(
        edge, binary, {"content-type": "application/octet-stream", **binary_headers},
        tool="rest-binary", model=model, concurrency=c, duration=d, warmup=w, workdir=workdir))
    record("edge", uvloop.run(grpc_loop(
        grpc_edge, request, tool="grpc", model=model, concurrency=c, duration=d, warmup=w)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.protocols",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per run")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--models", nargs="+", choices=sorted(SPECS), default=list(SPECS))
    parser.add_argument("--out", type=Path,
                        help="JSON path (default bench/results/protocols-DATE.json)")
    parser.add_argument("--infermesh", default=".venv/bin/infermesh", help="launcher executable")
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds")
    parser.add_argument("--gateway-port", type=int, default=GATEWAY_PORT)
    parser.add_argument("--grpc-port", type=int, default=GRPC_PORT)
    parser.add_argument("--edge-port", type=int, default=EDGE_PORT)
    parser.add_argument("--registry-port", type=int, default=REGISTRY_PORT)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Start the mesh, register ``big``, measure every protocol, write the report."""
    args = _parser().parse_args(argv)
    started = datetime.now(UTC)
    command = shlex.join(
        ["python", "-m", "bench.protocols", *(sys.argv[1:] if argv is None else argv)]
    )
    report = ProtocolReport(command=command, started=started, concurrency=args.concurrency)
    out = args.out or Path("bench/results") / f"protocols-{started:%Y-%m-%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.with_suffix(".logs")
    logs.mkdir(exist_ok=True)
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found (Debian package nghttp2-client)")
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="protocols-")))
        gateway = start_launcher(
            stack, args, logs, "mesh", ports=(args.gateway_port, args.registry_port),
            # Auth off: this compares wire protocols; bench.run_all measures with auth on.
            extra_env={"INFERMESH_GATEWAY_GRPC_PORT": str(args.grpc_port),
                       "INFERMESH_EDGE": "1", "INFERMESH_EDGE_PORT": str(args.edge_port),
                       "INFERMESH_GATEWAY_AUTH": "0"},
        )  # fmt: skip
        if "big" in args.models:
            artifact = workdir / "big.pt"
            build_big(artifact)
            register_big(args, artifact, gateway)
        for model in args.models:
            measure_model(report, args, model, workdir)
    write_report(report, out, logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
