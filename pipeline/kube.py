"""The optional Kubernetes path: an ephemeral Dask cluster per run, from a DaskCluster spec.

The spec is the dask-kubernetes operator's custom resource
(``kubernetes.dask.org/v1``, kind ``DaskCluster``): a scheduler pod spec and
service, and a worker group. ``load_cluster_spec`` reads and checks it
without any Kubernetes client; ``kube_cluster`` hands it to
``dask_kubernetes.operator.KubeCluster``, which creates it, waits for the
scheduler, and deletes it when closed. dask-kubernetes is an optional extra,
imported only inside ``kube_cluster``.
"""

from __future__ import annotations

import copy
import re
import secrets
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.yaml_input import read_yaml

API_VERSION = "kubernetes.dask.org/v1"
KIND = "DaskCluster"
#: The extended resource of the NVIDIA device plugin, in container limits.
GPU_LIMIT = "nvidia.com/gpu"
#: The Dask worker resource GPU tasks ask for; the same as ``pipeline.cluster.GPU_RESOURCE``
#: (not imported from there, so that this module stays free of distributed).
GPU_RESOURCE = "GPU"
#: The pod label the operator puts on every pod of a cluster (and the scheduler service selects).
CLUSTER_LABEL = "dask.org/cluster-name"
INSTALL_HINT = "pip install 'fcn-pipeline[kubernetes]'"

_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
#: The scheduler service is "<name>-scheduler", and a service name is a DNS label (63 characters).
_MAX_NAME = 63 - len("-scheduler")


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _DNS_LABEL.fullmatch(name) or len(name) > _MAX_NAME:
        raise ConfigError(
            f"{where} must be a DNS label of at most {_MAX_NAME} characters (lower-case letters, "
            f"digits and '-', starting with a letter), got {name!r}"
        )
    return name


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _containers(spec: Mapping[str, Any], role: str, source: str) -> list[Mapping[str, Any]]:
    section = _mapping(spec.get(role), f"{source}: spec.{role}")
    pod = _mapping(section.get("spec"), f"{source}: spec.{role}.spec (a pod spec)")
    containers = pod.get("containers")
    if not isinstance(containers, list) or not containers:
        raise ConfigError(f"{source}: spec.{role}.spec.containers must list at least one container")
    for k, container in enumerate(containers):
        _mapping(container, f"{source}: spec.{role}.spec.containers[{k}]")
    return containers


def _main_container(
    containers: list[Mapping[str, Any]], role: str
) -> tuple[int, Mapping[str, Any]]:
    """The container named after its role ("worker"), else the first one."""
    for k, container in enumerate(containers):
        if container.get("name") == role:
            return k, container
    return 0, containers[0]


def worker_resources(command: list[str]) -> dict[str, float]:
    """The Dask resources a ``dask worker`` command advertises (``--resources "GPU=1 X=2"``)."""
    found: dict[str, float] = {}
    values: list[str] = []
    for k, arg in enumerate(command):
        if arg == "--resources" and k + 1 < len(command):
            values.append(command[k + 1])
        elif arg.startswith("--resources="):
            values.append(arg.split("=", 1)[1])
    for value in values:
        for item in value.replace(",", " ").split():
            name, _, amount = item.partition("=")
            try:
                found[name] = float(amount)
            except ValueError as exc:
                raise ConfigError(f"--resources {value!r}: {item!r} is not NAME=NUMBER") from exc
    return found


def _gpu_limit(container: Mapping[str, Any], where: str) -> int:
    resources = container.get("resources") or {}
    limits = _mapping(resources, f"{where}.resources").get("limits") or {}
    raw = _mapping(limits, f"{where}.resources.limits").get(GPU_LIMIT)
    if raw is None:
        return 0
    try:
        return int(str(raw))
    except ValueError as exc:
        raise ConfigError(
            f"{where}.resources.limits.{GPU_LIMIT} must be a whole number, got {raw!r}"
        ) from exc


