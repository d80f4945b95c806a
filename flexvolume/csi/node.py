"""CSI Node service: one gfuse mount per volume per node (staging), a bind mount per pod (publish).

With the agent's pooled subdir PVs (``gfuse-agent --pool-subdirs yes``, what the DaemonSet runs;
:mod:`flexvolume.pools`) the staging path of a PV that names a subdirectory of a volume is not a gfuse mount of
its own but the agent's bind of that subdirectory of its one gfuse mount of the pool volume (in the mount
table: ``fuse.gfuse``, the pool's source, root ``/<subdir>``, the pool mount's device); publishing binds the
staging path as always, so a target is a bind of the same subdirectory. Nothing here depends on which: targets
are matched to their staging path by device and root, NodeGetVolumeStats asks statvfs of the path it is given
(gfuse answers statfs for the bound directory's inode: a PV's quota, not the pool's size) and its
VolumeCondition is the pool server's health, and NodeUnstageVolume has the agent drop its PV (the pool mount
goes with its last PV).

- NodeStageVolume asks the node agent (``gfuse-agent``) to mount the volume's gluster source at the
  staging path kubelet gives (``<kubelet-dir>/plugins/kubernetes.io/csi/<driver>/<hash>/globalmount``):
  the agent owns the FUSE server process, so restarting this plugin never breaks a pod's mount.
- NodePublishVolume bind-mounts the staging path on the pod's target path (read-only when asked);
  NodeUnpublishVolume unmounts it and removes the target directory; NodeUnstageVolume has the
  agent unmount the staging path.
- Every path must lie inside ``--kubelet-dir``: a privileged plugin mounts nowhere else.
- Every call is idempotent, as kubelet retries them; calls on the same volume (stage/unstage) or the
  same target path (publish/unpublish) while one is in flight answer ABORTED.
- Access modes: SINGLE_NODE_SINGLE_WRITER and SINGLE_NODE_MULTI_WRITER (spec v1.5+) are served like
  SINGLE_NODE_WRITER, except that a SINGLE_NODE_SINGLE_WRITER volume is published at one target at a
  time (another target: FAILED_PRECONDITION, as csi-sanity expects).
- NodeGetVolumeStats reports usage and a VolumeCondition (VOLUME_CONDITION capability): abnormal, with
  the reason, when the path is not a gfuse mount any more or its gfuse server is dead or hung (kubelet
  turns an abnormal condition into an event on the pod). A path that names no volume — relative,
  outside the kubelet directory, or absent — is NOT_FOUND.
- Repair events: NodePublishVolume records the pod (podInfoOnMount's ``csi.storage.k8s.io/pod.*`` in the
  volume context) in the agent's context of the staging mount (``csi.pods``, see flexvolume.kubeevents),
  NodeUnpublishVolume forgets it; the agent's repair of the staging mount is then an Event on each pod.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import subprocess
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from ..agentclient import AgentClient
from ..pools import effective_source
from ..kubeevents import CSI_POD_NAME, CSI_POD_NAMESPACE, CSI_POD_UID, CSI_PODS, csi_pods, encode_csi_pods
from .stubs import csi_pb2, csi_pb2_grpc
from gfuse.mounttable import MountEntry, mount_at, read_mounts

from .volumes import (
    AccessMode,
    CsiError,
    OpLocks,
    capability_readonly,
    check_capability,
    check_mount_options,
    check_path,
    invalid,
    require,
    rpc,
    volume_from,
)

log = logging.getLogger(__name__)

NodeRPC = csi_pb2.NodeServiceCapability.RPC
VolumeUsage = csi_pb2.VolumeUsage
VolumeCondition = csi_pb2.VolumeCondition
#: what NodeGetCapabilities advertises
NODE_CAPABILITIES = (NodeRPC.STAGE_UNSTAGE_VOLUME, NodeRPC.GET_VOLUME_STATS, NodeRPC.VOLUME_CONDITION,
                     NodeRPC.SINGLE_NODE_MULTI_WRITER)

GFUSE_FSTYPE = "fuse.gfuse"
#: seconds one mount/umount command may take
COMMAND_TIMEOUT = 30.0
#: seconds statvfs of a volume may take (a hung FUSE server would block forever)
STATS_TIMEOUT = 5.0

T = TypeVar("T")
#: kubelet's target of a CSI volume: <kubelet-dir>/pods/<pod uid>/volumes/kubernetes.io~csi/<pv>/mount
POD_TARGET = re.compile(r"/pods/([0-9a-fA-F-]{8,})/volumes/kubernetes\.io~csi/[^/]+/mount$")


def run(cmd: list[str], timeout: float = COMMAND_TIMEOUT) -> None:
    """Run a mount-table command; INTERNAL with its message if it fails."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CsiError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{' '.join(cmd)}: no answer within {timeout:g}s") from None
    except OSError as e:
        raise CsiError(grpc.StatusCode.INTERNAL, f"{' '.join(cmd)}: {e}") from None
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        raise CsiError(grpc.StatusCode.INTERNAL,
                       f"{' '.join(cmd)} failed (status {p.returncode}): {msg[-1] if msg else ''}")


