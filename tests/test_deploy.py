"""deploy/: the manifests render, validate strictly offline (Kubernetes schemas, the operator's
CRD schemas), meet the "restricted" Pod Security Standard, and agree with workflows/, the
Makefile and each other."""

from __future__ import annotations

import base64
import functools
import importlib.resources
import ipaddress
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from pipeline.kube import check_cluster_spec
from pipeline.tls import TlsFiles, client_context
from pipeline.workflow import validate_workflow
from tests.certificates import make_certificates, readme_block, run_block

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = ["deploy/base", "deploy/overlays/example"]
#: The Kubernetes version the manifests are validated against (kubernetes-validate's schemas).
K8S_VERSION = "1.32.0"
RUN_AS_USER = 10001
DASK_GROUP = "kubernetes.dask.org"


# --------------------------------------------------------------------------- rendering


@functools.cache
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl is not installed: cannot render the kustomizations (kubectl kustomize)"
        )
    done = subprocess.run([kubectl, "kustomize", str(ROOT / kustomization)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{done.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(done.stdout) if d)
    assert docs, f"{kustomization} renders nothing"
    return docs


def all_docs() -> Iterator[tuple[str, dict[str, Any]]]:
    for kustomization in KUSTOMIZATIONS:
        for doc in render(kustomization):
            yield kustomization, doc


def of_kind(kustomization: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in render(kustomization) if d["kind"] == kind]


def ident(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


# --------------------------------------------------------------------------- schemas


def validate_kubernetes(doc: dict[str, Any]) -> None:
    """Strict validation against Kubernetes' own schemas; a kind without one raises."""
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _strict_definitions() -> Resource:
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    path = folder / f"v{K8S_VERSION}-local-strict" / "_definitions.json"
    return Resource.from_contents(json.loads(path.read_text()))


def _forbid_unknown_fields(schema: Any) -> Any:
    """A CRD schema made strict like kubectl's field validation: unknown fields are errors."""
    if isinstance(schema, dict):
        schema = {k: _forbid_unknown_fields(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_forbid_unknown_fields(v) for v in schema]
    return schema


@functools.cache
def operator_crds() -> dict[str, tuple[str, dict[str, Any]]]:
    """Kind -> (file, CRD) of the fully expanded CRDs shipped in the dask-kubernetes package.

    They are the operator's Helm chart CRDs,
    dask_kubernetes/operator/deployment/helm/dask-kubernetes-operator/crds/*.yaml
    (the customresources/ sources hold python:// references, not schemas).
    """
    try:
        package = importlib.resources.files("dask_kubernetes")
    except ModuleNotFoundError:
        pytest.fail("dask-kubernetes is not installed: it ships the DaskCluster CRD schema the "
                    "manifests are validated against (pip install -e '.[test]')")
    crds: dict[str, tuple[str, dict[str, Any]]] = {}
    for path in sorted(Path(str(package)).rglob("crds/*.yaml")):
        text = path.read_text()
        if "CustomResourceDefinition" not in text or "python://" in text:
            continue
        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if doc.get("kind") == "CustomResourceDefinition" and doc["spec"]["group"] == DASK_GROUP:
            crds[doc["spec"]["names"]["kind"]] = (str(path.relative_to(str(package))), doc)
    assert "DaskCluster" in crds, f"no DaskCluster CRD found under {package}"
    return crds


def validate_custom(doc: dict[str, Any]) -> None:
    """Strict validation of a custom resource against its CRD's openAPIV3Schema."""
    group, _, version = doc["apiVersion"].partition("/")
    if doc["kind"] not in operator_crds():
        raise LookupError(f"no CRD schema for {doc['apiVersion']} {doc['kind']}")
    _, crd = operator_crds()[doc["kind"]]
    assert crd["spec"]["group"] == group
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    if version not in served:
        raise LookupError(f"the {doc['kind']} CRD serves {sorted(served)}, not {version}")
    schema = _forbid_unknown_fields(served[version]["schema"]["openAPIV3Schema"])
    assert "$ref" not in json.dumps(schema), "the CRD schema is not expanded"
    schema["properties"] = {
        **schema["properties"],
        "apiVersion": {"const": doc["apiVersion"]},
        "kind": {"const": doc["kind"]},
        "metadata": {"$ref": "https://kubernetes.io/api/_definitions.json#/$defs/"
                             "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
    }
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    registry = _strict_definitions() @ Registry()
    jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)


def validate_any(doc: dict[str, Any]) -> None:
    if doc["apiVersion"].split("/")[0] == DASK_GROUP:
        validate_custom(doc)
    else:
        validate_kubernetes(doc)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_manifest_validates_strictly(kustomization: str) -> None:
    for doc in render(kustomization):
        validate_any(doc)  # raises on an unknown kind, a missing schema or a bad field


def test_the_validators_fail_rather_than_skip() -> None:
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
        validate_any({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    with pytest.raises(LookupError):
        validate_any(
            {"apiVersion": f"{DASK_GROUP}/v1", "kind": "DaskWidget", "metadata": {"name": "w"}}
        )
    with pytest.raises(LookupError):
        validate_any(
            {"apiVersion": f"{DASK_GROUP}/v2", "kind": "DaskCluster", "metadata": {"name": "w"}}
        )
    cronjob = json.loads(json.dumps(of_kind("deploy/base", "CronJob")[0]))
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    container["imagePullPolcy"] = "Always"
    with pytest.raises(jsonschema.ValidationError):
        validate_any(cronjob)
    cluster = json.loads(json.dumps(of_kind("deploy/base", "DaskCluster")[0]))
    cluster["spec"]["worker"]["spec"]["containers"][0]["resorces"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate_any(cluster)
    cluster = json.loads(json.dumps(of_kind("deploy/base", "DaskCluster")[0]))
    cluster["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 1
    with pytest.raises(jsonschema.ValidationError):  # the CRD types quantities as strings
        validate_any(cluster)


def test_the_daskcluster_pods_and_service_also_validate_as_kubernetes_objects() -> None:
    for cluster in of_kind("deploy/overlays/example", "DaskCluster"):
        for role in ("scheduler", "worker"):
            validate_kubernetes({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": role},
                                 "spec": cluster["spec"][role]["spec"]})
        validate_kubernetes({"apiVersion": "v1", "kind": "Service",
                             "metadata": {"name": "scheduler"},
                             "spec": cluster["spec"]["scheduler"]["service"]})


# --------------------------------------------------------------------------- pods


#: Kind -> paths to its pod specs. A kind holding containers that is not listed fails the tests.
POD_SPECS: dict[str, list[tuple[str, ...]]] = {
    "Pod": [("spec",)],
    "Deployment": [("spec", "template", "spec")],
    "StatefulSet": [("spec", "template", "spec")],
    "DaemonSet": [("spec", "template", "spec")],
    "ReplicaSet": [("spec", "template", "spec")],
    "Job": [("spec", "template", "spec")],
    "CronJob": [("spec", "jobTemplate", "spec", "template", "spec")],
    "DaskCluster": [("spec", "scheduler", "spec"), ("spec", "worker", "spec")],
    "DaskWorkerGroup": [("spec", "worker", "spec")],
    "DaskJob": [("spec", "job", "spec"), ("spec", "cluster", "spec", "scheduler", "spec"),
                ("spec", "cluster", "spec", "worker", "spec")],
}


def _has_containers(value: Any) -> bool:
    if isinstance(value, dict):
        return "containers" in value or any(_has_containers(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_containers(v) for v in value)
    return False


def pod_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if doc["kind"] not in POD_SPECS:
        assert not _has_containers(doc), (
            f"{ident(doc)} holds containers but its pod specs are unknown"
        )
        return []
    found = []
    for path in POD_SPECS[doc["kind"]]:
        node: Any = doc
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if node:
            found.append((f"{ident(doc)} {'.'.join(path)}", node))
    return found


def all_pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{k}: {where}", spec) for k, doc in all_docs() for where, spec in pod_specs(doc)]


_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                 "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                 "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                 "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                 "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                       "persistentVolumeClaim", "projected", "secret"}
_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What breaks the "restricted" Pod Security Standard (Kubernetes v1.32), control by control."""
    bad: list[str] = []
    pod_ctx = pod.get("securityContext") or {}
    containers = [(f"{kind}[{c.get('name')}]", c)
                  for kind in ("initContainers", "containers", "ephemeralContainers")
                  for c in pod.get(kind) or []]
    if not containers:
        bad.append("no containers")
    # Baseline: host namespaces, host ports, hostPath, privileged, capabilities, ...
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            bad.append(f"{field} is true")
    if (pod_ctx.get("windowsOptions") or {}).get("hostProcess"):
        bad.append("pod windowsOptions.hostProcess")
    for sysctl in pod_ctx.get("sysctls") or []:
        if sysctl.get("name") not in _SAFE_SYSCTLS:
            bad.append(f"unsafe sysctl {sysctl.get('name')}")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            bad.append(f"volume {volume.get('name')} of type {sorted(kinds - _RESTRICTED_VOLUMES)}")
    contexts = [(n, c.get("securityContext") or {}) for n, c in containers]
    for scope, ctx in [("pod", pod_ctx), *contexts]:
        if (ctx.get("appArmorProfile") or {}).get("type") == "Unconfined":
            bad.append(f"{scope}: AppArmor Unconfined")
        selinux = ctx.get("seLinuxOptions") or {}
        if (selinux.get("type", "") not in _SELINUX_TYPES or selinux.get("user")
                or selinux.get("role")):
            bad.append(f"{scope}: seLinuxOptions {selinux}")
        if ctx.get("runAsUser") == 0:
            bad.append(f"{scope}: runAsUser 0")
        if ctx.get("runAsNonRoot") is False:
            bad.append(f"{scope}: runAsNonRoot false")
        if (ctx.get("seccompProfile") or {}).get("type") == "Unconfined":
            bad.append(f"{scope}: seccompProfile Unconfined")
    for name, container in containers:
        ctx = container.get("securityContext") or {}
        if ctx.get("privileged"):
            bad.append(f"{name}: privileged")
        if (ctx.get("windowsOptions") or {}).get("hostProcess"):
            bad.append(f"{name}: windowsOptions.hostProcess")
        if ctx.get("procMount", "Default") != "Default":
            bad.append(f"{name}: procMount {ctx.get('procMount')}")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                bad.append(f"{name}: hostPort {port['hostPort']}")
        # Restricted
        if ctx.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = ctx.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{name}: capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: capabilities.add {caps['add']}")
        if not (ctx.get("runAsNonRoot") is True or
                (pod_ctx.get("runAsNonRoot") is True and ctx.get("runAsNonRoot") is not False)):
            bad.append(f"{name}: runAsNonRoot is not true")
        seccomp = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile is {seccomp}, not RuntimeDefault or Localhost")
    return bad


def test_every_workload_kind_is_covered() -> None:
    kinds = {doc["kind"] for _, doc in all_docs()}
    assert {"CronJob", "DaskCluster"} <= kinds
    wheres = [w for w, _ in all_pod_specs()]
    for part in ("CronJob/fcn-pipeline-nightly", "spec.scheduler.spec", "spec.worker.spec"):
        assert any(part in w for w in wheres), part


def test_every_pod_meets_the_restricted_standard() -> None:
    problems = [
        f"{where}: {p}" for where, pod in all_pod_specs() for p in restricted_violations(pod)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("edit", "found"), [
    (lambda p: p.update(hostNetwork=True), "hostNetwork"),
    (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
    (lambda p: p["securityContext"].pop("seccompProfile"), "seccompProfile is None"),
    (lambda p: p["securityContext"].update(runAsUser=0), "runAsUser 0"),
    (lambda p: p["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
     "allowPrivilegeEscalation"),
    (lambda p: p["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
     "drop lacks ALL"),
    (lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
     "capabilities.add"),
    (lambda p: (p["securityContext"].pop("runAsNonRoot"),
                p["containers"][0]["securityContext"].pop("runAsNonRoot")),
     "runAsNonRoot is not true"),
    (lambda p: p["containers"][0]["securityContext"].update(privileged=True), "privileged"),
    (lambda p: p["containers"][0].setdefault("ports", []).append(
        {"containerPort": 80, "hostPort": 80}), "hostPort"),
])
def test_the_restricted_checks_catch_violations(edit: Any, found: str) -> None:
    pod = json.loads(json.dumps(of_kind("deploy/base", "CronJob")[0]))
    pod = pod["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    edit(pod)
    assert any(found in p for p in restricted_violations(pod)), restricted_violations(pod)


def test_pods_have_a_read_only_root_and_writable_tmp_and_no_token() -> None:
    for where, pod in all_pod_specs():
        assert pod.get("automountServiceAccountToken") is False, where
        assert pod["securityContext"]["runAsUser"] == RUN_AS_USER, where
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounts.get("/tmp") in empty_dirs, f"{where}: /tmp is not an emptyDir"
            assert container["resources"]["limits"]["memory"], where


def test_references_resolve_and_secrets_are_only_referenced() -> None:
    for kustomization in KUSTOMIZATIONS:
        docs = render(kustomization)
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert not any(d["kind"] == "Secret" for d in docs), "secrets are referenced, never shipped"
        for where, pod in [p for d in docs for p in pod_specs(d)]:
            assert ("ServiceAccount", pod["serviceAccountName"]) in names, where
            for volume in pod.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    claim = volume["persistentVolumeClaim"]["claimName"]
                    assert ("PersistentVolumeClaim", claim) in names
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in names, where
            for container in pod["containers"]:
                for source in container.get("envFrom", []):
                    assert ("secretRef" not in source
                            or source["secretRef"]["optional"] is True), where
                for env in container.get("env", []):
                    assert "value" not in env or not re.search(
                        r"(?i)secret|password|token|key", env["name"]
                    )


# --------------------------------------------------------------------------- services, RBAC


def test_services_are_cluster_ip_only() -> None:
    seen = 0
    for where, doc in all_docs():
        services = [doc["spec"]] if doc["kind"] == "Service" else []
        if doc["kind"] == "DaskCluster":
            services.append(doc["spec"]["scheduler"]["service"])
        for service in services:
            seen += 1
            assert service.get("type", "ClusterIP") == "ClusterIP", f"{where}: {ident(doc)}"
            assert not any("nodePort" in p for p in service.get("ports", []))
    assert seen


def test_the_runner_has_no_kubernetes_api_rights() -> None:
    for where, doc in all_docs():
        assert doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"), f"{where}: {ident(doc)}"
        assert doc["kind"] not in ("Role", "RoleBinding"), (
            f"{where}: {ident(doc)}: the nightly runner talks to an existing scheduler and "
            "needs no rights; see deploy/README.md before adding any")
        if doc["kind"] == "ServiceAccount":
            assert doc.get("automountServiceAccountToken") is False, ident(doc)


# --------------------------------------------------------------------------- the Dask cluster


def test_the_worker_group_has_one_gpu_per_worker_advertised_to_dask() -> None:
    for kustomization in KUSTOMIZATIONS:
        (cluster,) = of_kind(kustomization, "DaskCluster")
        check_cluster_spec(cluster, source=kustomization, gpu=True)
        (worker,) = cluster["spec"]["worker"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
        command = worker["command"] + worker["args"]
        assert command[:2] == ["dask", "worker"]
        assert " ".join(command).count("--nthreads 1") == 1
        pod = cluster["spec"]["worker"]["spec"]
        assert pod["nodeSelector"] and pod["tolerations"]
        scheduler = cluster["spec"]["scheduler"]["spec"]["containers"][0]
        assert scheduler["command"] == ["dask", "scheduler"]


# --------------------------------------------------------------------------- TLS


#: Role -> the Secret its pods mount: the CA's certificate and the role's own (the
#: layout of kubernetes.io/tls Secrets, and of cert-manager's).
TLS_SECRETS = {"scheduler": "fcn-pipeline-tls-scheduler", "worker": "fcn-pipeline-tls-worker",
               "runner": "fcn-pipeline-tls-runner"}
#: The option of fcn-pipeline run, dask scheduler and dask worker -> the Secret's key.
TLS_KEYS = {"--tls-ca-file": "ca.crt", "--tls-cert": "tls.crt", "--tls-key": "tls.key"}
SECRET_MODE = 0o440  # read-only, for the owner (root) and the pod's fsGroup


def roles(kustomization: str) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Role -> (pod spec, main container) of the scheduler, the workers and the runner."""
    (cluster,) = of_kind(kustomization, "DaskCluster")
    runner_pod = _cronjob(kustomization)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    found = {"runner": (runner_pod, runner_pod["containers"][0])}
    for role in ("scheduler", "worker"):
        pod = cluster["spec"][role]["spec"]
        found[role] = (pod, next(c for c in pod["containers"] if c["name"] == role))
    return found


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def tls_problems(pod: dict[str, Any], container: dict[str, Any], secret: str) -> list[str]:
    """Why ``container`` does not take its TLS files from ``secret``, option by option."""
    args = [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]
    problems = []
    for option, key in TLS_KEYS.items():
        if option not in args[:-1]:
            problems.append(f"no {option}")
            continue
        path = PurePosixPath(args[args.index(option) + 1])
        mount = next((m for m in container.get("volumeMounts", [])
                      if m["mountPath"] == str(path.parent)), None)
        if mount is None:
            problems.append(f"{option} {path}: nothing is mounted at {path.parent}")
            continue
        volume = next(v for v in pod.get("volumes", []) if v["name"] == mount["name"])
        source = volume.get("secret") or {}
        if source.get("secretName") != secret:
            problems.append(f"{option} {path}: {path.parent} is not the Secret {secret}")
        if path.name != key:
            problems.append(f"{option} {path}: the Secret's key is {key}")
        if source.get("optional") or source.get("defaultMode") != SECRET_MODE \
                or not mount.get("readOnly"):
            problems.append(f"{option} {path}: the Secret must be required, mode 0440, "
                            "mounted read-only")
    return problems


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_scheduler_workers_and_runner_speak_tls_only(kustomization: str) -> None:
    """Teeth: --protocol tls, a --tls-* option or the workers' DASK_SCHEDULER_ADDRESS
    taken out of daskcluster.yaml, or the runner's secret volume made optional: this
    fails (each seen failing, restored)."""
    found = roles(kustomization)
    for role, (pod, container) in found.items():
        assert tls_problems(pod, container, TLS_SECRETS[role]) == [], role
    (cluster,) = of_kind(kustomization, "DaskCluster")
    _, scheduler = found["scheduler"]
    args = scheduler["args"]
    assert args[args.index("--protocol") + 1] == "tls"
    address = f"tls://{cluster['metadata']['name']}-scheduler:{args[args.index('--port') + 1]}"
    _, worker = found["worker"]
    assert _env(worker)["DASK_SCHEDULER_ADDRESS"] == address  # else the operator's tcp://
    runner_args = found["runner"][1]["args"]
    assert runner_args[runner_args.index("--scheduler") + 1] == address
    for container in (scheduler, worker):
        assert _env(container)["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"


@pytest.mark.parametrize(("role", "edit", "found"), [
    ("worker", lambda p, c: c["args"].remove("--tls-key"), "no --tls-key"),
    ("scheduler", lambda p, c: c["volumeMounts"].pop(), "nothing is mounted"),
    ("runner", lambda p, c: p["volumes"][-1]["secret"].update(optional=True), "required"),
    ("worker", lambda p, c: p["volumes"][-1]["secret"].update(secretName="other"),
     "is not the Secret"),
])
def test_the_tls_checks_catch_mistakes(role: str, edit: Any, found: str) -> None:
    pod, container = json.loads(json.dumps(roles("deploy/base")[role]))
    assert tls_problems(pod, container, TLS_SECRETS[role]) == []
    edit(pod, container)
    assert any(found in p for p in tls_problems(pod, container, TLS_SECRETS[role]))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_workers_hold_no_storage_credentials(kustomization: str) -> None:
    """Workers read and write on the data volume only: no Secret but their TLS one.

    Teeth: the envFrom secretRef fcn-pipeline-storage put back on the worker container:
    this fails (seen failing, restored)."""
    pod, _ = roles(kustomization)["worker"]
    secrets = {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    assert secrets == {TLS_SECRETS["worker"]}
    assert not any("projected" in v for v in pod.get("volumes", []))
    for container in pod["containers"] + pod.get("initContainers", []):
        assert not any("secretRef" in source for source in container.get("envFrom", []))
        assert not any("secretKeyRef" in (e.get("valueFrom") or {})
                       for e in container.get("env", []))


def test_the_readme_commands_make_the_secrets_the_pods_mount(tmp_path: Path) -> None:
    """The openssl and kubectl blocks of deploy/README.md, run as written (kubectl with
    --dry-run=client): one Secret per role, named as the pods mount it, holding the keys
    the options name, a certificate signed by the CA and its key.

    Teeth: a Secret renamed in the README's kubectl block, or ca.crt left out of it:
    this fails (seen failing, restored)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: cannot run the README's kubectl commands")
    folder = make_certificates(tmp_path / "certificates")
    rendered = run_block(readme_block("create secret"), folder, prelude=(
        'kubectl() { command kubectl "$@" --dry-run=client -o yaml; echo ---; }'))
    secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all(rendered) if d}
    assert set(secrets) == set(TLS_SECRETS.values())
    (namespace,) = of_kind("deploy/overlays/example", "Namespace")
    for role, name in TLS_SECRETS.items():
        secret = secrets[name]
        assert secret["type"] == "kubernetes.io/tls"
        assert secret["metadata"]["namespace"] == namespace["metadata"]["name"]
        assert set(secret["data"]) == set(TLS_KEYS.values())
        files = {}
        for key, value in secret["data"].items():
            files[key] = tmp_path / role / key
            files[key].parent.mkdir(exist_ok=True)
            files[key].write_bytes(base64.b64decode(value))
        client_context(TlsFiles(str(files["ca.crt"]), str(files["tls.crt"]),
                                str(files["tls.key"])))  # a certificate and its key
        verified = subprocess.run(["openssl", "verify", "-CAfile", str(files["ca.crt"]),
                                   str(files["tls.crt"])], capture_output=True, text=True)
        assert verified.returncode == 0, verified.stdout + verified.stderr


# --------------------------------------------------------------------------- cert-manager


CERT_MANAGER = "deploy/cert-manager"
#: The fields of the cert-manager.io/v1 specs used here, as cert-manager's CRDs define them
#: (deploy/crds/cert-manager.io_certificates.yaml and _issuers.yaml, cert-manager 2026-08):
#: a misspelt field is an error here, since the CRD schemas are not available offline.
CERTIFICATE_FIELDS = {"commonName", "dnsNames", "duration", "isCA", "issuerRef", "privateKey",
                      "renewBefore", "secretName", "usages"}
PRIVATE_KEY_FIELDS = {"algorithm", "encoding", "rotationPolicy", "size"}
ISSUER_KINDS = {"selfSigned", "ca"}


def _hours(duration: str) -> float:
    match = re.fullmatch(r"(\d+)h", duration)
    assert match, f"durations are written in hours here, got {duration!r}"
    return float(match.group(1))


def test_cert_manager_issues_the_secrets_the_pods_mount() -> None:
    """deploy/cert-manager: a self-signed Issuer, a CA Certificate, a CA Issuer, and for
    each Secret the pods mount a Certificate that the CA signs, for client and server use.

    Teeth: a Certificate's secretName changed, or its issuerRef pointed at the
    self-signed Issuer: this fails (seen failing, restored)."""
    docs = render(CERT_MANAGER)
    assert {d["apiVersion"] for d in docs} == {"cert-manager.io/v1"}
    issuers = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Issuer"}
    certificates = [d["spec"] for d in docs if d["kind"] == "Certificate"]
    assert len(issuers) + len(certificates) == len(docs)
    for spec in issuers.values():
        assert len(spec) == 1 and set(spec) <= ISSUER_KINDS, spec
    for spec in certificates:
        assert set(spec) <= CERTIFICATE_FIELDS, set(spec) - CERTIFICATE_FIELDS
        assert set(spec["privateKey"]) <= PRIVATE_KEY_FIELDS
        assert spec["issuerRef"] in ({"group": "cert-manager.io", "kind": "Issuer",
                                      "name": name} for name in issuers), spec["issuerRef"]
    (ca_issuer,) = [n for n, s in issuers.items() if "ca" in s]
    (ca,) = [c for c in certificates if c.get("isCA")]
    assert issuers[ca_issuer]["ca"]["secretName"] == ca["secretName"]
    assert "selfSigned" in issuers[ca["issuerRef"]["name"]]
    mounted = {v["secret"]["secretName"] for k in KUSTOMIZATIONS
               for _, pod in [p for d in render(k) for p in pod_specs(d)]
               for v in pod.get("volumes", []) if "secret" in v}
    assert mounted == set(TLS_SECRETS.values())
    leaves = {c["secretName"]: c for c in certificates if not c.get("isCA")}
    assert set(leaves) == mounted
    for spec in leaves.values():
        assert spec["issuerRef"]["name"] == ca_issuer
        assert {"client auth", "server auth"} <= set(spec["usages"])
        assert 0 < _hours(spec["renewBefore"]) < _hours(spec["duration"])


# --------------------------------------------------------------------------- network policy


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is understood here: {selector}"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def reaches(docs: tuple[dict[str, Any], ...], source: dict[str, str],
            target: dict[str, str], port: int) -> bool:
    """Whether a pod with labels ``source`` in the namespace may open ``port`` on a pod
    with labels ``target``, by the NetworkPolicies in ``docs`` (a peer outside the pod
    selector form, a namespace or an address block, counts as admitting anyone)."""
    policies = [d["spec"] for d in docs if d["kind"] == "NetworkPolicy"
                and "Ingress" in d["spec"].get("policyTypes", ["Ingress"])
                and _selects(d["spec"]["podSelector"], target)]
    if not policies:
        return True
    for rule in (r for p in policies for r in p.get("ingress") or []):
        ports = rule.get("ports")
        if ports is not None and not any(p.get("port") in (port, None) for p in ports):
            continue
        peers = rule.get("from")
        if peers is None or any(set(peer) != {"podSelector"}
                                or _selects(peer["podSelector"], source) for peer in peers):
            return True
    return False


def cluster_pods(kustomization: str) -> dict[str, dict[str, str]]:
    """The labels of each kind of pod: the operator's on the Dask pods
    (dask_kubernetes.operator.controller: dask.org/cluster-name and dask.org/component),
    the CronJob's pod template's on the runner, and two strangers."""
    (cluster,) = of_kind(kustomization, "DaskCluster")
    name = cluster["metadata"]["name"]
    template = _cronjob(kustomization)["spec"]["jobTemplate"]["spec"]["template"]
    return {
        "scheduler": {"dask.org/cluster-name": name, "dask.org/component": "scheduler"},
        "worker": {"dask.org/cluster-name": name, "dask.org/component": "worker",
                   "dask.org/workergroup-name": f"{name}-default"},
        "runner": dict(template["metadata"]["labels"]),
        "stranger": {"app": "anything-else"},
        "other cluster's worker": {"dask.org/cluster-name": "other",
                                   "dask.org/component": "worker"},
    }


COMM, DASHBOARD, ANY = 8786, 8787, 40000


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_only_the_runner_and_the_workers_reach_the_scheduler(kustomization: str) -> None:
    """Teeth: networkpolicy.yaml left out of the base, or a rule admitting
    `podSelector: {}`: this fails (seen failing, restored)."""
    docs, pods = render(kustomization), cluster_pods(kustomization)
    allowed = {(s, t, port) for s in pods for t in ("scheduler", "worker")
               for port in (COMM, DASHBOARD, ANY)
               if reaches(docs, pods[s], pods[t], port)}
    assert allowed == {
        ("runner", "scheduler", COMM), ("worker", "scheduler", COMM),
        *{(s, "worker", port) for s in ("scheduler", "worker") for port in (COMM, DASHBOARD, ANY)},
    }, sorted(allowed)


@pytest.mark.parametrize(("edit", "admitted"), [
    (lambda rule: rule["from"].append({"podSelector": {}}), "stranger"),
    (lambda rule: rule["from"].append({"namespaceSelector": {}}), "stranger"),
    (lambda rule: rule.pop("from"), "stranger"),
])
def test_the_reach_check_sees_wider_rules(edit: Any, admitted: str) -> None:
    docs = json.loads(json.dumps(render("deploy/base")))
    pods = cluster_pods("deploy/base")
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy"
                  and _selects(d["spec"]["podSelector"], pods["scheduler"]))
    assert not reaches(tuple(docs), pods[admitted], pods["scheduler"], COMM)
    edit(policy["spec"]["ingress"][0])
    assert reaches(tuple(docs), pods[admitted], pods["scheduler"], COMM)


#: Where a Dask pod might send: pods of the namespace by their labels (cluster_pods), the
#: cluster DNS, and addresses outside the cluster.
NAMESPACE = {"kubernetes.io/metadata.name": "fcn-pipeline"}
DNS = {"namespace": {"kubernetes.io/metadata.name": "kube-system"},
       "pod": {"k8s-app": "kube-dns"}}
METADATA, INTERNET = {"ip": "169.254.169.254"}, {"ip": "203.0.113.7"}


def _peer_admits(peer: dict[str, Any], dest: dict[str, Any]) -> bool:
    """Whether an egress peer (podSelector, namespaceSelector, ipBlock) covers ``dest``;
    an ipBlock counts as covering every pod (pod addresses may fall in it)."""
    assert set(peer) <= {"podSelector", "namespaceSelector", "ipBlock"}, peer
    if "ipBlock" in peer:
        if "ip" not in dest:
            return True
        block = peer["ipBlock"]
        address = ipaddress.ip_address(dest["ip"])
        return (address in ipaddress.ip_network(block["cidr"])
                and not any(address in ipaddress.ip_network(e) for e in block.get("except", [])))
    if "ip" in dest:
        return False
    namespace = dest.get("namespace", NAMESPACE)
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], namespace):
            return False
    elif namespace != NAMESPACE:
        return False
    return "podSelector" not in peer or _selects(peer["podSelector"], dest["pod"])


def sends(docs: tuple[dict[str, Any], ...], source: dict[str, str], dest: dict[str, Any],
          port: int, protocol: str = "TCP") -> bool:
    """Whether a pod with labels ``source`` may open ``port`` (``protocol``) to ``dest``
    (``{"pod": labels}``, with ``"namespace": labels`` outside the namespace, or
    ``{"ip": address}``), by the egress rules of the NetworkPolicies in ``docs``."""
    policies = [d["spec"] for d in docs if d["kind"] == "NetworkPolicy"
                and "Egress" in d["spec"].get("policyTypes", [])
                and _selects(d["spec"]["podSelector"], source)]
    if not policies:
        return True
    for rule in (r for p in policies for r in p.get("egress") or []):
        ports = rule.get("ports")
        if ports is not None and not any(p.get("port") in (port, None)
                                         and p.get("protocol", "TCP") == protocol
                                         for p in ports):
            continue
        peers = rule.get("to")
        if peers is None or any(_peer_admits(peer, dest) for peer in peers):
            return True
    return False


def _destinations(pods: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
    return {**{name: {"pod": labels} for name, labels in pods.items()},
            "dns": DNS, "metadata": METADATA, "internet": INTERNET}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_dask_pods_reach_only_each_other_and_the_cluster_dns(kustomization: str) -> None:
    """Code on a worker may be anyone's who holds a certificate of the CA: the workers and
    the scheduler send only to each other (the workers to the scheduler's comm port) and
    to the DNS, never to the cloud metadata endpoint, other pods or the internet.

    Teeth: the egress rules dropped (policyTypes [Ingress]): the workers reach everything;
    the DNS rule without its namespaceSelector: port 53 on the internet (both seen failing).
    """
    docs, pods = render(kustomization), cluster_pods(kustomization)
    dests = _destinations(pods)
    ports = ((COMM, "TCP"), (DASHBOARD, "TCP"), (ANY, "TCP"), (80, "TCP"), (443, "TCP"),
             (53, "UDP"), (53, "TCP"))
    allowed = {(s, d, port, protocol) for s in ("scheduler", "worker") for d in dests
               for port, protocol in ports if sends(docs, pods[s], dests[d], port, protocol)}
    assert allowed == {
        ("worker", "scheduler", COMM, "TCP"),
        *{(s, "worker", *p) for s in ("scheduler", "worker") for p in ports},
        *{(s, "dns", 53, protocol) for s in ("scheduler", "worker") for protocol in ("UDP", "TCP")},
    }, sorted(allowed)
    # The runner is not restricted here: its own steps may need object storage.
    assert sends(docs, pods["runner"], INTERNET, 443)


@pytest.mark.parametrize(("edit", "reached"), [
    (lambda rule: rule["to"].append({"podSelector": {}}), "stranger"),
    (lambda rule: rule["to"].append({"namespaceSelector": {}}), "stranger"),
    (lambda rule: rule["to"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}), "metadata"),
    (lambda rule: rule["to"].append({"ipBlock": {"cidr": "0.0.0.0/0",
                                                 "except": ["169.254.169.254/32"]}}),
     "internet"),
    (lambda rule: rule.pop("to"), "internet"),
])
def test_the_egress_check_sees_wider_rules(edit: Any, reached: str) -> None:
    docs = json.loads(json.dumps(render("deploy/base")))
    pods = cluster_pods("deploy/base")
    dest = _destinations(pods)[reached]
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy"
                  and _selects(d["spec"]["podSelector"], pods["worker"]))
    rule = next(r for r in policy["spec"]["egress"] if r.get("ports") is None)  # to workers
    assert not sends(tuple(docs), pods["worker"], dest, ANY)
    edit(rule)
    assert sends(tuple(docs), pods["worker"], dest, ANY)


# --------------------------------------------------------------------------- the CronJob


def _cronjob(kustomization: str) -> dict[str, Any]:
    (cronjob,) = of_kind(kustomization, "CronJob")
    return cronjob


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_cronjob_runs_once_at_a_time_within_deadlines(kustomization: str) -> None:
    spec = _cronjob(kustomization)["spec"]
    job = spec["jobTemplate"]["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["timeZone"] == "Etc/UTC"  # {date} defaults to today in UTC
    assert job["backoffLimit"] >= 0 and job["activeDeadlineSeconds"] > 0
    assert job["ttlSecondsAfterFinished"] > 0
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    fail_fast = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert fail_fast[0]["onExitCodes"]["values"] == [1, 2]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_cronjob_runs_a_shipped_workflow_on_the_shipped_cluster(kustomization: str) -> None:
    cronjob = _cronjob(kustomization)
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (runner,) = pod["containers"]
    args = runner["args"]
    assert args[0] == "run"
    workflow = Path(args[args.index("--workflow") + 1])
    # The file comes from the ConfigMap generated from workflows/, mounted at its folder.
    mount = next(m for m in runner["volumeMounts"] if m["mountPath"] == str(workflow.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    (configmap,) = [d for d in of_kind(kustomization, "ConfigMap")
                    if d["metadata"]["name"] == volume["configMap"]["name"]]
    source = ROOT / "workflows" / workflow.name
    assert source.is_file(), f"{workflow.name} is not in workflows/"
    assert configmap["data"][workflow.name] == source.read_text()
    config = validate_workflow(source, date="2024-06-30")
    assert config.device == "cuda"
    # The scheduler is the DaskCluster's service, in the same namespace, over TLS.
    (cluster,) = of_kind(kustomization, "DaskCluster")
    address = args[args.index("--scheduler") + 1]
    assert address == f"tls://{cluster['metadata']['name']}-scheduler:8786"
    assert cluster["metadata"].get("namespace") == cronjob["metadata"].get("namespace")
    ports = {p["name"]: p["port"] for p in cluster["spec"]["scheduler"]["service"]["ports"]}
    assert ports["tcp-comm"] == 8786
    # Workflow paths are on the volumes both the runner and the workers mount.
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    worker_mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    runner_mounts = {m["mountPath"] for m in runner["volumeMounts"]}
    for path in (*config.scenes, config.output, config.model):
        top = "/" + Path(path).parts[1]
        assert top in worker_mounts and top in runner_mounts, path


# --------------------------------------------------------------------------- the overlay


def test_the_overlay_sets_namespace_image_and_gpu_nodes() -> None:
    docs = render("deploy/overlays/example")
    (namespace,) = [d for d in docs if d["kind"] == "Namespace"]
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace["metadata"]["name"], ident(doc)
    for where, pod in [p for d in docs for p in pod_specs(d)]:
        for container in pod["containers"]:
            assert container["image"] == "registry.example.com/geo/fcn-pipeline:0.1.0", where
    (base,) = of_kind("deploy/base", "DaskCluster")
    (cluster,) = of_kind("deploy/overlays/example", "DaskCluster")
    assert (cluster["spec"]["worker"]["spec"]["nodeSelector"]
            != base["spec"]["worker"]["spec"]["nodeSelector"])


# --------------------------------------------------------------------------- the image


def _makefile_vars() -> dict[str, str]:
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"^(\w+)\s*\?=\s*(.*?)\s*$", text, re.M))


def _dockerfile() -> tuple[dict[str, str], list[str], list[str]]:
    """(ARG defaults, RUN commands split on &&, other instructions) of deploy/Dockerfile."""
    lines: list[str] = []
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1] + " " + line.strip()
        else:
            lines.append(line.strip())
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", "\n".join(lines), re.M))
    runs = [step.strip() for line in lines if line.startswith("RUN ")
            for step in line[4:].split("&&")]
    return {k: v.strip('"') for k, v in args.items()}, runs, lines


def _install_steps(commands: list[str], ref: str) -> list[tuple[str, str]]:
    """Each `pip install` in order.

    As ("pip", ""), ("torch", "index" or "default"), ("package", target).

    ``ref`` writes a variable reference: "$({})" in the Makefile, "${{{}}}" in the Dockerfile.
    """
    steps = []
    for command in commands:
        found = re.search(r"pip install (.*)", command)
        if not found:
            continue
        rest = found.group(1).replace('"', "")
        if re.search(r"--upgrade pip\b", rest):
            steps.append(("pip", ""))
        elif ref.format("TORCH") in rest.split():
            index = "--index-url " + ref.format("TORCH_INDEX")
            steps.append(("torch", "index" if index in rest else "default"))
        elif target := re.search(r"(?:^|\s)(?:-e\s+)?'?(\.(?:\[[\w,-]+\])?)'?(?:\s|$)", rest):
            steps.append(("package", target.group(1)))
        else:
            steps.append(("other", rest))
    return steps


def test_the_image_installs_like_make_install() -> None:
    make = _makefile_vars()
    args, runs, _ = _dockerfile()
    assert args["TORCH"] == make["TORCH"], "the image and `make install` pin different torch builds"
    recipe = [
        line.strip()
        for line in (ROOT / "Makefile").read_text().splitlines()
        if "pip install" in line
    ]
    # Make: pip, torch (from TORCH_INDEX when set), then the package alone (make demo) or
    # with its test extra (make test), and the real network's test data without their
    # dependencies (make test).
    assert _install_steps(recipe, "$({})") == [
        ("pip", ""), ("torch", "index"), ("package", "."), ("package", ".[test]"),
        ("other", "--quiet --no-deps $(REAL_NETWORK_DATA)"),
    ]
    # Image: the same steps; torch from a chosen (CUDA) index, the package without the test
    # extra (which brings the CPU onnxruntime) but with ONNX Runtime's CUDA build.
    assert _install_steps(runs, "${{{}}}") == [
        ("pip", ""), ("torch", "index"), ("package", ".[onnx-cuda]")
    ]
    assert args["TORCH_INDEX"].startswith("https://")


def test_the_image_gets_one_onnx_runtime_the_cuda_build() -> None:
    """onnxruntime and onnxruntime-gpu install the same module: the image's extra brings the
    CUDA build alone, the test extra (not in the image) the CPU build."""
    text = (ROOT / "pyproject.toml").read_text()

    def names(extra: str) -> set[str]:
        found = re.search(rf"^{extra} = \[(.*?)\]", text, re.M | re.S)
        assert found, extra
        return {re.match(r'\s*"([\w.-]+)', r).group(1)  # type: ignore[union-attr]
                for r in found.group(1).split(",") if r.strip()}

    assert {"onnxruntime-gpu", "onnx"} <= names("onnx-cuda")
    assert "onnxruntime" not in names("onnx-cuda")
    assert {"onnxruntime", "onnx"} <= names("onnx") and "onnxruntime-gpu" not in names("onnx")
    _, runs, _ = _dockerfile()
    assert not any(re.search(r"\bonnxruntime\b(?!-gpu)", run) for run in runs)


def test_the_image_runs_fcn_pipeline_as_a_fixed_non_root_user_without_secrets() -> None:
    args, _, lines = _dockerfile()
    assert int(args["UID"]) == RUN_AS_USER != 0
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users == ["${UID}:${UID}"]
    # Under tini (installed by the image), which forwards SIGTERM and reaps children.
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "fcn-pipeline"]' in lines
    assert any("apt-get install" in run and " tini" in run for run in _dockerfile()[1])
    assert any(line.startswith("FROM ") for line in lines)
    assert re.match(
        r"nvidia/cuda:12\.\d+(\.\d+)?-cudnn-runtime-ubuntu\d\d\.04$", args["BASE_IMAGE"]
    )
    text = (DEPLOY / "Dockerfile").read_text()
    assert not re.search(r"(?im)^(ARG|ENV)\s+\w*(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", text)
    assert "--mount=type=secret" not in text
    copied = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert sorted(p for c in copied for p in c) == ["README.md", "pipeline", "pyproject.toml"]


def test_the_image_gives_dask_workers_the_packaged_settings() -> None:
    _, steps, _ = _dockerfile()
    assert "cp pipeline/data/dask.yaml /etc/dask/fcn-pipeline.yaml" in steps
    assert steps.index("cp pipeline/data/dask.yaml /etc/dask/fcn-pipeline.yaml") < steps.index(
        "rm -rf /src")
