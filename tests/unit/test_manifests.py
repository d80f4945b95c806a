"""Offline checks of the Kubernetes manifests, image recipe and install scripts in daemonset/.

No kube-apiserver or kubelet can run on these machines (none is packaged for Debian, PyPI or npm), so
nothing here talks to a cluster. What stands in for the API server's validation:

- every manifest document is validated with ``kubernetes-validate`` in strict mode (unknown fields fail)
  against the OpenAPI schemas of the oldest and the newest Kubernetes version we claim to support; an
  unknown apiVersion/kind raises ``SchemaNotFoundError``, which fails the test (its CLI only warns);
- what the schemas do not check: enums (mountPropagation, hostPath type), references inside a pod
  (volumeMounts -> volumes, probe ports, ``$(VAR)`` -> env), image tags, selectors matching template
  labels, RBAC and ServiceAccount references, the driver names used across objects, the paths kubelet
  and the sidecars must agree on, and that every kustomization lists every file of its directory;
- the FlexVolume installer and shim, and the converged-mode setup script, run for real against stand-ins
  (a temporary plugin dir, a fake ``gluster`` CLI).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, all_versions

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = ROOT / "daemonset"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_DIR = DAEMONSET / "image"

#: the Kubernetes versions we claim to support: the oldest and the newest are validated
OLDEST_K8S = "1.25"
NEWEST_K8S = "1.37"
K8S_VERSIONS = (OLDEST_K8S, NEWEST_K8S)

CSI_DRIVER = "gfuse.csi.example.org"
FLEX_VENDOR, FLEX_DRIVER = "gfuse.example.org", "gfuse"
FLEX_PLUGIN_DIR = "/usr/libexec/kubernetes/kubelet-plugins/volume/exec"
KUBELET_DIR = "/var/lib/kubelet"
NAMESPACE = "gfuse-system"

MOUNT_PROPAGATION = {"None", "HostToContainer", "Bidirectional"}
HOST_PATH_TYPES = {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice",
                   "BlockDevice"}
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CSIDriver", "StorageClass",
                  "PersistentVolume", "SecurityContextConstraints"}
#: OpenShift's own API objects: kubernetes-validate has no schema for them; check_scc() below checks them instead
OPENSHIFT_KINDS = {("security.openshift.io/v1", "SecurityContextConstraints")}
#: libyaml's loader when PyYAML has it (the rendered kustomizations are long)
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: what the shim answers to ``init`` without an agent: exactly what the Python driver answers (kubelet keeps the
#: first answer; tests/k8s/test_flexvolume_driver.py reads it as kubelet does)
FLEX_INIT_ANSWER = {"status": "Success",
                    "capabilities": {"attach": False, "selinuxRelabel": False, "fsGroup": False,
                                     "supportsMetrics": True, "requiresFSResize": False}}


# ---- loading --------------------------------------------------------------------------------------------------

def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def manifest_files() -> list[Path]:
    """Every YAML file under daemonset/ except kustomizations (checked on their own)."""
    return sorted(p for p in DAEMONSET.rglob("*.y*ml")
                  if p.suffix in (".yaml", ".yml") and p.name != "kustomization.yaml")


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in DAEMONSET.rglob("kustomization.yaml"))


def _load_all() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in manifest_files():
        for i, doc in enumerate(d for d in yaml.load_all(path.read_text(), Loader=LOADER) if d is not None):
            docs.append((f"{_rel(path)}#{i}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc))
    return docs


DOCS = _load_all()


def docs_of(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in DOCS if d.get("kind") == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs_of(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind} {name}, found {len(found)}"
    return found[0]


def _load_converter():
    spec = importlib.util.spec_from_file_location("kube_to_pod", DAEMONSET / "podman" / "kube_to_pod.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


kube_to_pod = _load_converter()


def podman_pod(**kw: Any) -> dict[str, Any]:
    """The gfuse-node DaemonSet as the Pod that `podman kube play` would run on a test machine."""
    opts: dict[str, Any] = {"kubelet_dir": "/var/tmp/gfuse-k8s/kubelet",
                            "flexvolume_dir": "/var/tmp/gfuse-k8s/flexvolume", "image": "localhost/gfuse:test",
                            "node_name": "testnode", "no_systemd": True}
    opts.update(kw)
    return kube_to_pod.template_to_pod(one("DaemonSet", "gfuse-node"), **opts)


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for ident, doc in DOCS:
        if doc["kind"] == "Pod":
            yield ident, doc["spec"]
        elif doc["kind"] in WORKLOADS:
            yield ident, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "CronJob":
            yield ident, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    yield "podman:gfuse-node", podman_pod()["spec"]


POD_SPECS = list(pod_specs())


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in containers(spec) if c["name"] == name]
    assert len(found) == 1, f"no container {name}"
    return found[0]


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [v for v in spec.get("volumes", []) if v["name"] == name]
    assert len(found) == 1, f"no volume {name}"
    return found[0]


def arg_value(c: dict[str, Any], flag: str) -> str:
    """The value of `--flag=value` in a container's command + args."""
    values = [a.split("=", 1)[1] for a in (c.get("command", []) + c.get("args", [])) if a.startswith(flag + "=")]
    assert len(values) == 1, f"container {c['name']}: expected one {flag}=..., got {values}"
    return values[0]


def mount_of(spec: dict[str, Any], c: dict[str, Any], volume_name: str) -> dict[str, Any]:
    found = [m for m in c.get("volumeMounts", []) if m["name"] == volume_name]
    assert len(found) == 1, f"container {c['name']} does not mount {volume_name}"
    return found[0]


# ---- the schema ---------------------------------------------------------------------------------------------

def test_schema_versions_available() -> None:
    have = {".".join(v.split(".")[:2]) for v in all_versions()}
    missing = [v for v in K8S_VERSIONS if v not in have]
    assert not missing, (f"kubernetes-validate {kubernetes_validate.version.__version__} has no schemas for "
                         f"{missing} (has {sorted(have)}); pyproject pins the release that has them")


def test_manifests_found() -> None:
    kinds = {d["kind"] for _, d in DOCS}
    for kind in ("Namespace", "DaemonSet", "Deployment", "CSIDriver", "StorageClass", "PersistentVolume",
                 "PersistentVolumeClaim", "Pod", "ClusterRole", "ServiceAccount", "ConfigMap", "Service"):
        assert kind in kinds, f"no {kind} among the manifests"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("ident,doc", DOCS + [("podman:gfuse-node", podman_pod())],
                         ids=[i for i, _ in DOCS] + ["podman:gfuse-node"])
def test_schema(ident: str, doc: dict[str, Any], version: str) -> None:
    if (doc.get("apiVersion"), doc.get("kind")) in OPENSHIFT_KINDS:
        check_scc(ident, doc)
        return
    try:
        validated = kubernetes_validate.validate(doc, version, strict=True)
    except SchemaNotFoundError as e:
        pytest.fail(f"{ident}: {e.message} (not an API of Kubernetes {version})", pytrace=False)
    except ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        pytest.fail(f"{ident}: invalid for Kubernetes {version} at {where or '<root>'}: {e.message}", pytrace=False)
    assert validated == version, f"validated against {validated}, not {version}"


def test_schema_check_is_strict() -> None:
    """The validator itself: strict mode rejects unknown fields and unknown kinds (else the above proves little)."""
    pv = one("PersistentVolume", "gfuse-flex-example")
    bad = json.loads(json.dumps(pv))
    bad["spec"]["flexVolume"]["optoins"] = {}
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(bad, NEWEST_K8S, strict=True)
    with pytest.raises(SchemaNotFoundError):
        kubernetes_validate.validate({"apiVersion": "storage.k8s.io/v1", "kind": "CSIDrivr",
                                      "metadata": {"name": "x"}}, NEWEST_K8S, strict=True)


@pytest.mark.parametrize("ident,doc", DOCS, ids=[i for i, _ in DOCS])
def test_metadata(ident: str, doc: dict[str, Any]) -> None:
    meta = doc.get("metadata") or {}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta.get("name", "")), f"{ident}: bad name"
    in_examples = ident.startswith("daemonset/examples/")
    if doc["kind"] in CLUSTER_SCOPED:
        assert "namespace" not in meta, f"{ident}: {doc['kind']} is cluster-scoped"
    elif in_examples:
        assert meta.get("namespace") == "default", f"{ident}: examples live in namespace default"
    else:
        assert meta.get("namespace") == NAMESPACE, f"{ident}: must be in namespace {NAMESPACE}"


def test_names_unique() -> None:
    seen: dict[tuple[str, str, str], str] = {}
    for ident, doc in DOCS:
        key = (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])
        assert key not in seen, f"{ident} and {seen[key]} are the same object"
        seen[key] = ident


# ---- pod specs: what the schema misses ----------------------------------------------------------------------

pod_param = pytest.mark.parametrize("ident,spec", POD_SPECS, ids=[i for i, _ in POD_SPECS])


@pod_param
def test_mount_propagation(ident: str, spec: dict[str, Any]) -> None:
    for c in containers(spec):
        privileged = bool((c.get("securityContext") or {}).get("privileged"))
        for m in c.get("volumeMounts", []):
            prop = m.get("mountPropagation")
            if prop is None:
                continue
            assert prop in MOUNT_PROPAGATION, f"{ident}: {c['name']} mounts {m['name']} with mountPropagation {prop!r}"
            if prop == "Bidirectional":
                assert privileged, f"{ident}: Bidirectional propagation needs a privileged container ({c['name']})"


@pod_param
def test_host_path_types(ident: str, spec: dict[str, Any]) -> None:
    for v in spec.get("volumes", []):
        if "hostPath" in v:
            t = v["hostPath"].get("type", "")
            assert t in HOST_PATH_TYPES, f"{ident}: volume {v['name']} has hostPath type {t!r}"
            assert v["hostPath"]["path"].startswith("/"), f"{ident}: volume {v['name']}: relative hostPath"


@pod_param
def test_volumes_and_mounts(ident: str, spec: dict[str, Any]) -> None:
    names = [v["name"] for v in spec.get("volumes", [])]
    assert len(names) == len(set(names)), f"{ident}: duplicate volume names"
    used = set()
    for c in containers(spec):
        paths = [m["mountPath"] for m in c.get("volumeMounts", [])]
        assert len(paths) == len(set(paths)), f"{ident}: {c['name']} mounts two volumes at one path"
        for m in c.get("volumeMounts", []) + c.get("volumeDevices", []):
            assert m["name"] in names, f"{ident}: {c['name']} mounts {m['name']!r}, which is not a volume"
            used.add(m["name"])
    unused = set(names) - used
    assert not unused, f"{ident}: volumes nobody mounts: {sorted(unused)}"


@pod_param
def test_containers(ident: str, spec: dict[str, Any]) -> None:
    names = [c["name"] for c in containers(spec)]
    assert len(names) == len(set(names)), f"{ident}: duplicate container names"
    for c in containers(spec):
        image = c.get("image", "")
        assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image.rsplit("/", 1)[-1]), \
            f"{ident}: {c['name']}: image {image!r} has no tag"
        assert not image.endswith(":latest"), f"{ident}: {c['name']}: image {image!r} is :latest"
        assert (c.get("resources") or {}).get("requests"), f"{ident}: {c['name']} requests no resources"


