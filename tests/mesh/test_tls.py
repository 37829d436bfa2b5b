"""mTLS on the internal surfaces: a link over TLS works with a certificate the mesh CA signed,
and the server refuses a client without one."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from services.mesh.infra import tls
from services.mesh.infra.settings import ServiceSettings
from services.mesh.transport import frames
from services.mesh.transport.links import LinkClient, LinkServer
from tests.credentials import AUTH, CREDENTIAL

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def issue(ca: Path, directory: Path, name: str) -> tuple[Path, Path]:
    """A key and a certificate for 127.0.0.1 signed by `ca` (ca.pem / ca.key)."""
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca / "ca.pem"),
            "-CAkey", str(ca / "ca.key"), "-CAcreateserial", "-days", "1",
            "-extfile", str(ext), "-out", str(cert))
    return cert, key


@pytest.fixture(scope="module")
def mesh_pki(tmp_path_factory: pytest.TempPathFactory) -> ServiceSettings:
    """Settings naming a throwaway CA and one instance certificate it signed."""
    root = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(root / "ca.key"), "-out", str(root / "ca.pem"), "-days", "1",
            "-subj", "/CN=infermesh test CA")
    cert, key = issue(root, root, "instance")
    return ServiceSettings(tls_cert=str(cert), tls_key=str(key), tls_ca=str(root / "ca.pem"))


def test_partial_tls_settings_are_refused() -> None:
    assert not tls.enabled(ServiceSettings())
    with pytest.raises(ValueError, match="tls_cert, tls_key and tls_ca"):
        tls.enabled(ServiceSettings(tls_cert="a.pem"))


async def test_a_link_over_mtls(mesh_pki: ServiceSettings) -> None:
    assert tls.enabled(mesh_pki)

    async def echo(meta: dict[str, object], payload: memoryview) -> tuple[
        dict[str, object], frames.Buffers
    ]:
        return {"size": len(payload)}, []

    server = LinkServer(echo, name="callee", credential=CREDENTIAL)
    app = web.Application()
    app.router.add_get("/link", server.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    server_context = await asyncio.to_thread(tls.server_context, mesh_pki)
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context).start()
    url = f"wss://127.0.0.1:{runner.addresses[0][1]}/link"
    try:
        client_context = await asyncio.to_thread(tls.client_context, mesh_pki)
        connector = aiohttp.TCPConnector(ssl=client_context)
        async with aiohttp.ClientSession(connector=connector) as session:
            client = LinkClient(session, url, peer="callee", credential=CREDENTIAL)
            await client.connect()
            try:
                reply = await client.call({}, [b"abc"], timeout=30)
            finally:
                await client.aclose()
        assert reply.meta == {"size": 3}
        # Trusting the server but presenting no certificate: the handshake fails.
        bare = ssl.create_default_context(cafile=mesh_pki.tls_ca)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=bare)) as session:
            with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                await session.ws_connect(url, headers=AUTH)
    finally:
        await server.aclose()
        await runner.cleanup()