def check_cluster_spec(
    spec: Any, *, source: str = "cluster spec", gpu: bool | None = None
) -> dict[str, Any]:
    """Check a DaskCluster resource; return it. See ``load_cluster_spec``."""
    spec = _mapping(spec, f"{source}: the document")
    if spec.get("apiVersion") != API_VERSION or spec.get("kind") != KIND:
        raise ConfigError(
            f"{source}: expected apiVersion {API_VERSION} and kind {KIND} (the dask-kubernetes "
            f"operator's resource), got {spec.get('apiVersion')!r} {spec.get('kind')!r}"
        )
    metadata = _mapping(spec.get("metadata"), f"{source}: metadata")
    _check_name(metadata.get("name"), f"{source}: metadata.name")
    body = _mapping(spec.get("spec"), f"{source}: spec")
    scheduler = _mapping(body.get("scheduler"), f"{source}: spec.scheduler")
    _mapping(scheduler.get("service"), f"{source}: spec.scheduler.service (the scheduler Service)")
    _containers(body, "scheduler", source)
    k, worker = _main_container(_containers(body, "worker", source), "worker")
    where = f"{source}: spec.worker.spec.containers[{k}]"
    command = [str(a) for a in (worker.get("command") or []) + (worker.get("args") or [])]
    advertised = worker_resources(command).get(GPU_RESOURCE, 0)
    devices = _gpu_limit(worker, where)
    wants_gpu = bool(devices) if gpu is None else gpu
    if wants_gpu and not devices:
        raise ConfigError(f"{where}.resources.limits must ask for the GPU: {GPU_LIMIT}: \"1\"")
    if wants_gpu and advertised != devices:
        raise ConfigError(
            f"{where}: the worker command must advertise its GPU to Dask as "
            f"--resources {GPU_RESOURCE}={devices} (one per {GPU_LIMIT} in its limits; GPU tasks "
            f"ask for {GPU_RESOURCE}=1), got {command}"
        )
    if advertised and not devices:
        raise ConfigError(
            f"{where}: the worker advertises --resources {GPU_RESOURCE}={advertised:g} but its "
            f"limits give it no {GPU_LIMIT}; GPU tasks would land on a worker without a GPU"
        )
    return dict(spec)


def load_cluster_spec(path: str | PathLike[str], *, gpu: bool | None = None) -> dict[str, Any]:
    """Read and check a DaskCluster resource file (``kubernetes.dask.org/v1``).

    Checks the kind, a scheduler (pod spec and service) and a worker pod spec.
    When the run needs a GPU (``gpu=True``, or ``None`` and the worker's
    limits ask for ``nvidia.com/gpu``), the worker command must advertise
    ``--resources GPU=<n>`` with ``n`` the number of GPUs in its limits.
    Errors are ConfigErrors naming the file and the field.
    """
    data = read_yaml(Path(path), what="cluster spec").data
    if data is None:
        raise ConfigError(f"{path}: the cluster spec is empty")
    return check_cluster_spec(data, source=str(path), gpu=gpu)


def named_cluster_spec(spec: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    """A copy of ``spec`` under ``name`` (default: its own name plus a random suffix).

    KubeCluster takes the cluster name from ``metadata.name`` of a custom spec
    and ignores its ``name`` argument, so the name is set here, and the
    scheduler service's selector follows it.
    """
    named = copy.deepcopy(dict(check_cluster_spec(spec)))
    base = named["metadata"]["name"]
    if name is None:
        name = f"{base[:_MAX_NAME - 7]}-{secrets.token_hex(3)}"
    _check_name(name, "cluster name")
    named["metadata"]["name"] = name
    selector = named["spec"]["scheduler"]["service"].get("selector")
    if isinstance(selector, dict) and CLUSTER_LABEL in selector:
        selector[CLUSTER_LABEL] = name
    return named


def kube_cluster(spec: Mapping[str, Any], *, name: str | None = None) -> Any:
    """Create an ephemeral Dask cluster on Kubernetes from a DaskCluster ``spec``.

    Returns a ``dask_kubernetes.operator.KubeCluster``; closing it (or leaving
    its ``with`` block) deletes the cluster. The name defaults to the spec's
    name with a random suffix, and creation refuses to attach to an existing
    cluster of that name (which closing would otherwise delete). Needs the
    dask-kubernetes operator in the cluster and, in a pod, a service account
    allowed to manage daskclusters (``deploy/README.md``).
    """
    request = named_cluster_spec(spec, name)
    try:
        from dask_kubernetes.operator import KubeCluster
        from dask_kubernetes.operator.kubecluster.kubecluster import CreateMode
    except ImportError as exc:
        raise ConfigError(
            f"--cluster kubernetes needs dask-kubernetes, which is not installed: {INSTALL_HINT}"
        ) from exc
    namespace = request["metadata"].get("namespace")
    try:
        return KubeCluster(
            custom_cluster_spec=request,
            shutdown_on_close=True,
            create_mode=CreateMode.CREATE_ONLY,
            **({"namespace": namespace} if namespace else {}),
        )
    except Exception as exc:  # kr8s, httpx, timeouts: KubeCluster has no error root of its own
        raise ConfigError(
            f"cannot create the Dask cluster {request['metadata']['name']} on Kubernetes "
            f"({type(exc).__name__}: {exc}); is the dask-kubernetes operator installed, and may "
            "this account create daskclusters (deploy/README.md, RBAC)?"
        ) from exc
