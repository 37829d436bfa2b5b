"""Private etcd and Postgres: start, serve real clients, restart on the same data, stop cleanly."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from deploy.localdeps import (
    LocalPostgres,
    free_port,
    process_gone,
    start_etcd,
    start_postgres,
)
from services.mesh.infra.etcd import connect_client


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A temp dir outside pytest's basetemp, which a concurrent pytest run resets to 0700
    (locking the postgres user out of data dirs below it)."""
    root = Path(tempfile.mkdtemp(prefix="infermesh-localdeps-"))
    root.chmod(0o755)
    # One level down: the servers keep their passwords beside their data, in `root/secrets`.
    (root / "deps").mkdir(mode=0o755)
    yield root / "deps"
    shutil.rmtree(root, ignore_errors=True)


async def _etcd_roundtrip(url: str, key: bytes, value: bytes | None) -> bytes | None:
    """Put ``value`` (unless None) at ``key`` and read the key back."""
    async with connect_client(url) as client:
        if value is not None:
            await client.put(key, value)
        result = await client.get(key)
        return None if result is None else bytes(result.value)


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_shared_etcd_serves_put_and_get(etcd_url: str, etcd_prefix: str) -> None:
    key = f"{etcd_prefix}model".encode()
    assert await _etcd_roundtrip(etcd_url, key, b"resnet") == b"resnet"


# Lifecycle tests are synchronous: starting and stopping servers blocks, so it stays off any loop.
def test_etcd_keeps_data_across_restart_and_stops_cleanly(tmp_path: Path) -> None:
    etcd = start_etcd(tmp_path, fast=True)
    with etcd:
        assert asyncio.run(_etcd_roundtrip(etcd.url, b"k", b"v")) == b"v"
    assert process_gone(etcd.pid)
    etcd.stop()  # idempotent

    with start_etcd(tmp_path, port=free_port(), fast=True) as again:
        assert asyncio.run(_etcd_roundtrip(again.url, b"k", None)) == b"v"
    assert process_gone(again.pid)


def test_etcd_refuses_a_taken_port(tmp_path: Path) -> None:
    with start_etcd(tmp_path / "first", fast=True) as etcd:
        taken = etcd.port
        with pytest.raises(RuntimeError, match="already in use"):
            start_etcd(tmp_path / "second", port=taken, fast=True)


async def test_shared_postgres_gives_fresh_databases(database_url: str) -> None:
    assert await _execute(database_url, "SELECT 1") == 1
    conn = await asyncpg.connect(database_url)
    try:
        tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    assert tables == 0


async def _execute(dsn: str, sql: str) -> object:
    """Run ``sql`` on ``dsn``; return the first value of its last row, if any."""
    conn = await asyncpg.connect(dsn)
    try:
        if sql.lstrip().upper().startswith("SELECT"):
            return await conn.fetchval(sql)
        return await conn.execute(sql)
    finally:
        await conn.close()


def test_postgres_keeps_data_across_restart_and_stops_cleanly(tmp_path: Path) -> None:
    postgres = start_postgres(tmp_path / "pg", fast=True)
    with postgres:
        dsn = postgres.create_database("durable")
        asyncio.run(_execute(dsn, "CREATE TABLE t (x int); INSERT INTO t VALUES (42)"))
        pid = postgres.pid
    assert pid is not None and process_gone(pid)
    postgres.stop()  # idempotent

    with start_postgres(tmp_path / "pg", port=free_port()) as again:
        moved = dsn.replace(f":{postgres.port}/", f":{again.port}/")
        assert asyncio.run(_execute(moved, "SELECT x FROM t")) == 42
    assert again.pid is not None and process_gone(again.pid)


def test_postgres_recovers_from_a_killed_launcher(tmp_path: Path) -> None:
    first = start_postgres(tmp_path / "pg", fast=True)
    # The launcher died without stopping its server: the next start takes the data dir over.
    with start_postgres(tmp_path / "pg", fast=True) as second:
        assert first.pid is not None and process_gone(first.pid)
        assert second.create_database("after_takeover")
    first.stop()


def test_create_database_rejects_odd_names(local_postgres: LocalPostgres) -> None:
    with pytest.raises(ValueError):
        local_postgres.create_database('x"; DROP DATABASE postgres; --')


def test_etcd_startup_failure_reports_its_log(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    with pytest.raises(RuntimeError, match="etcd did not become healthy"):
        start_etcd(tmp_path, fast=True)


def test_postgres_recovers_from_a_killed_server(tmp_path: Path) -> None:
    crashed = start_postgres(tmp_path / "pg", fast=True)
    assert crashed.pid is not None
    os.kill(crashed.pid, signal.SIGKILL)  # leaves a stale postmaster.pid behind
    with start_postgres(tmp_path / "pg", fast=True) as again:
        assert asyncio.run(_execute(again.create_database("after_crash"), "SELECT 1")) == 1
    crashed.stop()  # still idempotent and harmless after a crash


def test_etcd_left_running_by_a_dead_launcher_is_replaced(tmp_path: Path) -> None:
    launcher = (
        "import os, sys; from pathlib import Path; from deploy.localdeps import start_etcd; "
        "print(start_etcd(Path(sys.argv[1]), fast=True).pid); os._exit(0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", launcher, str(tmp_path)], capture_output=True, text=True, check=True
    )
    orphan = int(done.stdout)
    assert not process_gone(orphan)
    with start_etcd(tmp_path, fast=True) as etcd:
        assert process_gone(orphan)
        assert asyncio.run(_etcd_roundtrip(etcd.url, b"k", b"v")) == b"v"
