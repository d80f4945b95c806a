#!/usr/bin/env python3
"""Turn the pod template of a DaemonSet/Deployment manifest into a Pod for `podman kube play`.

podman runs Pods and Deployments, not DaemonSets. This takes the template (by default the gfuse-node
DaemonSet) and writes a v1 Pod to stdout, optionally adapted to a test machine:

  --kubelet-dir DIR      use DIR instead of /var/lib/kubelet everywhere (hostPath paths, mountPaths, args,
                         env): a stand-in kubelet dir, made rshared first (mount --bind DIR DIR &&
                         mount --make-rshared DIR); host and container paths stay equal, as they must.
  --flexvolume-dir DIR   host dir for the FlexVolume driver instead of kubelet's default plugin dir (the
                         install-flexvolume init container's FLEXVOLUME_PLUGIN_DIR)
  --image IMAGE          replace the gfuse image (localhost/gfuse:TAG) with IMAGE
  --node-name NAME       value for env taken from spec.nodeName (and for $(VAR) uses of it)
  --no-systemd           the host has no systemd (e.g. a test container): drop the agent's
                         --mount-wrapper (systemd-run) and the /run/systemd volume; mounts then do not
                         outlive the agent's container
  --keep-sidecars        keep registry.k8s.io sidecars (dropped by default: no registry is reachable
                         offline, and without kubelet node-driver-registrar has nobody to register with);
                         probes served by a dropped sidecar go with it

  python3 daemonset/podman/kube_to_pod.py --kubelet-dir /var/tmp/k/kubelet --node-name $(hostname) \
      > /tmp/gfuse-node-pod.yaml && podman kube play /tmp/gfuse-node-pod.yaml

Needs PyYAML only.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from typing import Any

import yaml

DEFAULT_KUBELET_DIR = "/var/lib/kubelet"
DEFAULT_FLEXVOLUME_DIR = "/usr/libexec/kubernetes/kubelet-plugins/volume/exec"
FLEXVOLUME_DIR_ENV = "FLEXVOLUME_PLUGIN_DIR"
DEFAULT_INPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "base", "daemonset-node.yaml")
SIDECAR_REGISTRIES = ("registry.k8s.io/",)
WORKLOAD_KINDS = ("DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job")
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_MOUNT_WRAPPER = re.compile(r"""\s*(?:\\\n\s*)?--mount-wrapper=(?:"[^"]*"|'[^']*'|\S+)""")
SYSTEMD_VOLUME = "run-systemd"
_PORT_ARG = re.compile(r"^--(?:health-port=|http-endpoint=[^:]*:)(\d+)$")


def _rewrite_prefix(value: str, old: str, new: str) -> str:
    """Replace the path prefix `old` by `new` wherever it starts a path in `value`."""
    if old == new:
        return value
    return re.sub(re.escape(old) + r"(?=/|$|\s|\")", new, value)