def unmount_all(path: str, what: str) -> None:
    """Unmount every mount stacked on ``path`` (lazily if busy or dead)."""
    for _ in range(16):
        if mount_at(path) is None:
            return
        try:
            run(["umount", path])
        except CsiError as e:
            log.warning("%s: %s; detaching lazily", what, e.message)
            run(["umount", "-l", path])
    if mount_at(path) is not None:
        raise CsiError(grpc.StatusCode.INTERNAL, f"{what} {path} is still mounted after 16 unmounts")


def bounded(key: str, fn: Callable[[], T], timeout: float, inflight: dict[str, threading.Thread],
            mu: threading.Lock) -> T:
    """``fn()`` in a helper thread, waiting ``timeout`` at most: a hung FUSE server must not hang the
    RPC, nor pile up threads (while an earlier call for ``key`` is stuck, UNAVAILABLE at once).
    OSError from ``fn`` is raised as it is."""
    with mu:
        t = inflight.get(key)
        if t is not None and t.is_alive():
            raise CsiError(grpc.StatusCode.UNAVAILABLE, f"{key}: an earlier call has not returned yet "
                                                        f"(the gfuse mount is hung; see the agent's log)")
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["ok"] = fn()
            except OSError as e:
                box["err"] = e

        t = threading.Thread(target=work, name=f"bounded {key}", daemon=True)
        inflight[key] = t
        t.start()
    t.join(timeout)
    if t.is_alive():
        raise CsiError(grpc.StatusCode.UNAVAILABLE, f"{key}: no answer within {timeout:g}s (the gfuse mount is hung)")
    with mu:
        inflight.pop(key, None)
    if "err" in box:
        raise box["err"]
    return box["ok"]


