"""The private etcd and Postgres refuse anyone without credentials, and a service's credentials
allow only what that service does (issue 15: the etcd and Postgres rows of the attack table)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import aetcd
import asyncpg
import pytest

from deploy.localdeps import LocalEtcd, LocalPostgres
from services.mesh.infra.etcd import connect_client

PREFIX = "/infermesh/"  # the mesh prefix the session's etcd gave its service users


async def test_etcd_refuses_a_client_without_credentials(local_etcd: LocalEtcd) -> None:
    async with aetcd.Client(host="127.0.0.1", port=local_etcd.port, timeout=5) as anonymous:
        with pytest.raises(aetcd.exceptions.ClientError, match="user name is empty"):
            await anonymous.get(f"{PREFIX}apikeys/k1".encode())
        with pytest.raises(aetcd.exceptions.ClientError, match="user name is empty"):
            await anonymous.put(f"{PREFIX}models/m/1".encode(), b"{}")


async def test_etcd_refuses_a_wrong_password(local_etcd: LocalEtcd) -> None:
    parts = urlsplit(local_etcd.url_for("worker"))
    wrong = parts._replace(netloc=f"worker:not-the-password@{parts.hostname}:{parts.port}")
    client = connect_client(wrong.geturl())
    try:
        with pytest.raises(aetcd.exceptions.ClientError, match="authentication failed"):
            await client.get(f"{PREFIX}models/m/1".encode())
    finally:
        await client.close()


async def test_a_worker_writes_its_endpoint_and_nothing_else(local_etcd: LocalEtcd) -> None:
    instance = uuid.uuid4().hex
    async with connect_client(local_etcd.url_for("worker")) as worker:
        own = f"{PREFIX}endpoints/worker/{instance}".encode()
        await worker.put(own, b'{"link": "ws://127.0.0.1:1/link"}')  # the legitimate path
        assert (await worker.get(own)) is not None
        for other in (f"models/evil/{instance}", f"rollouts/{instance}",
                      f"apikeys/{instance}", f"endpoints/router/{instance}"):
            with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
                await worker.put(f"{PREFIX}{other}".encode(), b"{}")
        await worker.delete(own)


async def test_the_registry_publishes_models_but_not_tenants(local_etcd: LocalEtcd) -> None:
    name = uuid.uuid4().hex
    async with connect_client(local_etcd.url_for("registry")) as registry:
        await registry.put(f"{PREFIX}models/{name}/1".encode(), b"{}")
        with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
            await registry.put(f"{PREFIX}apikeys/{name}".encode(), b"{}")
        await registry.delete(f"{PREFIX}models/{name}/1".encode())


async def test_postgres_refuses_a_connection_without_password(
    local_postgres: LocalPostgres,
) -> None:
    for role in ("postgres", "infermesh"):
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(f"postgresql://{role}@127.0.0.1:{local_postgres.port}/postgres",
                                  timeout=10)


async def test_the_app_role_owns_its_database_but_runs_no_programs_nor_makes_roles(
    database_url: str,
) -> None:
    connection = await asyncpg.connect(database_url, timeout=10)
    try:
        # The legitimate path: the role owns its database and creates tables in it.
        await connection.execute("CREATE TABLE owned (x int)")
        assert await connection.fetchval("SELECT rolsuper FROM pg_roles "
                                         "WHERE rolname = current_user") is False
        marker = f"/tmp/infermesh-copy-program-{uuid.uuid4().hex}"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute(f"COPY owned TO PROGRAM 'touch {marker}'")
        assert not await asyncio.to_thread(Path(marker).exists)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute("CREATE ROLE intruder LOGIN SUPERUSER")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute("ALTER ROLE current_user SUPERUSER")
    finally:
        await connection.close()