def _expand(text: str, env: dict[str, str]) -> str:
    """Expand $(VAR) for the variables of `env`, as kubelet does; others stay as they are."""
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def _all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def template_to_pod(
    workload: dict[str, Any],
    *,
    kubelet_dir: str = DEFAULT_KUBELET_DIR,
    flexvolume_dir: str | None = None,
    image: str | None = None,
    node_name: str | None = None,
    keep_sidecars: bool = False,
    no_systemd: bool = False,
) -> dict[str, Any]:
    """The Pod (a new dict) that `workload`'s pod template describes, adapted as the options say."""
    if workload.get("kind") not in WORKLOAD_KINDS:
        raise ValueError(f"not a workload with a pod template: kind {workload.get('kind')!r}")
    template = copy.deepcopy(workload["spec"]["template"])
    spec = template["spec"]
    meta = workload.get("metadata", {})
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": meta["name"], "labels": dict(template.get("metadata", {}).get("labels") or {})},
        "spec": spec,
    }
    # Cluster-only fields podman ignores or cannot honour; harmless in a real cluster, noise here.
    for field in ("serviceAccountName", "priorityClassName", "tolerations"):
        spec.pop(field, None)
    spec["restartPolicy"] = "Always"

    if not keep_sidecars:
        dropped = [c for c in spec.get("containers", []) if c.get("image", "").startswith(SIDECAR_REGISTRIES)]
        dropped_ports = {int(m.group(1)) for c in dropped for a in c.get("args", []) if (m := _PORT_ARG.match(a))}
        spec["containers"] = [c for c in spec["containers"] if c not in dropped]
        for c in spec["containers"]:
            named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
                if named.get(port, port) in dropped_ports:
                    del c[probe]
            c["ports"] = [p for p in c.get("ports", []) if p["containerPort"] not in dropped_ports]
            if not c["ports"]:
                del c["ports"]
        used = {m["name"] for c in _all_containers(spec) for m in c.get("volumeMounts", [])}
        spec["volumes"] = [v for v in spec.get("volumes", []) if v["name"] in used]

    if spec.get("hostNetwork"):
        # a hostNetwork pod's ports are the node's own (nothing to map); podman 4.3's kube play refuses any
        # declared port there ("PortMappings can only be used with Bridge or slirp4netns networking")
        # (probes naming a port get its number first)
        for c in _all_containers(spec):
            named = {p.get("name"): p["containerPort"] for p in c.pop("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                get = (c.get(probe) or {}).get("httpGet") or {}
                if get.get("port") in named:
                    get["port"] = named[get["port"]]

    if no_systemd:
        spec["volumes"] = [v for v in spec.get("volumes", []) if v["name"] != SYSTEMD_VOLUME]
        for c in _all_containers(spec):
            c["volumeMounts"] = [m for m in c.get("volumeMounts", []) if m["name"] != SYSTEMD_VOLUME]
            for key in ("command", "args"):
                if key in c:
                    c[key] = [_MOUNT_WRAPPER.sub("", a) for a in c[key]]

    for v in spec.get("volumes", []):
        hp = v.get("hostPath")
        if not hp:
            continue
        hp["path"] = _rewrite_prefix(hp["path"], DEFAULT_KUBELET_DIR, kubelet_dir)

    for c in _all_containers(spec):
        if image and c.get("image", "").split(":")[0] == "localhost/gfuse":
            c["image"] = image
        for m in c.get("volumeMounts", []):
            m["mountPath"] = _rewrite_prefix(m["mountPath"], DEFAULT_KUBELET_DIR, kubelet_dir)
        literal: dict[str, str] = {}
        for e in c.get("env", []):
            if flexvolume_dir and e["name"] == FLEXVOLUME_DIR_ENV:
                e["value"] = flexvolume_dir
            ref = (e.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
            if ref == "spec.nodeName" and node_name:
                e.pop("valueFrom")
                e["value"] = node_name
            if "value" in e:
                e["value"] = _rewrite_prefix(e["value"], DEFAULT_KUBELET_DIR, kubelet_dir)
                literal[e["name"]] = e["value"]
        for key in ("command", "args"):
            if key in c:
                c[key] = [_expand(_rewrite_prefix(a, DEFAULT_KUBELET_DIR, kubelet_dir), literal) for a in c[key]]
    return pod


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (shell scripts) as literal blocks."""


_Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", nargs="?", default=DEFAULT_INPUT, help="YAML with the workload (default: gfuse-node)")
    p.add_argument("--kind", default=None, help="which workload of the file (default: the first)")
    p.add_argument("--kubelet-dir", default=DEFAULT_KUBELET_DIR)
    p.add_argument("--flexvolume-dir", default=None)
    p.add_argument("--image", default=None)
    p.add_argument("--node-name", default=None)
    p.add_argument("--no-systemd", action="store_true")
    p.add_argument("--keep-sidecars", action="store_true")
    args = p.parse_args(argv)
    with open(args.manifest) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    workloads = [d for d in docs if d.get("kind") in WORKLOAD_KINDS and (args.kind in (None, d["kind"]))]
    if not workloads:
        print(f"kube_to_pod: no workload in {args.manifest}", file=sys.stderr)
        return 1
    pod = template_to_pod(workloads[0], kubelet_dir=args.kubelet_dir.rstrip("/") or "/",
                          flexvolume_dir=args.flexvolume_dir, image=args.image, node_name=args.node_name,
                          keep_sidecars=args.keep_sidecars, no_systemd=args.no_systemd)
    yaml.dump(pod, sys.stdout, Dumper=_Dumper, sort_keys=False, width=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
