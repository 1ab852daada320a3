"""The Kubernetes path up to the API call: the DaskCluster spec is checked, named and
handed to KubeCluster with the arguments its real signature takes; no cluster needed."""

from __future__ import annotations

import copy
import inspect
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.errors import ConfigError
from pipeline.kube import (
    GPU_RESOURCE,
    INSTALL_HINT,
    check_cluster_spec,
    kube_cluster,
    load_cluster_spec,
    named_cluster_spec,
    worker_resources,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "deploy" / "base" / "daskcluster.yaml"


def spec(*, args: list[str] | None = None, gpus: str | None = "1") -> dict[str, Any]:
    worker: dict[str, Any] = {
        "name": "worker", "image": "fcn-pipeline",
        "command": ["dask", "worker"],
        "args": ["--nthreads", "1"] + (["--resources", "GPU=1"] if args is None else args),
    }
    if gpus is not None:
        worker["resources"] = {"limits": {"nvidia.com/gpu": gpus}}
    return {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskCluster",
        "metadata": {"name": "labels"},
        "spec": {
            "scheduler": {
                "spec": {"containers": [{"name": "scheduler", "image": "fcn-pipeline"}]},
                "service": {"type": "ClusterIP", "selector": {
                    "dask.org/cluster-name": "labels", "dask.org/component": "scheduler"}},
            },
            "worker": {"replicas": 1, "spec": {"containers": [worker]}},
        },
    }


def test_the_shipped_cluster_spec_loads_as_a_gpu_cluster() -> None:
    loaded = load_cluster_spec(SHIPPED)
    assert loaded["metadata"]["name"] == "fcn-pipeline"
    load_cluster_spec(SHIPPED, gpu=True)


def test_the_gpu_resource_is_the_one_tasks_ask_for() -> None:
    from pipeline.cluster import GPU_RESOURCE as TASKS_ASK_FOR

    assert GPU_RESOURCE == TASKS_ASK_FOR


@pytest.mark.parametrize(("command", "expected"), [
    (["dask", "worker", "--resources", "GPU=1"], {"GPU": 1.0}),
    (["--resources=GPU=2,MEM=1e9"], {"GPU": 2.0, "MEM": 1e9}),
    (["--resources", "GPU=1 MEM=4"], {"GPU": 1.0, "MEM": 4.0}),
    (["--nthreads", "1"], {}),
])
def test_worker_resources_are_parsed_like_dask_worker(
    command: list[str], expected: dict[str, float]
) -> None:
    assert worker_resources(command) == expected


def test_a_gpu_worker_must_advertise_the_gpu_resource() -> None:
    with pytest.raises(
        ConfigError, match=r"containers\[0\]: the worker command must advertise .*GPU=1"
    ):
        check_cluster_spec(spec(args=[]), source="c.yaml")
    with pytest.raises(ConfigError, match="GPU=1"):
        check_cluster_spec(spec(args=["--resources", "GPU=2"]))


def test_asking_for_a_gpu_needs_a_gpu_limit() -> None:
    with pytest.raises(ConfigError, match=r"resources.limits must ask for the GPU: nvidia.com/gpu"):
        check_cluster_spec(spec(args=[], gpus=None), gpu=True)
    check_cluster_spec(spec(args=[], gpus=None))  # a CPU cluster is fine when no GPU is asked for


def test_a_gpu_resource_without_a_gpu_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"no nvidia\.com/gpu"):
        check_cluster_spec(spec(gpus=None))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.update(kind="Deployment"),
     "expected apiVersion kubernetes.dask.org/v1 and kind DaskCluster"),
    (lambda s: s["spec"].pop("worker"), r"spec.worker must be a mapping"),
    (lambda s: s["spec"]["scheduler"].pop("service"), r"spec.scheduler.service"),
    (lambda s: s["spec"]["scheduler"]["spec"].update(containers=[]),
     r"spec.scheduler.spec.containers must list"),
    (lambda s: s["metadata"].update(name="Labels_1"), r"metadata.name must be a DNS label"),
    (lambda s: s["metadata"].update(name="x" * 54),
     r"metadata.name must be a DNS label of at most 53"),
])
def test_basic_structure_is_checked(edit: Any, message: str) -> None:
    bad = spec()
    edit(bad)
    with pytest.raises(ConfigError, match=message):
        check_cluster_spec(bad, source="c.yaml")


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec(args=[])))
    with pytest.raises(ConfigError, match=rf"^{path}: spec.worker"):
        load_cluster_spec(path)
    path.write_text("kind: DaskCluster\nkind: Pod\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: duplicate key 'kind'"):
        load_cluster_spec(path)


