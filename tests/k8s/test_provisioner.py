"""The FlexVolume provisioner controller (``flexvolume/provisioner``) against a Kubernetes API emulator.

No real control plane (kube-apiserver, kube-controller-manager, kubelet) can run on these machines,
so the controller talks over real HTTP, through the unmodified ``kubernetes`` client, to
``tests/kube_emulator.py``, which validates every body against the Kubernetes 1.37 schema and
stands in for the PV controller's binding (see its docstring). Kubelet's part — mounting the PV —
is played by this module: it feeds the PV's ``flexVolume.options`` to the gfuse FlexVolume driver's
option parser, as kubelet would, and mounts the result with ``gfuse mount``.

Two parts:

- emulator-only tests with an in-memory backend (``MemoryBackend`` below): provisioning, the PV's
  shape, reclaim Delete/Retain, StorageError → Event, expansion, 409 conflicts, watch expiry and
  410 Gone, resync, leader election;
- end-to-end tests with the real ``SubdirBackend`` on a real replica-3 gluster pool volume, the
  controller run as the ``gfuse-provisioner`` process: mount and write a provisioned PV, Delete
  removes the directory, Retain keeps it, StorageError → Event, two replicas with leader election
  (SIGKILL of the leader), and SIGKILL at each step of create and delete followed by a restart
  (no orphan directories, no duplicate or lost PVs).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

kubernetes = pytest.importorskip("kubernetes")

from flexvolume.provisioner import controller as ctl  # noqa: E402
from flexvolume.provisioner.controller import DRIVER, FINALIZER, PROVISIONER, Controller  # noqa: E402
from flexvolume.provisioner.leader import LeaderElector  # noqa: E402
from flexvolume.storage.api import ProvisionedVolume, StorageError  # noqa: E402

from gfuse.mounttable import mounts_under  # noqa: E402
from testkit.kube_emulator import KubeEmulator  # noqa: E402

GiB = 1 << 30
NS = "apps"


# ------------------------------------------------------------------------------------------------
# an in-memory backend (emulator-only tests)


class MemoryBackend:
    """Backend protocol in memory: one instance per pool, records calls."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.volumes: dict[str, ProvisionedVolume] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: StorageError | None = None
        self.lock = threading.Lock()

    def create(self, name: str, size_bytes: int, params: Mapping[str, str]) -> ProvisionedVolume:
        with self.lock:
            self.calls.append(("create", name))
            if self.fail is not None:
                raise self.fail
            if name not in self.volumes:
                self.volumes[name] = ProvisionedVolume(name, f"{self.pool}/{name}", ["127.0.0.3", "127.0.0.4"],
                                                       size_bytes, "memory", {"pool": self.pool})
            return self.volumes[name]

    def delete(self, name: str) -> None:
        with self.lock:
            self.calls.append(("delete", name))
            if self.fail is not None:
                raise self.fail
            self.volumes.pop(name, None)

    def expand(self, name: str, size_bytes: int) -> ProvisionedVolume:
        with self.lock:
            self.calls.append(("expand", name))
            if self.fail is not None:
                raise self.fail
            if name not in self.volumes:
                raise StorageError("not-found", f"no volume {name}")
            vol = self.volumes[name]
            vol.size_bytes = max(vol.size_bytes, size_bytes)
            return vol

    def get(self, name: str) -> ProvisionedVolume | None:
        with self.lock:
            return self.volumes.get(name)

    def count(self, op: str, name: str) -> int:
        with self.lock:
            return sum(1 for c in self.calls if c == (op, name))


class Backends:
    def __init__(self) -> None:
        self.by_pool: dict[str, MemoryBackend] = {}

    def __call__(self, params: Mapping[str, str]) -> MemoryBackend:
        pool = params.get("pool", "")
        if not pool:
            raise StorageError("invalid-parameters", "StorageClass parameter 'pool' is required")
        return self.by_pool.setdefault(pool, MemoryBackend(pool))


# ------------------------------------------------------------------------------------------------
# helpers shared by both parts


def storage_class(name: str, *, reclaim: str = "Delete", expand: bool = False, provisioner: str = PROVISIONER,
                  params: dict[str, str] | None = None, mount_options: list[str] | None = None,
                  binding: str = "Immediate") -> dict[str, Any]:
    sc: dict[str, Any] = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name},
                          "provisioner": provisioner, "parameters": params or {"pool": "127.0.0.2:/pool"},
                          "reclaimPolicy": reclaim, "allowVolumeExpansion": expand, "volumeBindingMode": binding}
    if mount_options:
        sc["mountOptions"] = mount_options
    return sc


def claim(name: str, sc: str | None, size: str = "1Gi", modes: tuple[str, ...] = ("ReadWriteMany",),
          ns: str = NS, provisioner: str | None = PROVISIONER, **spec: Any) -> dict[str, Any]:
    """A claim of class ``sc`` as the PV controller leaves it once it decided ``provisioner`` must make its volume
    (``provisioner=None``: not decided, or no class)."""
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                            "metadata": {"name": name, "namespace": ns},
                            "spec": {"accessModes": list(modes), "resources": {"requests": {"storage": size}},
                                     **spec}}
    if sc is not None:
        body["spec"]["storageClassName"] = sc
        if provisioner is not None:
            body["metadata"]["annotations"] = pv_controller_asks(provisioner)
    return body


def pv_controller_asks(provisioner: str, beta_only: bool = False) -> dict[str, str]:
    """The annotations kube-controller-manager's PV controller puts on a claim it found no PV for and whose class
    names an external provisioner (``setClaimProvisioner`` in pkg/controller/volume/persistentvolume/
    pv_controller.go, called from ``provisionClaim``: both the GA and the beta key). The emulator binds but does
    not do this part, so the tests do. ``beta_only``: a claim of an older PV controller."""
    beta = {"volume.beta.kubernetes.io/storage-provisioner": provisioner}
    return beta if beta_only else {**beta, "volume.kubernetes.io/storage-provisioner": provisioner}


def events_for(emu: KubeEmulator, name: str, reason: str | None = None, ns: str = NS) -> list[dict[str, Any]]:
    return [e for e in emu.list("events", ns) if e["involvedObject"].get("name") == name
            and (reason is None or e["reason"] == reason)]


def pv_of(emu: KubeEmulator, c: dict[str, Any]) -> dict[str, Any] | None:
    return emu.get("persistentvolumes", f"pvc-{c['metadata']['uid']}")


def wait_pv(emu: KubeEmulator, c: dict[str, Any], timeout: float = 10, phase: str = "Bound") -> dict[str, Any]:
    def ok() -> Any:
        pv = pv_of(emu, c)
        return pv if pv and pv["status"].get("phase") == phase else None
    return emu.wait_for(ok, timeout, f"PV of claim {c['metadata']['name']} {phase}")


