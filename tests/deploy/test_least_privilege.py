"""Least privilege in `infermesh up` (issue 15, point 4): each child's environment holds only
the secrets its service uses, each surface binds its own address, and the state is private."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.child_env import BindHosts, ChildSecrets, child_env, service_of
from deploy.launcher import make_private

ADMIN = "ops:admin-secret-3f9c"
DB_PASSWORD = "db-password-77a1"
SERVICES = ("gateway", "router", "batcher", "worker", "registry", "control", "fused")

COMMON = {
    "PATH": "/usr/bin", "INFERMESH_ETCD_PREFIX": "/infermesh/",
    # What the launcher's own environment holds, an explicit admin token included.
    "INFERMESH_CONTROL_ADMIN_TOKENS": ADMIN,
    "INFERMESH_DATABASE_URL": f"postgresql://infermesh:{DB_PASSWORD}@127.0.0.1:5432/infermesh",
    "INFERMESH_ETCD_URL": "http://root:root-password@127.0.0.1:2379",
}
SECRETS = ChildSecrets(
    etcd_url="http://launcher:l-pw@127.0.0.1:2379", admin_tokens=ADMIN,
    database_url=COMMON["INFERMESH_DATABASE_URL"],
    etcd_urls={name: f"http://{name}:{name}-pw@127.0.0.1:2379" for name in SERVICES},
)


def env_of(service: str, hosts: BindHosts | None = None) -> dict[str, str]:
    return child_env(service, COMMON, SECRETS, hosts or BindHosts())


def holds(env: dict[str, str], secret: str) -> bool:
    return any(secret in value for value in env.values())


def test_only_the_control_api_gets_the_admin_token() -> None:
    for service in SERVICES:
        assert holds(env_of(service), "admin-secret-3f9c") == (service == "control"), service
    assert env_of("control")["INFERMESH_CONTROL_ADMIN_TOKENS"] == ADMIN


def test_workers_and_the_batcher_get_no_database() -> None:
    for service in ("worker", "batcher"):
        assert not holds(env_of(service), DB_PASSWORD), service
    for service in ("registry", "control", "router", "gateway", "fused"):
        assert env_of(service)["INFERMESH_DATABASE_URL"] == SECRETS.database_url


def test_each_service_gets_its_own_etcd_user_and_never_root() -> None:
    for service in SERVICES:
        env = env_of(service)
        assert env["INFERMESH_ETCD_URL"].startswith(f"http://{service}:"), service
        assert not holds(env, "root-password"), service


def test_an_external_etcd_url_reaches_every_service() -> None:
    shared = ChildSecrets(etcd_url="http://mesh:pw@etcd:2379", database_url="", admin_tokens="")
    for service in SERVICES:
        assert child_env(service, COMMON, shared, BindHosts())["INFERMESH_ETCD_URL"] == (
            "http://mesh:pw@etcd:2379")


def test_each_surface_binds_its_own_address() -> None:
    hosts = BindHosts.from_env({"INFERMESH_PUBLIC_HOST": "10.0.0.1",
                                "INFERMESH_INTERNAL_HOST": "10.1.0.1"})
    assert hosts == BindHosts(public="10.0.0.1", internal="10.1.0.1", admin="127.0.0.1")
    assert env_of("gateway", hosts)["INFERMESH_GATEWAY_HOST"] == "10.0.0.1"
    assert env_of("fused", hosts)["INFERMESH_HOST"] == "10.0.0.1"
    assert env_of("control", hosts)["INFERMESH_CONTROL_HOST"] == "127.0.0.1"
    for service in ("router", "batcher", "worker", "registry"):
        assert env_of(service, hosts)[f"INFERMESH_{service.upper()}_HOST"] == "10.1.0.1"


def test_child_names_map_to_their_service() -> None:
    assert [service_of(n) for n in ("router-1", "worker-mlp-1", "gateway")] == [
        "router", "worker", "gateway"]


@pytest.fixture
def restored_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_the_state_dir_and_what_is_written_under_it_are_private(
    tmp_path: Path, restored_umask: None,
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    make_private(state)
    logs = state / "logs"
    logs.mkdir()
    (logs / "gateway.log").write_text("a line a service logged\n")
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    assert stat.S_IMODE((logs / "gateway.log").stat().st_mode) == 0o600