def bounded_statvfs(path: str, timeout: float, inflight: dict[str, threading.Thread],
                    mu: threading.Lock) -> os.statvfs_result:
    """statvfs of ``path``, bounded (see :func:`bounded`); NOT_FOUND/UNAVAILABLE when it fails."""
    try:
        return bounded(path, lambda: os.statvfs(path), timeout, inflight, mu)
    except OSError as e:
        code = grpc.StatusCode.NOT_FOUND if e.errno == errno.ENOENT else grpc.StatusCode.UNAVAILABLE
        raise CsiError(code, f"{path}: statvfs: {e.strerror or e}") from None


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, kubelet_dir: str, agent: AgentClient, mount_timeout: float = 60.0,
                 run_cmd: Callable[[list[str]], None] = run) -> None:
        self.node_id = node_id
        self.kubelet_dir = os.path.normpath(kubelet_dir)
        self.agent = agent
        self.mount_timeout = mount_timeout
        self.locks = OpLocks()
        self._run = run_cmd
        self._stats_inflight: dict[str, threading.Thread] = {}
        self._stats_mu = threading.Lock()
        self._pods_mu = threading.Lock()  # read-modify-write of the staging mounts' pod lists in the agent

    # -- repair of published targets --------------------------------------------------------

    def repair_targets(self) -> list[str]:
        """Bind again every published target left on a dead gfuse mount whose staging mount was replaced.

        A restartable staging mount (the agent's default where the kernel has FUSE_NOTIFY_RESEND) never needs
        this: when its server dies a successor takes over the same FUSE connection, so the targets -- and the
        containers' binds of them -- stay on a live mount (same device), and nothing is done here.

        A repair-only one: when its serving process dies the agent stacks a fresh mount over the dead one at the
        staging path, but the pods' targets are bind mounts of the old, dead mount ("Transport endpoint is not
        connected") and stay so until the pod restarts. A target whose device differs from the current staging
        mount of the same source, and which fails with ENOTCONN (or ECONNABORTED) while that staging mount
        answers, gets a bind of the staging mount stacked over it (read-only if it was) -- never detached
        first, so nothing can be written into the node's directory in between; NodeUnpublishVolume unmounts the
        whole stack. Open files on the old mount keep failing, as does the directory in a container that got
        it with propagation None; new opens through the target work. Returns the targets repaired.
        """
        mounts = read_mounts()
        pods = self.kubelet_dir.rstrip("/") + "/pods/"
        plugins = self.kubelet_dir.rstrip("/") + "/plugins/"
        top: dict[str, MountEntry] = {}
        for m in mounts:
            top[m.target] = m  # later mounts cover earlier ones
        staged: dict[str, list[MountEntry]] = {}
        for m in top.values():
            if m.fstype == GFUSE_FSTYPE and m.target.startswith(plugins):
                staged.setdefault(m.source, []).append(m)
        repaired = []
        for t in top.values():
            if t.fstype != GFUSE_FSTYPE or not t.target.startswith(pods):
                continue
            candidates = [m for m in staged.get(t.source, []) if m.root == t.root]
            if not candidates or any(m.dev == t.dev for m in candidates):
                continue  # not published from a staging path, or still on the live mount
            try:
                with self.locks.hold("path:" + t.target):
                    if self._repair_target(t, candidates):
                        repaired.append(t.target)
            except CsiError as e:
                log.info("repair of %s skipped: %s", t.target, e.message)
        return repaired

    def _repair_target(self, t: MountEntry, candidates: list[MountEntry]) -> bool:
        try:
            bounded("target " + t.target, lambda: os.stat(t.target), STATS_TIMEOUT,
                    self._stats_inflight, self._stats_mu)
            return False  # it answers: nothing to repair
        except OSError as e:
            if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                return False
        staging = None
        for m in candidates:
            try:
                bounded("staging " + m.target, functools.partial(os.stat, m.target), STATS_TIMEOUT,
                        self._stats_inflight, self._stats_mu)
            except (OSError, CsiError):
                continue
            staging = m
            break
        if staging is None:
            return False  # the agent has not repaired the staging mount yet
        log.warning("published target %s is on a dead gfuse mount of %s; binding %s over it",
                    t.target, t.source, staging.target)
        self._run(["mount", "--bind", staging.target, t.target])
        if t.readonly:
            self._run(["mount", "-o", "remount,bind,ro", t.target])
        return True

    def repair_loop(self, interval: float, stop: threading.Event) -> None:
        while not stop.wait(interval):
            try:
                self.repair_targets()
            except Exception:  # keep the loop alive; the next pass retries
                log.exception("repair pass failed")

    def health(self) -> None:
        """Probe: the agent must answer."""
        try:
            self.agent.ping(timeout=5.0)
        except Exception as e:  # noqa: BLE001 - AgentError or anything unexpected
            raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, f"gfuse agent: {e}") from None

    def published_targets(self, staged: MountEntry, exclude: str = "") -> list[str]:
        """Targets where the staged mount ``staged`` is bound now: any mount of it below ``--kubelet-dir`` but
        the staging path itself and what is below ``<kubelet-dir>/plugins/`` (staging paths). Not only below
        ``pods/``: csi-sanity's targets are ``<--csi.mountdir>/target`` and ``…/other_target``."""
        root = self.kubelet_dir.rstrip("/") + "/"
        plugins = root + "plugins/"
        top: dict[str, MountEntry] = {}
        for m in read_mounts():
            top[m.target] = m  # later mounts cover earlier ones
        return sorted(t for t, m in top.items()
                      if t.startswith(root) and not t.startswith(plugins) and t not in (exclude, staged.target)
                      and m.dev == staged.dev and m.root == staged.root)

    # -- the pods of a staging mount, for the agent's repair Events ------------------------------------

    @staticmethod
    def pod_of(target: str, volume_context: Any) -> dict[str, str] | None:
        """The pod a NodePublishVolume is for: the CSIDriver's podInfoOnMount puts its name, namespace and uid
        in the volume context (the uid is also in kubelet's target path); None when not known."""
        m = POD_TARGET.search(target)
        pod = {"name": volume_context.get(CSI_POD_NAME, ""), "namespace": volume_context.get(CSI_POD_NAMESPACE, ""),
               "uid": volume_context.get(CSI_POD_UID, "") or (m.group(1) if m else "")}
        return pod if all(pod.values()) else None

    def _update_pods(self, staging: str | None, target: str, pod: dict[str, str] | None) -> None:
        """Best effort: record (``pod``) or forget (None) the pod published at ``target`` in the context of the
        agent's staging mount (``staging``; None: whichever names ``target``), so that the agent's repair of it
        is an Event on each pod it serves (:func:`flexvolume.kubeevents.pod_refs`). The agent replaces the
        context of a mount asked again with the same source and mode (an idempotent mount request)."""
        try:
            with self._pods_mu:
                for rec in self.agent.list(timeout=10):
                    ctx = dict(rec.get("context") or {})
                    pods = csi_pods(ctx)
                    if staging is not None:
                        if rec.get("target") != staging:
                            continue
                        staged = mount_at(staging)
                        live = set(self.published_targets(staged)) if staged is not None else set()
                        pods = {t: p for t, p in pods.items() if t in live}  # unpublished while we were down
                        if pod is not None:
                            pods[target] = pod
                    elif target in pods:
                        del pods[target]
                    else:
                        continue
                    if pods == csi_pods(ctx):
                        continue
                    ctx[CSI_PODS] = encode_csi_pods(pods)
                    self.agent.mount(rec["source"], rec["target"], options=rec.get("options") or [],
                                     readonly=bool(rec.get("readonly")), context=ctx, timeout=self.mount_timeout)
        except Exception as e:  # noqa: BLE001 - events are best effort; publishing does not depend on them
            log.warning("cannot record the pod of %s with the agent (no repair events for it): %s", target, e)

    # -- stage ---------------------------------------------------------------------------------

    @rpc
    def NodeStageVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        staging = check_path(request.staging_target_path, self.kubelet_dir, "staging_target_path")
        cap = request.volume_capability
        check_capability(cap)
        vol = volume_from(request.volume_id, request.volume_context)
        # PV/StorageClass mountOptions: checked as the volume context's are (no subdir=, no log-file=, …)
        flags = [f for f in check_mount_options(list(cap.mount.mount_flags),
                                                "volume_capability.mount.mount_flags (the PV's mountOptions)")
                 if f not in ("rw", "defaults")]
        readonly = vol.readonly or capability_readonly(cap) or "ro" in flags
        flags = [f for f in flags if f != "ro"]
        with self.locks.hold("volume:" + request.volume_id, "path:" + staging):
            if mount_at(staging) is None:  # never stat a path that may carry a dead mount
                os.makedirs(staging, exist_ok=True)
            log.info("staging %s (%s%s) at %s", request.volume_id, vol.source, ", ro" if readonly else "", staging)
            self.agent.mount(vol.source, staging, options=vol.mount_options(flags), readonly=readonly,
                             timeout=self.mount_timeout,
                             context={"csi.volume_id": request.volume_id, "csi.role": "staging"})
        return csi_pb2.NodeStageVolumeResponse()

    @rpc
    def NodeUnstageVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        staging = check_path(request.staging_target_path, self.kubelet_dir, "staging_target_path")
        with self.locks.hold("volume:" + request.volume_id, "path:" + staging):
            log.info("unstaging %s from %s", request.volume_id, staging)
            self.agent.unmount(staging, timeout=self.mount_timeout)
            unmount_all(staging, "staging path")  # anything the agent did not own (e.g. after a crash)
            with contextlib.suppress(OSError):
                os.rmdir(staging)
        return csi_pb2.NodeUnstageVolumeResponse()

    # -- publish -------------------------------------------------------------------------------

    @rpc
    def NodePublishVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.target_path, "target_path")
        require(request.staging_target_path, "staging_target_path")
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        target = check_path(request.target_path, self.kubelet_dir, "target_path")
        staging = check_path(request.staging_target_path, self.kubelet_dir, "staging_target_path")
        if target == staging:
            raise invalid("target_path and staging_target_path are the same")
        cap = request.volume_capability
        check_capability(cap)
        vol = volume_from(request.volume_id, request.volume_context)
        readonly = request.readonly or capability_readonly(cap) or vol.readonly
        with self.locks.hold("path:" + target):
            staged = mount_at(staging)
            if staged is None:
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"volume {request.volume_id} is not staged at {staging} (NodeStageVolume first)")
            existing = mount_at(target)
            if existing is not None:
                if existing.dev == staged.dev and existing.root == staged.root and existing.readonly == readonly:
                    pod = self.pod_of(target, request.volume_context)
                    if pod is not None:  # published already, the same way (by a plugin that kept no pods?)
                        self._update_pods(staging, target, pod)
                    return csi_pb2.NodePublishVolumeResponse()
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                               f"{target} is already mounted ({existing.fstype} {existing.source}"
                               f"{', ro' if existing.readonly else ''}) and not as this volume "
                               f"{'read-only' if readonly else 'read-write'}")
            if cap.access_mode.mode == AccessMode.SINGLE_NODE_SINGLE_WRITER:
                others = self.published_targets(staged, exclude=target)
                if others:
                    raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"volume {request.volume_id} is SINGLE_NODE_SINGLE_WRITER and already "
                                   f"published at {others[0]}")
            os.makedirs(target, exist_ok=True)
            log.info("publishing %s: %s -> %s%s", request.volume_id, staging, target, " (ro)" if readonly else "")
            self._run(["mount", "--bind", staging, target])
            if readonly:
                try:
                    self._run(["mount", "-o", "remount,bind,ro", target])
                except CsiError:
                    with contextlib.suppress(CsiError):
                        unmount_all(target, "target path")
                    raise
            pod = self.pod_of(target, request.volume_context)
            if pod is not None:
                self._update_pods(staging, target, pod)
        return csi_pb2.NodePublishVolumeResponse()

    @rpc
    def NodeUnpublishVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.target_path, "target_path")
        target = check_path(request.target_path, self.kubelet_dir, "target_path")
        with self.locks.hold("path:" + target):
            log.info("unpublishing %s from %s", request.volume_id, target)
            unmount_all(target, "target path")
            self._update_pods(None, target, None)
            try:
                os.rmdir(target)
            except FileNotFoundError:
                pass
            except OSError as e:  # not empty: data a pod wrote while nothing was mounted; keep it
                log.warning("unpublish %s: cannot remove %s: %s", request.volume_id, target, e.strerror)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # -- information ---------------------------------------------------------------------------

    @rpc
    def NodeGetVolumeStats(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.volume_path, "volume_path")
        vid, given = request.volume_id, request.volume_path
        # csi-sanity (and the spec): a path where the volume is not is NOT_FOUND, relative ones included
        if not os.path.isabs(given) or "\0" in given:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {vid} is not at {given!r}: not an absolute path")
        path = os.path.normpath(given)
        if not path.startswith(self.kubelet_dir.rstrip("/") + "/"):
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {vid} is not at {path}: outside the kubelet "
                                                      f"directory {self.kubelet_dir}, where it publishes")
        m = mount_at(path)
        if m is None:
            try:  # nothing mounted there: lstat cannot hang on it
                os.lstat(path)
            except FileNotFoundError:
                raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {vid} is not at {path}: no such path") from None
            except OSError as e:
                return self._abnormal(f"{path}: {e.strerror or e}")
            return self._abnormal(f"nothing is mounted at {path} any more: the volume's mount is gone "
                                  f"(restart the pod to mount it again)")
        if m.fstype != GFUSE_FSTYPE:
            return self._abnormal(f"{path} is a {m.fstype} mount of {m.source}, not a gfuse mount")
        try:
            st = bounded(path, lambda: os.statvfs(path), STATS_TIMEOUT, self._stats_inflight, self._stats_mu)
        except CsiError as e:  # no answer in time: a hung gfuse server (or bricks it waits for)
            return self._abnormal(e.message)
        except OSError as e:
            if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                return self._abnormal(f"the gfuse server of {m.source} at {path} is dead ({e.strerror}); the "
                                      f"agent mounts the volume again and the plugin rebinds pods' targets to it")
            return self._abnormal(f"the gfuse mount of {m.source} at {path} fails: {e.strerror or e}")
        bs = st.f_frsize or st.f_bsize
        served = effective_source(m.source, m.root)  # a pooled PV's bind: the pool's source and its subdirectory
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=[
                VolumeUsage(unit=VolumeUsage.BYTES, total=st.f_blocks * bs, available=st.f_bavail * bs,
                            used=max(0, st.f_blocks - st.f_bfree) * bs),
                VolumeUsage(unit=VolumeUsage.INODES, total=st.f_files, available=st.f_favail,
                            used=max(0, st.f_files - st.f_ffree)),
            ],
            volume_condition=VolumeCondition(abnormal=False, message=f"the gfuse mount of {served} answers"),
        )

    @staticmethod
    def _abnormal(message: str) -> Any:
        log.warning("NodeGetVolumeStats: abnormal: %s", message)
        return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=VolumeCondition(abnormal=True, message=message))

    @rpc
    def NodeGetCapabilities(self, request, context):
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=NodeRPC(type=t)) for t in NODE_CAPABILITIES
        ])

    @rpc
    def NodeGetInfo(self, request, context):
        return csi_pb2.NodeGetInfoResponse(node_id=self.node_id)