def wait_gone(emu: KubeEmulator, plural: str, name: str, timeout: float = 10, ns: str = "",
              log: Any = None) -> None:
    emu.wait_for(lambda: emu.get(plural, name, ns) is None, timeout,
                 f"{plural} {name} gone" + (f"\n{log.tail()}" if log is not None else ""))


def wait_event(emu: KubeEmulator, name: str, reason: str, timeout: float = 10, ns: str = NS) -> dict[str, Any]:
    return emu.wait_for(lambda: (events_for(emu, name, reason, ns) or [None])[0], timeout,
                        f"a {reason} event on {ns}/{name}")


@contextlib.contextmanager
def running(emu: KubeEmulator, backend_for: Callable[..., Any], **kw: Any) -> Iterator[Controller]:
    """A Controller on its own thread (in this process), stopped at the end (bounded)."""
    kw.setdefault("resync_period", 30.0)
    kw.setdefault("retry_base", 0.1)
    kw.setdefault("retry_max", 2.0)
    kw.setdefault("watch_timeout", 30.0)
    c = Controller(emu.api_client(), backend_for, **kw)
    stop = threading.Event()
    t = threading.Thread(target=c.run, args=(stop,), daemon=True)
    t.start()
    try:
        assert c.wait_synced(10), "informers did not sync"
        yield c
    finally:
        stop.set()
        t.join(15)
        assert not t.is_alive(), "the controller did not stop"


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with KubeEmulator() as e:
        yield e


@pytest.fixture
def backends() -> Backends:
    return Backends()


# ------------------------------------------------------------------------------------------------
# part 1: emulator + in-memory backend


