"""A small Kubernetes API server emulator, for tests of the FlexVolume provisioner controller.

No real control plane (kube-apiserver, etcd, kube-controller-manager, kubelet) can run on the
machines these tests run on: none is packaged for Debian, PyPI or npm, and there is no Go module
proxy to build one. This module stands in for the API server: it speaks real HTTP on 127.0.0.1 and
serves the unmodified ``kubernetes`` Python client, with the API semantics a controller depends on.

Served (JSON only)
------------------
- core/v1 ``persistentvolumeclaims`` (namespaced, ``/status``), ``persistentvolumes`` (cluster,
  ``/status``), ``events`` (namespaced); storage.k8s.io/v1 ``storageclasses``;
  coordination.k8s.io/v1 ``leases``. Namespaces need not exist (there are no Namespace objects).
- GET, LIST (``labelSelector`` with ``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``;
  ``fieldSelector`` with ``=``/``!=`` on any dotted field path; ``limit`` is ignored, which the API
  allows), CREATE (``generateName`` too), PUT (replace), PATCH, DELETE (with ``preconditions``).
- PATCH content types: ``application/merge-patch+json`` (RFC 7386), ``application/json-patch+json``
  (RFC 6902: add, remove, replace, move, copy, test) and ``application/strategic-merge-patch+json``,
  which is applied **as a JSON merge patch**: lists are replaced whole instead of merged by their
  patch keys. The client sends strategic merge for any dict body unless told otherwise; code under
  test that relies on list merging must say ``_content_type`` explicitly. Server-side apply → 415.
- Objects get ``uid``, ``creationTimestamp`` and a ``resourceVersion`` from one counter that rises
  with every write (as etcd's revision). ``metadata.resourceVersion`` in a PUT or PATCH body that is
  not the current one → **409 Conflict**; create of an existing name → 409 AlreadyExists; missing →
  404. An empty resourceVersion in a PUT is an unconditional update (as for PVs, PVCs and leases).
- Status subresources (PVC, PV): writes to the main resource keep the stored status, writes to
  ``/status`` change only the status. Create resets the status (phase Pending), as the apiserver's
  create strategies do. Defaults: PV reclaim policy Retain and volumeMode Filesystem, PVC volumeMode
  Filesystem, StorageClass reclaimPolicy Delete and volumeBindingMode Immediate.
- Finalizers: DELETE of an object with finalizers sets ``deletionTimestamp``; the object goes once an
  update empties ``metadata.finalizers``. No finalizer may be added to an object being deleted.
  PV and PVC DELETE answer with the object, the others with a Status (as the apiserver does).
  The apiserver's admission plugins do not run: PVCs and PVs get no ``kubernetes.io/pvc-protection``
  / ``pv-protection`` finalizers.
- Validation of every written object (after defaulting, before storing) with ``kubernetes-validate``
  in strict mode against the newest schema it has (1.37 here) → **422 Invalid**. Its schemas miss
  what the apiserver checks in Go, so a few of those checks are added here: names, label keys and
  values, finalizer names, quantities, the enums of PVs/PVCs/StorageClasses, required PV/PVC fields,
  exactly one PV volume source, immutable fields (PV source, PVC spec apart from the storage
  request and an unset volumeName, shrinking a bound claim).
- Watch (``?watch=true``): chunked JSON lines, starting after ``resourceVersion`` (unset or "0":
  synthetic ADDED events of the current objects first). ``timeoutSeconds`` ends the stream
  (default :attr:`KubeEmulator.default_watch_timeout`). A resourceVersion older than the kept
  history gets an ERROR event with a 410 ``Expired`` Status, as from the apiserver. No bookmarks.

Test hooks
----------
- :meth:`KubeEmulator.expire_watches` ends every open watch now (cleanly, or with 410 Gone);
  :meth:`KubeEmulator.compact` forgets the event history, so watches from older versions get 410.
- :meth:`KubeEmulator.hold` stops a matching request before it is applied until the test releases
  it (apply it, or drop the connection unanswered): to kill a client between two of its writes.
- :meth:`KubeEmulator.fail` answers matching requests with an error status a number of times.
- ``pv_controller=True`` (default) runs a stand-in for kube-controller-manager's PV controller
  (binding only): a PV whose ``claimRef`` names an existing claim with that uid is bound to it
  (``pvc.spec.volumeName``, both phases Bound, the claim's status capacity and access modes);
  a PV whose claim is gone becomes Released; an unclaimed Pending PV becomes Available. It runs
  synchronously after each write, as separate writes with their own resourceVersions. It does not
  reclaim anything: PVs of external provisioners are theirs to delete, as in Kubernetes.

This is test infrastructure: stdlib ``http.server`` in a thread, one lock around all state.
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import json
import logging
import re
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# resources


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status: bool = False          # has a /status subresource
    return_deleted: bool = False  # DELETE answers with the object (else a Status)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES: dict[tuple[str, str, str], Resource] = {
    (r.group, r.version, r.plural): r
    for r in (
        Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, status=True, return_deleted=True),
        Resource("", "v1", "persistentvolumes", "PersistentVolume", False, status=True, return_deleted=True),
        Resource("", "v1", "events", "Event", True),
        Resource("storage.k8s.io", "v1", "storageclasses", "StorageClass", False),
        Resource("coordination.k8s.io", "v1", "leases", "Lease", True),
    )
}
PVC = RESOURCES[("", "v1", "persistentvolumeclaims")]
PV = RESOURCES[("", "v1", "persistentvolumes")]

K8S_VERSION = "1.37"


class ApiError(Exception):
    """Ends a request with a Kubernetes Status."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def _details(res: Resource, name: str) -> dict[str, Any]:
    d = {"name": name, "kind": res.plural}
    if res.group:
        d["group"] = res.group
    return d


def not_found(res: Resource, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{res.plural}{"." + res.group if res.group else ""} "{name}" not found',
                    _details(res, name))