def test_naming_copies_the_spec_and_moves_the_selector() -> None:
    original = spec()
    kept = copy.deepcopy(original)
    named = named_cluster_spec(original, "run-2024-06-30")
    assert named["metadata"]["name"] == "run-2024-06-30"
    selector = named["spec"]["scheduler"]["service"]["selector"]
    assert selector["dask.org/cluster-name"] == "run-2024-06-30"
    assert original == kept
    unique = {named_cluster_spec(original)["metadata"]["name"] for _ in range(5)}
    assert len(unique) == 5 and all(n.startswith("labels-") for n in unique)
    with pytest.raises(ConfigError, match="cluster name must be a DNS label"):
        named_cluster_spec(original, "Run 1")


class _Captured:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


def test_kube_cluster_sends_the_checked_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a stand-in dask_kubernetes: what KubeCluster would be given."""
    class CreateMode:
        CREATE_ONLY = "create-only-sentinel"

    operator = types.ModuleType("dask_kubernetes.operator")
    operator.KubeCluster = _Captured  # type: ignore[attr-defined]
    kubecluster = types.ModuleType("dask_kubernetes.operator.kubecluster.kubecluster")
    kubecluster.CreateMode = CreateMode  # type: ignore[attr-defined]
    for name, module in {
        "dask_kubernetes": types.ModuleType("dask_kubernetes"),
        "dask_kubernetes.operator": operator,
        "dask_kubernetes.operator.kubecluster":
            types.ModuleType("dask_kubernetes.operator.kubecluster"),
        "dask_kubernetes.operator.kubecluster.kubecluster": kubecluster,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)

    source = spec()
    source["metadata"]["namespace"] = "geo"
    cluster = kube_cluster(source, name="nightly-1")
    assert isinstance(cluster, _Captured)
    sent = cluster.kwargs
    assert sent["shutdown_on_close"] is True
    assert sent["create_mode"] == CreateMode.CREATE_ONLY
    assert sent["namespace"] == "geo"
    request = sent["custom_cluster_spec"]
    assert request["metadata"]["name"] == "nightly-1"
    worker = request["spec"]["worker"]["spec"]["containers"][0]
    assert worker["args"][-2:] == ["--resources", "GPU=1"]
    assert source["metadata"]["name"] == "labels"


def test_kube_cluster_without_the_extra_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    with pytest.raises(ConfigError, match=INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")):
        kube_cluster(spec())


def test_kube_cluster_matches_the_real_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the installed dask_kubernetes: the keyword arguments bind to the real __init__."""
    operator = pytest.importorskip(
        "dask_kubernetes.operator", reason="the kubernetes extra is not installed"
    )
    from dask_kubernetes.operator.kubecluster.kubecluster import CreateMode

    real = operator.KubeCluster
    monkeypatch.setattr(operator, "KubeCluster", _Captured)
    sent = kube_cluster(load_cluster_spec(SHIPPED)).kwargs
    inspect.signature(real).bind(**sent)
    assert sent["create_mode"] is CreateMode.CREATE_ONLY
    assert sent["custom_cluster_spec"]["metadata"]["name"].startswith("fcn-pipeline-")


def test_a_cluster_that_cannot_be_created_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    operator = pytest.importorskip(
        "dask_kubernetes.operator", reason="the kubernetes extra is not installed"
    )

    def refuse(**kwargs: Any) -> None:
        raise RuntimeError("Failed to create DaskCluster resource.")

    monkeypatch.setattr(operator, "KubeCluster", refuse)
    with pytest.raises(ConfigError, match=r"cannot create the Dask cluster nightly on Kubernetes "
                                          r"\(RuntimeError: Failed to create DaskCluster"):
        kube_cluster(spec(), name="nightly")