def test_provisions_a_flexvolume_pv_for_a_claim(emu: KubeEmulator, backends: Backends) -> None:
    emu.put_object(storage_class("gfuse", params={"pool": "127.0.0.2:/pool", "mountOptions": "log-level=INFO"},
                                 mount_options=["ping-timeout=10"]))
    emu.put_object(storage_class("other", provisioner="example.com/other"))
    with running(emu, backends):
        c = emu.put_object(claim("data", "gfuse", "1536Mi", ("ReadWriteOnce",)))
        ignored = emu.put_object(claim("theirs", "other", provisioner="example.com/other"))
        no_class = emu.put_object(claim("static", None))
        pv = wait_pv(emu, c)
        wait_event(emu, "data", "ProvisioningSucceeded")
        uid = c["metadata"]["uid"]
        assert pv["metadata"]["name"] == f"pvc-{uid}"
        assert pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == PROVISIONER
        assert pv["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "gfuse-provisioner"
        assert json.loads(pv["metadata"]["annotations"][ctl.ANN_PARAMETERS])["pool"] == "127.0.0.2:/pool"
        assert pv["metadata"]["finalizers"] == [FINALIZER]
        spec = pv["spec"]
        assert spec["capacity"] == {"storage": "1536Mi"}
        assert spec["accessModes"] == ["ReadWriteOnce"]
        assert spec["persistentVolumeReclaimPolicy"] == "Delete"
        assert spec["storageClassName"] == "gfuse"
        assert "mountOptions" not in spec, "kubelet refuses PV mountOptions for flexVolume: they go into its options"
        assert spec["volumeMode"] == "Filesystem"
        assert spec["claimRef"]["uid"] == uid and spec["claimRef"]["name"] == "data"
        assert spec["claimRef"]["namespace"] == NS and spec["claimRef"]["resourceVersion"]
        assert spec["flexVolume"] == {"driver": DRIVER, "options": {
            "volume": f"127.0.0.2:/pool/pvc-{uid}", "backupServers": "127.0.0.3:127.0.0.4", "readOnly": "false",
            "mountOptions": "log-level=INFO,ping-timeout=10"}}
        bound = emu.get("persistentvolumeclaims", "data", NS)
        assert bound["spec"]["volumeName"] == pv["metadata"]["name"]
        assert bound["status"]["phase"] == "Bound"
        assert FINALIZER not in (bound["metadata"].get("finalizers") or [])
        assert backends.by_pool["127.0.0.2:/pool"].count("create", f"pvc-{uid}") == 1
        time.sleep(0.5)  # nothing happens to the claims of other provisioners
        assert pv_of(emu, ignored) is None and pv_of(emu, no_class) is None
        assert events_for(emu, "theirs") == [] and events_for(emu, "static") == []
        assert len(emu.list("persistentvolumes")) == 1


def test_reclaim_delete_and_retain(emu: KubeEmulator, backends: Backends) -> None:
    emu.put_object(storage_class("del", reclaim="Delete"))
    emu.put_object(storage_class("keep", reclaim="Retain"))
    with running(emu, backends):
        d = emu.put_object(claim("d", "del"))
        k = emu.put_object(claim("k", "keep"))
        pv_d, pv_k = wait_pv(emu, d), wait_pv(emu, k)
        assert "finalizers" not in pv_k["metadata"]
        mem = backends.by_pool["127.0.0.2:/pool"]
        emu.delete_object("persistentvolumeclaims", "d", NS)
        emu.delete_object("persistentvolumeclaims", "k", NS)
        wait_gone(emu, "persistentvolumes", pv_d["metadata"]["name"])
        assert mem.get(pv_d["metadata"]["name"]) is None
        wait_pv(emu, k, phase="Released")
        time.sleep(0.5)
        assert emu.get("persistentvolumes", pv_k["metadata"]["name"])["status"]["phase"] == "Released"
        assert mem.get(pv_k["metadata"]["name"]) is not None
        assert mem.count("delete", pv_k["metadata"]["name"]) == 0


def test_pv_deleted_by_hand_frees_its_storage(emu: KubeEmulator, backends: Backends) -> None:
    emu.put_object(storage_class("del"))
    with running(emu, backends):
        c = emu.put_object(claim("c", "del"))
        name = wait_pv(emu, c)["metadata"]["name"]
        emu.delete_object("persistentvolumes", name)  # kubectl delete pv: our finalizer holds it
        wait_gone(emu, "persistentvolumes", name)
        assert backends.by_pool["127.0.0.2:/pool"].get(name) is None


def test_storage_error_is_an_event_and_is_retried(emu: KubeEmulator, backends: Backends) -> None:
    emu.put_object(storage_class("gfuse"))
    mem = backends({"pool": "127.0.0.2:/pool"})
    mem.fail = StorageError("pool-full", "pool 127.0.0.2:/pool has 0.5 GiB free, 1 GiB asked: add storage")
    with running(emu, backends):
        c = emu.put_object(claim("c", "gfuse"))
        ev = wait_event(emu, "c", "ProvisioningFailed")
        assert ev["type"] == "Warning"
        assert "pool 127.0.0.2:/pool has 0.5 GiB free, 1 GiB asked: add storage" in ev["message"]
        assert ev["involvedObject"]["uid"] == c["metadata"]["uid"]
        assert ev["involvedObject"]["kind"] == "PersistentVolumeClaim"
        emu.wait_for(lambda: mem.count("create", f"pvc-{c['metadata']['uid']}") >= 3, 10, "retries with backoff")
        # the repeats are one event with a rising count, not a flood
        assert len(events_for(emu, "c", "ProvisioningFailed")) == 1
        emu.wait_for(lambda: events_for(emu, "c", "ProvisioningFailed")[0].get("count", 1) >= 2, 10, "count")
        assert emu.get("persistentvolumeclaims", "c", NS)["status"]["phase"] == "Pending"
        mem.fail = None
        wait_pv(emu, c)


def test_bad_class_parameters_and_unservable_claims_are_events(emu: KubeEmulator, backends: Backends) -> None:
    emu.put_object(storage_class("nopool", params={"backend": "subdir"}))
    emu.put_object(storage_class("gfuse"))
    with running(emu, backends):
        emu.put_object(claim("a", "nopool"))
        assert "parameter 'pool' is required" in wait_event(emu, "a", "ProvisioningFailed")["message"]
        emu.put_object(claim("b", "gfuse", volumeMode="Block"))
        assert "volumeMode Block is not supported" in wait_event(emu, "b", "ProvisioningFailed")["message"]
        emu.put_object(claim("s", "gfuse", selector={"matchLabels": {"x": "y"}}))
        assert "selector is not supported" in wait_event(emu, "s", "ProvisioningFailed")["message"]
        assert emu.list("persistentvolumes") == []


def test_wait_for_first_consumer_waits_for_the_scheduler(emu: KubeEmulator, backends: Backends) -> None:
    emu.put_object(storage_class("wffc", binding="WaitForFirstConsumer"))
    with running(emu, backends):
        c = emu.put_object(claim("c", "wffc", provisioner=None))  # the PV controller waits for the scheduler too
        time.sleep(0.6)
        assert pv_of(emu, c) is None
        # the scheduler picks a node, the PV controller then asks; the scheduler taking it back stops us
        c["metadata"]["annotations"] = {**pv_controller_asks(PROVISIONER)}
        c = emu.put_object(c)
        time.sleep(0.6)
        assert pv_of(emu, c) is None, "no selected-node (the scheduler may have taken it back): wait"
        c["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] = "node-1"
        emu.put_object(c)
        wait_pv(emu, c)


def test_expansion(emu: KubeEmulator, backends: Backends) -> None:
    emu.put_object(storage_class("grow", expand=True))
    emu.put_object(storage_class("fixed", expand=False))
    with running(emu, backends):
        g = emu.put_object(claim("g", "grow", "1Gi"))
        f = emu.put_object(claim("f", "fixed", "1Gi"))
        pv_g, _ = wait_pv(emu, g), wait_pv(emu, f)
        for name in ("g", "f"):
            obj = emu.get("persistentvolumeclaims", name, NS)
            obj["spec"]["resources"]["requests"]["storage"] = "3Gi"
            emu.put_object(obj)
        emu.wait_for(lambda: emu.get("persistentvolumeclaims", "g", NS)["status"]["capacity"]["storage"] == "3Gi",
                     10, "claim status capacity 3Gi")
        assert emu.get("persistentvolumes", pv_g["metadata"]["name"])["spec"]["capacity"]["storage"] == "3Gi"
        assert backends.by_pool["127.0.0.2:/pool"].get(pv_g["metadata"]["name"]).size_bytes == 3 * GiB
        wait_event(emu, "g", "VolumeResizeSuccessful")
        ev = wait_event(emu, "f", "VolumeResizeFailed")
        assert "allowVolumeExpansion" in ev["message"]
        assert emu.get("persistentvolumeclaims", "f", NS)["status"]["capacity"]["storage"] == "1Gi"


def test_conflicts_are_retried_on_fresh_reads(emu: KubeEmulator, backends: Backends) -> None:
    emu.put_object(storage_class("gfuse"))
    with running(emu, backends):
        # a real stale write: the claim changes between the controller's read and its finalizer patch
        hold = emu.hold("PATCH", rf"/namespaces/{NS}/persistentvolumeclaims/c$")
        c = emu.put_object(claim("c", "gfuse"))
        hold.wait(10)
        assert hold.body["metadata"]["resourceVersion"] == c["metadata"]["resourceVersion"]
        c2 = emu.get("persistentvolumeclaims", "c", NS)
        c2["metadata"]["labels"] = {"changed": "meanwhile"}
        emu.put_object(c2)
        hold.release(apply=True)
        wait_pv(emu, c)
        assert ("PATCH", f"/api/v1/namespaces/{NS}/persistentvolumeclaims/c", 409) in emu.requests
        assert emu.get("persistentvolumeclaims", "c", NS)["metadata"]["labels"] == {"changed": "meanwhile"}
        # injected conflicts on the PV writes of an expansion
        emu.fail("PATCH", r"/persistentvolumes/", 409, "Conflict", times=2)
        emu.put_object(storage_class("gfuse", expand=True))
        c3 = emu.get("persistentvolumeclaims", "c", NS)
        c3["spec"]["resources"]["requests"]["storage"] = "2Gi"
        emu.put_object(c3)
        emu.wait_for(lambda: emu.get("persistentvolumeclaims", "c", NS)["status"]["capacity"]["storage"] == "2Gi",
                     10, "expansion through conflicts")


def test_watch_expiry_and_410_gone_resume(emu: KubeEmulator, backends: Backends) -> None:
    emu.put_object(storage_class("gfuse"))
    with running(emu, backends, watch_timeout=30) as c:
        relists = c.claims.relists
        emu.wait_for(lambda: emu.open_watches() == 3, 5, "three watches")
        emu.expire_watches()  # as the apiserver's timeout: resume from the last resourceVersion
        a = emu.put_object(claim("a", "gfuse"))
        wait_pv(emu, a)
        assert c.claims.relists == relists
        emu.wait_for(lambda: emu.open_watches() == 3, 5, "watches resumed")
        emu.compact()
        emu.expire_watches(gone=True)  # 410: list again and watch from the list's resourceVersion
        b = emu.put_object(claim("b", "gfuse"))
        wait_pv(emu, b)
        emu.wait_for(lambda: c.claims.relists > relists, 5, "a re-list after 410")
        # a compaction while the informer is behind: the watch gets 410 from the start
        hold = emu.hold("GET", r"/persistentvolumeclaims$")
        emu.expire_watches()
        hold.wait(5)
        x = emu.put_object(claim("x", "gfuse"))
        emu.compact()
        hold.release(apply=True)
        wait_pv(emu, x)
        assert len(emu.list("persistentvolumes")) == 3


def test_periodic_resync_picks_up_what_backoff_would_delay(emu: KubeEmulator, backends: Backends) -> None:
    emu.put_object(storage_class("gfuse"))
    mem = backends({"pool": "127.0.0.2:/pool"})
    mem.fail = StorageError("glusterd-unreachable", "glusterd at 127.0.0.2 does not answer")
    with running(emu, backends, resync_period=1.0, retry_base=60.0, retry_max=60.0):
        c = emu.put_object(claim("c", "gfuse"))
        wait_event(emu, "c", "ProvisioningFailed")
        mem.fail = None
        wait_pv(emu, c, timeout=5)


def test_claim_deleted_while_provisioning_leaves_nothing(emu: KubeEmulator, backends: Backends) -> None:
    emu.put_object(storage_class("gfuse"))
    with running(emu, backends):
        hold = emu.hold("POST", r"^/api/v1/persistentvolumes$")
        c = emu.put_object(claim("c", "gfuse"))
        hold.wait(10)
        name = f"pvc-{c['metadata']['uid']}"
        mem = backends.by_pool["127.0.0.2:/pool"]
        assert mem.get(name) is not None
        emu.delete_object("persistentvolumeclaims", "c", NS)  # our finalizer keeps it for now
        assert emu.get("persistentvolumeclaims", "c", NS)["metadata"]["deletionTimestamp"]
        hold.release(apply=True)
        wait_gone(emu, "persistentvolumeclaims", "c", ns=NS)
        wait_gone(emu, "persistentvolumes", name)
        emu.wait_for(lambda: mem.get(name) is None, 10, "storage removed")

        # the same, but the PV write never lands
        hold = emu.hold("POST", r"^/api/v1/persistentvolumes$")
        c = emu.put_object(claim("c2", "gfuse"))
        hold.wait(10)
        name = f"pvc-{c['metadata']['uid']}"
        emu.delete_object("persistentvolumeclaims", "c2", NS)
        hold.release(apply=False)
        wait_gone(emu, "persistentvolumeclaims", "c2", ns=NS)
        emu.wait_for(lambda: mem.get(name) is None, 10, "half-made storage removed")
        assert emu.get("persistentvolumes", name) is None


def kubelet_driver_options(pv: dict[str, Any], pod_uid: str = "0000-test") -> dict[str, Any]:
    """What the gfuse driver makes of a PV once kubelet mounts it, kubelet's checks included:
    ``checkMountOptionSupport`` (pkg/volume/util/operationexecutor/operation_generator.go) refuses any mount
    option of the PV (``MountOptionFromSpec``: ``spec.mountOptions`` or the annotation
    ``volume.beta.kubernetes.io/mount-options``) for a plugin whose ``SupportsMountOption()`` is false, as the
    FlexVolume plugin's is (pkg/volume/flexvolume/plugin.go); then ``NewOptionsForDriver`` (driver-call.go) hands
    the driver kubelet's keys plus the flexVolume ``options``, which :func:`flexvolume.driver.parse_mount_options`
    reads."""
    from flexvolume.driver import parse_mount_options

    if pv["spec"].get("mountOptions") or (pv["metadata"].get("annotations") or {}).get(
            "volume.beta.kubernetes.io/mount-options"):
        raise AssertionError(f"kubelet: MountVolume.MountOptionSupport check failed for PV {pv['metadata']['name']}: "
                             f"Mount options are not supported for this volume type")
    opts = {"kubernetes.io/fsType": pv["spec"]["flexVolume"].get("fsType", ""),
            "kubernetes.io/readwrite": "ro" if pv["spec"]["flexVolume"].get("readOnly") else "rw",
            "kubernetes.io/pvOrVolumeName": pv["metadata"]["name"], "kubernetes.io/pod.name": "writer",
            "kubernetes.io/pod.namespace": NS, "kubernetes.io/pod.uid": pod_uid,
            "kubernetes.io/serviceAccount.name": "default"}
    opts.update(pv["spec"]["flexVolume"]["options"])
    return parse_mount_options(json.dumps(opts))


def test_class_mount_options_reach_the_driver_not_the_pv_spec(emu: KubeEmulator, backends: Backends) -> None:
    """A class's ``mountOptions`` (and its ``mountOptions`` parameter) are mount options of the gfuse driver: in the
    PV's flexVolume ``options``, which kubelet passes on, not in ``spec.mountOptions``, which makes kubelet refuse
    the mount (kubelet_driver_options). An SELinux context with commas stays one option."""
    context = 'context="system_u:object_r:container_file_t:s0:c1,c2"'
    emu.put_object(storage_class("gfuse", params={"pool": "127.0.0.2:/pool", "mountOptions": "log-level=INFO"},
                                 mount_options=["ping-timeout=10", context]))
    with running(emu, backends):
        pv = wait_pv(emu, emu.put_object(claim("data", "gfuse")))
        assert "mountOptions" not in pv["spec"]
        req = kubelet_driver_options(pv)
        assert req["options"] == ["allow_other", "log-level=INFO", "ping-timeout=10", context,
                                  "backup-volfile-servers=127.0.0.3:127.0.0.4"]
        assert req["source"] == pv["spec"]["flexVolume"]["options"]["volume"]
        with pytest.raises(AssertionError, match="Mount options are not supported for this volume type"):
            kubelet_driver_options({**pv, "spec": {**pv["spec"], "mountOptions": ["ping-timeout=10"]}})


def test_provisions_only_when_the_pv_controller_asks(emu: KubeEmulator, backends: Backends) -> None:
    """sig-storage-lib-external-provisioner's ``shouldProvision`` (controller/controller.go): a claim is provisioned
    when ``volume.kubernetes.io/storage-provisioner`` — or, only if that is absent, the beta key — names this
    provisioner (and, with WaitForFirstConsumer, a node is selected), not because its class does. The PV
    controller sets the annotation only after finding no existing PV for the claim: a claim of our class that an
    existing PV is being bound to must not get a second, provisioned one."""
    emu.put_object(storage_class("gfuse"))
    emu.put_object(storage_class("moved", provisioner="example.com/other"))
    mem = backends({"pool": "127.0.0.2:/pool"})
    static = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "static-pv"},
              "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "gfuse",
                       "persistentVolumeReclaimPolicy": "Retain",
                       "flexVolume": {"driver": DRIVER, "options": {"volume": "127.0.0.2:/pool/static"}}}}
    with running(emu, backends):
        emu.put_object(static)
        undecided = emu.put_object(claim("undecided", "gfuse", provisioner=None))
        beta = emu.put_object(claim("beta", "gfuse", provisioner=None))
        beta["metadata"]["annotations"] = pv_controller_asks(PROVISIONER, beta_only=True)
        beta = emu.put_object(beta)
        other = emu.put_object(claim("other", "gfuse", provisioner=None))
        other["metadata"]["annotations"] = {**pv_controller_asks(PROVISIONER, beta_only=True),
                                            "volume.kubernetes.io/storage-provisioner": "example.com/other"}
        other = emu.put_object(other)
        moved = emu.put_object(claim("moved", "moved"))  # asked of us, but its class names another provisioner
        wait_pv(emu, beta)  # the beta annotation alone is enough
        time.sleep(1.0)
        for c in (undecided, other, moved):
            assert pv_of(emu, c) is None, c["metadata"]["name"]
            assert mem.count("create", f"pvc-{c['metadata']['uid']}") == 0
            assert events_for(emu, c["metadata"]["name"]) == []
        # the PV controller binds the existing PV to the undecided claim: we never made one
        pv = emu.get("persistentvolumes", "static-pv")
        pv["spec"]["claimRef"] = {"kind": "PersistentVolumeClaim", "namespace": NS, "name": "undecided",
                                  "uid": undecided["metadata"]["uid"]}
        emu.put_object(pv)
        emu.wait_for(lambda: emu.get("persistentvolumeclaims", "undecided", NS)["spec"].get("volumeName")
                     == "static-pv", 10, "the static PV bound")
        time.sleep(0.5)
        assert pv_of(emu, undecided) is None and len(emu.list("persistentvolumes")) == 2


