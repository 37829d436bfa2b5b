"""The HTTP/2 edge: nginx in front of the gateway (aiohttp has no HTTP/2).

`start_edge` renders `deploy/nginx/edge.conf` into a state dir and runs nginx in the
foreground as a child process: h2c on one port for REST and gRPC alike, and TLS h2 on another
when a certificate and key are given. The same rendered file works as a reference config for
deployments (`python -m deploy.edge --port 8080 --rest HOST:PORT --grpc HOST:PORT`).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from services.gateway import grpc_bridge

TEMPLATE = "nginx/edge.conf"


@dataclass(frozen=True)
class EdgeConfig:
    """Where the edge listens and what it fronts."""

    h2c_port: int
    rest_upstream: str
    """host:port of the gateway's REST (aiohttp) listener."""
    grpc_upstream: str
    """host:port of the gateway's gRPC listener."""
    host: str = "127.0.0.1"
    tls_port: int | None = None
    certificate: Path | None = None
    key: Path | None = None
    max_body: str = "64m"
    max_conns: int = 512
    """Requests the edge keeps in flight at the gateway's REST port at once; past it nginx
    answers 503 with Retry-After itself, in C, for a few microseconds (see edge.conf)."""
    model_conns: int = 128
    """Inference requests (`/v2/models/{name}[/versions/{v}]/infer`) the edge keeps in flight
    for one model at once; past it nginx answers 503 with Retry-After itself (0: no bound
    per model, only `max_conns`). A few dozen keep a worker busy (a closed loop of 64 reaches
    each demo model's capacity); more only queue in front of the gateway's loop and the
    batcher, where a 50 ms request expired and a burst's admitted ones waited seconds
    (docs/PERFORMANCE.md, "In flight at the gateway, bounded per model")."""
    model_bounds: tuple[tuple[str, int], ...] = ()
    """(model, bound) pairs overriding `model_conns` for those models: the registry's
    `edge_inflight` (deploy/edge_bounds.py keeps a running edge's equal to it)."""
    grpc_bridge: bool = True
    """Unary gRPC ModelInfer to the gateway's REST port as HTTP/1.1 (services/gateway/
    grpc_bridge.py), not to grpc.aio: nginx parses the HTTP/2 and the call costs the gateway
    about what a REST request does (docs/PERFORMANCE.md, "gRPC through the edge")."""


def render(config: EdgeConfig, prefix: Path) -> str:
    """The nginx configuration text for `config`, with runtime files under `prefix`."""
    template = resources.files("deploy").joinpath(TEMPLATE).read_text()
    tls = config.tls_port and config.certificate and config.key
    tls_listen = (
        f"        listen {config.host}:{config.tls_port} ssl http2;\n"
        f"        ssl_certificate {config.certificate};\n"
        f"        ssl_certificate_key {config.key};\n"
        if tls else ""
    )
    return template.format(
        prefix=prefix, max_body=config.max_body, rest_upstream=config.rest_upstream,
        max_conns=config.max_conns,
        grpc_upstream=config.grpc_upstream, h2c_listen=f"{config.host}:{config.h2c_port}",
        tls_listen=tls_listen, grpc_bridge=_grpc_bridge() if config.grpc_bridge else "",
        **_model_limit(config.model_conns, dict(config.model_bounds)),
        tls_block_note=f"TLS h2 on {config.host}:{config.tls_port}" if tls else "no TLS listener",
    )


def _model_limit(default: int, bounds: Mapping[str, int]) -> dict[str, str]:
    """The per-model bounds on inference requests in flight (`limit_conn`, keyed by the model
    in the path: under HTTP/2 nginx counts each stream as a connection; an empty key, any
    other path or model, is not counted): `bounds[model]` for the models named there, and
    `default` for every other (0: none); nothing when no model is bounded."""
    own: dict[str, int] = {}
    for model, n in bounds.items():
        # nginx's map matches strings without case: models named alike share the larger.
        own[model.lower()] = max(n, own.get(model.lower(), 0))
    own = {model: n for model, n in sorted(own.items()) if n > 0 and n != default}
    if default <= 0 and not own:
        return {"model_limit": "", "model_limit_location": "", "model_limit_answer": ""}
    http = [
        "    map $uri $infermesh_infer_model {",
        '        "~^/v2/models/([^/]+)(/versions/[^/]+)?/infer$" $1;',
        '        default "";',
        "    }",
        "    map $infermesh_infer_model $infermesh_model_bound {",
        *(f'        "{model}" {n};' for model, n in own.items()),
        f"        default {default};",
        "    }",
    ]
    location = []
    if default > 0:
        http += ["    map $infermesh_infer_model $infermesh_model_default {",
                 *(f'        "{model}" "";' for model in own),
                 "        default $infermesh_infer_model;", "    }",
                 "    limit_conn_zone $infermesh_model_default zone=infermesh_models:1m;"]
        location.append(f"            limit_conn infermesh_models {default};")
    # A zone per model, named after it: a reload that changes the bound reuses the zone, so
    # the requests already in flight still count against the new bound.
    for index, (model, n) in enumerate(own.items()):
        http += [f"    map $infermesh_infer_model $infermesh_model_{index} {{",
                 f'        "{model}" $infermesh_infer_model;', '        default "";', "    }",
                 f"    limit_conn_zone $infermesh_model_{index} zone=infermesh_model_{model}:64k;"]
        location.append(f"            limit_conn infermesh_model_{model} {n};")
    http += ["    limit_conn_status 503;", "    limit_conn_log_level info;"]
    location.append("            error_page 503 = @model_busy;")  # nginx's own 503s only
    return {
        "model_limit": "\n".join(http) + "\n",
        "model_limit_location": "\n".join(location) + "\n",
        "model_limit_answer": (
            "        location @model_busy {\n"
            "            default_type application/json;\n"
            "            add_header Retry-After 1 always;\n"
            "            return 503 '{\"error\": \"overloaded: the edge has $infermesh_model_bound "
            "requests for this model in flight\"}';\n"
            "        }\n"
        ),
    }