@pod_param
def test_env_references(ident: str, spec: dict[str, Any]) -> None:
    """kubelet expands $(VAR) from the container's env and leaves unknown ones as they are (silently); $$
    becomes $. Either would be a bug here."""
    for c in containers(spec):
        env = {e["name"] for e in c.get("env", [])}
        for text in c.get("command", []) + c.get("args", []) + [e.get("value", "") for e in c.get("env", [])]:
            assert "$$" not in text, f"{ident}: {c['name']}: '$$' is turned into '$' by kubelet: {text!r}"
            for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", text):
                assert var in env, f"{ident}: {c['name']} uses $({var}) but has no such env"


@pod_param
def test_probe_ports(ident: str, spec: dict[str, Any]) -> None:
    for c in containers(spec):
        ports = {p.get("name") for p in c.get("ports", [])}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            for handler in ("httpGet", "tcpSocket", "grpc"):
                port = ((c.get(probe) or {}).get(handler) or {}).get("port")
                if isinstance(port, str):
                    assert port in ports, f"{ident}: {c['name']} {probe} uses port {port!r}, not declared"


def test_selectors_match_templates() -> None:
    for ident, doc in DOCS:
        if doc["kind"] in WORKLOADS:
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{ident}: selector does not select the template"
        if doc["kind"] == "Service" and doc["spec"].get("selector"):
            selected = [d for _, d in DOCS if d["kind"] in WORKLOADS
                        and doc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert selected, f"{ident}: selects no pods"


def test_service_accounts_exist() -> None:
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs_of("ServiceAccount")}
    for ident, doc in DOCS:
        if doc["kind"] in WORKLOADS:
            sa = doc["spec"]["template"]["spec"].get("serviceAccountName")
            if sa:
                assert (doc["metadata"]["namespace"], sa) in accounts, f"{ident}: no ServiceAccount {sa}"


def test_rbac_references() -> None:
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs_of("ServiceAccount")}
    cluster_roles = {d["metadata"]["name"] for d in docs_of("ClusterRole")}
    roles = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs_of("Role")}
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        for b in docs_of(kind):
            ref = b["roleRef"]
            if ref["kind"] == "ClusterRole":
                assert ref["name"] in cluster_roles, f"{kind} {b['metadata']['name']}: no ClusterRole {ref['name']}"
            else:
                assert (b["metadata"]["namespace"], ref["name"]) in roles, \
                    f"{kind} {b['metadata']['name']}: no Role {ref['name']}"
            for s in b["subjects"]:
                if s["kind"] == "ServiceAccount":
                    assert (s["namespace"], s["name"]) in accounts, \
                        f"{kind} {b['metadata']['name']}: no ServiceAccount {s['namespace']}/{s['name']}"


def _allowed(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(group in r.get("apiGroups", []) and resource in r.get("resources", []) and verb in r.get("verbs", [])
               for r in rules)


def test_provisioner_rbac_covers_sidecars() -> None:
    """What csi-provisioner, csi-resizer and the FlexVolume provisioner call, by the book."""
    rules = one("ClusterRole", "gfuse-provisioner")["rules"]
    needed = [("", "persistentvolumes", v) for v in ("get", "list", "watch", "create", "delete", "patch")]
    needed += [("", "persistentvolumeclaims", v) for v in ("get", "list", "watch", "update", "patch")]
    needed += [("", "persistentvolumeclaims/status", "patch"), ("storage.k8s.io", "storageclasses", "list"),
               ("storage.k8s.io", "storageclasses", "watch"), ("storage.k8s.io", "csinodes", "get"),
               ("", "nodes", "get"), ("", "events", "create"), ("", "events", "patch"), ("", "pods", "list")]
    for g, r, v in needed:
        assert _allowed(rules, g, r, v), f"gfuse-provisioner cannot {v} {r}"
    lease_rules = one("Role", "gfuse-leader-election")["rules"]
    for v in ("get", "create", "update"):
        assert _allowed(lease_rules, "coordination.k8s.io", "leases", v), f"leader election cannot {v} leases"


def test_configmap_volumes_exist() -> None:
    maps = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs_of("ConfigMap")}
    for ident, doc in DOCS:
        if doc["kind"] not in WORKLOADS:
            continue
        for v in doc["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in v:
                key = (doc["metadata"]["namespace"], v["configMap"]["name"])
                assert key in maps, f"{ident}: no ConfigMap {key[1]}"


# ---- names and paths components must agree on ---------------------------------------------------------------

def node_spec() -> dict[str, Any]:
    return one("DaemonSet", "gfuse-node")["spec"]["template"]["spec"]


def test_flexvolume_driver_name() -> None:
    spec = node_spec()
    init = container(spec, "install-flexvolume")
    env = {e["name"]: e.get("value") for e in init.get("env", [])}
    vendor, driver = env["FLEXVOLUME_VENDOR"], env["FLEXVOLUME_DRIVER"]
    assert (vendor, driver) == (FLEX_VENDOR, FLEX_DRIVER)
    assert "~" not in vendor + driver and "/" not in vendor + driver
    assert env["FLEXVOLUME_PLUGIN_DIR"] == FLEX_PLUGIN_DIR, "default FlexVolume plugin dir of kubelet"
    # the installer sees the host's / (a hostPath that exists everywhere) and finds or makes the plugin dir in it
    assert volume(spec, "host-root")["hostPath"] == {"path": "/", "type": "Directory"}
    assert mount_of(spec, init, "host-root")["mountPath"] == env["FLEXVOLUME_HOST_ROOT"]
    assert "FLEXVOLUME_DIR" not in env, "FLEXVOLUME_DIR would override FLEXVOLUME_HOST_ROOT + FLEXVOLUME_PLUGIN_DIR"
    name = f"{vendor}/{driver}"
    flex_pvs = [pv for pv in docs_of("PersistentVolume") if "flexVolume" in pv["spec"]]
    assert flex_pvs, "no FlexVolume example PV"
    for pv in flex_pvs:
        fv = pv["spec"]["flexVolume"]
        assert fv["driver"] == name, f"PV {pv['metadata']['name']}: driver {fv['driver']} is not {name}"
        assert re.fullmatch(r"[^:/]+:/[^/]+(/.*)?", fv["options"]["volume"]), "volume is SERVER:/VOLUME[/SUBDIR]"
        assert all(isinstance(v, str) for v in fv["options"].values()), "FlexVolume options are strings"
    flex_classes = [sc for sc in docs_of("StorageClass") if sc["provisioner"] != CSI_DRIVER]
    for sc in flex_classes:
        assert sc["provisioner"] == name, f"StorageClass {sc['metadata']['name']}: unknown provisioner"


def test_csi_driver_name() -> None:
    (driver,) = docs_of("CSIDriver")
    assert driver["metadata"]["name"] == CSI_DRIVER
    assert driver["spec"]["attachRequired"] is False
    assert driver["spec"]["podInfoOnMount"] is True
    assert driver["spec"]["volumeLifecycleModes"] == ["Persistent"]
    # kubelet then mounts with -o context="<the pod's SELinux label>" (SELinux nodes only) instead of relabelling
    # every file; gfuse passes context= to the kernel (tests/k8s/test_flexvolume_driver.py)
    assert driver["spec"]["seLinuxMount"] is True
    csi_classes = [sc for sc in docs_of("StorageClass") if sc["provisioner"] == CSI_DRIVER]
    assert len(csi_classes) >= 2, "CSI StorageClass examples (subdir and volume backends)"
    assert {sc["parameters"]["backend"] for sc in csi_classes} == {"subdir", "volume"}
    for pv in docs_of("PersistentVolume"):
        if "csi" in pv["spec"]:
            assert pv["spec"]["csi"]["driver"] == CSI_DRIVER, f"PV {pv['metadata']['name']}"
    spec = node_spec()
    assert arg_value(container(spec, "csi-node"), "--driver-name") == CSI_DRIVER
    controller = one("Deployment", "gfuse-controller")["spec"]["template"]["spec"]
    assert arg_value(container(controller, "gfuse-csi"), "--driver-name") == CSI_DRIVER
    reg = arg_value(container(spec, "node-driver-registrar"), "--kubelet-registration-path")
    assert reg == f"{KUBELET_DIR}/plugins/{CSI_DRIVER}/csi.sock"
    assert volume(spec, "socket-dir")["hostPath"]["path"] == f"{KUBELET_DIR}/plugins/{CSI_DRIVER}"


#: StorageClass parameters the examples use per backend (the real parsers check them too:
#: test_csi_storage_classes_are_accepted_by_the_controller, test_flexvolume_storage_classes_...)
SUBDIR_PARAMETERS = {"backend", "pool", "backupServers", "mountOptions", "dirMode"}
VOLUME_PARAMETERS = {"backend", "replica", "volumeOptions", "mountOptions"}
HOST = r"[A-Za-z0-9][A-Za-z0-9.-]*(:\d+)?"


def test_storage_class_parameters() -> None:
    for sc in docs_of("StorageClass"):
        name, params = sc["metadata"]["name"], sc["parameters"]
        assert all(isinstance(v, str) for v in params.values()), f"{name}: StorageClass parameters are strings"
        backend = params.get("backend", "subdir")
        if backend == "subdir":
            assert set(params) <= SUBDIR_PARAMETERS, f"{name}: unknown {set(params) - SUBDIR_PARAMETERS}"
            assert re.fullmatch(HOST + r":/[A-Za-z0-9_.-]+", params["pool"]), f"{name}: pool is SERVER[:PORT]:/VOLUME"
            assert int(params.get("dirMode", "0777"), 8) <= 0o7777
        else:
            assert backend == "volume", f"{name}: unknown backend {backend}"
            assert set(params) <= VOLUME_PARAMETERS, f"{name}: unknown {set(params) - VOLUME_PARAMETERS}"
            assert params.get("replica", "3").isdigit()
        if params.get("backupServers"):
            assert all(re.fullmatch(HOST, h) for h in params["backupServers"].split(":")
                       if not h.isdigit()), f"{name}: backupServers is h2:h3"


def test_csi_static_volume_attributes() -> None:
    known = {"source", "volume", "backupServers", "mountOptions", "readOnly"}
    for pv in docs_of("PersistentVolume"):
        csi = pv["spec"].get("csi")
        if csi:
            attrs = csi.get("volumeAttributes", {})
            assert set(attrs) <= known, f"PV {pv['metadata']['name']}: unknown {set(attrs) - known}"
            source = attrs.get("source") or attrs.get("volume")
            assert source and re.fullmatch(HOST + r":/[A-Za-z0-9_.-]+(/.*)?", source)


def test_node_paths_agree() -> None:
    """Paths kubelet hands out must be the same inside the containers; sockets must meet."""
    spec = node_spec()
    kubelet = volume(spec, "kubelet-dir")["hostPath"]
    assert kubelet["path"] == KUBELET_DIR
    for name in ("agent", "csi-node"):
        c = container(spec, name)
        assert (c.get("securityContext") or {}).get("privileged") is True, f"{name} must be privileged"
        m = mount_of(spec, c, "kubelet-dir")
        assert m["mountPath"] == KUBELET_DIR and m["mountPropagation"] == "Bidirectional"
        assert mount_of(spec, c, "dev-fuse")["mountPath"] == "/dev/fuse"
        assert mount_of(spec, c, "run-gfuse")["mountPath"] == "/run/gfuse"
    assert volume(spec, "dev-fuse")["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    for vol, path in (("run-gfuse", "/run/gfuse"), ("state-dir", "/var/lib/gfuse"), ("log-dir", "/var/log/gfuse")):
        assert volume(spec, vol)["hostPath"]["path"] == path
        assert mount_of(spec, container(spec, "agent"), vol)["mountPath"] == path
    csi = container(spec, "csi-node")
    assert arg_value(csi, "--kubelet-dir") == KUBELET_DIR
    assert arg_value(csi, "--mode") == "node"
    assert arg_value(csi, "--nodeid") == "$(NODE_NAME)"
    endpoint = arg_value(csi, "--endpoint")
    assert endpoint.startswith("unix://")
    sock = endpoint[len("unix://"):]
    assert os.path.dirname(sock) == mount_of(spec, csi, "socket-dir")["mountPath"]
    for name in ("node-driver-registrar", "liveness-probe"):
        c = container(spec, name)
        assert arg_value(c, "--csi-address") == sock
        assert mount_of(spec, c, "socket-dir")["mountPath"] == os.path.dirname(sock)
    reg = container(spec, "node-driver-registrar")
    assert mount_of(spec, reg, "registration-dir")["mountPath"] == "/registration"
    assert volume(spec, "registration-dir")["hostPath"]["path"] == f"{KUBELET_DIR}/plugins_registry"
    agent = container(spec, "agent")
    script = " ".join(agent["command"] + agent["args"])
    assert "--socket=/run/gfuse/agent.sock" in script and "--state=/var/lib/gfuse/agent-state.msgpack" in script
    init_env = {e["name"]: e.get("value") for e in container(spec, "install-flexvolume")["env"]}
    assert f"> {init_env['GFUSE_AGENT_PIDFILE']}.tmp" in script, "the agent writes the pid file the shim reads"
    assert spec.get("hostPID") is True, "the shim nsenters the agent by a host pid"
    assert {"operator": "Exists"} in spec.get("tolerations", []), "runs on every node"
    assert agent.get("livenessProbe"), "agent liveness probe"


def test_agent_metrics_port() -> None:
    """The agent serves /metrics (--metrics-address) on the port the container declares and the pod's
    prometheus.io/* annotations name; a node port (hostNetwork) that no other container of the pod uses."""
    from flexvolume.metrics import parse_address

    ds = one("DaemonSet", "gfuse-node")
    spec = node_spec()
    agent = container(spec, "agent")
    (flag,) = re.findall(r"--metrics-address=(\S+)", " ".join(agent["command"] + agent["args"]))
    host, port = parse_address(flag)
    assert host == "" and port == 9840
    assert [p for p in agent.get("ports", []) if p["name"] == "metrics"] == [
        {"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    others = {p["containerPort"] for c in containers(spec) if c["name"] != "agent" for p in c.get("ports", [])}
    others |= {int(m.group(1)) for c in containers(spec) for a in c.get("args", [])
               if (m := re.match(r"--(?:health-port=|http-endpoint=[^:]*:)(\d+)$", a))}
    assert port not in others and spec.get("hostNetwork") is True
    assert "--metrics-address=:9840" in " ".join(container(podman_pod()["spec"], "agent")["args"])


def test_controller_sockets_agree() -> None:
    spec = one("Deployment", "gfuse-controller")["spec"]["template"]["spec"]
    csi = container(spec, "gfuse-csi")
    assert arg_value(csi, "--mode") == "controller"
    # it mounts the pools itself (a private gfuse mount under --state-dir): FUSE and mount rights
    assert csi["securityContext"]["privileged"] is True
    assert mount_of(spec, csi, "dev-fuse")["mountPath"] == "/dev/fuse"
    assert mount_of(spec, csi, "pool-mounts")["mountPath"] == arg_value(csi, "--state-dir")
    assert "mountPropagation" not in mount_of(spec, csi, "pool-mounts"), "the pool mounts stay private"
    sock = arg_value(csi, "--endpoint")[len("unix://"):]
    names = {c["name"] for c in containers(spec)}
    assert {"csi-provisioner", "csi-resizer"} <= names
    for c in containers(spec):
        if c["name"] != "gfuse-csi":
            assert arg_value(c, "--csi-address") == sock
            assert mount_of(spec, c, "socket-dir")["mountPath"] == os.path.dirname(sock)
        if c["name"] in ("csi-provisioner", "csi-resizer"):
            assert "--leader-election" in c["args"]
            assert arg_value(c, "--leader-election-namespace") == NAMESPACE


# ---- the CSI controller: its command line and the classes it serves, in every kustomize output ------------------

CSI_CONTROLLER_DEPLOYMENT = "gfuse-controller"
NEEDS_KUBECTL = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="kubectl (with its built-in kustomize) not installed")


def _rendered(kdir: Path) -> list[dict[str, Any]]:
    rc, out, err = _kustomize_all()[kdir]
    assert rc == 0, f"kubectl kustomize {_rel(kdir)}: {err.strip()}"
    return [d for d in yaml.load_all(out, Loader=LOADER) if d]


def _csi_controller(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], Any] | None:
    """(the pod spec, gfuse-csi's parsed command line) of the CSI controller in rendered docs, if any."""
    from flexvolume.csi.server import parse_args

    deps = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == CSI_CONTROLLER_DEPLOYMENT]
    if not deps:
        return None
    (dep,) = deps
    spec = dep["spec"]["template"]["spec"]
    c = container(spec, "gfuse-csi")
    assert c["command"] == ["gfuse-csi"]
    fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "valueFrom" in e}
    assert fields == {"NODE_NAME": "spec.nodeName"}
    try:
        args = parse_args([_expand_vars(a, {"NODE_NAME": "node-1"}) for a in c["args"]])
    except SystemExit:  # argparse has printed why
        pytest.fail(f"gfuse-csi refuses the args of {CSI_CONTROLLER_DEPLOYMENT}: {c['args']}")
    return spec, args


