"""Actuators: what turns a desired replica count into workers.

One protocol, two engines (like httpx's transports: one interface, several implementations):

- `EtcdActuator` writes `scale/{model}/{version}` = {"replicas", "reason", "at"} and, from
  the autoscaler, "batchers" (the k routers and batchers spread the version over, read by
  `ModelCatalog.batchers`). The local
  launcher's supervisor follows those records (starting warmed-up workers, draining stopping
  ones). The autoscaler always writes this record, whatever the engine: it is the published
  desired state, and the next tick reads it back to count workers still starting.
- `KubeActuator` patches the `scale` subresource of the version's worker Deployment through the
  Kubernetes API (`kubernetes_asyncio`, aiohttp underneath), for a mesh run on Kubernetes.

An actuator that cannot act raises `ActuationFailed` with a message that says what to fix; the
runner logs it and tries again on its next tick.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import re
from typing import Protocol

import aetcd
import orjson
from kubernetes_asyncio import client as kube
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)

DEPLOYMENT_TEMPLATE = "infermesh-worker-{model}-{version}"
MERGE_PATCH = "application/merge-patch+json"


class ActuationFailed(Exception):
    """The engine refused or could not be reached; the message names what and why."""


class Actuator(Protocol):
    """Makes `replicas` workers of (model, version) exist."""

    async def apply(self, model: str, version: str, replicas: int) -> None: ...


class EtcdActuator:
    """Publishes the desired replicas under `scale/` for the launcher to follow."""

    def __init__(self, etcd: aetcd.Client, *, etcd_prefix: str) -> None:
        self._etcd = etcd
        self._prefix = etcd_prefix

    async def apply(self, model: str, version: str, replicas: int) -> None:
        await self.publish(model, version, replicas, reason="")

    async def publish(self, model: str, version: str, replicas: int, *, reason: str,
                      batchers: int | None = None) -> None:
        """Write the record with the decision's reason and the wall-clock time (and the
        batchers the version spreads over, when given)."""
        record: dict[str, object] = {"replicas": replicas, "reason": reason,
                                     "at": datetime.datetime.now(datetime.UTC).isoformat()}
        if batchers is not None:
            record["batchers"] = batchers
        key = f"{self._prefix}scale/{model}/{version}".encode()
        try:
            await self._etcd.put(key, orjson.dumps(record))
        except Exception as exc:  # aetcd raises many kinds (connection, auth, timeout)
            raise ActuationFailed(f"etcd: writing {key.decode()} failed: {exc!r}") from exc


def deployment_name(model: str, version: str, template: str = DEPLOYMENT_TEMPLATE) -> str:
    """The worker Deployment of (model, version): `template` filled in, made a DNS-1123 label
    (lower case, `[a-z0-9-]`, at most 63 characters; a shortened name ends in a hash so two
    long names stay apart)."""
    filled = template.format(model=model, version=version).lower()
    name = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", filled)).strip("-")
    if len(name) > 63:
        digest = hashlib.sha256(filled.encode()).hexdigest()[:8]
        name = f"{name[:54].rstrip('-')}-{digest}"
    if not name:
        raise ValueError(f"deployment name template {template!r} gives an empty name")
    return name


class KubeActuator:
    """Sets `spec.replicas` of the version's worker Deployment (its `scale` subresource)."""

    def __init__(self, api: kube.ApiClient, *, namespace: str,
                 template: str = DEPLOYMENT_TEMPLATE, request_timeout: float = 5.0) -> None:
        self._apps = kube.AppsV1Api(api)
        self._namespace = namespace
        self._template = template
        self._timeout = request_timeout

    async def apply(self, model: str, version: str, replicas: int) -> None:
        name = deployment_name(model, version, self._template)
        where = f"deployment {self._namespace}/{name}"
        try:
            # `_content_type` is accepted through **kwargs; the stubs do not list it.
            await self._apps.patch_namespaced_deployment_scale(  # type: ignore[call-arg]
                name, self._namespace, {"spec": {"replicas": replicas}},
                _content_type=MERGE_PATCH, _request_timeout=self._timeout,
                field_manager="infermesh-autoscaler",
            )
        except ApiException as exc:
            raise ActuationFailed(f"kubernetes: scaling {where} to {replicas} failed: "
                                  f"{_explain(exc)}") from exc
        except (OSError, TimeoutError) as exc:
            raise ActuationFailed(f"kubernetes: the API server did not answer while scaling "
                                  f"{where}: {exc!r}") from exc
        log.info("kubernetes: scaled %s to %d", where, replicas)


def _explain(exc: ApiException) -> str:
    message = ""
    try:
        body = orjson.loads(exc.body or b"{}")
        message = str(body.get("message", "")) if isinstance(body, dict) else ""
    except orjson.JSONDecodeError:
        message = ""
    hint = {404: "no such Deployment (is the version deployed under that name and namespace?)",
            403: "forbidden (the autoscaler's service account needs patch on "
                 "deployments/scale in this namespace)",
            401: "unauthorized (no valid service account token)"}.get(exc.status or 0, "")
    parts = [f"HTTP {exc.status}", hint, message]
    return "; ".join(part for part in parts if part)


async def open_kube_api(api_url: str) -> kube.ApiClient:
    """A Kubernetes API client: at `api_url` without credentials (e.g. `kubectl proxy`), or
    with the pod's service account when `api_url` is empty. The caller closes it."""
    configuration = kube.Configuration()
    if api_url:
        configuration.host = api_url
    else:
        # Reads the service account's token and CA files: off the event loop.
        await asyncio.to_thread(kube_config.load_incluster_config,
                                client_configuration=configuration)
    return kube.ApiClient(configuration)