def _grpc_bridge() -> str:
    """The location sending unary ModelInfer to the REST upstream: the gateway answers with
    the call's status and metadata in headers, which this moves into HTTP/2 trailers."""
    lines = [f"        location = {grpc_bridge.PATH} {{"]
    lines += [f"            {line}" for line in (
        "proxy_pass http://infermesh_rest;", "proxy_http_version 1.1;",
        'proxy_set_header Connection "";', "proxy_set_header Host $host;",
        "proxy_set_header X-Request-Id $infermesh_request_id;",
        'proxy_set_header X-Request-Start "t=${msec}";',
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Real-IP $remote_addr;",
        # The whole message first (in memory up to 1 MiB): the gateway then gets it with
        # the headers and a Content-Length, not chunked.
        "client_body_buffer_size 1m;", "proxy_buffering off;",
        "proxy_read_timeout 3600s;", "proxy_send_timeout 3600s;",
        "error_page 502 = @overloaded;",
    )]
    for name in grpc_bridge.TRAILERS:
        variable = "$upstream_http_" + name.replace("-", "_")
        lines += [f"            proxy_hide_header {name};",
                  f"            add_trailer {name} {variable} always;"]
    return "\n".join([*lines, "        }"]) + "\n"


def nginx_binary() -> str | None:
    """The nginx executable, if installed."""
    return shutil.which("nginx") or next(
        (str(p) for p in (Path("/usr/sbin/nginx"),) if p.exists()), None
    )


class Edge:
    """A running nginx edge; `stop()` ends it (idempotent)."""

    def __init__(self, process: subprocess.Popen[bytes], prefix: Path) -> None:
        self.process = process
        self.prefix = prefix

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish open requests
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        deadline = time.monotonic() + 5
        pid_file = self.prefix / "nginx.pid"
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def reload(self, config: EdgeConfig) -> None:
        """Run with `config` from now on (nginx's reload: the new configuration is checked
        first, and a rejected one leaves the running one in place, raising with nginx's
        words); returns once every old worker has stopped taking connections, so each new
        one gets `config`. Requests in flight finish on the old workers (an HTTP/2 client
        there gets GOAWAY naming its streams as still served)."""
        binary = nginx_binary()
        assert binary is not None, "a running edge has an nginx"
        candidate = self.prefix / "nginx.conf.next"
        candidate.write_text(render(config, self.prefix))
        _check(binary, candidate, self.prefix)
        candidate.replace(self.prefix / "nginx.conf")
        old = _children(self.process.pid)
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not (_children(self.process.pid) - old
                   and all(_shutting_down(pid) for pid in old)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nginx did not reload: "
                                   f"{(self.prefix / 'error.log').read_text()[-2000:]}")
            time.sleep(0.01)


def _children(pid: int) -> set[int]:
    """The processes `pid` started (nginx's master: its workers)."""
    try:
        return set(map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()))
    except OSError:
        return set()


def _shutting_down(pid: int) -> bool:
    """Whether nginx worker `pid` has exited or is past taking connections: a worker sets
    this title on the master's graceful stop, then closes its listening sockets."""
    try:
        return b"shutting down" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _check(binary: str, conf: Path, prefix: Path) -> None:
    """RuntimeError with nginx's words unless nginx accepts `conf`."""
    check = subprocess.run([binary, "-t", "-q", "-c", str(conf), "-p", str(prefix)],
                           capture_output=True, text=True)  # fmt: skip
    if check.returncode != 0:
        raise RuntimeError(f"nginx rejected {conf}: {check.stderr.strip()}")


def start_edge(config: EdgeConfig, prefix: Path) -> Edge:
    """Render the config under `prefix` and start nginx; raises with its log on failure."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx)")
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render(config, prefix))
    _check(binary, conf, prefix)
    log = (prefix / "nginx.out").open("ab")
    process = subprocess.Popen([binary, "-c", str(conf), "-p", str(prefix)], stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    log.close()
    edge = Edge(process, prefix)
    _wait_listening(edge, config)
    return edge


def _wait_listening(edge: Edge, config: EdgeConfig, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if edge.process.poll() is not None:
            raise RuntimeError(f"nginx exited: {(edge.prefix / 'error.log').read_text()[-2000:]}")
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex((config.host, config.h2c_port)) == 0:
                return
        time.sleep(0.05)
    edge.stop()
    raise RuntimeError(f"nginx did not listen on {config.host}:{config.h2c_port}")


def main(argv: list[str] | None = None) -> int:
    """Print the rendered configuration (for deployments that run their own nginx)."""
    parser = argparse.ArgumentParser(prog="python -m deploy.edge", description=__doc__)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--rest", default="127.0.0.1:8000")
    parser.add_argument("--grpc", default="127.0.0.1:8001")
    parser.add_argument("--prefix", type=Path, default=Path("/var/lib/infermesh-edge"))
    args = parser.parse_args(argv)
    sys.stdout.write(render(EdgeConfig(args.port, args.rest, args.grpc), args.prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
