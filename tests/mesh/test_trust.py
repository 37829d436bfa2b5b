"""The trust checks of control-plane data: each hostile value is refused naming its field, and
the values the registry writes today pass."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.trust import (
    MAX_BATCH_SIZE,
    MAX_QUEUE_SIZE,
    MAX_RANK,
    RECORD_ERRORS,
    check_artifact_uri,
    check_batching,
    check_name,
    check_sha256,
    check_signature,
    check_store,
    check_version_record,
    parse_version_key,
    trusted_version,
)
from services.mesh.domain.types import BatchingPolicy, ModelVersion, Signature

SHA = "ab" * 32
STORES = ("http://127.0.0.1:8200", "file:///srv/artifacts")


def signature(*shape: int) -> Signature:
    return Signature.from_json({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": list(shape)}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
    })


RECORD = ModelVersion("mlp", "1", signature(-1, 16), f"http://127.0.0.1:8200/v1/artifacts/{SHA}",
                      SHA)


@pytest.mark.parametrize("name", ["mlp", "resnet-50", "v1.2_b", "A" * 64, "1"])
def test_safe_names_pass(name: str) -> None:
    assert check_name(name, field="model") == name


@pytest.mark.parametrize("name", [
    "", ".", "..", "../etc", "a/b", "a\\b", ".hidden", "-flag", "a b", "a\0", "é", "A" * 65, 7,
    None,
])
def test_unsafe_names_are_refused_naming_the_field(name: Any) -> None:
    with pytest.raises(InvalidInput, match="^version: "):
        check_name(name, field="version")


@pytest.mark.parametrize("sha256", [
    "../../victim.txt", "AB" * 32, "ab" * 31, "ab" * 33, "g" * 64, f"{SHA[:-1]}/", "", 0,
])
def test_a_sha256_is_64_lowercase_hex_digits(sha256: Any) -> None:
    with pytest.raises(InvalidInput, match="^sha256: must be 64 lowercase hex digits"):
        check_sha256(sha256)


@pytest.mark.parametrize("uri", [
    f"http://127.0.0.1:8200/v1/artifacts/{SHA}",
    f"file:///srv/artifacts/sha256/ab/{SHA}",
    "file:///srv/artifacts/mlp.pt",
])
def test_uris_into_a_configured_store_pass(uri: str) -> None:
    assert check_artifact_uri(uri, sha256=SHA, stores=STORES) == uri


@pytest.mark.parametrize("uri", [
    "http://169.254.169.254/latest/meta-data/",                      # another host (SSRF)
    f"http://169.254.169.254/v1/artifacts/{SHA}",
    f"http://127.0.0.1:8201/v1/artifacts/{SHA}",                     # another port
    f"https://127.0.0.1:8200/v1/artifacts/{SHA}",                    # another scheme
    f"http://user:pw@127.0.0.1:8200/v1/artifacts/{SHA}",             # credentials
    f"http://127.0.0.1:8200/v1/artifacts/{SHA}?next=http://evil",    # a query
    f"http://127.0.0.1:8200/v1/artifacts/{'cd' * 32}",               # another artifact
    f"http://127.0.0.1:8200/v1/artifacts/../admin/{SHA}",
    "file:///etc/passwd",                                            # a file outside the store
    "file:///srv/artifacts/../../etc/passwd",
    "file:///srv/artifacts/a/%2e%2e/%2e%2e/etc/passwd",
    "file:///srv/artifacts-evil/x",
    "file:///srv/artifacts/",
    "file://attacker/srv/artifacts/x",
    "/srv/artifacts/x",                                              # no scheme
    "gopher://127.0.0.1:8200/", "ftp://127.0.0.1/x", "",
])
def test_uris_anywhere_else_are_refused(uri: str) -> None:
    with pytest.raises(InvalidInput, match="^artifact_uri: .*not in the configured artifact"):
        check_artifact_uri(uri, sha256=SHA, stores=STORES)


@pytest.mark.parametrize("store", ["ftp://x", "http://", "file:///a/../b", "http://h/?q", "x"])
def test_a_store_must_be_an_http_base_or_a_plain_directory(store: str) -> None:
    with pytest.raises(InvalidInput, match="^artifact store: "):
        check_store(store)


@pytest.mark.parametrize(("change", "field"), [
    ({"max_batch_size": MAX_BATCH_SIZE + 1}, "'max_batch_size'"),
    ({"max_batch_size": 10**9}, "'max_batch_size'"),
    ({"max_queue_size": MAX_QUEUE_SIZE + 1}, "'max_queue_size'"),
    ({"preferred_batch_sizes": tuple(range(1, 66)), "max_batch_size": 100},
     "'preferred_batch_sizes'"),
    ({"default_timeout_ms": 10.0**9}, "'default_timeout_ms'"),
    ({"max_queue_delay_ms": 10.0**9}, "'max_queue_delay_ms'"),
    ({"edge_inflight": 10**9}, "'edge_inflight'"),
])
def test_batching_past_its_bounds_is_refused(change: dict[str, Any], field: str) -> None:
    policy = replace(BatchingPolicy(), **change)
    with pytest.raises(InvalidInput, match=f"^batching: {field}"):
        check_batching(policy)


def test_batching_at_its_bounds_passes() -> None:
    policy = BatchingPolicy(max_batch_size=MAX_BATCH_SIZE, max_queue_size=MAX_QUEUE_SIZE)
    assert check_batching(policy) is policy


@pytest.mark.parametrize("shape", [
    [-1] + [2] * MAX_RANK,           # rank past the bound
    [-1, 1 << 21],                   # a dim past the bound
    [-1, 1 << 13, 1 << 13],          # 2**26 elements a row
])
def test_shapes_past_their_bounds_are_refused(shape: list[int]) -> None:
    with pytest.raises(InvalidInput, match="^signature: input 'x' shape"):
        check_signature(signature(*shape))


@pytest.mark.parametrize(("record", "key", "field"), [
    (replace(RECORD, sha256="../../victim.txt"), None, "sha256"),
    (replace(RECORD, model="../m"), None, "model"),
    (replace(RECORD, version="1/../../x"), None, "version"),
    (replace(RECORD, platform="../x"), None, "platform"),
    (replace(RECORD, batching=BatchingPolicy(max_batch_size=10**6)), None, "batching"),
    (RECORD, "models/other/1", "model"),
])
def test_a_hostile_version_record_is_refused(
    record: ModelVersion, key: str | None, field: str
) -> None:
    with pytest.raises(InvalidInput, match=f"^{field}: "):
        check_version_record(record, key=key)


def test_a_registry_record_passes() -> None:
    assert check_version_record(RECORD, key="models/mlp/1") is RECORD


@pytest.mark.parametrize(("key", "field"), [
    ("models/mlp", "key"), ("models/a/b/c", "key"), ("models/../1", "model"),
    ("models/m/..", "version"),
])
def test_a_version_key_names_two_safe_segments(key: str, field: str) -> None:
    with pytest.raises(InvalidInput, match=f"^{field}: "):
        parse_version_key(key)
    assert parse_version_key("models/mlp/1") == ("mlp", "1")


def test_a_trusted_version_is_parsed_from_a_safe_record_at_its_own_key() -> None:
    assert trusted_version("models/mlp/1", RECORD.to_json()) == RECORD
    with pytest.raises(InvalidInput, match="^record: not a JSON object"):
        trusted_version("models/mlp/1", ["x"])
    with pytest.raises(InvalidInput, match="^key: "):
        trusted_version("models/mlp/1/2", RECORD.to_json())
    with pytest.raises(InvalidInput, match="^model: the record names mlp/1"):
        trusted_version("models/mlp/2", RECORD.to_json())
    with pytest.raises(RECORD_ERRORS):  # whatever a half record fails on first
        trusted_version("models/mlp/1", {"model": "mlp", "version": "1"})