@NEEDS_KUBECTL
def test_csi_controller_command_line() -> None:
    """In the base and every mode, gfuse-csi's args are what its own parser accepts, and they say how it reaches
    glusterd: the CLI of its node's glusterd (gfuse-node-gluster), which converged mode gives it (storage
    node, hostPID); the other modes run the base's pod, which cannot (daemonset/README.md)."""
    rendered = {_rel(d): _rendered(d) for d in kustomization_dirs()}
    with_controller = {k for k, docs in rendered.items() if _csi_controller(docs) is not None}
    assert with_controller >= {"daemonset", "daemonset/base", "daemonset/converged", "daemonset/independent",
                               "daemonset/standalone"}
    for kdir in sorted(with_controller):
        spec, args = _csi_controller(rendered[kdir])
        assert args.mode == "controller" and args.driver_name == CSI_DRIVER and args.nodeid == "node-1"
        assert args.gluster_command.split() == ["gfuse-node-gluster"], kdir
        assert args.glusterd_socket == "/var/run/glusterd.socket", kdir
        assert args.pool == "gfuse-pool", f"{kdir}: the default pool and the volume backend's brick pool registry"
        assert args.pool_mounter == "private"
        c = container(spec, "gfuse-csi")
        assert c["securityContext"]["privileged"] is True, "nsenter into glusterd, FUSE mounts of the pools"
        assert mount_of(spec, c, "pool-mounts")["mountPath"] == args.state_dir
        glusterds = [d for d in rendered[kdir]
                     if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "gfuse-glusterd"]
        if glusterds:  # converged: on a storage node, seeing its glusterd
            gspec = glusterds[0]["spec"]["template"]["spec"]
            assert spec.get("hostPID") is True, kdir
            assert spec["nodeSelector"] == gspec["nodeSelector"], kdir
            assert all(t in spec["tolerations"] for t in gspec["tolerations"]), kdir
            # the socket as glusterd's container sees it: its default, on the glusterd-run emptyDir at /run
            assert mount_of(gspec, container(gspec, "glusterd"), "glusterd-run")["mountPath"] == "/run"
        else:  # nothing claims a glusterd here: the base's pod, any node, no hostPID
            assert not spec.get("hostPID") and "nodeSelector" not in spec, kdir
    converged = _csi_controller(rendered["daemonset/converged"])[0]
    flex = one("Deployment", FLEX_PROVISIONER_DEPLOYMENT)["spec"]["template"]["spec"]
    assert converged["nodeSelector"] == flex["nodeSelector"] and converged["tolerations"] == flex["tolerations"]


@NEEDS_KUBECTL
def test_csi_storage_classes_are_accepted_by_the_controller(tmp_path: Path) -> None:
    """Every class of gfuse.csi.example.org, in every kustomize output, has parameters the CSI controller of
    that output accepts (the base's for outputs without one: storageclasses/ is applied on top of it): its
    split_params and Backends.for_params (with its --pool), and the backends' own checks of dirMode, replica
    and volumeOptions."""
    from flexvolume.csi.controller import Backends, split_params
    from flexvolume.storage.backends import SubdirBackend, VolumeBackend
    from flexvolume.storage.glusterd import Glusterd

    base = _csi_controller(_rendered(DAEMONSET / "base"))
    assert base is not None
    checked = set()
    for kdir in kustomization_dirs():
        docs = _rendered(kdir)
        classes = [d for d in docs if d["kind"] == "StorageClass" and d["provisioner"] == CSI_DRIVER]
        if not classes:
            continue
        args = (_csi_controller(docs) or base)[1]
        backends = Backends(Glusterd(args.glusterd_socket, command=["false"]), tmp_path, args.pool)
        for sc in classes:
            name = f"{_rel(kdir)}: StorageClass {sc['metadata']['name']}"
            _, params = split_params(sc["parameters"])
            backend = backends.for_params(params)
            assert backend.kind == sc["parameters"].get("backend", "subdir"), name
            if isinstance(backend, VolumeBackend):
                backend._params(params)
            else:
                assert isinstance(backend, SubdirBackend)
                assert 0 <= int(params.get("dirMode", "0777"), 8) <= 0o7777, name
            checked.add(sc["metadata"]["name"])
    every = {sc["metadata"]["name"] for sc in docs_of("StorageClass") if sc["provisioner"] == CSI_DRIVER}
    assert checked == every, f"CSI classes in no kustomization: {every - checked}"


# ---- the FlexVolume provisioner: its RBAC is what its code calls ------------------------------------------------

PROVISIONER_CODE = ROOT / "flexvolume" / "provisioner"
#: the Event recorder the provisioner and the node agent share
EVENTS_CODE = ROOT / "flexvolume" / "kubeevents.py"
FLEX_PROVISIONER_SA = "gfuse-flexvolume-provisioner"
FLEX_PROVISIONER_DEPLOYMENT = "gfuse-flexvolume-provisioner"


def _api_attributes(tree: Any) -> tuple[dict[str, str], list[tuple[str, str]], set[tuple[str, str]]]:
    """In one module: ``self.X = client.SomeApi(...)`` → {X: SomeApi}; every ``self.X.method`` reference
    (called or passed on) → [(X, method)]; those passed to ``Informer(...)`` (listed and watched)."""
    import ast

    apis: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            f = node.value.func
            if isinstance(f, ast.Attribute) and f.attr.endswith("Api") and isinstance(f.value, ast.Name) \
                    and f.value.id == "client":
                for t in node.targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        apis[t.attr] = f.attr

    def api_ref(node: Any) -> tuple[str, str] | None:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self" \
                and node.value.attr in apis:
            return node.value.attr, node.attr
        return None

    refs = [r for r in (api_ref(n) for n in ast.walk(tree)) if r]
    watched = {r for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Informer"
               for a in n.args for r in [api_ref(a)] if r}
    return apis, refs, watched


