"""Fused mode honours every setting of every service, as `python -m services.<name>` does.

Both build each service with its wiring function (`services/<name>/wiring.py`), so what is
checked here is that fused mode reads each service's settings object from the environment and
hands that very object to its wiring function, which reads every field of it. The fields are
enumerated with `dataclasses.fields`: a setting added later is covered without a change here,
and fails these tests until it is read from the environment and used by its wiring function.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from deploy import fused
from deploy.fused import FusedMesh, FusedSettings, build_fused
from deploy.localdeps import free_port
from services.batcher.settings import BatcherSettings
from services.gateway.settings import GatewaySettings
from services.mesh.domain.catalog import ModelCatalog
from services.mesh.domain.errors import InvalidInput, Unavailable
from services.mesh.infra.settings import ServiceSettings, load_settings
from services.predlog.spool import instance_dir_name
from services.router.settings import RouterSettings
from services.worker.settings import WorkerSettings
from tests.router.fakes import make_config, request, rollout

SERVICES: dict[str, type[ServiceSettings]] = {
    "gateway": GatewaySettings, "router": RouterSettings, "batcher": BatcherSettings,
    "worker": WorkerSettings,
}
NODE_FIELDS = {"gateway": {"http_port"}}
"""Own fields used by the mesh node rather than the wiring (the node listens on `http_port`)."""

S = TypeVar("S", bound=ServiceSettings)


def own_fields(cls: type[ServiceSettings]) -> list[dataclasses.Field[Any]]:
    """The fields a service adds to what every service has (where etcd is, where to listen)."""
    shared = {field.name for field in dataclasses.fields(ServiceSettings)}
    return [field for field in dataclasses.fields(cls) if field.name not in shared]


def changed(default: Any, kind: Any) -> Any:
    """A value of `kind` other than `default`."""
    if kind is bool:
        return not default
    if kind in (int, float):
        return kind(default * 2 + 3)
    if kind is str:
        return f"{default}-changed"
    if typing.get_origin(kind) is tuple:
        return (*default, "changed")
    raise AssertionError(f"no non-default value for settings of type {kind}: add one here")


def env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


@pytest.fixture
def values(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """A non-default value for every own field of every service (usable ones where the build
    needs them: a free port, a valid compression, a database nothing listens on)."""
    closed_dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    usable: dict[str, dict[str, Any]] = {
        "gateway": {"grpc_port": free_port(), "http_port": free_port(),
                    "grpc_compression": "gzip", "database_url": closed_dsn,
                    "job_duty": 0.25},
        "router": {"database_url": closed_dsn, "prediction_log_spool": str(tmp_path / "spool")},
        "batcher": {"no_worker_grace": 0.2},
        "worker": {"cache_dir": str(tmp_path / "cache"), "models": ("none-such",),
                   "artifact_stores": ((tmp_path / "artifacts").as_uri(),)},
    }
    found: dict[str, dict[str, Any]] = {}
    for service, cls in SERVICES.items():
        hints = typing.get_type_hints(cls)
        found[service] = {
            field.name: usable[service].get(field.name, changed(field.default, hints[field.name]))
            for field in own_fields(cls)
        }
    return found


@pytest.fixture
def settings(values: dict[str, dict[str, Any]]) -> FusedSettings:
    env = {f"INFERMESH_{service.upper()}_{name.upper()}": env_text(value)
           for service, fields in values.items() for name, value in fields.items()}
    return FusedSettings.load(env)


def test_fused_mode_reads_every_setting_of_every_service(
    values: dict[str, dict[str, Any]], settings: FusedSettings
) -> None:
    for service, cls in SERVICES.items():
        loaded = getattr(settings, service)
        assert type(loaded) is cls
        for field in own_fields(cls):
            assert getattr(loaded, field.name) == values[service][field.name] != field.default
    assert settings.gateway.port == values["gateway"]["http_port"]


def recording(settings: S) -> tuple[S, set[str]]:
    """A copy of `settings` that notes the name of every field read from it."""
    names = {field.name for field in dataclasses.fields(settings)}
    read: set[str] = set()

    def getattribute(self: object, name: str) -> Any:
        if name in names:
            read.add(name)
        return object.__getattribute__(self, name)

    cls = type(f"Recording{type(settings).__name__}", (type(settings),),
               {"__getattribute__": getattribute})
    copy = cls(**{name: object.__getattribute__(settings, name) for name in names})
    read.clear()
    return typing.cast(S, copy), read


@contextlib.asynccontextmanager
async def built(settings: FusedSettings) -> AsyncIterator[FusedMesh]:
    """Fused mode's services as `deploy.fused.main` builds them, over a static config."""
    config = make_config(rollout(0.0))
    async with aiohttp.ClientSession() as session, contextlib.AsyncExitStack() as stack:
        yield await build_fused(settings, stack, catalog=ModelCatalog(config), session=session,
                                publish_models=lambda ready: None)


