#!/usr/bin/env bash
# Idempotent bootstrap for a fresh Debian machine: system packages, then the project venv.
# Fast (well under 2 s) when everything is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

have_pg_ctl() {
    compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null
}

missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
have_pg_ctl || missing+=(postgresql)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
# curl: an HTTP/2 client that honours GOAWAY (tests/deploy/test_edge.py reloads nginx under it).
command -v curl >/dev/null 2>&1 || missing+=(curl)
# kubectl 1.20 (`kubectl kustomize` renders deploy/k8s in tests); any kubectl already here will do.
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || missing+=(iproute2)
# Debian's python3.11 with venv: the Triton tests make pytriton's own venv from it.
/usr/bin/python3.11 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3.11-venv)

if [ "${#missing[@]}" -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]}" >&2
    $SUDO apt-get update -qq >/dev/null
    # Installing postgresql may start a cluster on 5432 via its service; infermesh never uses it.
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv" >&2
    python3 -m venv .venv
fi

stamp=.venv/.infermesh-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
    echo "bootstrap: installing python dependencies" >&2
    # torch is named explicitly so pip resolves the CPU wheel this machine's index serves.
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' torch==2.13.0
    printf '%s\n' "$want" >"$stamp"
fi
