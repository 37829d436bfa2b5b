"""A client of the registry's REST API, and `register_file` for one-call registration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import aiohttp
import orjson

from services.mesh.infra.digests import sha256_of
from services.mesh.transport.auth import Credential, bearer

READ_SIZE = 1024 * 1024


class RegistryError(Exception):
    """The registry refused a request (`status` set) or could not be reached (`status` None)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class RegistryClient:
    """Calls the registry at `base_url`, presenting the mesh `credential`, through a session
    the caller owns and closes."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, *, credential: Credential
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._credential = credential

    async def create_model(self, name: str, description: str = "") -> dict[str, Any]:
        """Create a model (an existing one is returned unchanged)."""
        body = {"name": name, "description": description}
        return await self._call("POST", "/v1/models", json=body)

    async def list_models(self) -> list[dict[str, Any]]:
        """Every model: name, description, versions, latest, serving."""
        body = await self._call("GET", "/v1/models")
        models: list[dict[str, Any]] = body["models"]
        return models

    async def get_model(self, name: str) -> dict[str, Any]:
        """One model with its version records and its rollout."""
        return await self._call("GET", f"/v1/models/{quote(name, safe='')}")

    async def upload_artifact(self, path: Path) -> dict[str, Any]:
        """Stream a file to the artifact store; returns {"sha256", "size", "uri"}.

        The file is hashed first so the registry rejects a copy damaged on the way.
        """
        sha256 = await asyncio.to_thread(sha256_of, path)
        return await self._call(
            "PUT", "/v1/artifacts", data=_read_chunks(path),
            headers={"X-Infermesh-Sha256": sha256, "Content-Type": "application/octet-stream"},
        )

    async def register_version(
        self, model: str, version: str, *, artifact_sha256: str,
        signature: Mapping[str, Any] | None,
        batching: Mapping[str, Any] | None = None, device: str = "auto",
        platform: str = "pytorch_torchscript", prediction_log: str = "digest",
        cpu_fallback: bool = False, worker: str = "shared",
    ) -> dict[str, Any]:
        """Register an immutable version; identical re-registration is a no-op. `signature`
        None (or a side left out) lets the registry read it from an ONNX artifact; `worker`
        `dedicated` gives the version workers of its own under the launcher."""
        body: dict[str, Any] = {
            "artifact_sha256": artifact_sha256, "device": device, "platform": platform,
            "prediction_log": prediction_log, "cpu_fallback": cpu_fallback,
        }
        if worker != "shared":
            body["worker"] = worker
        if signature is not None:
            body["signature"] = dict(signature)
        if batching is not None:
            body["batching"] = dict(batching)
        path = f"/v1/models/{quote(model, safe='')}/versions/{quote(version, safe='')}"
        return await self._call("PUT", path, json=body)

    async def change_batching(
        self, model: str, version: str, batching: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Change fields of a version's queue policy (the rest stay); returns its record.

        The data plane applies the new policy without a restart.
        """
        path = (f"/v1/models/{quote(model, safe='')}/versions/{quote(version, safe='')}"
                "/batching")
        return await self._call("PATCH", path, json=dict(batching))

    async def change_autoscaling(
        self, model: str, version: str, autoscaling: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge fields into a version's `autoscaling` block (null: back to the default;
        a version without one becomes autoscaled); returns its record."""
        path = (f"/v1/models/{quote(model, safe='')}/versions/{quote(version, safe='')}"
                "/autoscaling")
        return await self._call("PATCH", path, json=dict(autoscaling))

    async def quantize_version(
        self, model: str, version: str, *, mode: str = "int8-dynamic",
        new_version: str | None = None,
    ) -> dict[str, Any]:
        """Derive a quantized version from an ONNX one; the registry measures it against the
        source first (speed-ups, output errors: the record's `quantization`). Returns it."""
        body: dict[str, Any] = {"mode": mode}
        if new_version is not None:
            body["version"] = new_version
        path = (f"/v1/models/{quote(model, safe='')}/versions/{quote(version, safe='')}"
                "/quantize")
        return await self._call("POST", path, json=body)

    async def download_artifact(self, sha256: str, dest: Path) -> None:
        """Write the stored artifact `sha256` to `dest`; RegistryError when the registry
        answers an error. The caller checks the digest of what arrived."""
        url = f"{self._base_url}/v1/artifacts/{quote(sha256, safe='')}"
        try:
            async with self._session.get(url, headers=bearer(self._credential)) as response:
                if response.status >= 400:
                    raise RegistryError(f"artifact {sha256}: HTTP {response.status}",
                                        status=response.status)
                file: IO[bytes] = await asyncio.to_thread(dest.open, "wb")
                try:
                    async for block in response.content.iter_chunked(READ_SIZE):
                        await asyncio.to_thread(file.write, block)
                finally:
                    await asyncio.to_thread(file.close)
        except aiohttp.ClientError as exc:
            raise RegistryError(f"cannot reach the registry at {self._base_url}: {exc}") from exc

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        if "json" in kwargs:
            kwargs["data"] = orjson.dumps(kwargs.pop("json"))
            kwargs["headers"] = {"Content-Type": "application/json"}
        kwargs["headers"] = {**kwargs.get("headers", {}), **bearer(self._credential)}
        url = self._base_url + path
        try:
            async with self._session.request(method, url, **kwargs) as response:
                raw = await response.read()
                status = response.status
        except aiohttp.ClientError as exc:
            raise RegistryError(f"cannot reach the registry at {self._base_url}: {exc}") from exc
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = {"error": raw.decode(errors="replace").strip() or f"HTTP {status}"}
        if not isinstance(body, dict):
            raise RegistryError(f"unexpected reply from the registry: {raw[:200]!r}", status=status)
        if status >= 400:
            raise RegistryError(str(body.get("error") or f"HTTP {status}"), status=status)
        return body


async def register_file(
    client: RegistryClient, name: str, version: str, artifact: Path,
    signature: Mapping[str, Any] | None, batching: Mapping[str, Any] | None = None,
    device: str = "auto", prediction_log: str = "digest", *,
    platform: str = "pytorch_torchscript", cpu_fallback: bool = False, worker: str = "shared",
) -> dict[str, Any]:
    """Create the model if needed, upload `artifact`, register the version; returns its record."""
    await client.create_model(name)
    uploaded = await client.upload_artifact(artifact)
    return await client.register_version(
        name, version, artifact_sha256=uploaded["sha256"], signature=signature,
        batching=batching, device=device, prediction_log=prediction_log,
        platform=platform, cpu_fallback=cpu_fallback, worker=worker,
    )


async def _read_chunks(path: Path) -> AsyncIterator[bytes]:
    file: IO[bytes] = await asyncio.to_thread(path.open, "rb")
    try:
        while block := await asyncio.to_thread(file.read, READ_SIZE):
            yield block
    finally:
        await asyncio.to_thread(file.close)