def _request_of(api_class: str, method: str) -> tuple[str, str]:
    """The HTTP method and path the kubernetes client sends for ``api_class().method(...)`` (its own
    request serializer, no network)."""
    import inspect

    from kubernetes import client

    api = getattr(client, api_class)(client.ApiClient(client.Configuration(host="http://recorder.invalid")))
    ser = getattr(api, f"_{method}_serialize", None)
    assert ser is not None, f"kubernetes client {api_class}.{method}: no request serializer (client too old?)"
    kw = {p: ("NAME" if p == "name" else "NS" if p == "namespace" else {} if p == "body" else None)
          for p in inspect.signature(ser).parameters}
    kw["_host_index"] = 0
    http, url = ser(**kw)[:2]
    return http, url.split("recorder.invalid", 1)[1].split("?", 1)[0]


def _rbac_of(http: str, path: str) -> tuple[str, str, str, bool, bool]:
    """(apiGroup, resource[/subresource], verb, namespaced, named) of one request path."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        assert parts[0] == "apis", path
        group, rest = parts[1], parts[3:]
    namespaced = len(rest) > 2 and rest[0] == "namespaces"
    if namespaced:
        rest = rest[2:]
    resource, name, sub = rest[0], rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
    verb = {"GET": "get" if name else "list", "POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection"}[http]
    return group, resource + (f"/{sub}" if sub else ""), verb, namespaced, bool(name)


@functools.cache
def provisioner_api_calls() -> frozenset[tuple[str, str, str, bool, bool]]:
    """Every (apiGroup, resource, verb, namespaced, named) the FlexVolume provisioner's code can request:
    each kubernetes API method its modules reference, as the client turns it into a request, plus
    ``watch`` for the list functions its informers also watch."""
    import ast

    calls = set()
    for py in [*sorted(PROVISIONER_CODE.glob("*.py")), EVENTS_CODE]:
        apis, refs, watched = _api_attributes(ast.parse(py.read_text()))
        for attr, method in refs:
            http, path = _request_of(apis[attr], method)
            rb = _rbac_of(http, path)
            calls.add(rb)
            if (attr, method) in watched:
                assert rb[2] == "list", f"{py.name}: an informer of {method}, not a list call"
                calls.add((rb[0], rb[1], "watch", rb[3], False))
    return frozenset(calls)


def _subject_rules(sa: str) -> list[tuple[str | None, dict[str, Any]]]:
    """(namespace or None for cluster-wide, rule) of every role bound to ServiceAccount gfuse-system/sa."""
    def binds(b: dict[str, Any]) -> bool:
        return any(s["kind"] == "ServiceAccount" and s["name"] == sa and s["namespace"] == NAMESPACE
                   for s in b["subjects"])

    out: list[tuple[str | None, dict[str, Any]]] = []
    for b in docs_of("ClusterRoleBinding"):
        if binds(b):
            out += [(None, r) for r in one("ClusterRole", b["roleRef"]["name"])["rules"]]
    for b in docs_of("RoleBinding"):
        if binds(b):
            ns = b["metadata"]["namespace"]
            role = (one("ClusterRole", b["roleRef"]["name"]) if b["roleRef"]["kind"] == "ClusterRole"
                    else next(r for r in docs_of("Role") if r["metadata"]["name"] == b["roleRef"]["name"]
                              and r["metadata"]["namespace"] == ns))
            out += [(ns, r) for r in role["rules"]]
    return out


def _grants(rule: dict[str, Any], group: str, resource: str, verb: str, name: str | None) -> bool:
    names = rule.get("resourceNames")
    return (group in rule.get("apiGroups", []) and resource in rule.get("resources", [])
            and verb in rule.get("verbs", []) and (not names or (name is not None and name in names)))


def test_provisioner_code_api_calls_found() -> None:
    """The derivation sees what the provisioner is known to do (else the RBAC check below proves little)."""
    calls = {(g, r, v) for g, r, v, _, _ in provisioner_api_calls()}
    for expected in [("", "persistentvolumeclaims", "watch"), ("", "persistentvolumeclaims/status", "patch"),
                     ("", "persistentvolumes", "create"), ("", "persistentvolumes", "delete"),
                     ("storage.k8s.io", "storageclasses", "list"), ("", "events", "create"),
                     ("coordination.k8s.io", "leases", "update")]:
        assert expected in calls, f"{expected} not derived from the provisioner's code: {sorted(calls)}"


def test_flexvolume_provisioner_rbac_is_what_its_code_calls() -> None:
    """Every request the provisioner's code can make is allowed to its ServiceAccount (cluster-wide for
    claims, volumes, classes and events, which live in any namespace; leases in the leader-election
    namespace, by the Lease's name), and the roles grant nothing it does not call."""
    from flexvolume.provisioner.controller import PROVISIONER
    from flexvolume.provisioner.main import _lease_name

    spec = one("Deployment", FLEX_PROVISIONER_DEPLOYMENT)["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == FLEX_PROVISIONER_SA
    rules = _subject_rules(FLEX_PROVISIONER_SA)
    lease = _lease_name(PROVISIONER)
    used: set[tuple[str, str, str]] = set()
    for group, resource, verb, _namespaced, named in sorted(provisioner_api_calls()):
        if group == "coordination.k8s.io":
            where, name = [NAMESPACE], (lease if named else None)
        else:
            where, name = [None], None  # any namespace / cluster-scoped, any name
        ok = any(ns in where and _grants(r, group, resource, verb, name) for ns, r in rules)
        assert ok, (f"ServiceAccount {FLEX_PROVISIONER_SA} may not {verb} {group or 'core'}/{resource}"
                    f"{' ' + name if name else ''} {'in ' + str(where[0]) if where[0] else 'cluster-wide'}, "
                    f"which flexvolume/provisioner/ calls")
        used.add((group, resource, verb))
    for ns, r in rules:
        if r["apiGroups"] == ["security.openshift.io"] and r["verbs"] == ["use"]:
            continue  # OpenShift's SCC admission checks it for the pod (test_openshift_overlay_admits_every_pod)
        for g in r["apiGroups"]:
            for res in r["resources"]:
                for v in r["verbs"]:
                    assert (g, res, v) in used, (f"{FLEX_PROVISIONER_SA} is granted {v} {g or 'core'}/{res}"
                                                 f"{' in ' + ns if ns else ''}, which the provisioner never calls")


def test_node_rbac_covers_the_agents_events() -> None:
    """The node agent posts Events on pods of any namespace (repairs: flexvolume/kubeevents.py); its
    ServiceAccount may create and patch them cluster-wide."""
    import ast

    apis, refs, _ = _api_attributes(ast.parse(EVENTS_CODE.read_text()))
    calls = {_rbac_of(*_request_of(apis[attr], method))[:3] for attr, method in refs}
    assert calls == {("", "events", "create"), ("", "events", "patch")}, calls
    spec = node_spec()
    rules = _subject_rules(spec["serviceAccountName"])
    for group, resource, verb in calls:
        assert any(ns is None and _grants(r, group, resource, verb, None) for ns, r in rules), (group, resource, verb)
    env = {e["name"]: e for e in container(spec, "agent").get("env", [])}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def _expand_vars(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)


def test_flexvolume_provisioner_deployment() -> None:
    """The Deployment's command line is one gfuse-provisioner accepts, leader election is on with the
    identity and namespace from the downward API, and it can reach glusterd and FUSE."""
    from flexvolume.provisioner.main import parse_args

    dep = one("Deployment", FLEX_PROVISIONER_DEPLOYMENT)
    assert dep["metadata"]["namespace"] == NAMESPACE
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["command"] == ["gfuse-provisioner"]
    fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "valueFrom" in e}
    assert fields == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    env = {"POD_NAME": "gfuse-flexvolume-provisioner-7d9f-abcde", "POD_NAMESPACE": dep["metadata"]["namespace"]}
    args = parse_args([_expand_vars(a, env) for a in c["args"]])
    assert args.identity == env["POD_NAME"]
    assert args.leader_elect, "replicas are only safe with leader election"
    assert dep["spec"]["replicas"] == 2
    assert args.leader_election_namespace == NAMESPACE
    assert args.kubeconfig is None, "in-cluster config (the ServiceAccount's token)"
    # the storage it reaches: gluster CLI inside the node's glusterd (hostPID, on a storage node)
    gluster = args.gluster_command.split()
    assert gluster == ["gfuse-node-gluster"]
    assert spec["hostPID"] is True
    glusterd = one("DaemonSet", "gfuse-glusterd")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == glusterd["nodeSelector"]
    assert all(t in spec["tolerations"] for t in glusterd["tolerations"])
    gd = container(glusterd, "glusterd")
    run_mount = mount_of(glusterd, gd, "glusterd-run")["mountPath"]
    # glusterd's default socket (/var/run -> /run in Debian) on its emptyDir, as glusterd's container sees it
    assert args.glusterd_socket == "/var/run/glusterd.socket" and run_mount == "/run"
    # its own FUSE mounts of the pool, private to the container
    assert c["securityContext"]["privileged"] is True
    assert mount_of(spec, c, "dev-fuse")["mountPath"] == "/dev/fuse"
    assert mount_of(spec, c, "state-dir")["mountPath"] == args.state_dir
    assert "mountPropagation" not in mount_of(spec, c, "state-dir")
    assert mount_of(spec, c, "log-dir")["mountPath"] == "/var/log/gfuse"  # gfuse mount's logs
    # the image provides the gluster command (installed by the Dockerfile into the gfuse stage)
    assert re.search(r"COPY daemonset/image/node-gluster.sh /usr/local/bin/gfuse-node-gluster\b",
                     _dockerfile_stages()["gfuse"])


def test_flexvolume_storage_classes_are_accepted_by_the_provisioner(tmp_path: Path) -> None:
    """Each class of gfuse.example.org/gfuse has parameters the provisioner's backend_for accepts."""
    from flexvolume.provisioner.controller import CONTROLLER_PARAMETERS, PROVISIONER, backend_parameters
    from flexvolume.storage.backends import PARAMETERS, backend_for
    from flexvolume.storage.glusterd import Glusterd

    classes = [sc for sc in docs_of("StorageClass") if sc["provisioner"] == PROVISIONER]
    assert {sc["metadata"]["name"] for sc in classes} >= {"gfuse-flexvolume", "gfuse-converged-flexvolume"}
    for sc in classes:
        params = sc["parameters"]
        assert set(params) <= set(PARAMETERS) | CONTROLLER_PARAMETERS, sc["metadata"]["name"]
        backend = backend_for(backend_parameters(params), glusterd=Glusterd(None, command=["false"]),
                              pool="gfuse-pool", state_dir=tmp_path)
        assert backend.kind == params.get("backend", "subdir")
    conv = one("StorageClass", "gfuse-converged-flexvolume")
    assert conv["parameters"]["pool"] == one("StorageClass", "gfuse-converged")["parameters"]["pool"]