def test_pv_finalizer_is_optional(emu: KubeEmulator, backends: Backends) -> None:
    """``--no-pv-finalizer``: new PVs get no finalizer, PVs made earlier lose ours (so that nothing waits for a
    provisioner that is being uninstalled), and a Released PV is still deleted with its storage."""
    from flexvolume.provisioner.main import parse_args

    assert parse_args([]).pv_finalizer is True and parse_args(["--no-pv-finalizer"]).pv_finalizer is False
    emu.put_object(storage_class("del"))
    mem = backends({"pool": "127.0.0.2:/pool"})
    with running(emu, backends):
        old = emu.put_object(claim("old", "del"))
        assert wait_pv(emu, old)["metadata"]["finalizers"] == [FINALIZER]
    with running(emu, backends, pv_finalizer=False):
        new = emu.put_object(claim("new", "del"))
        assert "finalizers" not in wait_pv(emu, new)["metadata"]
        emu.wait_for(lambda: not pv_of(emu, old)["metadata"].get("finalizers"), 10, "the old PV's finalizer removed")
        for c in (old, new):
            name = pv_of(emu, c)["metadata"]["name"]
            emu.delete_object("persistentvolumeclaims", c["metadata"]["name"], NS)
            wait_gone(emu, "persistentvolumes", name)
            assert mem.get(name) is None


