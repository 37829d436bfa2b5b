"""What the mesh checks of control-plane data before it touches a file, a URL or a process.

Anyone who can write etcd (or the registry) writes the records every service acts on: a
`models/` record names a file (by its sha256), a URL to download and a batch size to allocate.
These checks run where such data enters: the registry's validation, the catalog's parse of
`models/` records, the worker's artifact fetch and the launcher's worker fleet. Each raises
InvalidInput whose message starts with the offending field. Pure: no I/O.

Artifact stores are named by strings: an `http(s)://host:port[/path]`
base URL of the registry (its artifacts live at `{base}/v1/artifacts/{sha256}`, the form the
registry writes), or a `file:///directory` (a local store: any file below that directory).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.tensors import DTYPES
from services.mesh.domain.types import BatchingPolicy, ModelVersion, Signature

MAX_NAME_LENGTH = 64
MAX_BATCH_SIZE = 4096
"""Largest `max_batch_size`: a worker's warm-up allocates that many rows."""
MAX_QUEUE_SIZE = 1 << 20
MAX_BATCHERS = 64
"""Most batcher instances one model spreads over (`batchers`): each ranks every peer per key."""
MAX_EDGE_INFLIGHT = 65_536
"""Largest `edge_inflight`: the edge's worker has 4,096 connections; a bound far above that
is no bound, and a typo's zeros must not reach nginx's configuration."""
MAX_PREFERRED_SIZES = 64
MAX_QUEUE_DELAY_MS = 60_000.0
MAX_TIMEOUT_MS = 3_600_000.0
MAX_RANK = 8
MAX_DIM = 1 << 20
MAX_ROW_ELEMENTS = 1 << 24
"""Largest product of a tensor's fixed non-batch dims: elements one row holds."""
MAX_TENSORS = 64
"""Most inputs (or outputs) a signature declares."""

ARTIFACT_PATH = "/v1/artifacts/"
"""Where below its base URL the registry serves artifacts (`{base}/v1/artifacts/{sha256}`)."""

_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME_LENGTH - 1}}}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_name(value: Any, *, field: str) -> str:
    """`value` if it is a safe etcd key segment and file name (a model, version or platform):
    1-64 letters, digits, '_', '.', '-', starting with a letter or digit; else InvalidInput."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidInput(
            f"{field}: must be 1-{MAX_NAME_LENGTH} characters of letters, digits, '_', '.', '-' "
            "starting with a letter or digit"
        )
    return value


def check_sha256(value: Any, *, field: str = "sha256") -> str:
    """`value` if it is 64 lowercase hex digits, else InvalidInput naming `field`."""
    if not isinstance(value, str) or not _SHA256.match(value):
        raise InvalidInput(f"{field}: must be 64 lowercase hex digits")
    return value


def check_batching(policy: BatchingPolicy, *, field: str = "batching") -> BatchingPolicy:
    """`policy` if its sizes, delays and timeouts are within the mesh's upper bounds."""
    _at_most(policy.max_batch_size, MAX_BATCH_SIZE, f"{field}: 'max_batch_size'", low=1)
    _at_most(policy.max_queue_size, MAX_QUEUE_SIZE, f"{field}: 'max_queue_size'", low=1)
    _at_most(policy.max_queue_delay_ms, MAX_QUEUE_DELAY_MS, f"{field}: 'max_queue_delay_ms'")
    _at_most(policy.batchers, MAX_BATCHERS, f"{field}: 'batchers'", low=1)
    if policy.edge_inflight is not None:
        _at_most(policy.edge_inflight, MAX_EDGE_INFLIGHT, f"{field}: 'edge_inflight'", low=1)
    if policy.default_timeout_ms is not None:
        _at_most(policy.default_timeout_ms, MAX_TIMEOUT_MS, f"{field}: 'default_timeout_ms'")
    if len(policy.preferred_batch_sizes) > MAX_PREFERRED_SIZES:
        raise InvalidInput(
            f"{field}: 'preferred_batch_sizes' may list at most {MAX_PREFERRED_SIZES} sizes"
        )
    for size in policy.preferred_batch_sizes:
        _at_most(size, policy.max_batch_size, f"{field}: 'preferred_batch_sizes'", low=1)
    return policy


