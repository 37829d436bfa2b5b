"""deploy/'s Jaeger configurations agree with each other and with what the services read."""

from __future__ import annotations

import re
from pathlib import Path

from services.mesh.infra import telemetry

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = (DEPLOY / "jaeger" / "docker-compose.yml").read_text()
MANIFEST = (DEPLOY / "k8s" / "jaeger.yaml").read_text()


def _config_map() -> dict[str, str]:
    data = MANIFEST.split("data:\n", 1)[1].split("---", 1)[0]
    return dict(re.findall(r'^  ([A-Z_]+): "([^"]*)"', data, flags=re.MULTILINE))


def test_the_config_map_sets_only_settings_the_services_read() -> None:
    settings = _config_map()
    assert set(settings) <= set(telemetry.SETTINGS)
    assert settings["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    assert 0 < float(settings["INFERMESH_TRACE_SAMPLE_RATIO"]) <= 1


def test_the_manifest_serves_the_ports_the_config_map_and_compose_name() -> None:
    for port in ("4317", "4318", "16686"):
        assert f'"127.0.0.1:{port}:{port}"' in COMPOSE
        assert f"port: {port}," in MANIFEST
    images = re.findall(r"image: (\S+)", COMPOSE + MANIFEST)
    assert len(set(images)) == 1 and ":" in images[0] and not images[0].endswith(":latest")
    for receiver in ("grpc.endpoint=0.0.0.0:4317", "http.endpoint=0.0.0.0:4318"):
        assert receiver in COMPOSE and receiver in MANIFEST


def test_the_config_map_turns_on_otlp_export() -> None:
    try:
        telemetry.setup_tracing("gateway", _config_map())
        assert telemetry.recording()
        assert telemetry.sample_ratio() == float(_config_map()["INFERMESH_TRACE_SAMPLE_RATIO"])
    finally:
        telemetry.setup_tracing("test", {})