def conflict(res: Resource, name: str, why: str = "the object has been modified; please apply your changes "
                                                    "to the latest version and try again") -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} "{name}": {why}',
                    _details(res, name))


def invalid(res: Resource, name: str, causes: list[str]) -> ApiError:
    return ApiError(422, "Invalid", f'{res.kind} "{name}" is invalid: ' + "; ".join(causes),
                    {**_details(res, name), "causes": [{"message": c} for c in causes]})


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


# ------------------------------------------------------------------------------------------------
# time and names


def now_time() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_microtime() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$")
_GEN_CHARS = "bcdfghjklmnpqrstvwxz2456789"


def _check_qualified_name(key: str, what: str) -> list[str]:
    """Label/annotation key or finalizer: ``[prefix/]name`` (prefix a DNS subdomain, name ≤ 63)."""
    prefix, _, name = key.rpartition("/")
    errs = []
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        errs.append(f"{what}: Invalid value: {key!r}: prefix part must be a lowercase RFC 1123 subdomain")
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        errs.append(f"{what}: Invalid value: {key!r}: name part must consist of alphanumeric characters, '-', "
                    f"'_' or '.', must start and end with an alphanumeric character, at most 63 characters")
    return errs


def parse_quantity(value: Any) -> Decimal:
    """A Kubernetes quantity as a Decimal; ValueError if it is not one."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity")
    if isinstance(value, (int, float)):
        return Decimal(str(value))
    text = str(value)
    if not _QUANTITY.match(text):
        raise ValueError(f"{text!r} is not a quantity (e.g. 1Gi, 500M, 1073741824)")
    m = re.match(r"^(.*?)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$", text)
    assert m
    number, suffix = Decimal(m.group(1)), m.group(2) or ""
    binary = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
    decimal_ = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
    if suffix in binary:
        return number * (Decimal(1024) ** binary[suffix])
    if suffix[:1] in ("e", "E"):
        return number * (Decimal(10) ** int(suffix[1:]))
    return number * (Decimal(10) ** decimal_[suffix])


# ------------------------------------------------------------------------------------------------
# JSON merge patch and JSON patch


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"json patch: path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for p in parts:
        if isinstance(doc, list):
            try:
                doc = doc[int(p)]
            except (ValueError, IndexError):
                raise bad_request(f"json patch: no index {p!r}") from None
        elif isinstance(doc, dict):
            if p not in doc:
                raise bad_request(f"json patch: no member {p!r}")
            doc = doc[p]
        else:
            raise bad_request(f"json patch: cannot descend into {type(doc).__name__} at {p!r}")
    return doc


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 (add, remove, replace, move, copy, test)."""
    if not isinstance(ops, list):
        raise bad_request("json patch: the body must be a list of operations")
    doc = copy.deepcopy(doc)

    def remove(parts: list[str]) -> Any:
        parent = _walk(doc, parts[:-1])
        last = parts[-1]
        if isinstance(parent, list):
            try:
                return parent.pop(int(last))
            except (ValueError, IndexError):
                raise bad_request(f"json patch: no index {last!r} to remove") from None
        if not isinstance(parent, dict) or last not in parent:
            raise bad_request(f"json patch: no member {last!r} to remove")
        return parent.pop(last)

    def add(parts: list[str], value: Any) -> None:
        nonlocal doc
        if not parts:
            doc = value
            return
        parent = _walk(doc, parts[:-1])
        last = parts[-1]
        if isinstance(parent, list):
            if last == "-":
                parent.append(value)
                return
            try:
                i = int(last)
            except ValueError:
                raise bad_request(f"json patch: bad index {last!r}") from None
            if not 0 <= i <= len(parent):
                raise bad_request(f"json patch: index {i} out of range")
            parent.insert(i, value)
        elif isinstance(parent, dict):
            parent[last] = value
        else:
            raise bad_request(f"json patch: cannot add into {type(parent).__name__}")

    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise bad_request(f"json patch: bad operation {op!r}")
        kind, parts = op["op"], _pointer(op["path"])
        if kind == "add":
            add(parts, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            remove(parts)
        elif kind == "replace":
            remove(parts)
            add(parts, copy.deepcopy(op.get("value")))
        elif kind == "move":
            value = remove(_pointer(op["from"]))
            add(parts, value)
        elif kind == "copy":
            add(parts, copy.deepcopy(_walk(doc, _pointer(op["from"]))))
        elif kind == "test":
            if _walk(doc, parts) != op.get("value"):
                raise ApiError(422, "Invalid", f"json patch: test failed at {op['path']}")
        else:
            raise bad_request(f"json patch: unknown operation {kind!r}")
    return doc


# ------------------------------------------------------------------------------------------------
# selectors


def _get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _label_in(key: str, values: set[str], wanted: bool, labels: dict[str, str]) -> bool:
    return (labels.get(key) in values) == wanted


def _label_is(key: str, value: str, wanted: bool, labels: dict[str, str]) -> bool:
    return (labels.get(key) == value) == wanted


def _label_present(key: str, wanted: bool, labels: dict[str, str]) -> bool:
    return (key in labels) == wanted


def _split_selector(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def label_selector(text: str | None) -> Callable[[dict[str, Any]], bool]:
    if not text:
        return lambda obj: True
    tests: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_selector(text):
        m = re.match(r"^([^\s!=]+)\s+(in|notin)\s+\((.*)\)$", term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            tests.append(functools.partial(_label_in, key, values, op == "in"))
            continue
        m = re.match(r"^([^\s!=]+)\s*(==|=|!=)\s*(\S*)$", term)
        if m:
            key, op, value = m.groups()
            tests.append(functools.partial(_label_is, key, value, op != "!="))
            continue
        m = re.match(r"^(!?)([^\s!=()]+)$", term)
        if m:
            neg, key = m.groups()
            tests.append(functools.partial(_label_present, key, not neg))
            continue
        raise bad_request(f"unable to parse requirement: {term!r}")
    return lambda obj: all(t(obj.get("metadata", {}).get("labels") or {}) for t in tests)


def field_selector(text: str | None) -> Callable[[dict[str, Any]], bool]:
    if not text:
        return lambda obj: True
    tests = []
    for term in _split_selector(text):
        m = re.match(r"^([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)$", term)
        if not m:
            raise bad_request(f"invalid field selector: {term!r}")
        path, op, value = m.groups()
        if op == "!=":
            tests.append(lambda o, p=path, v=value: str(_get_path(o, p) or "") != v)
        else:
            tests.append(lambda o, p=path, v=value: str(_get_path(o, p) or "") == v)
    return lambda obj: all(t(obj) for t in tests)


# ------------------------------------------------------------------------------------------------
# validation


@functools.lru_cache(maxsize=1)
def _kubernetes_validate() -> Any:
    """kubernetes_validate, with its schema loader memoized (it re-reads megabytes of JSON per call)."""
    import kubernetes_validate
    import kubernetes_validate.utils as kvu

    if hasattr(kvu, "schema_contents") and not hasattr(kvu.schema_contents, "cache_info"):
        kvu.schema_contents = functools.lru_cache(maxsize=None)(kvu.schema_contents)
    return kubernetes_validate


def schema_version(wanted: str = K8S_VERSION) -> str:
    """The schema version kubernetes-validate uses for ``wanted`` (the newest it has, if older)."""
    kv = _kubernetes_validate()
    latest = kv.latest_version()
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split(".")[:2])
    return wanted if key(wanted) <= key(latest) else ".".join(latest.split(".")[:2])


_ACCESS_MODES = {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"}
_RECLAIM = {"Retain", "Delete", "Recycle"}
_VOLUME_MODES = {"Filesystem", "Block"}
_PV_PHASES = {"Pending", "Available", "Bound", "Released", "Failed"}
_PVC_PHASES = {"Pending", "Bound", "Lost"}
_BINDING_MODES = {"Immediate", "WaitForFirstConsumer"}
_PV_SOURCES = (
    "awsElasticBlockStore", "azureDisk", "azureFile", "cephfs", "cinder", "csi", "fc", "flexVolume", "flocker",
    "gcePersistentDisk", "glusterfs", "hostPath", "iscsi", "local", "nfs", "photonPersistentDisk",
    "portworxVolume", "quobyte", "rbd", "scaleIO", "storageos", "vsphereVolume",
)


def extra_checks(res: Resource, obj: dict[str, Any]) -> list[str]:
    """What the apiserver validates in Go and the JSON schemas do not say."""
    errs: list[str] = []
    meta = obj.get("metadata") or {}
    name = meta.get("name") or ""
    if res.kind == "Event":
        if len(name) > 253 or not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", name):
            errs.append(f"metadata.name: Invalid value: {name!r}: must be a lowercase RFC 1123 subdomain")
    elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        errs.append(f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain must consist of lower "
                    f"case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character")
    for key, value in (meta.get("labels") or {}).items():
        errs += _check_qualified_name(key, "metadata.labels")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            errs.append(f"metadata.labels: Invalid value: {value!r}: a valid label must be an empty string or "
                        f"consist of alphanumeric characters, '-', '_' or '.', at most 63 characters")
    ann = meta.get("annotations") or {}
    for key in ann:
        errs += _check_qualified_name(key, "metadata.annotations")
    if sum(len(k) + len(str(v)) for k, v in ann.items()) > 256 * 1024:
        errs.append("metadata.annotations: Too long: must have at most 262144 bytes")
    for fin in meta.get("finalizers") or []:
        errs += _check_qualified_name(fin, "metadata.finalizers")
        if "/" not in fin and fin not in ("kubernetes", "orphan", "foregroundDeletion"):
            errs.append(f"metadata.finalizers: Invalid value: {fin!r}: name is neither a standard finalizer name "
                        f"nor is it fully qualified")
    if len(set(meta.get("finalizers") or [])) != len(meta.get("finalizers") or []):
        errs.append("metadata.finalizers: Duplicate value")

    def quantity(path: str, value: Any, positive: bool = True) -> None:
        try:
            q = parse_quantity(value)
        except ValueError as e:
            errs.append(f"{path}: Invalid value: {e}")
            return
        if positive and q <= 0:
            errs.append(f"{path}: Invalid value: {value!r}: must be greater than zero")

    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if res is PV:
        sources = [s for s in _PV_SOURCES if spec.get(s) is not None]
        if len(sources) != 1:
            errs.append(f"spec: Required value: must specify exactly one volume type (got {sources or 'none'})")
        cap = (spec.get("capacity") or {})
        if "storage" not in cap:
            errs.append("spec.capacity: Required value")
        else:
            quantity("spec.capacity.storage", cap["storage"])
        modes = spec.get("accessModes") or []
        if not modes:
            errs.append("spec.accessModes: Required value")
        for m in modes:
            if m not in _ACCESS_MODES:
                errs.append(f"spec.accessModes: Unsupported value: {m!r}")
        if "ReadWriteOncePod" in modes and len(modes) > 1:
            errs.append("spec.accessModes: Forbidden: may not use ReadWriteOncePod with other access modes")
        if spec.get("persistentVolumeReclaimPolicy") not in _RECLAIM:
            errs.append(f"spec.persistentVolumeReclaimPolicy: Unsupported value: "
                        f"{spec.get('persistentVolumeReclaimPolicy')!r}")
        if spec.get("volumeMode") not in _VOLUME_MODES:
            errs.append(f"spec.volumeMode: Unsupported value: {spec.get('volumeMode')!r}")
        if status.get("phase") and status["phase"] not in _PV_PHASES:
            errs.append(f"status.phase: Unsupported value: {status['phase']!r}")
        flex = spec.get("flexVolume")
        if flex is not None and not flex.get("driver"):
            errs.append("spec.flexVolume.driver: Required value")
        claim = spec.get("claimRef")
        if claim is not None:
            if not claim.get("name"):
                errs.append("spec.claimRef.name: Required value")
            if not claim.get("namespace"):
                errs.append("spec.claimRef.namespace: Required value")
    elif res is PVC:
        modes = spec.get("accessModes") or []
        if not modes:
            errs.append("spec.accessModes: Required value: at least 1 access mode is required")
        for m in modes:
            if m not in _ACCESS_MODES:
                errs.append(f"spec.accessModes: Unsupported value: {m!r}")
        req = ((spec.get("resources") or {}).get("requests") or {})
        if "storage" not in req:
            errs.append("spec.resources.requests.storage: Required value")
        else:
            quantity("spec.resources.requests.storage", req["storage"])
        if spec.get("volumeMode") not in _VOLUME_MODES:
            errs.append(f"spec.volumeMode: Unsupported value: {spec.get('volumeMode')!r}")
        if status.get("phase") and status["phase"] not in _PVC_PHASES:
            errs.append(f"status.phase: Unsupported value: {status['phase']!r}")
        for m in status.get("accessModes") or []:
            if m not in _ACCESS_MODES:
                errs.append(f"status.accessModes: Unsupported value: {m!r}")
        for k, v in (status.get("capacity") or {}).items():
            quantity(f"status.capacity.{k}", v, positive=False)
    elif res.kind == "StorageClass":
        if not obj.get("provisioner"):
            errs.append("provisioner: Required value")
        if obj.get("reclaimPolicy") not in ("Retain", "Delete"):
            errs.append(f"reclaimPolicy: Unsupported value: {obj.get('reclaimPolicy')!r}")
        if obj.get("volumeBindingMode") not in _BINDING_MODES:
            errs.append(f"volumeBindingMode: Unsupported value: {obj.get('volumeBindingMode')!r}")
    elif res.kind == "Lease":
        d = spec.get("leaseDurationSeconds")
        if d is not None and d <= 0:
            errs.append("spec.leaseDurationSeconds: Invalid value: must be greater than 0")
        t = spec.get("leaseTransitions")
        if t is not None and t < 0:
            errs.append("spec.leaseTransitions: Invalid value: must be greater than or equal to 0")
    elif res.kind == "Event":
        if not (obj.get("involvedObject") or {}).get("kind") and not (obj.get("involvedObject") or {}).get("name"):
            errs.append("involvedObject: Required value")
        if obj.get("type") and obj["type"] not in ("Normal", "Warning"):
            errs.append(f"type: Unsupported value: {obj['type']!r}")
    return errs


def update_checks(res: Resource, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Immutable fields."""
    errs: list[str] = []
    if res is PV:
        for s in _PV_SOURCES:
            if old.get("spec", {}).get(s) != new.get("spec", {}).get(s):
                errs.append("spec.persistentvolumesource: Forbidden: spec.persistentvolumesource is immutable "
                            "after creation")
                break
        if old["spec"].get("volumeMode") != new["spec"].get("volumeMode"):
            errs.append("spec.volumeMode: Invalid value: field is immutable")
    elif res is PVC:
        o, n = copy.deepcopy(old.get("spec", {})), copy.deepcopy(new.get("spec", {}))
        for spec in (o, n):
            spec.get("resources", {}).get("requests", {}).pop("storage", None)
            spec.pop("volumeAttributesClassName", None)
        if not old.get("spec", {}).get("volumeName"):
            o.pop("volumeName", None)
            n.pop("volumeName", None)
        if o != n:
            errs.append("spec: Forbidden: spec is immutable after creation except resources.requests and "
                        "volumeAttributesClassName for bound claims")
        if old.get("status", {}).get("phase") == "Bound":
            try:
                if parse_quantity(new["spec"]["resources"]["requests"]["storage"]) < parse_quantity(
                        (old.get("status", {}).get("capacity") or {}).get("storage", "0")):
                    errs.append("spec.resources.requests.storage: Forbidden: "
                                "field can not be less than status.capacity")
            except (KeyError, ValueError):
                pass
    old_fin = set(old["metadata"].get("finalizers") or [])
    new_fin = set(new["metadata"].get("finalizers") or [])
    if old["metadata"].get("deletionTimestamp") and new_fin - old_fin:
        errs.append(f"metadata.finalizers: Forbidden: no new finalizers can be added if the object is being "
                    f"deleted, found new finalizers {sorted(new_fin - old_fin)}")
    return errs


def apply_defaults(res: Resource, obj: dict[str, Any]) -> None:
    if res is PV:
        spec = obj.setdefault("spec", {})
        spec.setdefault("persistentVolumeReclaimPolicy", "Retain")
        spec.setdefault("volumeMode", "Filesystem")
    elif res is PVC:
        obj.setdefault("spec", {}).setdefault("volumeMode", "Filesystem")
    elif res.kind == "StorageClass":
        obj.setdefault("reclaimPolicy", "Delete")
        obj.setdefault("volumeBindingMode", "Immediate")


# ------------------------------------------------------------------------------------------------
# test hooks


@dataclass
class Hold:
    """A request held before it is applied (see :meth:`KubeEmulator.hold`)."""

    method: str
    path: re.Pattern[str]
    arrived: threading.Event = field(default_factory=threading.Event)
    _released: threading.Event = field(default_factory=threading.Event)
    apply: bool = False
    request: tuple[str, str] | None = None
    body: Any = None

    def wait(self, timeout: float) -> tuple[str, str]:
        """Wait until a matching request arrives; (method, path). AssertionError after ``timeout``."""
        if not self.arrived.wait(timeout):
            raise AssertionError(f"no {self.method} {self.path.pattern} request within {timeout:g}s")
        assert self.request is not None
        return self.request

    def release(self, apply: bool) -> None:
        """Let the held request go: applied (the answer goes to a client that may be gone), or dropped
        (the connection is closed unanswered and nothing changes)."""
        self.apply = apply
        self._released.set()


@dataclass
class _Failure:
    method: str
    path: re.Pattern[str]
    code: int
    reason: str
    times: int


@dataclass
class _Watch:
    res: Resource
    namespace: str | None
    match: Callable[[dict[str, Any]], bool]
    epoch: int


# ------------------------------------------------------------------------------------------------
# the emulator


class KubeEmulator:
    """The API server stand-in. Use as a context manager or call :meth:`start`/:meth:`stop`."""

    def __init__(self, *, validate: bool = True, k8s_version: str = K8S_VERSION, pv_controller: bool = True,
                 history: int = 10000, default_watch_timeout: float = 60.0) -> None:
        self.validate = validate
        self.k8s_version = schema_version(k8s_version) if validate else k8s_version
        self.pv_controller = pv_controller
        self.default_watch_timeout = default_watch_timeout
        self._cond = threading.Condition(threading.RLock())
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural@group, ns, name) -> object
        self._rv = 0
        self._history: deque[tuple[int, Resource, str, dict[str, Any]]] = deque(maxlen=history)
        self._floor = 0  # watches from a resourceVersion below this get 410 Gone
        self._epoch = 0  # expire_watches() bumps it
        self._expire_gone = False
        self._watches: list[_Watch] = []
        self._holds: list[Hold] = []
        self._failures: list[_Failure] = []
        self._binding = False
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request answered
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._stopping = False

    # -------------------------------------------------------------------------------- lifecycle

    def start(self) -> KubeEmulator:
        emu = self

        class Handler(_Handler):
            emulator = emu

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="kube-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            for h in self._holds:
                h.release(False)
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self._cond:
                conns = list(self._conns)
            for c in conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # an AF_INET server: (host, port)
        return f"http://{host}:{port}"

    def configuration(self) -> Any:
        """A ``kubernetes.client.Configuration`` for this server."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return cfg

    def api_client(self) -> Any:
        from kubernetes import client

        return client.ApiClient(self.configuration())

    def write_kubeconfig(self, path: str | Path) -> Path:
        """A kubeconfig file naming this server (http, no credentials)."""
        path = Path(path)
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}],
        }
        path.write_text(json.dumps(cfg))  # JSON is YAML
        return path

    # -------------------------------------------------------------------------------- test hooks

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def expire_watches(self, gone: bool = False) -> None:
        """End every open watch now: cleanly (as on the apiserver's timeout), or with an ERROR event
        carrying a 410 Expired Status (as when etcd compacted the watch's revision)."""
        with self._cond:
            self._epoch += 1
            self._expire_gone = gone
            self._cond.notify_all()

    def compact(self) -> int:
        """Forget the event history up to now: a watch from an older resourceVersion gets 410 Gone."""
        with self._cond:
            self._history.clear()
            self._floor = self._rv
            return self._rv

    def open_watches(self) -> int:
        with self._cond:
            return len(self._watches)

    def hold(self, method: str, path: str) -> Hold:
        """Hold the next request with this method whose path matches ``path`` (a regex, searched)
        before it is applied; see :class:`Hold`. One request per hold."""
        h = Hold(method.upper(), re.compile(path))
        with self._cond:
            self._holds.append(h)
        return h

    def fail(self, method: str, path: str, code: int = 500, reason: str = "InternalError", times: int = 1) -> None:
        """Answer the next ``times`` matching requests with this error, without applying them."""
        with self._cond:
            self._failures.append(_Failure(method.upper(), re.compile(path), code, reason, times))

    def get(self, plural: str, name: str, namespace: str = "", group: str = "") -> dict[str, Any] | None:
        """A stored object (a copy), or None."""
        with self._cond:
            obj = self._objects.get((self._rkey(self._resource(group, plural)), namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(self, plural: str, namespace: str | None = None, group: str = "") -> list[dict[str, Any]]:
        res = self._resource(group, plural)
        rkey = self._rkey(res)
        with self._cond:
            return [copy.deepcopy(o) for (rk, ns, _), o in sorted(self._objects.items())
                    if rk == rkey and (namespace is None or ns == namespace)]

    def put_object(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create (or replace, unconditionally) an object directly, as another controller would."""
        res = self._resource_of(obj)
        ns = obj.get("metadata", {}).get("namespace", "") if res.namespaced else ""
        name = obj["metadata"]["name"]
        with self._cond:
            if (self._rkey(res), ns, name) in self._objects:
                return self._update(res, ns, name, obj, subresource="", check_rv=False)
            return self._create(res, ns, obj)

    def delete_object(self, plural: str, name: str, namespace: str = "", group: str = "") -> None:
        with self._cond:
            self._delete(self._resource(group, plural), namespace, name, {})

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Wait (bounded) until ``predicate()`` is truthy; re-checked on every write. Returns its value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
                self._cond.wait(min(left, 0.2))

    # -------------------------------------------------------------------------------- internals

    @staticmethod
    def _rkey(res: Resource) -> str:
        return f"{res.plural}@{res.group}"

    @staticmethod
    def _resource(group: str, plural: str) -> Resource:
        for r in RESOURCES.values():
            if r.group == group and r.plural == plural:
                return r
        raise KeyError(f"{plural}.{group} is not served")

    @staticmethod
    def _resource_of(obj: dict[str, Any]) -> Resource:
        for r in RESOURCES.values():
            if r.api_version == obj.get("apiVersion") and r.kind == obj.get("kind"):
                return r
        raise KeyError(f"{obj.get('apiVersion')}/{obj.get('kind')} is not served")

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _record(self, res: Resource, kind: str, obj: dict[str, Any]) -> None:
        if self._history.maxlen and len(self._history) == self._history.maxlen:
            self._floor = self._history[0][0]
        self._history.append((int(obj["metadata"]["resourceVersion"]), res, kind, copy.deepcopy(obj)))
        self._cond.notify_all()

    def _check_valid(self, res: Resource, obj: dict[str, Any], old: dict[str, Any] | None = None) -> None:
        name = obj.get("metadata", {}).get("name", "")
        causes: list[str] = []
        if self.validate:
            kv = _kubernetes_validate()
            try:
                kv.validate(obj, self.k8s_version, strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.absolute_path) or "<root>"
                causes.append(f"{where}: {e.message}")
            except kv.SchemaNotFoundError as e:
                causes.append(e.message)
        causes += extra_checks(res, obj)
        if old is not None:
            causes += update_checks(res, old, obj)
        if causes:
            raise invalid(res, name, causes)

    def _create(self, res: Resource, ns: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        obj = copy.deepcopy(body)
        if obj.get("apiVersion") != res.api_version or obj.get("kind") != res.kind:
            raise bad_request(f"the body is {obj.get('apiVersion')}/{obj.get('kind')}, this endpoint takes "
                              f"{res.api_version}/{res.kind}")
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if res.namespaced:
            if meta.get("namespace") not in (None, "", ns):
                raise bad_request("the namespace of the provided object does not match the namespace sent on "
                                  "the request")
            meta["namespace"] = ns
        elif meta.get("namespace"):
            raise bad_request(f"{res.kind} is not namespaced: metadata.namespace must be empty")
        if meta.get("resourceVersion"):
            raise bad_request("resourceVersion should not be set on objects to be created")
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise invalid(res, "", ["metadata.name: Required value: name or generateName is required"])
            meta["name"] = meta["generateName"] + "".join(secrets.choice(_GEN_CHARS) for _ in range(5))
        name = meta["name"]
        if (self._rkey(res), ns, name) in self._objects:
            raise ApiError(409, "AlreadyExists", f'{res.plural}{"." + res.group if res.group else ""} "{name}" '
                                                 f'already exists', _details(res, name))
        for k in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation",
                  "managedFields", "selfLink"):
            meta.pop(k, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_time()
        apply_defaults(res, obj)
        if res is PV:
            obj["status"] = {"phase": "Pending"}
        elif res is PVC:
            obj["status"] = {"phase": "Pending"}
        self._check_valid(res, obj)
        meta["resourceVersion"] = str(self._next_rv())
        self._objects[(self._rkey(res), ns, name)] = obj
        self._record(res, "ADDED", obj)
        self._after_write(res)
        return copy.deepcopy(obj)

    def _update(self, res: Resource, ns: str, name: str, body: Any, subresource: str,
                check_rv: bool = True) -> dict[str, Any]:
        key = (self._rkey(res), ns, name)
        old = self._objects.get(key)
        if old is None:
            raise not_found(res, name)
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        if body.get("apiVersion") not in (None, res.api_version) or body.get("kind") not in (None, res.kind):
            raise bad_request(f"the body is {body.get('apiVersion')}/{body.get('kind')}, this endpoint takes "
                              f"{res.api_version}/{res.kind}")
        meta_in = body.get("metadata") or {}
        if meta_in.get("name") not in (None, name):
            raise bad_request(f"the name of the object ({meta_in.get('name')}) does not match the name on the URL "
                              f"({name})")
        if res.namespaced and meta_in.get("namespace") not in (None, "", ns):
            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
        rv = meta_in.get("resourceVersion")
        if check_rv and rv and str(rv) != old["metadata"]["resourceVersion"]:
            raise conflict(res, name)
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
            else:
                new.pop("status", None)
        else:
            new = copy.deepcopy(body)
            new.setdefault("apiVersion", res.api_version)
            new.setdefault("kind", res.kind)
            meta = new.setdefault("metadata", {})
            for k in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                      "deletionGracePeriodSeconds"):
                if k in old["metadata"]:
                    meta[k] = old["metadata"][k]
                else:
                    meta.pop(k, None)
            if res.status:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            apply_defaults(res, new)
        new["metadata"].pop("resourceVersion", None)
        cmp_old = copy.deepcopy(old)
        cmp_old["metadata"].pop("resourceVersion", None)
        if new == cmp_old:
            return copy.deepcopy(old)  # no-op: no new resourceVersion, no event (as the apiserver)
        self._check_valid(res, new, old)
        if (old.get("status") or {}).get("phase") != (new.get("status") or {}).get("phase") and res is PV:
            new.setdefault("status", {})["lastPhaseTransitionTime"] = now_time()
        new["metadata"]["resourceVersion"] = str(self._next_rv())
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            del self._objects[key]
            self._record(res, "DELETED", new)
        else:
            self._objects[key] = new
            self._record(res, "MODIFIED", new)
        self._after_write(res)
        return copy.deepcopy(new)

    def _delete(self, res: Resource, ns: str, name: str, options: Any) -> dict[str, Any]:
        key = (self._rkey(res), ns, name)
        old = self._objects.get(key)
        if old is None:
            raise not_found(res, name)
        pre = (options or {}).get("preconditions") or {} if isinstance(options, dict) else {}
        if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
            raise conflict(res, name, f"Precondition failed: UID in precondition: {pre['uid']}, "
                                      f"UID in object meta: {old['metadata']['uid']}")
        if pre.get("resourceVersion") and str(pre["resourceVersion"]) != old["metadata"]["resourceVersion"]:
            raise conflict(res, name, f"Precondition failed: ResourceVersion in precondition: "
                                      f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                                      f"{old['metadata']['resourceVersion']}")
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return copy.deepcopy(old)
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = now_time()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new["metadata"]["resourceVersion"] = str(self._next_rv())
            self._objects[key] = new
            self._record(res, "MODIFIED", new)
            self._after_write(res)
            return copy.deepcopy(new)
        del self._objects[key]
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._next_rv())
        self._record(res, "DELETED", gone)
        self._after_write(res)
        return gone

    # ------------------------------------------------------------------ PV controller stand-in

    def _after_write(self, res: Resource) -> None:
        if not self.pv_controller or self._binding or res not in (PV, PVC):
            return
        self._binding = True
        try:
            for _ in range(20):
                if not self._bind_pass():
                    break
        finally:
            self._binding = False

    def _bind_pass(self) -> bool:
        changed = False
        pvk, pvck = self._rkey(PV), self._rkey(PVC)
        for (rk, _, pv_name), pv in list(self._objects.items()):
            if rk != pvk or pv["metadata"].get("deletionTimestamp"):
                continue
            phase = (pv.get("status") or {}).get("phase", "Pending")
            claim_ref = pv["spec"].get("claimRef")
            if not claim_ref:
                if phase == "Pending":
                    self._set_pv_phase(pv_name, "Available")
                    changed = True
                continue
            if phase in ("Released", "Failed"):
                continue
            pvc = self._objects.get((pvck, claim_ref.get("namespace", ""), claim_ref.get("name", "")))
            if pvc is None or (claim_ref.get("uid") and pvc["metadata"]["uid"] != claim_ref["uid"]):
                self._set_pv_phase(pv_name, "Released")
                changed = True
                continue
            if pvc["spec"].get("volumeName") not in (None, "", pv_name):
                continue  # the claim is bound to another volume
            if phase != "Bound":
                self._set_pv_phase(pv_name, "Bound")
                changed = True
            ns, cname = pvc["metadata"]["namespace"], pvc["metadata"]["name"]
            if not pvc["spec"].get("volumeName"):
                new = copy.deepcopy(pvc)
                new["spec"]["volumeName"] = pv_name
                new["metadata"].setdefault("annotations", {})["pv.kubernetes.io/bind-completed"] = "yes"
                new["metadata"]["annotations"]["pv.kubernetes.io/bound-by-controller"] = "yes"
                self._update(PVC, ns, cname, new, subresource="", check_rv=False)
                changed = True
                pvc = self._objects[(pvck, ns, cname)]
            if (pvc.get("status") or {}).get("phase") != "Bound":
                new = copy.deepcopy(pvc)
                new["status"] = {"phase": "Bound", "accessModes": list(pv["spec"].get("accessModes") or []),
                                 "capacity": dict(pv["spec"].get("capacity") or {})}
                self._update(PVC, ns, cname, new, subresource="status", check_rv=False)
                changed = True
        return changed

    def _set_pv_phase(self, name: str, phase: str) -> None:
        pv = copy.deepcopy(self._objects[(self._rkey(PV), "", name)])
        pv.setdefault("status", {})["phase"] = phase
        self._update(PV, "", name, pv, subresource="status", check_rv=False)

    # -------------------------------------------------------------------------------- list / watch

    def _list(self, res: Resource, ns: str | None, query: dict[str, str]) -> dict[str, Any]:
        match_l = label_selector(query.get("labelSelector"))
        match_f = field_selector(query.get("fieldSelector"))
        rkey = self._rkey(res)
        items = [copy.deepcopy(o) for (rk, ons, _), o in sorted(self._objects.items())
                 if rk == rkey and (ns is None or ons == ns) and match_l(o) and match_f(o)]
        return {"kind": res.kind + "List", "apiVersion": res.api_version,
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _watch_events(self, w: _Watch, start: int) -> Iterator[tuple[str, dict[str, Any]] | None]:
        """Yields (type, object) in order, or None when there is nothing new (the caller waits). Runs
        under the lock. If the history it still needed was compacted away, yields a 410 ERROR."""
        last = start
        while True:
            if last < self._floor:
                yield ("ERROR", ApiError(410, "Expired", f"too old resource version: {last} "
                                                         f"({self._floor})").status())
                return
            for rv, res, kind, obj in list(self._history):
                if rv <= last:
                    continue
                last = rv
                if res is not w.res:
                    continue
                if w.namespace is not None and obj["metadata"].get("namespace", "") != w.namespace:
                    continue
                if w.match(obj):
                    yield (kind, obj)
            last = max(last, self._rv)
            yield None

    # -------------------------------------------------------------------------------- dispatch

    def _intercept(self, method: str, path: str) -> tuple[Hold | None, _Failure | None]:
        with self._cond:
            for f in self._failures:
                if f.method == method and f.path.search(path) and f.times > 0:
                    f.times -= 1
                    if f.times == 0:
                        self._failures.remove(f)
                    return None, f
            for h in self._holds:
                if h.method == method and h.path.search(path) and not h.arrived.is_set():
                    self._holds.remove(h)
                    h.request = (method, path)
                    h.arrived.set()
                    return h, None
        return None, None


def _parse_path(path: str) -> tuple[Resource, str | None, str | None, str]:
    """(resource, namespace or None, name or None, subresource) of an API path; ApiError 404 if not served."""
    parts = [unquote(p) for p in path.strip("/").split("/")]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
    ns = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        ns, rest = rest[1], rest[2:]
    if not rest:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
    res = RESOURCES.get((group, version, rest[0]))
    if res is None or (ns is not None and not res.namespaced):
        raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else ""
    if len(rest) > 3 or (sub and (sub != "status" or not res.status)):
        raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
    return res, ns, name, sub


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    emulator: KubeEmulator
    server_version = "kube-emulator/1"

    def setup(self) -> None:
        super().setup()
        with self.emulator._cond:
            self.emulator._conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.emulator._cond:
                self.emulator._conns.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # ---------------------------------------------------------------- plumbing

    def _send_json(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        with self.emulator._cond:
            self.emulator.requests.append((self.command, self.path, code))

    def _read_body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise bad_request(f"the body is not JSON: {e}") from None

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # ---------------------------------------------------------------- requests

    def _handle(self, method: str) -> None:
        emu = self.emulator
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            body = self._read_body() if method in ("POST", "PUT", "PATCH", "DELETE") else None
            if url.path == "/version":
                self._send_json(200, {"major": "1", "minor": emu.k8s_version.split(".")[1],
                                      "gitVersion": f"v{emu.k8s_version}.0-emulator"})
                return
            res, ns, name, sub = _parse_path(url.path)
            hold, failure = emu._intercept(method, url.path)
            if failure is not None:
                raise ApiError(failure.code, failure.reason, f"injected failure ({failure.reason})")
            if hold is not None:
                hold.body = body
                hold._released.wait(300)
                if not hold.apply:
                    self._drop()
                    return
            if method == "GET" and name is None and query.get("watch") in ("true", "1"):
                self._watch(res, ns, query)
                return
            with emu._cond:
                if emu._stopping:
                    raise ApiError(503, "ServiceUnavailable", "the emulator is stopping")
                code, out = self._apply(method, res, ns, name, sub, query, body)
            self._send_json(code, out)
        except ApiError as e:
            self._send_json(e.code, e.status())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:
            log.exception("kube emulator: %s %s", method, self.path)
            self._send_json(500, ApiError(500, "InternalError", f"{type(e).__name__}: {e}").status())

    def _apply(self, method: str, res: Resource, ns: str | None, name: str | None, sub: str,
               query: dict[str, str], body: Any) -> tuple[int, Any]:
        emu = self.emulator
        if res.namespaced and ns is None and not (method == "GET" and name is None):
            raise ApiError(404, "NotFound", f"{res.plural} are namespaced: use /namespaces/<ns>/{res.plural}")
        nsv = ns or ""
        if method == "GET":
            if name is None:
                return 200, emu._list(res, ns, query)
            obj = emu._objects.get((emu._rkey(res), nsv, name))
            if obj is None:
                raise not_found(res, name)
            return 200, copy.deepcopy(obj)
        if method == "POST":
            if name is not None:
                raise ApiError(405, "MethodNotAllowed", "POST to a named object is not allowed")
            return 201, emu._create(res, nsv, body)
        if name is None:
            raise ApiError(405, "MethodNotAllowed", f"{method} needs an object name")
        if method == "PUT":
            return 200, emu._update(res, nsv, name, body, sub)
        if method == "PATCH":
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            old = emu._objects.get((emu._rkey(res), nsv, name))
            if old is None:
                raise not_found(res, name)
            if ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                if not isinstance(body, dict):
                    raise bad_request("a merge patch must be a JSON object")
                patched = merge_patch(old, body)
                rv = (body.get("metadata") or {}).get("resourceVersion")
            elif ctype == "application/json-patch+json":
                patched = json_patch(old, body)
                rv = (patched.get("metadata") or {}).get("resourceVersion")
                if rv == old["metadata"]["resourceVersion"]:
                    rv = None
            else:
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                            f"accepted media types: merge-patch, json-patch, "
                                                            f"strategic-merge-patch (as merge-patch); got {ctype!r}")
            if not isinstance(patched, dict):
                raise bad_request("the patched object is not a JSON object")
            if rv and str(rv) != old["metadata"]["resourceVersion"]:
                raise conflict(res, name)
            patched.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
            return 200, emu._update(res, nsv, name, patched, sub)
        if method == "DELETE":
            if sub:
                raise ApiError(405, "MethodNotAllowed", "DELETE of a subresource is not allowed")
            out = emu._delete(res, nsv, name, body)
            if res.return_deleted:
                return 200, out
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {**_details(res, name), "uid": out["metadata"]["uid"]}}
        raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed")

    def _chunk(self, obj: Any) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, res: Resource, ns: str | None, query: dict[str, str]) -> None:
        emu = self.emulator
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else emu.default_watch_timeout
        except ValueError:
            raise bad_request(f"timeoutSeconds: {query['timeoutSeconds']!r} is not a number") from None
        match_l = label_selector(query.get("labelSelector"))
        match_f = field_selector(query.get("fieldSelector"))
        rv_text = query.get("resourceVersion", "")
        try:
            rv = int(rv_text) if rv_text not in ("", "0") else None
        except ValueError:
            raise bad_request(f"resourceVersion: {rv_text!r} is not a resource version") from None
        deadline = time.monotonic() + timeout
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        with emu._cond:
            w = _Watch(res, ns, lambda o: match_l(o) and match_f(o), emu._epoch)
            emu._watches.append(w)
        code = 200
        try:
            initial: list[dict[str, Any]] = []
            with emu._cond:
                if rv is None:
                    start = emu._rv
                    initial = emu._list(res, ns, query)["items"]
                elif rv < emu._floor:
                    start = -1
                else:
                    start = rv
            if start < 0:
                code = 410
                self._chunk({"type": "ERROR", "object": ApiError(
                    410, "Expired", f"too old resource version: {rv} ({emu._floor})").status()})
                return
            for obj in initial:
                self._chunk({"type": "ADDED", "object": obj})
            events = emu._watch_events(w, start)
            while True:
                with emu._cond:
                    batch = []
                    for ev in events:
                        if ev is None:
                            break
                        batch.append(ev)
                        if ev[0] == "ERROR":
                            code = 410
                            break
                    if not batch:
                        if emu._stopping:
                            return
                        if w.epoch != emu._epoch:
                            if emu._expire_gone:
                                code = 410
                                batch = [("ERROR", ApiError(410, "Expired", "too old resource version: "
                                                            f"{start} (expired by the test)").status())]
                            else:
                                return
                        else:
                            left = deadline - time.monotonic()
                            if left <= 0:
                                return
                            emu._cond.wait(min(left, 0.5))
                            continue
                for kind, obj in batch:
                    self._chunk({"type": kind, "object": obj})
                if code == 410:
                    return
                if w.epoch != emu._epoch and not emu._expire_gone:
                    return
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
            return
        finally:
            with emu._cond:
                if w in emu._watches:
                    emu._watches.remove(w)
                emu.requests.append(("GET", self.path, code))
            try:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                self.close_connection = True