@pytest.fixture
def wiring_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    """The settings object each wiring function is called with by `build_fused`."""
    calls: dict[str, object] = {}
    for service in SERVICES:
        real = getattr(fused, f"build_{service}")
        monkeypatch.setattr(fused, f"build_{service}", spy(real, service, calls))
    yield calls


def spy(real: Callable[..., Awaitable[object]], service: str,
        calls: dict[str, object]) -> Callable[..., Awaitable[object]]:
    async def call(settings: object, *args: Any, **kwargs: Any) -> object:
        calls[service] = settings
        return await real(settings, *args, **kwargs)

    return call


async def test_each_wiring_function_is_handed_its_settings_and_reads_every_field(
    settings: FusedSettings, wiring_calls: dict[str, object]
) -> None:
    copies = {service: recording(getattr(settings, service)) for service in SERVICES}
    watched = FusedSettings(**{service: copy for service, (copy, _) in copies.items()})
    async with built(watched):
        pass
    for service, cls in SERVICES.items():
        copy, read = copies[service]
        assert wiring_calls[service] is copy
        unread = {f.name for f in own_fields(cls)} - NODE_FIELDS.get(service, set()) - read
        assert unread == set(), f"{service} settings never used in fused mode: {unread}"


async def test_fused_services_behave_as_their_settings_say(
    settings: FusedSettings, tmp_path: Path
) -> None:
    async with built(settings) as mesh:
        # The batcher gives up on a version no worker serves after no_worker_grace (0.2 s),
        # not after the default 5 s.
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await mesh.router.core.infer(request("r1", version="1"))
        assert time.monotonic() - started < 2.0
        assert mesh.gateway.grpc_address == (
            f"{settings.gateway.host}:{settings.gateway.grpc_port}"
        )
        # The router's prediction log spools under its own directory for this instance.
        names = await asyncio.to_thread(lambda: [p.name for p in (tmp_path / "spool").iterdir()])
        assert names == [instance_dir_name(settings.router.instance_id)]


def test_the_core_takes_public_connections_with_one_front_only() -> None:
    # With two or more fronts the core only batches and runs the model (deploy/fused.py):
    # the kernel spreads connections evenly, and a core that also batched for every front
    # carried the busiest of the three loops (docs/PERFORMANCE.md).
    def process(**env: str) -> fused.FusedProcess:
        return load_settings(fused.FusedProcess, "fused",
                             {f"INFERMESH_FUSED_{k.upper()}": v for k, v in env.items()})

    assert process().core_serves_public  # one process: it is the whole plane
    assert process(processes="2").core_serves_public
    assert not process(processes="3").core_serves_public
    assert not process(processes="2", core_public="0").core_serves_public
    assert process(processes="3", core_public="1").core_serves_public
    with pytest.raises(InvalidInput, match="INFERMESH_FUSED_CORE_PUBLIC=0 needs"):
        process(core_public="0")