def check_signature(signature: Signature, *, field: str = "signature") -> Signature:
    """`signature` if it declares at most `MAX_TENSORS` tensors a side, each of rank at most
    `MAX_RANK`, dims at most `MAX_DIM` and at most `MAX_ROW_ELEMENTS` elements a row."""
    for side, specs in (("inputs", signature.inputs), ("outputs", signature.outputs)):
        if len(specs) > MAX_TENSORS:
            raise InvalidInput(f"{field}: at most {MAX_TENSORS} {side}")
        for spec in specs:
            where = f"{field}: {side[:-1]} '{spec.name[:64]}' shape"
            if len(spec.shape) > MAX_RANK:
                raise InvalidInput(f"{where}: rank must be at most {MAX_RANK}")
            row = 1
            for dim in spec.shape[1:]:
                _at_most(dim, MAX_DIM, where, low=-1)
                row *= max(dim, 1)
            if spec.shape:
                _at_most(spec.shape[0], MAX_DIM, where, low=-1)
            if row > MAX_ROW_ELEMENTS:
                raise InvalidInput(f"{where}: at most {MAX_ROW_ELEMENTS} elements a row")
    return signature


DEFAULT_MAX_FRAME_BYTES = 64 << 20
"""The mesh's largest link message by default (`max_frame_bytes`, `INFERMESH_MAX_FRAME_BYTES`)."""
FRAME_OVERHEAD = 64 << 10
"""Room a frame keeps for its header (request ids, tenants, traces) beside the tensor bytes."""


def largest_batch_bytes(signature: Signature, max_batch_size: int) -> int | None:
    """Tensor bytes of the larger side (inputs or outputs: each travels in its own frame) of
    a full batch; None when a row's size is not fixed (a variable non-batch dim, or BYTES)."""
    sides = []
    for specs in (signature.inputs, signature.outputs):
        total = 0
        for spec in specs:
            if spec.datatype not in DTYPES or any(d < 0 for d in spec.shape[1:]):
                return None
            row = DTYPES[spec.datatype].itemsize
            for dim in spec.shape[1:]:
                row *= dim
            total += row * max_batch_size
        sides.append(total)
    return max(sides)


def check_frame_fit(
    signature: Signature, policy: BatchingPolicy, *, max_frame_bytes: int,
    field: str = "batching",
) -> None:
    """InvalidInput naming `max_batch_size` when a full batch would not fit in one link frame:
    the frame limit and the largest valid batch must agree, or the batch would be refused
    between hops after it was admitted."""
    size = largest_batch_bytes(signature, policy.max_batch_size)
    if size is not None and size + FRAME_OVERHEAD > max_frame_bytes:
        raise InvalidInput(
            f"{field}: 'max_batch_size' {policy.max_batch_size}: a full batch is {size} bytes "
            f"of tensors, over the mesh's frame limit of {max_frame_bytes} bytes "
            "(max_frame_bytes); lower max_batch_size or raise the limit on every service"
        )


def check_version_record(record: ModelVersion, *, key: str | None = None) -> ModelVersion:
    """`record` (a `models/` record) if its names, sha256, signature and batching are safe;
    with `key` (`models/{model}/{version}`), also that the key names the same version."""
    check_name(record.model, field="model")
    check_name(record.version, field="version")
    check_name(record.platform, field="platform")
    check_sha256(record.sha256)
    check_signature(record.signature)
    check_batching(record.batching)
    if key is not None and key != f"models/{record.model}/{record.version}":
        raise InvalidInput(
            f"model: the record names {record.model}/{record.version}, its key {key[:200]!r}"
        )
    return record