# ------------------------------------------------------------------------------------------------
# leader election (emulator)


def _elector(emu: KubeEmulator, identity: str, clock: Callable[[], float] = time.monotonic,
             **kw: Any) -> LeaderElector:
    kw.setdefault("lease_duration", 2.0)
    kw.setdefault("renew_deadline", 1.5)
    kw.setdefault("retry_period", 0.2)
    return LeaderElector(emu.api_client(), "gfuse-system", "gfuse-example-org-gfuse", identity, clock=clock, **kw)


def test_lease_is_taken_only_after_it_expires_on_the_candidates_clock(emu: KubeEmulator) -> None:
    t = [1000.0]
    a = _elector(emu, "a", clock=lambda: t[0], lease_duration=15, renew_deadline=10, retry_period=2)
    b = _elector(emu, "b", clock=lambda: t[0], lease_duration=15, renew_deadline=10, retry_period=2)
    assert a.try_acquire_or_renew() and a.is_leader()
    assert not b.try_acquire_or_renew() and not b.is_leader()
    lease = emu.get("leases", "gfuse-example-org-gfuse", "gfuse-system", group="coordination.k8s.io")
    assert lease["spec"]["holderIdentity"] == "a" and lease["spec"]["leaseDurationSeconds"] == 15
    t[0] += 9
    assert a.try_acquire_or_renew()  # a renews ...
    assert not b.try_acquire_or_renew()  # ... b sees the record change and counts from now
    t[0] += 14  # a stops renewing (it "crashed")
    assert not b.try_acquire_or_renew()  # 14 s < 15 s on b's clock: still a's
    assert not a.is_leader()  # a has not renewed for 14 s > renew_deadline: it would no longer act
    t[0] += 1.5  # 15.5 s since b saw the last renewal: expired
    assert b.try_acquire_or_renew() and b.is_leader()
    lease = emu.get("leases", "gfuse-example-org-gfuse", "gfuse-system", group="coordination.k8s.io")
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
    assert not a.try_acquire_or_renew() and not a.is_leader()
    # a clean release lets the other take over at once
    b.release()
    assert a.try_acquire_or_renew()


def test_two_controllers_only_the_leader_acts(emu: KubeEmulator, backends: Backends) -> None:
    emu.put_object(storage_class("gfuse"))
    stops, threads, ctrls = {}, {}, {}
    electors = {n: _elector(emu, n) for n in ("one", "two")}
    try:
        for n, el in electors.items():
            ctrls[n] = Controller(emu.api_client(), backends, identity=n, is_leader=el.is_leader,
                                  retry_base=0.1, retry_max=1.0, watch_timeout=30)
            stops[n] = threading.Event()
            threads[n] = threading.Thread(target=el.run, args=(stops[n], ctrls[n].run), daemon=True)
            threads[n].start()
        leader = emu.wait_for(lambda: next((n for n, e in electors.items() if e.is_leader()), None), 10, "a leader")
        follower = "two" if leader == "one" else "one"
        claims = [emu.put_object(claim(f"c{i}", "gfuse")) for i in range(5)]
        for c in claims:
            wait_pv(emu, c)
        pvs = emu.list("persistentvolumes")
        assert {pv["metadata"]["annotations"][ctl.ANN_IDENTITY] for pv in pvs} == {leader}
        assert len(pvs) == 5 and not electors[follower].is_leader()
        mem = backends.by_pool["127.0.0.2:/pool"]
        assert sorted(mem.calls) == sorted(("create", f"pvc-{c['metadata']['uid']}") for c in claims)
        # the leader stops (and releases the Lease): the follower takes over
        stops[leader].set()
        threads[leader].join(15)
        emu.wait_for(electors[follower].is_leader, 5, f"{follower} leading")
        c = emu.put_object(claim("after", "gfuse"))
        pv = wait_pv(emu, c)
        assert pv["metadata"]["annotations"][ctl.ANN_IDENTITY] == follower
    finally:
        for n in stops:
            stops[n].set()
        for n in threads:
            threads[n].join(15)


# ------------------------------------------------------------------------------------------------
# part 2: end to end — the gfuse-provisioner process, the real SubdirBackend, a real gluster pool

REPO = Path(__file__).resolve().parents[2]
LEASE = ("gfuse-system", "gfuse-example-org-gfuse")


