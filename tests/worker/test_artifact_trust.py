"""A worker acts on `models/` records only as far as they can be trusted: a hostile sha256 or
artifact URI is refused and logged, no file outside the cache is read or deleted, no other host
is asked for anything; a record the registry wrote still loads."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.config import StaticConfig
from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.types import ModelVersion, Signature
from services.mesh.infra.settings import load_settings
from services.worker.artifacts import ArtifactCache
from services.worker.settings import WorkerSettings

WEIGHTS = b"torchscript weights"
SHA = hashlib.sha256(WEIGHTS).hexdigest()
VICTIM = b"a file the worker must never touch"
SIGNATURE = Signature.from_json({
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
})


@dataclass
class Server:
    """A local HTTP server that counts the requests it gets."""

    url: str
    hits: list[str]


async def _serve(handler_body: bytes) -> AsyncIterator[Server]:
    hits: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=handler_body)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    async with TestServer(app, host="127.0.0.1") as server:
        yield Server(str(server.make_url("")).rstrip("/"), hits)


@pytest.fixture
async def registry() -> AsyncIterator[Server]:
    """The configured artifact store: serves WEIGHTS at any path."""
    async for server in _serve(WEIGHTS):
        yield server


@pytest.fixture
async def elsewhere() -> AsyncIterator[Server]:
    """Another host (a metadata service, an internal API): must never be asked."""
    async for server in _serve(VICTIM):
        yield server


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_bytes(VICTIM)
    return path


@pytest.fixture
def cache_dir(tmp_path: Path, victim: Path) -> Path:
    path = tmp_path / "state" / "worker-cache"
    path.mkdir(parents=True)
    assert (path / "../../victim.txt").resolve() == victim.resolve()
    return path


def contents(path: Path) -> bytes:
    return path.read_bytes()


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
async def cache(registry: Server, cache_dir: Path) -> AsyncIterator[ArtifactCache]:
    # A short timeout: a URI that is not refused fails fast instead of hanging the test.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield ArtifactCache(session, cache_dir, stores=[registry.url])


def record(registry: Server, *, sha256: str = SHA, artifact_uri: str = "") -> ModelVersion:
    """A version record as the registry writes it, or with a hostile field."""
    uri = artifact_uri or f"{registry.url}/v1/artifacts/{SHA}"
    return ModelVersion("mlp", "1", SIGNATURE, uri, sha256)


async def test_a_record_the_registry_wrote_is_fetched_and_verified(
    cache: ArtifactCache, registry: Server, cache_dir: Path
) -> None:
    path = await cache.fetch(record(registry))
    assert path == cache_dir / SHA and contents(path) == WEIGHTS
    assert registry.hits == [f"/v1/artifacts/{SHA}"]


async def test_a_sha256_naming_a_path_outside_the_cache_is_refused_and_the_file_kept(
    cache: ArtifactCache, registry: Server, victim: Path, cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING), pytest.raises(InvalidInput, match="^sha256: "):
        await cache.fetch(record(registry, sha256="../../victim.txt"))
    assert contents(victim) == VICTIM and listing(cache_dir) == []
    assert "mlp/1" in caplog.text and "sha256: must be 64 lowercase hex digits" in caplog.text
    assert registry.hits == []


@pytest.mark.parametrize("uri", [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "file:///etc/passwd",
    "VICTIM",
    "ELSEWHERE",
])
async def test_an_artifact_uri_outside_the_store_is_refused_and_nothing_fetched(
    cache: ArtifactCache, registry: Server, elsewhere: Server, victim: Path, cache_dir: Path,
    caplog: pytest.LogCaptureFixture, uri: str,
) -> None:
    uri = {"VICTIM": victim.as_uri(),
           "ELSEWHERE": f"{elsewhere.url}/v1/artifacts/{SHA}"}.get(uri, uri)
    with caplog.at_level(logging.WARNING), pytest.raises(InvalidInput, match="^artifact_uri: "):
        await cache.fetch(record(registry, artifact_uri=uri))
    assert "mlp/1" in caplog.text and "not in the configured artifact store" in caplog.text
    assert elsewhere.hits == [] and registry.hits == []
    assert contents(victim) == VICTIM and listing(cache_dir) == []


@pytest.fixture
def planted(cache_dir: Path, victim: Path) -> Path:
    """The cache entry for SHA planted as a symlink to the victim."""
    (cache_dir / SHA).symlink_to(victim)
    return cache_dir / SHA


async def test_a_cached_file_that_is_a_symlink_out_of_the_cache_is_refused(
    cache: ArtifactCache, registry: Server, victim: Path, planted: Path,
) -> None:
    with pytest.raises(InvalidInput, match="^sha256: .*outside the cache directory"):
        await cache.fetch(record(registry))
    assert contents(victim) == VICTIM and registry.hits == []


@pytest.fixture
def file_store(tmp_path: Path, victim: Path) -> Path:
    """A `file:` artifact store holding WEIGHTS and a symlink out to the victim."""
    store = tmp_path / "artifacts"
    store.mkdir()
    (store / "mlp.pt").write_bytes(WEIGHTS)
    (store / "escape.pt").symlink_to(victim)
    return store


async def test_a_file_store_serves_files_below_it_and_nothing_that_links_out(
    file_store: Path, cache_dir: Path
) -> None:
    store = file_store
    async with aiohttp.ClientSession() as session:
        cache = ArtifactCache(session, cache_dir, stores=[store.as_uri()])
        spec = ModelVersion("mlp", "1", SIGNATURE, (store / "mlp.pt").as_uri(), SHA)
        assert contents(await cache.fetch(spec)) == WEIGHTS
        escape = replace(spec, artifact_uri=(store / "escape.pt").as_uri(),
                         sha256=hashlib.sha256(VICTIM).hexdigest())
        with pytest.raises(InvalidInput, match="^artifact_uri: .*outside the artifact store"):
            await cache.fetch(escape)
    assert listing(cache_dir) == [SHA]


def test_the_catalog_refuses_and_logs_a_hostile_record_so_no_worker_loads_it(
    registry: Server, caplog: pytest.LogCaptureFixture
) -> None:
    hostile = record(registry, sha256="../../victim.txt").to_json()
    with caplog.at_level(logging.ERROR):
        catalog = ModelCatalog(StaticConfig({
            "models/mlp/1": hostile,
            "models/mlp/2": {**record(registry).to_json(), "version": "2"},
            "models/mlp/3": {**record(registry).to_json(), "version": "../3"},
        }))
    assert [v.version for v in catalog.versions("mlp")] == ["2"]
    assert "models/mlp/1" in caplog.text and "sha256: must be 64" in caplog.text
    assert "models/mlp/3" in caplog.text and "version: " in caplog.text


def test_by_default_a_worker_fetches_only_from_the_registry_the_launcher_runs() -> None:
    # The launcher hands every child INFERMESH_REGISTRY_PORT; the registry's artifact URIs are
    # `http://{host}:{port}/v1/artifacts/{sha256}` (its public URL defaults to where it binds).
    env = {"INFERMESH_REGISTRY_PORT": "8311"}
    assert load_settings(WorkerSettings, "worker", env).stores == ("http://127.0.0.1:8311",)
    env["INFERMESH_ARTIFACT_STORES"] = "https://artifacts.internal:8443,file:///srv/artifacts"
    assert load_settings(WorkerSettings, "worker", env).stores == (
        "https://artifacts.internal:8443", "file:///srv/artifacts",
    )