def parse_version_key(key: str) -> tuple[str, str]:
    """(model, version) of a `models/{model}/{version}` key; InvalidInput if either part is
    not a safe name (or there are more or fewer parts)."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "models":
        raise InvalidInput(f"key: {key[:200]!r} is not models/<model>/<version>")
    return check_name(parts[1], field="model"), check_name(parts[2], field="version")


RECORD_ERRORS = (InvalidInput, AttributeError, KeyError, TypeError, ValueError)
"""What `trusted_version` raises for a record that does not parse or fails a check."""


def trusted_version(key: str, record: Any) -> ModelVersion:
    """The `models/{model}/{version}` record `record` at `key`, parsed, once it and its key
    pass the trust checks; one of RECORD_ERRORS naming the problem otherwise."""
    parse_version_key(key)
    if not isinstance(record, dict):
        raise InvalidInput("record: not a JSON object")
    return check_version_record(ModelVersion.from_json(record), key=key)


def check_store(store: str) -> str:
    """`store` if it names an artifact store: an http(s) base URL without query, fragment or
    credentials, or an absolute `file:///directory` without `..`."""
    parts = urlsplit(store)
    if parts.scheme in ("http", "https"):
        if not parts.hostname or parts.query or parts.fragment or parts.username is not None:
            raise InvalidInput(f"artifact store: {store!r} must be http(s)://host[:port][/path]")
        return store.rstrip("/")
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and _safe_path(parts.path):
        return f"file://{parts.path.rstrip('/')}/"
    raise InvalidInput(f"artifact store: {store!r} must be an http(s) URL or a file:/// directory")


def check_artifact_uri(uri: Any, *, sha256: str, stores: Iterable[str]) -> str:
    """`uri` if it points into one of `stores` (`check_store` forms): `{base}/v1/artifacts/
    {sha256}` of an http(s) store, or a file below a `file:` store's directory. Anything else
    (another scheme, host or port, credentials, a query, `..`, a file elsewhere) is refused."""
    if not isinstance(uri, str) or not uri.isprintable():
        raise InvalidInput("artifact_uri: must be a string")
    parts = urlsplit(uri)
    for store in stores:
        if _in_store(parts, sha256, urlsplit(check_store(store))):
            return uri
    raise InvalidInput(
        f"artifact_uri: {uri[:200]!r} is not in the configured artifact store "
        f"({', '.join(stores) or 'none configured'})"
    )


def check_triton_server(server: Any, *, allowed: Iterable[str], field: str = "url") -> str:
    """`server` as `host:port` if it names (as `host:port` or `grpc://host:port`) one of the
    `allowed` Triton gRPC endpoints (same forms): a version's record must not send the worker's
    batches to any other host. Anything else is InvalidInput naming `field`."""
    wanted = _triton_endpoint(server, field=field)
    if wanted not in {_triton_endpoint(url, field="triton_urls") for url in allowed}:
        raise InvalidInput(
            f"{field}: Triton server {wanted!r} is not one of the configured Triton servers "
            f"({', '.join(allowed) or 'none configured: set triton_urls'})"
        )
    return wanted


def _triton_endpoint(server: Any, *, field: str) -> str:
    if not isinstance(server, str) or not server.isprintable():
        raise InvalidInput(f"{field}: must be a string host:port")
    parts = urlsplit(server if server.startswith("grpc://") else f"grpc://{server}")
    try:
        port = parts.port
    except ValueError:  # a port that is not a number
        port = None
    if (not parts.hostname or port is None or parts.path or parts.query or parts.fragment
            or parts.username is not None):
        raise InvalidInput(f"{field}: {server[:200]!r} must be host:port or grpc://host:port")
    host = parts.hostname
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _in_store(uri: SplitResult, sha256: str, store: SplitResult) -> bool:
    if uri.scheme != store.scheme or uri.query or uri.fragment:
        return False
    if store.scheme == "file":
        path = unquote(uri.path)
        return (uri.netloc in ("", "localhost") and _safe_path(path)
                and path.startswith(store.path) and len(path) > len(store.path))
    try:
        same_origin = (uri.hostname, uri.port) == (store.hostname, store.port)
    except ValueError:  # a port that is not a number
        return False
    return (same_origin and uri.username is None
            and uri.path == f"{store.path.rstrip('/')}{ARTIFACT_PATH}{sha256}")


def _safe_path(path: str) -> bool:
    """An absolute, normalised POSIX path: no `..`, `.`, empty segments or NULs."""
    if path == "/":
        return True
    return (path.startswith("/") and "\0" not in path and "\\" not in path
            and posixpath.normpath(path) == path.rstrip("/"))


def _at_most(value: float, high: float, field: str, *, low: float = 0) -> None:
    if not low <= value <= high:
        raise InvalidInput(f"{field} must be within {low:g}..{high:g}")

