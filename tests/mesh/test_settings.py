from __future__ import annotations

import dataclasses
import os
import socket

import pytest

from services.mesh.domain.errors import InvalidInput
from services.mesh.infra.settings import ServiceSettings, load_settings


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatewaySettings(ServiceSettings):
    http_port: int = 8000
    api_keys: tuple[str, ...] = ()
    cache_ttl: float | None = None
    allow_anonymous: bool = False


def test_defaults_when_nothing_is_set() -> None:
    settings = load_settings(GatewaySettings, "gateway", env={})
    assert settings == GatewaySettings()
    assert settings.etcd_url == "http://127.0.0.1:2379"
    assert settings.http_port == 8000


def test_service_variable_beats_shared_variable_beats_default() -> None:
    env = {
        "INFERMESH_GATEWAY_ETCD_URL": "http://gateway-etcd:2379",
        "INFERMESH_ETCD_URL": "http://shared-etcd:2379",
        "INFERMESH_ETCD_PREFIX": "/mesh-b/",
        "INFERMESH_ROUTER_HTTP_PORT": "9999",  # another service's variable
    }
    settings = load_settings(GatewaySettings, "gateway", env=env)
    assert settings.etcd_url == "http://gateway-etcd:2379"
    assert settings.etcd_prefix == "/mesh-b/"
    assert settings.http_port == 8000

    router = load_settings(GatewaySettings, "router", env=env)
    assert router.etcd_url == "http://shared-etcd:2379"
    assert router.http_port == 9999


def test_values_are_parsed_by_field_type() -> None:
    env = {
        "INFERMESH_GATEWAY_HTTP_PORT": "8080",
        "INFERMESH_GATEWAY_API_KEYS": " k1, k2 ,,k3 ",
        "INFERMESH_GATEWAY_CACHE_TTL": "2.5",
        "INFERMESH_GATEWAY_ALLOW_ANONYMOUS": "yes",
        "INFERMESH_DRAIN_TIMEOUT": "0.5",
    }
    settings = load_settings(GatewaySettings, "gateway", env=env)
    assert settings.http_port == 8080
    assert settings.api_keys == ("k1", "k2", "k3")
    assert settings.cache_ttl == 2.5
    assert settings.allow_anonymous is True
    assert settings.drain_timeout == 0.5
    off = load_settings(GatewaySettings, "gateway", env={"INFERMESH_ALLOW_ANONYMOUS": "0"})
    assert off.allow_anonymous is False


def test_bad_number_names_the_variable() -> None:
    env = {"INFERMESH_GATEWAY_HTTP_PORT": "eighty"}
    with pytest.raises(InvalidInput, match="INFERMESH_GATEWAY_HTTP_PORT.*'eighty'.*int"):
        load_settings(GatewaySettings, "gateway", env=env)
    with pytest.raises(InvalidInput, match="INFERMESH_CACHE_TTL"):
        load_settings(GatewaySettings, "gateway", env={"INFERMESH_CACHE_TTL": "soon"})


def test_instance_id_defaults_to_host_and_pid() -> None:
    named = load_settings(ServiceSettings, "worker", env={"INFERMESH_INSTANCE": "w7"})
    assert named.instance_id == "w7"
    assert ServiceSettings().instance_id == f"{socket.gethostname()}-{os.getpid()}"