def _have_cluster() -> str | None:
    from testkit import cluster as tc

    if os.geteuid() != 0:
        return "needs root (gluster, FUSE mounts)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return tc.unavailable_reason()


@pytest.fixture(scope="module")
def pool(glusterd: Any) -> Iterator[Any]:
    """A replica-3 pool volume with quota on, and a state dir for the provisioners' pool mounts.
    At the end: every mount under the state dir is unmounted and the volume deleted."""
    from testkit import cluster as tc
    from flexvolume.storage.glusterd import Glusterd

    reason = _have_cluster()
    if reason:
        pytest.skip(f"end-to-end provisioner tests: {reason}")
    vol = tc.create_volume("replica3")
    state = Path(tempfile.mkdtemp(prefix="gfuse-provisioner-test-"))
    try:
        Glusterd().quota_enable(vol.name)
        vol.state_dir = state  # type: ignore[attr-defined]
        yield vol
    finally:
        for m in reversed(mounts_under(str(state))):
            mp = m.target
            if mp != str(state):
                with contextlib.suppress(Exception):
                    subprocess.run(["umount", "-l", mp], capture_output=True, timeout=15, check=False)
        shutil.rmtree(state, ignore_errors=True)
        vol.delete()


def _brick_state(brick: Path) -> dict[str, set[str]]:
    meta = brick / ".gfuse-provisioner"

    def names(d: Path, suffix: str = "") -> set[str]:
        if not d.is_dir():
            return set()
        return {p.name[:len(p.name) - len(suffix)] for p in d.iterdir()
                if p.name.endswith(suffix) and not p.name.startswith(".")}

    return {"dirs": {p.name for p in brick.iterdir() if not p.name.startswith(".")},
            "records": names(meta / "volumes", ".json"), "staging": names(meta / "staging"),
            "trash": names(meta / "trash")}


def pool_state(vol: Any) -> dict[str, set[str]]:
    """What the subdir backend keeps on the pool, read from the bricks themselves: what a majority
    (2 of the 3 replicas) holds. Bricks that disagree are a replication problem, not the
    provisioner's: they are reported as a warning with ``gluster volume heal info``."""
    bricks = [_brick_state(Path(vol.brick_dir(i))) for i in range(3)]
    out: dict[str, set[str]] = {}
    for key in bricks[0]:
        seen = [b[key] for b in bricks]
        out[key] = {n for n in set().union(*seen) if sum(n in s for s in seen) >= 2}
        odd = set().union(*seen) - set.intersection(*seen)
        if odd:
            heal = subprocess.run(["gluster", "volume", "heal", vol.name, "info"], capture_output=True, text=True,
                                  timeout=30).stdout
            warnings.warn(f"pool {vol.name}: replicas disagree on {key} {sorted(odd)} "
                          f"(per brick: {[sorted(s & odd) for s in seen]})\n{heal}", stacklevel=2)
    return out


def assert_consistent(emu: KubeEmulator, vol: Any, claims: list[dict[str, Any]],
                      retained: frozenset[str] = frozenset()) -> None:
    """For each claim of this test: a PV exists exactly when its claim does (or it is retained), the
    pool has a directory and a record exactly for those, and nothing is half made or half deleted."""
    st = pool_state(vol)
    assert not st["staging"] and not st["trash"], st
    for c in claims:
        name = f"pvc-{c['metadata']['uid']}"
        alive = emu.get("persistentvolumeclaims", c["metadata"]["name"], c["metadata"]["namespace"]) is not None
        pv = emu.get("persistentvolumes", name)
        if alive or name in retained:
            assert pv is not None, f"{name}: claim alive but no PV"
            assert name in st["dirs"] and name in st["records"], (name, st)
        else:
            assert pv is None, f"{name}: claim gone but the PV stays"
            assert name not in st["dirs"] and name not in st["records"], (name, st)
    pvs = [pv for pv in emu.list("persistentvolumes")]
    refs = [pv["spec"]["claimRef"]["uid"] for pv in pvs]
    assert len(refs) == len(set(refs)), f"two PVs for one claim: {refs}"


class Provisioner:
    """``python -m flexvolume.provisioner.main`` (what the gfuse-provisioner script runs) as a child."""

    def __init__(self, emu: KubeEmulator, tmp: Path, identity: str, state_dir: Path,
                 env: dict[str, str] | None = None, leader_elect: bool = True) -> None:
        self.identity = identity
        self.kubeconfig = emu.write_kubeconfig(tmp / f"kubeconfig-{identity}")
        self.log = tmp / f"{identity}.log"
        self.state_dir = state_dir
        self.env = env or {}
        self.leader_elect = leader_elect
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Provisioner:
        cmd = [sys.executable, "-m", "flexvolume.provisioner.main", "--kubeconfig", str(self.kubeconfig),
               "--identity", self.identity, "--state-dir", str(self.state_dir),
               "--leader-election-namespace", LEASE[0], "--lease-duration", "3", "--renew-deadline", "2",
               "--retry-period", "0.3", "--retry-max", "2", "--resync-period", "20", "--watch-timeout", "20",
               "--log-level", "INFO"]
        if not self.leader_elect:
            cmd.append("--no-leader-elect")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               **self.env}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                         cwd=str(REPO), start_new_session=True)
        return self

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL (a crash: no cleanup, no Lease release)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, bounded; SIGKILL if it does not go."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"{self.identity} ignored SIGTERM for {timeout}s\n{self.tail()}") from None
        return self.proc.returncode

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.identity} did not exit within {timeout}s\n{self.tail()}") from None


@pytest.fixture
def provisioners(tmp_path: Path) -> Iterator[list[Provisioner]]:
    """Provisioner processes started by a test are all gone (SIGKILL) when it ends."""
    started: list[Provisioner] = []
    yield started
    for p in started:
        p.kill()


def _lease_holder(emu: KubeEmulator) -> str | None:
    lease = emu.get("leases", LEASE[1], LEASE[0], group="coordination.k8s.io")
    return (lease or {}).get("spec", {}).get("holderIdentity")


def kubelet_mount(pv: dict[str, Any], mountpoint: Path) -> Any:
    """Mount a PV as kubelet + the gfuse FlexVolume driver would: the driver's option parser on
    kubelet's JSON (the PV's flexVolume options + kubelet's keys), then ``gfuse mount`` with them."""
    from testkit import cluster as tc

    req = kubelet_driver_options(pv)
    assert not req["readonly"]
    server, path = req["source"].split(":/", 1)
    mountpoint.mkdir(parents=True, exist_ok=True)
    return tc.GfuseMount(path, mountpoint, server=server, options=req["options"]).mount()