def test_node_gluster_wrapper(tmp_path: Path) -> None:
    """gfuse-node-gluster: its failures are one line the provisioner classes as glusterd-unreachable;
    with a real glusterd it runs that glusterd's own CLI in its namespaces (pid, mount, ...)."""
    from flexvolume.storage.api import StorageError
    from flexvolume.storage.glusterd import Glusterd

    script = str(IMAGE_DIR / "node-gluster.sh")
    for pid in ("abc", str(os.getpid())):  # not a pid; a process whose file system has no gluster CLI
        if pid.isdigit() and Path(f"/proc/{pid}/root/usr/sbin/gluster").exists():
            continue  # this test's own file system has a gluster CLI: nothing to show with it
        env = {"PATH": os.environ["PATH"], "GFUSE_GLUSTERD_PID": pid}
        r = subprocess.run([script, "volume", "list"], capture_output=True, text=True, env=env, timeout=30, check=False)
        assert r.returncode == 1 and r.stdout == "", r
        assert r.stderr.startswith("Connection failed: gfuse-node-gluster: "), r
        assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(StorageError) as e:
        Glusterd(None, command=["env", "GFUSE_GLUSTERD_PID=abc", script], timeout=20).ping()
    assert e.value.reason == "glusterd-unreachable", e.value
    pids = [p for p in os.listdir("/proc") if p.isdigit() and _comm(p) == "glusterd"]
    if os.geteuid() != 0 or not pids or not shutil.which("nsenter"):
        pytest.skip("no glusterd running here as root: the nsenter path is exercised by test_podman_converged")
    r = subprocess.run(["env", f"GFUSE_GLUSTERD_PID={pids[0]}", script, "--mode=script", "--xml", "volume", "list"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and "<opRet>0</opRet>" in r.stdout, r


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_converged_glusterd() -> None:
    ds = one("DaemonSet", "gfuse-glusterd")
    spec = ds["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"storagenode": "glusterfs"}
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    glusterd = container(spec, "glusterd")
    assert glusterd["securityContext"]["privileged"] is True
    assert mount_of(spec, glusterd, "glusterd-state")["mountPath"] == "/var/lib/glusterd"
    assert volume(spec, "glusterd-state")["hostPath"]["path"] == "/var/lib/glusterd"
    setup = container(spec, "setup")
    env = {e["name"]: e.get("value") for e in setup["env"]}
    svc = one("Service", "gfuse-glusterd")
    assert env["PEER_SERVICE"] == f"{svc['metadata']['name']}.{NAMESPACE}.svc"
    assert svc["spec"]["clusterIP"] == "None"
    assert env["BRICK_ROOT"] == mount_of(spec, glusterd, "bricks")["mountPath"]
    assert mount_of(spec, setup, "glusterd-run")["mountPath"] == mount_of(spec, glusterd, "glusterd-run")["mountPath"]
    sc = one("StorageClass", "gfuse-converged")
    assert sc["parameters"]["pool"].startswith(env["PEER_SERVICE"] + ".")
    assert sc["parameters"]["pool"].endswith(":/" + env["POOL_VOLUME"])


# ---- OpenShift: SecurityContextConstraints ---------------------------------------------------------------------

#: SecurityContextConstraints (security.openshift.io/v1) fields and what they hold, as OpenShift's API defines them
#: (openshift/api security/v1 types.go; its CRD marks the REQUIRED ones required, nullable)
SCC_BOOLS = {"allowHostDirVolumePlugin", "allowHostIPC", "allowHostNetwork", "allowHostPID", "allowHostPorts",
             "allowPrivilegedContainer", "readOnlyRootFilesystem", "allowPrivilegeEscalation",
             "defaultAllowPrivilegeEscalation"}
SCC_LISTS = {"allowedCapabilities", "defaultAddCapabilities", "requiredDropCapabilities", "volumes", "users", "groups",
             "seccompProfiles", "allowedUnsafeSysctls", "forbiddenSysctls", "allowedFlexVolumes"}
SCC_STRATEGIES = {"runAsUser": {"MustRunAs", "MustRunAsRange", "MustRunAsNonRoot", "RunAsAny"},
                  "seLinuxContext": {"MustRunAs", "RunAsAny"}, "fsGroup": {"MustRunAs", "RunAsAny"},
                  "supplementalGroups": {"MustRunAs", "RunAsAny"}}
SCC_REQUIRED = {"allowHostDirVolumePlugin", "allowHostIPC", "allowHostNetwork", "allowHostPID", "allowHostPorts",
                "allowPrivilegedContainer", "allowedCapabilities", "defaultAddCapabilities", "priority",
                "readOnlyRootFilesystem", "requiredDropCapabilities", "volumes"}
SCC_VOLUMES = {"*", "none", "awsElasticBlockStore", "azureDisk", "azureFile", "cephFS", "cinder", "configMap", "csi",
               "downwardAPI", "emptyDir", "ephemeral", "fc", "flexVolume", "flocker", "gcePersistentDisk", "gitRepo",
               "glusterfs", "hostPath", "image", "iscsi", "nfs", "persistentVolumeClaim", "photonPersistentDisk",
               "portworxVolume", "projected", "quobyte", "rbd", "scaleIO", "secret", "storageOS", "vsphere"}


def check_scc(ident: str, doc: dict[str, Any]) -> None:
    """What OpenShift's API server would refuse in an SCC: unknown or missing fields, wrong types, enum typos."""
    known = {"apiVersion", "kind", "metadata", "priority", "userNamespaceLevel"} | SCC_BOOLS | SCC_LISTS | set(
        SCC_STRATEGIES)
    assert not set(doc) - known, f"{ident}: unknown SCC fields {sorted(set(doc) - known)}"
    assert not SCC_REQUIRED - set(doc), f"{ident}: SCC fields missing {sorted(SCC_REQUIRED - set(doc))}"
    for key in SCC_BOOLS & set(doc):
        assert isinstance(doc[key], bool), f"{ident}: {key} must be a boolean"
    for key in SCC_LISTS & set(doc):
        assert doc[key] is None or (isinstance(doc[key], list) and all(isinstance(v, (str, dict)) for v in doc[key])), \
            f"{ident}: {key} must be a list"
    assert doc["priority"] is None or isinstance(doc["priority"], int), f"{ident}: priority is an integer or null"
    for key, types in SCC_STRATEGIES.items():
        strategy = doc.get(key) or {}
        assert strategy.get("type") in types, f"{ident}: {key}.type {strategy.get('type')!r} not one of {types}"
    bad = set(doc.get("volumes") or []) - SCC_VOLUMES
    assert not bad, f"{ident}: unknown volume types {bad}"
    assert set(doc["metadata"]) <= {"name", "labels", "annotations"}, ident


def _scc_users(docs: list[dict[str, Any]], scc: str) -> set[tuple[str, str]]:
    """(namespace, ServiceAccount) that may use SCC ``scc``: by the SCC's ``users``/``groups`` or by RBAC ``use`` on
    it (a RoleBinding grants it in its namespace; OpenShift checks the pod's namespace)."""
    roles = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d for d in docs
             if d["kind"] in ("Role", "ClusterRole")}
    out: set[tuple[str, str]] = set()
    (obj,) = [d for d in docs if d["kind"] == "SecurityContextConstraints" and d["metadata"]["name"] == scc]
    for user in obj.get("users") or []:
        if user.startswith("system:serviceaccount:"):
            ns, name = user.split(":")[2:4]
            out.add((ns, name))
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = b["roleRef"]
        role_ns = b["metadata"].get("namespace", "") if ref["kind"] == "Role" else ""
        role = roles.get((ref["kind"], role_ns, ref["name"]))
        if role is None or not any(_grants(r, "security.openshift.io", "securitycontextconstraints", "use", scc)
                                   for r in role["rules"]):
            continue
        for s in b["subjects"]:
            if s["kind"] == "ServiceAccount" and (b["kind"] == "ClusterRoleBinding"
                                                  or s["namespace"] == b["metadata"]["namespace"]):
                out.add((s["namespace"], s["name"]))
    return out


def scc_admits(scc: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """Why OpenShift's SCC admission would refuse a pod under ``scc`` (empty: admitted). Stands in for the
    admission plugin (openshift/apiserver-library-go: sccadmission, and the sccmatching provider's validation of
    the pod's and each container's security context) on the fields gfuse's pods use; no OpenShift can run here."""
    why = []
    for flag, field in (("hostPID", "allowHostPID"), ("hostNetwork", "allowHostNetwork"), ("hostIPC", "allowHostIPC")):
        if spec.get(flag) and not scc[field]:
            why.append(f"{flag} needs {field}")
    used = {k for v in spec.get("volumes", []) for k in v if k != "name"}
    if spec.get("automountServiceAccountToken", True):
        used.add("projected")  # the ServiceAccount token volume the API server adds
    allowed = set(scc.get("volumes") or [])
    if "*" not in allowed:
        why += [f"volume type {t} not allowed" for t in sorted(used - allowed)]
    if "hostPath" in used and not scc["allowHostDirVolumePlugin"]:
        why.append("hostPath needs allowHostDirVolumePlugin")
    caps_ok = set(scc.get("allowedCapabilities") or []) | set(scc.get("defaultAddCapabilities") or [])
    for c in containers(spec):
        sc = c.get("securityContext") or {}
        if sc.get("privileged") and not scc["allowPrivilegedContainer"]:
            why.append(f"{c['name']}: privileged needs allowPrivilegedContainer")
        added = set((sc.get("capabilities") or {}).get("add") or [])
        if "*" not in caps_ok and added - caps_ok:
            why.append(f"{c['name']}: capabilities {sorted(added - caps_ok)} not allowed")
        if (spec.get("hostNetwork") and c.get("ports")) or any(p.get("hostPort") for p in c.get("ports", [])):
            if not scc["allowHostPorts"]:
                why.append(f"{c['name']}: host ports need allowHostPorts")
        if sc.get("allowPrivilegeEscalation", True) and scc.get("allowPrivilegeEscalation") is False:
            why.append(f"{c['name']}: privilege escalation not allowed")
        if not (sc.get("runAsUser") or (spec.get("securityContext") or {}).get("runAsUser")) \
                and scc["runAsUser"]["type"] != "RunAsAny":
            why.append(f"{c['name']}: runs as its image's user (root), which {scc['runAsUser']['type']} replaces")
    return why


@NEEDS_KUBECTL
def test_openshift_overlay_admits_every_pod() -> None:
    """``kubectl kustomize daemonset/openshift`` (converged mode + SCC + RBAC): every pod that the restricted-v2 SCC
    would refuse (privileged, host namespaces, hostPath) names the SCC gfuse-privileged (openshift.io/required-scc),
    its ServiceAccount may use it, and it admits the pod (scc_admits). The FlexVolume driver goes to RHCOS's plugin
    dir. Without this overlay no SCC would admit them (restricted-v2 allows none of that)."""
    docs = _rendered(DAEMONSET / "openshift")
    (scc,) = [d for d in docs if d["kind"] == "SecurityContextConstraints"]
    check_scc("openshift/gfuse-privileged", scc)
    users = _scc_users(docs, scc["metadata"]["name"])
    restricted = {"allowPrivilegedContainer": False, "allowHostPID": False, "allowHostNetwork": False,
                  "allowHostIPC": False, "allowHostPorts": False, "allowHostDirVolumePlugin": False,
                  "allowedCapabilities": ["NET_BIND_SERVICE"], "defaultAddCapabilities": None,
                  "volumes": ["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                              "projected", "secret"], "runAsUser": {"type": "MustRunAsRange"},
                  "allowPrivilegeEscalation": False}
    pods = [(d, d["spec"]["template"]) for d in docs if d["kind"] in WORKLOADS]
    assert {d["metadata"]["name"] for d, _ in pods} >= {"gfuse-node", "gfuse-controller", "gfuse-glusterd",
                                                        "gfuse-flexvolume-provisioner"}
    for d, template in pods:
        spec, name = template["spec"], f"{d['kind']} {d['metadata']['name']}"
        if not scc_admits(restricted, spec):
            continue  # restricted-v2 admits it: nothing to grant
        assert (template["metadata"].get("annotations") or {}).get("openshift.io/required-scc") == "gfuse-privileged", \
            name
        assert (d["metadata"]["namespace"], spec.get("serviceAccountName", "default")) in users, \
            f"{name}: ServiceAccount {spec.get('serviceAccountName')} may not use SCC gfuse-privileged"
        assert scc_admits(scc, spec) == [], f"{name}: {scc_admits(scc, spec)}"
    node = next(t["spec"] for d, t in pods if d["metadata"]["name"] == "gfuse-node")
    env = {e["name"]: e.get("value") for e in container(node, "install-flexvolume")["env"]}
    assert env["FLEXVOLUME_PLUGIN_DIR"] == "/etc/kubernetes/kubelet-plugins/volume/exec"
    (ns,) = [d for d in docs if d["kind"] == "Namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert ns["metadata"]["labels"]["security.openshift.io/scc.podSecurityLabelSync"] == "false"


def test_scc_check_is_strict() -> None:
    """The SCC checks themselves: a typo'd field, a missing required one, an unknown strategy or volume type fail;
    a pod the SCC does not allow is refused."""
    scc = one("SecurityContextConstraints", "gfuse-privileged")
    for broken in ({**scc, "allowHostPid": True}, {k: v for k, v in scc.items() if k != "volumes"},
                   {**scc, "runAsUser": {"type": "RunAsRoot"}}, {**scc, "volumes": ["hostpath"]}):
        with pytest.raises(AssertionError):
            check_scc("broken", broken)
    assert scc_admits({**scc, "allowHostPID": False}, node_spec()) == ["hostPID needs allowHostPID"]
    assert any("SYS_ADMIN" in w for w in scc_admits({**scc, "allowedCapabilities": []}, node_spec()))


# ---- kustomize ----------------------------------------------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "patches", "labels",
                      "commonLabels", "configMapGenerator", "components"}


@pytest.mark.parametrize("kdir", kustomization_dirs(), ids=lambda p: _rel(p))
def test_kustomization_lists_every_file(kdir: Path) -> None:
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert set(k) <= KUSTOMIZATION_KEYS, f"unexpected keys {set(k) - KUSTOMIZATION_KEYS}"
    resources = k.get("resources", [])
    assert len(resources) == len(set(resources)), "a resource listed twice"
    for r in resources:
        target = (kdir / r).resolve()
        assert target.exists(), f"{_rel(kdir)}: lists {r}, which does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").exists(), f"{r} is a directory without a kustomization"
            assert target != kdir.resolve() and target not in kdir.resolve().parents, \
                f"{r}: a base may not contain the overlay (kustomize cycle)"
    files = {p.name for p in kdir.glob("*.yaml") if p.name != "kustomization.yaml"}
    unlisted = files - set(resources)
    assert not unlisted, f"{_rel(kdir)}/kustomization.yaml does not list {sorted(unlisted)}"


def test_every_manifest_dir_has_a_kustomization() -> None:
    dirs = {ROOT / ident.split("#")[0] for ident, _ in DOCS}
    dirs = {p.parent for p in dirs}
    missing = [_rel(d) for d in dirs if not (d / "kustomization.yaml").exists()]
    assert not missing, f"directories with manifests but no kustomization.yaml: {missing}"


def test_modes_include_base() -> None:
    for mode in ("converged", "independent", "standalone"):
        k = yaml.safe_load((DAEMONSET / mode / "kustomization.yaml").read_text())
        assert "../base" in k["resources"], f"{mode} does not include the base"
        assert (DAEMONSET / mode / "README.md").exists()
        assert any(d["kind"] == "StorageClass" for _, d in DOCS if f"daemonset/{mode}/" in _)
    top = yaml.safe_load((DAEMONSET / "kustomization.yaml").read_text())
    assert top["resources"] == ["base"]


def _kustomize_ids(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in docs if d}


def _expected_ids(kdir: Path) -> set[tuple[str, str, str]]:
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    ids: set[tuple[str, str, str]] = set()
    for r in k.get("resources", []):
        target = (kdir / r).resolve()
        if target.is_dir():
            ids |= _expected_ids(target)
        else:
            ids |= _kustomize_ids(list(yaml.load_all(target.read_text(), Loader=LOADER)))
    return ids


@functools.cache
def _kustomize_all() -> dict[Path, tuple[int, str, str]]:
    """`kubectl kustomize DIR` for every kustomization, run concurrently (each takes about a second)."""
    procs = {d: subprocess.Popen(["kubectl", "kustomize", str(d)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for d in kustomization_dirs()}
    results = {}
    for d, p in procs.items():
        out, err = p.communicate(timeout=120)
        results[d] = (p.returncode, out, err)
    return results


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("kdir", kustomization_dirs(), ids=lambda p: _rel(p))
def test_kustomize_build(kdir: Path) -> None:
    """`kubectl kustomize` (offline) renders exactly the objects of the listed files, as `apply -k` would."""
    rc, out, err = _kustomize_all()[kdir]
    assert rc == 0, f"kubectl kustomize {_rel(kdir)}: {err.strip()}"
    assert _kustomize_ids(list(yaml.load_all(out, Loader=LOADER))) == _expected_ids(kdir)


# ---- image recipe ---------------------------------------------------------------------------------------------

def _dockerfile_stages() -> dict[str, str]:
    text = DOCKERFILE.read_text()
    stages: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            current = m.group(1) or f"stage{len(stages)}"
            stages[current] = ""
        elif current:
            stages[current] += line + "\n"
    return stages


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.MULTILINE)
    stages = _dockerfile_stages()
    assert list(stages)[-1] == "gfuse", "the default (last) target is the gfuse image"
    assert "glusterd" in stages
    assert re.search(r"apt-install\b.*\bfuse3\b", stages["gfuse"]) and "glusterfs-client" in stages["gfuse"]
    assert "glusterfs-server" in stages["glusterd"]
    assert "glusterfs-server" not in stages["gfuse"]
    assert "pip install" in stages["build"] and "/src" in stages["build"]
    # every COPY source exists (the build context is the repository root)
    for line in text.replace("\\\n", " ").splitlines():
        m = re.match(r"COPY\s+(?!--from)(.+)\s+(\S+)$", line.strip())
        if m:
            for src in m.group(1).split():
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"


def test_image_provides_manifest_commands() -> None:
    """Commands the manifests run in the gfuse image exist there (or are linked there by the Dockerfile)."""
    stages = _dockerfile_stages()
    gfuse = stages["gfuse"]
    loop = re.search(r"for cmd in ([^;]+);", gfuse)
    assert loop, "the gfuse stage links the console scripts into /usr/local/bin"
    linked = set(loop.group(1).split())
    copied = set(re.findall(r"COPY\s+\S+\s+/usr/local/bin/(\S+)", gfuse))
    provided = linked | copied | {"/bin/sh", "test"}
    assert {"gfuse-agent", "gfuse-csi", "gfuse-flexvolume"} <= linked
    assert "python3 -m venv /opt/gfuse" in stages["build"] and "/opt/gfuse" in gfuse
    # gfuse-csi's generated stubs are baked in at build time, where the runtime looks for them
    assert "ENV GFUSE_CSI_STUBS_DIR=/opt/gfuse/csi-stubs" in stages["build"]
    assert "ENV GFUSE_CSI_STUBS_DIR=/opt/gfuse/csi-stubs" in gfuse
    assert "-m flexvolume.csi.stubs" in stages["build"]
    for ident, spec in POD_SPECS:
        for c in containers(spec):
            if not c["image"].startswith("localhost/gfuse:"):
                continue
            cmd = c["command"][0]
            assert cmd in provided, f"{ident}: {c['name']} runs {cmd}, which the gfuse image does not provide"
            script = " ".join(c.get("args", []))
            for used in re.findall(r"exec (\S+)", script):
                assert used in provided, f"{ident}: {c['name']} execs {used}"
            probe = ((c.get("livenessProbe") or {}).get("exec") or {}).get("command")
            if probe:
                assert probe[0] in provided or probe[0].startswith("/opt/gfuse/bin/"), f"{ident}: probe {probe[0]}"
    shim_copy = re.search(r"COPY daemonset/image/flexvolume-shim.sh (\S+)", gfuse)
    assert shim_copy, "the gfuse stage installs the FlexVolume shim template"
    shim_dest = shim_copy.group(1)
    installer = (IMAGE_DIR / "install-flexvolume.sh").read_text()
    assert f"GFUSE_SHIM_TEMPLATE:-{shim_dest}" in installer
    assert "GFUSE_FLEXVOLUME_CMD:-/usr/local/bin/gfuse-flexvolume" in installer
    glusterd_images = {c["image"] for _, s in POD_SPECS for c in containers(s) if "glusterd" in c["image"]}
    assert glusterd_images == {"localhost/gfuse-glusterd:0.1.0"}


# ---- scripts, run for real --------------------------------------------------------------------------------------

def _configmap_script() -> str:
    return one("ConfigMap", "gfuse-gluster-setup")["data"]["gluster-setup.sh"]


@pytest.mark.parametrize("script", sorted(IMAGE_DIR.glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse(script: Path) -> None:
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"
    r = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


def test_embedded_scripts_parse(tmp_path: Path) -> None:
    (tmp_path / "setup.sh").write_text(_configmap_script())
    r = subprocess.run(["bash", "-n", str(tmp_path / "setup.sh")], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    for ident, spec in POD_SPECS:
        for c in containers(spec):
            if c.get("command", [])[:2] == ["/bin/sh", "-c"]:
                r = subprocess.run(["sh", "-n", "-c", c["args"][0]], capture_output=True, text=True, check=False)
                assert r.returncode == 0, f"{ident}: {c['name']}: {r.stderr}"


def _install(plugins: Path | None, tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The installer with the plugin dir ``plugins`` as it sees it (None: FLEXVOLUME_HOST_ROOT + _PLUGIN_DIR of
    ``env``), reporting to ``tmp/termination-log`` (kubelet makes that file for every container)."""
    (tmp / "termination-log").write_text("")
    full = {"PATH": os.environ["PATH"], "GFUSE_SHIM_TEMPLATE": str(IMAGE_DIR / "flexvolume-shim.sh"),
            "GFUSE_AGENT_PIDFILE": str(tmp / "agent.pid"), "TERMINATION_LOG": str(tmp / "termination-log")}
    if plugins is not None:
        full["FLEXVOLUME_DIR"] = str(plugins)
    full.update(env)
    return subprocess.run(["sh", str(IMAGE_DIR / "install-flexvolume.sh")], env=full, capture_output=True,
                          text=True, timeout=30, check=False)


def _driver(path: Path, *argv: str) -> tuple[int, Any, str]:
    r = subprocess.run([str(path), *argv], capture_output=True, text=True, timeout=30, check=False)
    out = r.stdout.strip()
    assert len(out.splitlines()) == 1, f"driver printed {out!r}"
    return r.returncode, json.loads(out), r.stderr


def test_install_flexvolume(tmp_path: Path) -> None:
    """The installer with the DaemonSet's settings, the host's / being ``tmp_path/host``: it makes kubelet's
    default plugin dir there and installs the shim; the shim answers init as the driver does."""
    from flexvolume.driver import CAPABILITIES

    assert FLEX_INIT_ANSWER["capabilities"] == CAPABILITIES, "the shim and the driver answer init alike"
    env = {e["name"]: e["value"] for e in container(node_spec(), "install-flexvolume")["env"]
           if e["name"].startswith("FLEXVOLUME_")}
    env["FLEXVOLUME_HOST_ROOT"] = str(tmp_path / "host")
    (tmp_path / "host").mkdir()
    plugins = tmp_path / "host" / env["FLEXVOLUME_PLUGIN_DIR"].lstrip("/")
    r = _install(None, tmp_path, **env)
    assert r.returncode == 0, r.stderr
    report = f"gfuse-install-flexvolume: installed {FLEX_PLUGIN_DIR}/{FLEX_VENDOR}~{FLEX_DRIVER}/{FLEX_DRIVER}"
    assert r.stdout.strip() == report and (tmp_path / "termination-log").read_text().strip() == report
    driver_dir = plugins / f"{FLEX_VENDOR}~{FLEX_DRIVER}"
    exe = driver_dir / FLEX_DRIVER
    assert sorted(os.listdir(plugins)) == [driver_dir.name], "staging leftovers in the plugin dir"
    assert sorted(os.listdir(driver_dir)) == [FLEX_DRIVER]
    assert stat.S_IMODE(exe.stat().st_mode) == 0o755
    assert not re.search(r"@[A-Z_]+@", exe.read_text()), "unsubstituted template placeholders"

    # no agent on this "node": init still succeeds (kubelet calls it as soon as the file appears)
    rc, answer, err = _driver(exe, "init")
    assert (rc, answer, err) == (0, FLEX_INIT_ANSWER, "")
    rc, answer, err = _driver(exe, "mount", str(tmp_path / "mnt"), json.dumps({"volume": "h:/v"}))
    assert rc != 0 and answer["status"] == "Failure" and err == ""
    assert "agent is not running" in answer["message"] and str(tmp_path / "agent.pid") in answer["message"]
    # unmount without an agent is done by the shim (nothing is mounted here: Success, the dir is removed)
    (tmp_path / "mnt").mkdir()
    rc, answer, err = _driver(exe, "unmount", str(tmp_path / "mnt"))
    assert (rc, err, answer["status"]) == (0, "", "Success"), answer
    assert answer["message"].startswith(f"gfuse: {tmp_path / 'mnt'} was not mounted without the gfuse agent")
    assert not (tmp_path / "mnt").exists()
    rc, answer, _ = _driver(exe, "unmount", "relative/dir")
    assert rc == 1 and answer["status"] == "Failure"
    rc, answer, _ = _driver(exe, "getvolumename", "{}")
    assert answer == {"status": "Not supported"}

    # a stale pid (a process that is gone) is no agent either
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=False).stdout.strip()
    (tmp_path / "agent.pid").write_text(dead + "\n")
    assert _driver(exe, "init")[1] == FLEX_INIT_ANSWER
    # nor is a live process that is not the agent (this test, whose command line lacks gfuse-agent)
    (tmp_path / "agent.pid").write_text(f"{os.getpid()}\n")
    assert _driver(exe, "mount", "/x", "{}")[1]["status"] == "Failure"

    # reinstall (a new version of the DaemonSet): the executable is replaced by a rename, nothing left over
    before = exe.stat().st_ino
    r = _install(None, tmp_path, **env)
    assert r.returncode == 0 and "updated" in r.stdout, r.stderr
    assert exe.stat().st_ino != before
    assert sorted(os.listdir(plugins)) == [driver_dir.name] and sorted(os.listdir(driver_dir)) == [FLEX_DRIVER]


def test_install_flexvolume_refuses_bad_input_and_goes_on(tmp_path: Path) -> None:
    """Bad settings install nothing, and say so — but exit 0: the FlexVolume driver is optional and its init
    container must not hold back the pod's CSI containers. FLEXVOLUME_REQUIRED=true makes it fail."""
    plugins = tmp_path / "exec"
    plugins.mkdir()
    (tmp_path / "a-file").write_text("")
    for bad in ({"FLEXVOLUME_VENDOR": "a~b"}, {"FLEXVOLUME_DRIVER": "x/y"}, {"GFUSE_AGENT_PIDFILE": "/a'b"},
                {"FLEXVOLUME_DIR": str(tmp_path / "a-file" / "exec")}, {"GFUSE_SHIM_TEMPLATE": str(tmp_path / "none")},
                {"FLEXVOLUME_PLUGIN_DIR": "relative/exec", "FLEXVOLUME_HOST_ROOT": str(tmp_path)}):
        r = _install(None if "FLEXVOLUME_HOST_ROOT" in bad else plugins, tmp_path, **bad)
        assert r.returncode == 0 and r.stderr == "", (bad, r)
        (line,) = r.stdout.splitlines()
        assert line.startswith("gfuse-install-flexvolume: FlexVolume driver NOT installed: "), (bad, line)
        assert "The CSI driver is not affected" in line and "FLEXVOLUME_PLUGIN_DIR" in line, line
        assert (tmp_path / "termination-log").read_text().strip() == line
        r = _install(None if "FLEXVOLUME_HOST_ROOT" in bad else plugins, tmp_path, FLEXVOLUME_REQUIRED="true", **bad)
        assert r.returncode == 1 and "NOT installed" in r.stdout, (bad, r)
    assert os.listdir(plugins) == []
    r = _install(plugins, tmp_path, FLEXVOLUME_INSTALL="false")
    assert r.returncode == 0 and "not installed (FLEXVOLUME_INSTALL=false)" in r.stdout and os.listdir(plugins) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only /usr stand-in needs root")
def test_install_flexvolume_on_a_read_only_usr(tmp_path: Path) -> None:
    """Flatcar, Talos, k3OS: /usr is read-only and kubelet's default plugin dir cannot be made. The installer
    reports it (naming the dir, the reason and the setting that fixes it) and exits 0; with the dir set to
    where such a kubelet looks (FLEXVOLUME_PLUGIN_DIR) it installs. The old manifest mounted the plugin dir
    as a DirectoryOrCreate hostPath, which kubelet fails to make there — and then starts no container of
    the pod, the CSI ones included."""
    host = tmp_path / "host"
    (host / "usr").mkdir(parents=True)
    (host / "var").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "gfuse-test-ro-usr", str(host / "usr")], check=True,
                   timeout=30)
    try:
        env = {"FLEXVOLUME_HOST_ROOT": str(host)}
        r = _install(None, tmp_path, **env)
        assert r.returncode == 0 and r.stderr == "", r
        assert (f"FlexVolume driver NOT installed: cannot create the plugin dir {FLEX_PLUGIN_DIR} on the host "
                f"(Read-only file system)") in r.stdout, r.stdout
        r = _install(None, tmp_path, FLEXVOLUME_PLUGIN_DIR="/var/lib/kubelet/volumeplugins", **env)
        assert r.returncode == 0, r
        assert r.stdout.strip() == ("gfuse-install-flexvolume: installed /var/lib/kubelet/volumeplugins/"
                                    f"{FLEX_VENDOR}~{FLEX_DRIVER}/{FLEX_DRIVER}")
        exe = host / "var/lib/kubelet/volumeplugins" / f"{FLEX_VENDOR}~{FLEX_DRIVER}" / FLEX_DRIVER
        assert _driver(exe, "init")[1] == FLEX_INIT_ANSWER
    finally:
        subprocess.run(["umount", str(host / "usr")], check=False, timeout=30)


def test_node_pod_starts_without_the_flexvolume_plugin_dir() -> None:
    """Nothing the node pod mounts depends on kubelet's FlexVolume plugin dir (or any path under /usr, /etc or
    /opt, read-only or absent on some distributions): kubelet sets up every volume of a pod before starting
    any of its containers, so one hostPath it cannot make would keep the CSI containers from starting. The
    installer reaches the plugin dir through the host's /, and is an init step that exits 0."""
    for ident, spec in [("daemonset", node_spec()), ("podman", podman_pod()["spec"])]:
        for v in spec["volumes"]:
            path = (v.get("hostPath") or {}).get("path")
            if path is None:
                continue
            assert not path.startswith(("/usr", "/etc", "/opt")), f"{ident}: volume {v['name']} is {path}"
        init = container(spec, "install-flexvolume")
        env = {e["name"]: e.get("value") for e in init["env"]}
        assert env.get("FLEXVOLUME_REQUIRED", "false") == "false", "a failed install must not hold the pod back"
        assert [m["name"] for m in init["volumeMounts"]] == ["host-root"]
        assert "mountPropagation" not in init["volumeMounts"][0], "the host's / stays private to the init container"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nsenter") is None, reason="needs root and nsenter")
def test_flexvolume_shim_runs_driver_in_agent_namespace(tmp_path: Path) -> None:
    """With a live agent the shim execs the real driver via nsenter into the agent's mount namespace, passing
    argv, stdout and the exit code through. This process stands in for the agent (same namespace as ours)."""
    plugins = tmp_path / "exec"
    plugins.mkdir()
    fake = tmp_path / "gfuse-flexvolume"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" > {tmp_path}/argv\n'
                    'printf \'{"status":"Success","ns":"%s"}\\n\' "$(readlink /proc/self/ns/mnt)"\nexit 3\n')
    fake.chmod(0o755)
    r = _install(plugins, tmp_path, GFUSE_AGENT_MATCH="", GFUSE_FLEXVOLUME_CMD=str(fake))
    assert r.returncode == 0, r.stderr
    (tmp_path / "agent.pid").write_text(f"{os.getpid()}\n")
    rc, answer, err = _driver(plugins / f"{FLEX_VENDOR}~{FLEX_DRIVER}" / FLEX_DRIVER, "mount", "/m", '{"a": "b c"}')
    assert rc == 3 and err == ""
    assert answer == {"status": "Success", "ns": os.readlink("/proc/self/ns/mnt")}
    assert (tmp_path / "argv").read_text().split("\0")[:-1] == ["mount", "/m", '{"a": "b c"}']


# a fake `gluster` CLI and `getent` for the converged setup script: state in $FAKE_GLUSTER_STATE
FAKE_GLUSTER = r"""#!/bin/bash
S="$FAKE_GLUSTER_STATE"
[ "$1" = "--mode=script" ] || { echo "fake gluster: not --mode=script: $*" >&2; exit 2; }
shift
echo "$*" >> "$S/calls"
case "$1 $2" in
    "pool list")
        printf 'UUID\tHostname\tState\n'
        printf 'u0\tlocalhost\tConnected\n'
        [ -f "$S/peers" ] && while read -r ip; do printf 'u-%s\t%s\tConnected\n' "$ip" "$ip"; done < "$S/peers"
        true ;;
    "peer probe")
        if [ -f "$S/refuse" ] && grep -qxF "$3" "$S/refuse"; then
            echo "peer probe: failed: $3 is either already part of another cluster or having volumes configured" >&2
            exit 1
        fi
        echo "$3" >> "$S/peers"; echo "peer probe: success" ;;
    "volume info")
        [ -f "$S/vol-$3" ] || { echo "Volume $3 does not exist" >&2; exit 1; }
        echo "Volume Name: $3"; echo "Status: $(cat "$S/vol-$3.status")"; echo "Options Reconfigured:"
        cat "$S/vol-$3.options" 2> /dev/null; true ;;
    "volume create") echo "${*:4}" > "$S/vol-$3"; echo Created > "$S/vol-$3.status" ;;
    "volume start") echo Started > "$S/vol-$3.status" ;;
    "volume quota") echo "features.quota: on" >> "$S/vol-$3.options" ;;
    "volume set") echo "$4: $5" >> "$S/vol-$3.options" ;;
    *) echo "fake gluster: unexpected $*" >&2; exit 2 ;;
esac
"""
FAKE_GETENT = r"""#!/bin/bash
[ "$1" = ahostsv4 ] && [ -f "$FAKE_GLUSTER_STATE/service" ] || exit 2
# an address resolves to itself (peer names in `pool list`), the Service's name to the ready pods
if [[ "$2" =~ ^[0-9.]+$ ]]; then printf '%s\tSTREAM %s\n' "$2" "$2"; exit 0; fi
while read -r ip; do printf '%s\tSTREAM %s\n%s\tDGRAM\n' "$ip" "$2" "$ip"; done < "$FAKE_GLUSTER_STATE/service"
"""


@pytest.fixture
def gluster_setup(tmp_path: Path):
    if shutil.which("bash") is None:
        pytest.skip("bash not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("gluster", FAKE_GLUSTER), ("getent", FAKE_GETENT)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "gluster-setup.sh"
    script.write_text(_configmap_script())
    state = tmp_path / "state"
    state.mkdir()

    def run(pod_ip: str, service: list[str], peers: tuple[str, ...] | list[str] = (),
            refuse: tuple[str, ...] | list[str] = ()) -> list[str]:
        (state / "service").write_text("".join(f"{ip}\n" for ip in service))
        (state / "peers").write_text("".join(f"{ip}\n" for ip in peers))
        (state / "refuse").write_text("".join(f"{ip}\n" for ip in refuse))
        (state / "calls").write_text("")
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GLUSTER_STATE": str(state), "POD_IP": pod_ip,
               "PEER_SERVICE": "gfuse-glusterd.gfuse-system.svc", "POOL_VOLUME": "pool", "REPLICA": "3",
               "BRICK_ROOT": "/bricks", "RUN_ONCE": "1"}
        r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        return [c for c in (state / "calls").read_text().splitlines() if c.split()[:2] not in
                (["pool", "list"], ["volume", "info"])]

    run.state = state  # type: ignore[attr-defined]
    return run


def test_gluster_setup_forms_pool_and_creates_volume(gluster_setup) -> None:
    nodes = ["10.0.0.10", "10.0.0.2", "10.0.0.3"]     # numeric order: .2 < .3 < .10
    assert gluster_setup("10.0.0.3", nodes) == [], "only the lowest IP forms the pool"
    calls = gluster_setup("10.0.0.2", nodes)
    assert calls == ["peer probe 10.0.0.3", "peer probe 10.0.0.10",
                     ("volume create pool replica 3 10.0.0.2:/bricks/pool 10.0.0.3:/bricks/pool "
                      "10.0.0.10:/bricks/pool force"),
                     "volume set pool features.hard-timeout 0", "volume set pool features.soft-timeout 0",
                     "volume start pool", "volume quota pool enable",
                     "volume set pool features.quota-deem-statfs on"]
    # idempotent: a second pass changes nothing
    assert gluster_setup("10.0.0.2", nodes, peers=["10.0.0.3", "10.0.0.10"]) == []


def test_gluster_setup_grows_pool(gluster_setup) -> None:
    # established pool of .2 .3 .10 (volume exists); .1 joins: the lowest *member* probes it ...
    gluster_setup("10.0.0.2", ["10.0.0.2", "10.0.0.3", "10.0.0.10"])
    nodes = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.10"]
    assert gluster_setup("10.0.0.2", nodes, peers=["10.0.0.3", "10.0.0.10"]) == ["peer probe 10.0.0.1"]
    # ... while the newcomer, lowest of all but alone, tries and is refused: no harm, no volume made
    calls = gluster_setup("10.0.0.1", nodes, refuse=["10.0.0.2", "10.0.0.3", "10.0.0.10"])
    assert calls == ["peer probe 10.0.0.2", "peer probe 10.0.0.3", "peer probe 10.0.0.10"]
    assert not (gluster_setup.state / "vol-pool.options").read_text().count("quota: on") > 1


def test_gluster_setup_waits_for_enough_nodes(gluster_setup) -> None:
    calls = gluster_setup("10.0.0.2", ["10.0.0.2", "10.0.0.3"])
    assert calls == ["peer probe 10.0.0.3"], "two nodes cannot hold a replica-3 volume"
    assert not (gluster_setup.state / "vol-pool").exists()


# ---- podman kube play ----------------------------------------------------------------------------------------

def test_podman_pod_conversion() -> None:
    pod = podman_pod()
    text = yaml.safe_dump(pod)
    assert KUBELET_DIR not in text, "every kubelet path moved to the stand-in dir"
    assert "registry.k8s.io" not in text and "systemd" not in text
    spec = pod["spec"]
    assert [c["name"] for c in spec["containers"]] == ["agent", "csi-node"]
    assert [c["name"] for c in spec["initContainers"]] == ["install-flexvolume"]
    kubelet = volume(spec, "kubelet-dir")["hostPath"]["path"]
    for name in ("agent", "csi-node"):
        assert mount_of(spec, container(spec, name), "kubelet-dir")["mountPath"] == kubelet
    csi = container(spec, "csi-node")
    assert arg_value(csi, "--nodeid") == "testnode" and arg_value(csi, "--kubelet-dir") == kubelet
    assert "livenessProbe" not in csi and "ports" not in csi, "its probe was served by the dropped sidecar"
    init_env = {e["name"]: e.get("value") for e in container(spec, "install-flexvolume")["env"]}
    assert init_env["FLEXVOLUME_PLUGIN_DIR"] == "/var/tmp/gfuse-k8s/flexvolume"
    assert "--mount-wrapper" not in " ".join(container(spec, "agent")["args"])
    full = kube_to_pod.template_to_pod(one("DaemonSet", "gfuse-node"), keep_sidecars=True)
    template = one("DaemonSet", "gfuse-node")["spec"]["template"]["spec"]
    assert [c["name"] for c in full["spec"]["containers"]] == [c["name"] for c in template["containers"]]
    # hostNetwork: podman 4.3 refuses declared ports, so none are left; a probe naming one gets its number
    assert template["hostNetwork"] and not any("ports" in c for c in kube_to_pod._all_containers(full["spec"]))
    for c, t in zip(full["spec"]["containers"], template["containers"]):
        numbers = {p["name"]: p["containerPort"] for p in t.get("ports", [])}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if "httpGet" in t.get(probe, {}):
                want = t[probe]["httpGet"]["port"]
                assert c[probe]["httpGet"]["port"] == numbers.get(want, want), (c["name"], probe)
            elif probe in t:
                assert c[probe] == t[probe], (c["name"], probe)
        assert {k: v for k, v in c.items() if k not in ("ports", "livenessProbe", "readinessProbe", "startupProbe")} \
            == {k: v for k, v in t.items() if k not in ("ports", "livenessProbe", "readinessProbe", "startupProbe")}


def test_podman_converter_cli(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(DAEMONSET / "podman" / "kube_to_pod.py"),
                        "--kubelet-dir", str(tmp_path / "kubelet"), "--node-name", "n1"],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    pod = yaml.safe_load(r.stdout)
    assert pod == kube_to_pod.template_to_pod(one("DaemonSet", "gfuse-node"), kubelet_dir=str(tmp_path / "kubelet"),
                                              node_name="n1")


def _readme_distribution_table() -> dict[str, dict[str, str]]:
    """The README's table of distributions (Deploying on Kubernetes): row name -> column (distribution) -> cell."""
    text = (ROOT / "README.md").read_text()
    start = text.index("| | vanilla Kubernetes (kubeadm, packages) | k3s | microk8s | OpenShift 4 |")
    lines = []
    for line in text[start:].splitlines():
        if not line.startswith("|"):
            break
        lines.append(line)
    split = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    head, rows = split[0], split[2:]
    return {r[0]: dict(zip(head[1:], r[1:], strict=True)) for r in rows}


@NEEDS_KUBECTL
def test_readme_distribution_table_matches_the_manifests() -> None:
    """What the README says per distribution is what the manifests do: the kubelet dir the base mounts, the
    FlexVolume plugin dir of the base and of the OpenShift overlay, the SCC and the ServiceAccounts that may use
    it, the Pod Security level of the namespace, the CSIDriver's seLinuxMount, the driver names."""
    table = _readme_distribution_table()
    vanilla, openshift, microk8s = "vanilla Kubernetes (kubeadm, packages)", "OpenShift 4", "microk8s"

    def plugin_dir(docs: list[dict[str, Any]]) -> str:
        (ds,) = [d for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "gfuse-node"]
        (init,) = [c for c in ds["spec"]["template"]["spec"]["initContainers"] if c["name"] == "install-flexvolume"]
        return {e["name"]: e.get("value") for e in init["env"]}["FLEXVOLUME_PLUGIN_DIR"]

    base = _rendered(DAEMONSET / "converged")
    osh = _rendered(DAEMONSET / "openshift")
    row = table["FlexVolume plugin dir (kubelet's `--volume-plugin-dir`)"]
    assert row[vanilla].startswith(f"`{plugin_dir(base)}`"), row[vanilla]
    assert row[openshift].startswith(f"`{plugin_dir(osh)}`"), row[openshift]
    # the kubelet dir: what the node pod mounts as kubelet-dir; microk8s's is the sed rewrite of it
    (ds,) = [d for d in base if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "gfuse-node"]
    (kdir,) = [v["hostPath"]["path"] for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "kubelet-dir"]
    kubelet = table["kubelet dir"]
    assert kubelet[vanilla] == kubelet[openshift] == f"`{kdir}`" and kubelet["k3s"].startswith(f"`{kdir}`")
    m = re.search(r"`(/var/snap/[^`]+)`", kubelet[microk8s])
    assert m, kubelet[microk8s]
    assert f"{kdir}\\|{m.group(1)}" in table["setting the kubelet dir in the manifests"][microk8s]
    # OpenShift: the SCC and who may use it
    (scc,) = [d for d in osh if d["kind"] == "SecurityContextConstraints"]
    admission = table["admission"][openshift]
    assert f"SCC `{scc['metadata']['name']}`" in admission
    assert sorted(re.findall(r"`(gfuse-[a-z-]+)`", admission.split("bound to the ServiceAccounts")[1])) == \
        sorted(name for _, name in _scc_users(osh, scc["metadata"]["name"]))
    (ns,) = [d for d in base if d["kind"] == "Namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert "Pod Security `privileged`" in table["admission"][vanilla]
    (csidriver,) = [d for d in base if d["kind"] == "CSIDriver"]
    assert csidriver["spec"]["seLinuxMount"] is True and "seLinuxMount: true" in table["SELinux"][openshift]
    assert f"CSI driver `{csidriver['metadata']['name']}`" in table