def test_e2e_provision_mount_write_expand_and_reclaim(pool: Any, provisioners: list[Provisioner],
                                                      tmp_path: Path) -> None:
    from flexvolume.storage.glusterd import Glusterd

    with KubeEmulator() as emu:
        emu.put_object(storage_class("gf-delete", reclaim="Delete", expand=True, params={"pool": pool.source}))
        emu.put_object(storage_class("gf-retain", reclaim="Retain", params={"pool": pool.source}))
        emu.put_object(storage_class("gf-nopool", params={"pool": "127.0.0.2:/gfuset_no_such_pool"}))
        emu.put_object(storage_class("gf-badparam", params={"pool": pool.source, "replicas": "3"}))
        p = Provisioner(emu, tmp_path, "e2e", pool.state_dir)
        provisioners.append(p.start())
        t0 = time.monotonic()
        d = emu.put_object(claim("data", "gf-delete", "64Mi"))
        r = emu.put_object(claim("kept", "gf-retain", "32Mi"))
        pv_d, pv_r = wait_pv(emu, d, 60), wait_pv(emu, r, 60)
        t_provision = time.monotonic() - t0
        name_d, name_r = pv_d["metadata"]["name"], pv_r["metadata"]["name"]
        assert pv_d["spec"]["flexVolume"]["options"]["volume"] == f"{pool.source}/{name_d}"
        assert pv_d["spec"]["capacity"]["storage"] == "64Mi"
        for i in range(3):
            assert (Path(pool.brick_dir(i)) / name_d).is_dir()
        limits = {q.path: q.hard_limit for q in Glusterd().quota_list(pool.name)}
        assert limits.get(f"/{name_d}") == 64 << 20, limits

        # kubelet's part: the driver's view of the PV, mounted with gfuse mount, written
        m = kubelet_mount(pv_d, tmp_path / "pod-volume")
        try:
            payload = os.urandom(1 << 20)
            (Path(m.path) / "hello.bin").write_bytes(payload)
            os.makedirs(Path(m.path) / "sub/dir")
            (Path(m.path) / "sub/dir/note.txt").write_text("written through the provisioned PV\n")
            assert (Path(m.path) / "hello.bin").read_bytes() == payload
        finally:
            m.unmount()
        for i in range(3):  # on every brick, inside the PV's directory, nowhere else
            assert (Path(pool.brick_dir(i)) / name_d / "hello.bin").read_bytes() == payload
        assert not (Path(pool.brick_dir(0)) / "hello.bin").exists()

        # expansion: claim → backend quota → PV → claim status
        c = emu.get("persistentvolumeclaims", "data", NS)
        c["spec"]["resources"]["requests"]["storage"] = "128Mi"
        emu.put_object(c)
        emu.wait_for(lambda: emu.get("persistentvolumeclaims", "data", NS)["status"]["capacity"]["storage"]
                     == "128Mi", 30, f"expansion\n{p.tail()}")
        assert emu.get("persistentvolumes", name_d)["spec"]["capacity"]["storage"] == "128Mi"
        limits = {q.path: q.hard_limit for q in Glusterd().quota_list(pool.name)}
        assert limits.get(f"/{name_d}") == 128 << 20, limits

        # StorageError → an Event the user can act on; the claim stays Pending, not silently
        emu.put_object(claim("broken", "gf-nopool"))
        emu.put_object(claim("typo", "gf-badparam"))
        ev = wait_event(emu, "broken", "ProvisioningFailed", 30)
        assert "gfuset_no_such_pool does not exist" in ev["message"], ev["message"]
        ev = wait_event(emu, "typo", "ProvisioningFailed", 30)
        assert "unknown StorageClass parameter(s) replicas" in ev["message"], ev["message"]

        # reclaim: Delete removes the directory (and its quota), Retain keeps the data
        emu.delete_object("persistentvolumeclaims", "data", NS)
        emu.delete_object("persistentvolumeclaims", "kept", NS)
        wait_gone(emu, "persistentvolumes", name_d, 30)
        wait_pv(emu, r, 30, phase="Released")
        time.sleep(1.0)
        st = pool_state(pool)
        assert name_d not in st["dirs"] and name_d not in st["records"]
        assert name_r in st["dirs"] and name_r in st["records"]
        assert emu.get("persistentvolumes", name_r)["status"]["phase"] == "Released"
        assert f"/{name_d}" not in {q.path for q in Glusterd().quota_list(pool.name)}
        assert_consistent(emu, pool, [d, r], retained={name_r})

        # a clean stop releases the Lease
        assert _lease_holder(emu) == "e2e"
        assert p.stop() == 0, p.tail()
        assert not _lease_holder(emu)
        print(f"\nprovisioning two claims (first use of the pool: mount) took {t_provision:.1f}s")


def test_e2e_two_replicas_only_the_leader_acts_and_the_other_takes_over(
        pool: Any, provisioners: list[Provisioner], tmp_path: Path) -> None:
    with KubeEmulator() as emu:
        emu.put_object(storage_class("gf", params={"pool": pool.source}))
        a = Provisioner(emu, tmp_path, "replica-a", pool.state_dir / "a")
        b = Provisioner(emu, tmp_path, "replica-b", pool.state_dir / "b")
        provisioners.append(a.start())
        emu.wait_for(lambda: _lease_holder(emu) == "replica-a", 30, f"replica-a leading\n{a.tail()}")
        provisioners.append(b.start())
        claims = [emu.put_object(claim(f"c{i}", "gf", "16Mi")) for i in range(3)]
        for c in claims:
            wait_pv(emu, c, 60)
        time.sleep(1.0)  # b has had time to act if it (wrongly) would
        assert {pv["metadata"]["annotations"][ctl.ANN_IDENTITY] for pv in emu.list("persistentvolumes")} == \
            {"replica-a"}
        assert "is the leader" not in b.tail(200)
        # the leader dies without releasing the Lease: b waits for it to expire, then acts
        a.kill()
        t_kill = time.monotonic()
        late = emu.put_object(claim("late", "gf", "16Mi"))
        emu.wait_for(lambda: _lease_holder(emu) == "replica-b", 20, f"replica-b leading\n{b.tail()}")
        t_takeover = time.monotonic() - t_kill
        pv = wait_pv(emu, late, 60)
        assert pv["metadata"]["annotations"][ctl.ANN_IDENTITY] == "replica-b"
        assert t_takeover >= 2.0, f"took over after {t_takeover:.1f}s, before the 3 s Lease could expire"
        assert_consistent(emu, pool, claims + [late])
        assert b.stop() == 0, b.tail()
        print(f"\nfollower took over {t_takeover:.1f}s after SIGKILL of the leader (lease 3 s)")


# ------------------------------------------------------------------------------------------------
# crash tests: the provisioner process killed at each step, then restarted

from flexvolume.storage.backends import CRASH_ENV, CRASH_EXIT, SubdirBackend  # noqa: E402

# The provisioner's own steps, each; of the backend's steps one per direction (the atomic rename that
# publishes a volume, the move to the trash that retracts it): that a crash after *every* backend step is
# finished by a retry is tested against the backend itself in tests/k8s/test_storage_backends.py
# (test_subdir_crash_once_during_create_then_delete, test_subdir_crash_through_every_step); what is
# tested here is that a restarted provisioner resumes around them.
assert "rename" in SubdirBackend.CREATE_STEPS and "trash" in SubdirBackend.DELETE_STEPS
CREATE_CASES = ["backend-rename", "before-pv-create", "before-claim-finalizer-removal", "claim-deleted-while-down"]
DELETE_CASES = ["backend-trash", "before-pv-finalizer-removal", "before-pv-delete"]


def _crash_provisioner(emu: KubeEmulator, pool: Any, tmp_path: Path, env: dict[str, str] | None = None,
                       name: str = "first") -> Provisioner:
    # one replica, no leader election: a restarted replica need not wait for its old Lease to expire
    return Provisioner(emu, tmp_path, name, pool.state_dir, env=env, leader_elect=False).start()


@pytest.mark.parametrize("case", CREATE_CASES)
def test_e2e_killed_while_creating_then_restarted(case: str, pool: Any, provisioners: list[Provisioner],
                                                  tmp_path: Path) -> None:
    with KubeEmulator() as emu:
        emu.put_object(storage_class("gf", params={"pool": pool.source}))
        env = {CRASH_ENV: f"subdir.create.{case[len('backend-'):]}"} if case.startswith("backend-") else None
        first = _crash_provisioner(emu, pool, tmp_path, env)
        provisioners.append(first)
        deleted = False
        if env:  # the backend exits the process right after this step of create()
            c = emu.put_object(claim("data", "gf", "16Mi"))
            assert first.wait_exit(60) == CRASH_EXIT, first.tail()
            name = f"pvc-{c['metadata']['uid']}"
            assert name in pool_state(pool)["records"]
        else:
            hold = emu.hold("POST", r"^/api/v1/persistentvolumes$")
            c = emu.put_object(claim("data", "gf", "16Mi"))
            name = f"pvc-{c['metadata']['uid']}"
            hold.wait(60)
            assert name in pool_state(pool)["dirs"]  # backend.create is done
            if case == "before-claim-finalizer-removal":
                fin = emu.hold("PATCH", rf"^/api/v1/namespaces/{NS}/persistentvolumeclaims/data$")
                hold.release(apply=True)  # the PV is created ...
                fin.wait(30)
                first.kill()  # ... and the provisioner dies before the claim's finalizer goes
                fin.release(apply=False)
                assert emu.get("persistentvolumes", name) is not None
                assert FINALIZER in emu.get("persistentvolumeclaims", "data", NS)["metadata"]["finalizers"]
            else:
                first.kill()  # dies with the PV create in flight; the server never applies it
                hold.release(apply=False)
                assert emu.get("persistentvolumes", name) is None
                assert FINALIZER in emu.get("persistentvolumeclaims", "data", NS)["metadata"]["finalizers"]
                if case == "claim-deleted-while-down":
                    emu.delete_object("persistentvolumeclaims", "data", NS)
                    assert emu.get("persistentvolumeclaims", "data", NS)["metadata"]["deletionTimestamp"]
                    deleted = True
        second = _crash_provisioner(emu, pool, tmp_path, name="second")
        provisioners.append(second)
        if deleted:
            wait_gone(emu, "persistentvolumeclaims", "data", 60, ns=NS)
            emu.wait_for(lambda: name not in pool_state(pool)["records"], 30, f"{name} cleaned up\n{second.tail()}")
        else:
            pv = wait_pv(emu, c, 60)
            emu.wait_for(lambda: FINALIZER not in (emu.get("persistentvolumeclaims", "data", NS)["metadata"]
                                                   .get("finalizers") or []), 30, "claim finalizer removed")
            assert pv["spec"]["flexVolume"]["options"]["volume"] == f"{pool.source}/{name}"
        assert len(emu.list("persistentvolumes")) == (0 if deleted else 1)
        assert_consistent(emu, pool, [c])
        if not deleted:  # the volume made across the crash is an ordinary one: it is deleted as usual
            emu.delete_object("persistentvolumeclaims", "data", NS)
            wait_gone(emu, "persistentvolumes", name, 60, log=second)
            assert_consistent(emu, pool, [c])
        assert second.stop() == 0, second.tail()


@pytest.mark.parametrize("case", DELETE_CASES)
def test_e2e_killed_while_deleting_then_restarted(case: str, pool: Any, provisioners: list[Provisioner],
                                                  tmp_path: Path) -> None:
    with KubeEmulator() as emu:
        emu.put_object(storage_class("gf", params={"pool": pool.source}))
        env = {CRASH_ENV: f"subdir.delete.{case[len('backend-'):]}"} if case.startswith("backend-") else None
        first = _crash_provisioner(emu, pool, tmp_path, env)
        provisioners.append(first)
        c = emu.put_object(claim("data", "gf", "16Mi"))
        name = wait_pv(emu, c, 60)["metadata"]["name"]
        assert name in pool_state(pool)["dirs"]
        if env:
            emu.delete_object("persistentvolumeclaims", "data", NS)
            assert first.wait_exit(60) == CRASH_EXIT, first.tail()
        else:
            if case == "before-pv-finalizer-removal":
                hold = emu.hold("PATCH", rf"^/api/v1/persistentvolumes/{name}$")
            else:
                hold = emu.hold("DELETE", rf"^/api/v1/persistentvolumes/{name}$")
            emu.delete_object("persistentvolumeclaims", "data", NS)
            hold.wait(60)
            first.kill()
            hold.release(apply=False)
            assert name not in pool_state(pool)["records"]  # backend.delete was done
        pv = emu.get("persistentvolumes", name)
        assert pv is not None and pv["status"]["phase"] == "Released"
        second = _crash_provisioner(emu, pool, tmp_path, name="second")
        provisioners.append(second)
        wait_gone(emu, "persistentvolumes", name, 60, log=second)
        assert second.stop() == 0, second.tail()
        assert_consistent(emu, pool, [c])


def test_command_line_configuration_errors_are_one_line_and_exit_2(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from flexvolume.provisioner import main as prov_main

    assert prov_main._lease_name(PROVISIONER) == "gfuse-example-org-gfuse"
    assert prov_main.main(["--kubeconfig", str(tmp_path / "missing")]) == 2
    with KubeEmulator() as emu:
        kubeconfig = emu.write_kubeconfig(tmp_path / "kubeconfig")
        assert prov_main.main(["--kubeconfig", str(kubeconfig), "--lease-duration", "5",
                               "--renew-deadline", "10"]) == 2
    args = prov_main.parse_args([])
    assert (args.leader_elect, args.leader_election_namespace, args.glusterd_socket) == \
        (True, "gfuse-system", "/var/run/glusterd.socket")
