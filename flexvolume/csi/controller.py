"""CSI Controller service: the "subdir" backend — each volume is a directory of a pool volume.

StorageClass parameters (CreateVolume ``parameters``)
-----------------------------------------------------
``pool`` (required)
    the pool volume, ``SERVER[:PORT]:/VOL``.
``backend``
    ``subdir`` (the default and, for now, the only one).
``backupServers``
    other glusterd hosts of the pool, ``h2:h3``; used for the controller's own mount and passed
    to the nodes in the volume context.
``mountOptions``
    extra ``gfuse mount -o`` items the nodes use (volume context).
``dirMode``
    octal mode of a new volume directory (default ``0777``: pods need not run as root).

Layout on the pool
------------------
``/<dir>`` is the volume (``<dir>`` is the CreateVolume name when it is a safe file name, e.g.
``pvc-<uid>``, else ``csi-sha-<hash of the name>``); ``/.gfuse-csi/volumes/<dir>.json`` records its
name, capacity, parameters and state; ``/.gfuse-csi/trash/`` holds directories being deleted.
The volume id is ``subdir:SERVER:/POOL/<dir>``, so nodes and DeleteVolume need nothing else.

Crash safety: CreateVolume writes the record (``creating``) before making the directory and marks
it ``ready`` after; DeleteVolume renames the directory into the trash, removes the record, then
empties the trash. A retry after a crash at any step finishes the job; a directory without a
record is never deleted nor taken over (it is not ours). Pods never see ``/.gfuse-csi``: they mount their own
directory only.

Capacity is recorded, not enforced yet. TODO(issue 5): enforce it with a gluster directory quota
(``volume quota POOL limit-usage /<dir> SIZE``) set through glusterd, raised by expansion.

The controller reaches the pool through a gfuse mount it keeps under ``--state-dir``/pools, either
a private ``gfuse mount`` (default: the controller Deployment has no node agent) or one made by the
node agent (``--pool-mounter agent``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from .. import jsonfile
from ..agentclient import AgentClient, AgentError
from .node import bounded, unmount_all
from .stubs import csi_pb2, csi_pb2_grpc
from .volumes import (
    MAX_ID_BYTES,
    SUBDIR_PREFIX,
    CsiError,
    OpLocks,
    agent_error,
    check_capability,
    check_source,
    invalid,
    mount_at,
    parse_backup_servers,
    require,
    rpc,
    split_list,
    unsupported_capability,
    volume_from,
)

log = logging.getLogger(__name__)

CtrlRPC = csi_pb2.ControllerServiceCapability.RPC
META_DIR = ".gfuse-csi"
PARAMETERS = {"pool", "backend", "backupServers", "mountOptions", "dirMode"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")


def dir_name(name: str) -> str:
    """The pool directory of a volume name (a pure function: the same name, the same directory)."""
    if _SAFE_NAME.match(name) and not name.startswith("csi-sha-"):
        return name
    return "csi-sha-" + hashlib.sha256(name.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class Params:
    pool: str
    backup_servers: tuple[str, ...]
    mount_options: tuple[str, ...]
    dir_mode: int

    def context(self, dirname: str) -> dict[str, str]:
        ctx = {"source": f"{self.pool}/{dirname}"}
        if self.backup_servers:
            ctx["backupServers"] = ":".join(self.backup_servers)
        if self.mount_options:
            ctx["mountOptions"] = ",".join(self.mount_options)
        return ctx


def parse_params(params: dict[str, str]) -> Params:
    unknown = sorted(k for k in params if k not in PARAMETERS and not k.startswith("csi.storage.k8s.io/"))
    if unknown:
        raise invalid(f"unknown StorageClass parameter(s) {', '.join(unknown)} (known: {', '.join(sorted(PARAMETERS))})")
    backend = params.get("backend", "subdir") or "subdir"
    if backend != "subdir":
        raise invalid(f"backend {backend!r} is not implemented (only 'subdir')")
    pool_text = params.get("pool", "")
    if not pool_text:
        raise invalid("StorageClass parameter 'pool' (SERVER:/VOLUME) is required for the subdir backend")
    pool = check_source(pool_text, "parameter 'pool'")
    if pool.count(":/") != 1 or "/" in pool.split(":/", 1)[1]:
        raise invalid(f"parameter 'pool': {pool_text!r} must name a whole volume, SERVER:/VOLUME")
    try:
        mode = int(params.get("dirMode", "0777"), 8)
    except ValueError:
        raise invalid(f"parameter 'dirMode': {params['dirMode']!r} is not an octal mode") from None
    if not 0 <= mode <= 0o7777:
        raise invalid(f"parameter 'dirMode': {params['dirMode']!r} is out of range")
    opts = tuple(split_list(params.get("mountOptions", "")))
    volume_from(pool, {"mountOptions": ",".join(opts)})  # same checks as the nodes make
    return Params(pool, parse_backup_servers(params.get("backupServers", "")), opts, mode)


def parse_id(volume_id: str) -> tuple[str, str] | None:
    """``(pool, dir)`` of a volume id this controller makes, or None for any other id."""
    if not volume_id.startswith(SUBDIR_PREFIX):
        return None
    try:
        source = check_source(volume_id[len(SUBDIR_PREFIX):])
    except CsiError:
        return None
    pool, _, sub = source.rpartition("/")
    if ":/" not in pool or "/" in pool.split(":/", 1)[1] or not sub or sub.startswith("."):
        return None
    return pool, sub


def check_capacity(cr: Any) -> tuple[int, int]:
    required, limit = cr.required_bytes, cr.limit_bytes
    if required < 0 or limit < 0:
        raise invalid("capacity_range: bytes must not be negative")
    if limit and required > limit:
        raise invalid(f"capacity_range: required_bytes {required} exceeds limit_bytes {limit}")
    return required, limit


# ------------------------------------------------------------------------------------------------
# the controller's mounts of pools


class PoolMounts:
    """One gfuse mount per pool under ``base``, made on first use, checked before each use.

    :meth:`get` answers ``/proc/self/fd/N``, a directory fd opened on the mount's root right after
    mounting: everything the controller writes goes to the pool even if the mount is detached
    underneath it (``umount -l`` by someone, a repair), never into the local directory the mount
    covered. Fds of replaced mounts are retired, not closed, until :meth:`close` (a closed number
    could be reused while another RPC still works through it).
    """

    def __init__(self, base: str, mounter: str = "private", agent: AgentClient | None = None,
                 timeout: float = 60.0) -> None:
        if mounter not in ("private", "agent"):
            raise ValueError(f"pool mounter must be 'private' or 'agent', not {mounter!r}")
        if mounter == "agent" and agent is None:
            raise ValueError("the agent pool mounter needs an agent client")
        self.base = Path(base) / "pools"
        self.mounter = mounter
        self.agent = agent
        self.timeout = timeout
        self._locks: dict[str, threading.Lock] = {}
        self._fds: dict[str, int] = {}
        self._retired: list[int] = []
        self._mu = threading.Lock()
        self._inflight: dict[str, threading.Thread] = {}
        self._inflight_mu = threading.Lock()

    def path(self, pool: str) -> str:
        return str(self.base / hashlib.sha256(pool.encode()).hexdigest()[:16])

    def _alive(self, path: str, fd: int) -> bool:
        m = mount_at(path)
        if m is None or not m.fstype.startswith("fuse"):
            log.warning("pool mount %s is gone (%s)", path, "unmounted" if m is None else f"covered by {m.fstype}")
            return False
        try:
            st = bounded(path, lambda: os.fstat(fd), 5.0, self._inflight, self._inflight_mu)
        except (OSError, CsiError) as e:
            log.warning("pool mount %s is dead (%s)", path, getattr(e, "message", None) or e)
            return False
        if f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" != m.dev:
            log.warning("pool mount %s was replaced underneath (device %s, fd on %d:%d)", path, m.dev,
                        os.major(st.st_dev), os.minor(st.st_dev))
            return False
        return True

    def get(self, pool: str, backup_servers: tuple[str, ...] = ()) -> Path:
        """The root of ``pool`` as ``/proc/self/fd/N``; mounts it (again) if needed."""
        path = self.path(pool)
        with self._mu:
            lock = self._locks.setdefault(path, threading.Lock())
        with lock:
            fd = self._fds.get(path)
            if fd is not None:
                if self._alive(path, fd):
                    return Path(f"/proc/self/fd/{fd}")
                with self._mu:
                    self._retired.append(self._fds.pop(path))
            if mount_at(path) is not None:  # ours from before a restart, or dead: start afresh
                self._unmount(path)
            os.makedirs(path, exist_ok=True)
            self._mount(pool, path, backup_servers)
            m = mount_at(path)
            if m is None or not m.fstype.startswith("fuse"):
                raise CsiError(grpc.StatusCode.INTERNAL, f"the pool {pool} is not mounted at {path} after mounting")
            try:
                fd = bounded(path, lambda: os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC),
                             self.timeout, self._inflight, self._inflight_mu)
            except OSError as e:
                raise CsiError(grpc.StatusCode.UNAVAILABLE, f"the pool mount {path} of {pool}: {e}") from None
            with self._mu:
                self._fds[path] = fd
            if not self._alive(path, fd):
                raise CsiError(grpc.StatusCode.UNAVAILABLE, f"the pool mount {path} of {pool} died at once")
            return Path(f"/proc/self/fd/{fd}")

    def _mount(self, pool: str, path: str, backup_servers: tuple[str, ...]) -> None:
        opts = []
        if backup_servers:
            opts.append("backup-volfile-servers=" + ":".join(backup_servers))
        log.info("mounting pool %s at %s (%s)", pool, path, self.mounter)
        if self.mounter == "agent":
            assert self.agent is not None
            try:
                self.agent.mount(pool, path, options=opts, timeout=self.timeout,
                                 context={"csi.role": "controller-pool"})
            except AgentError as e:
                raise agent_error(e, f"mounting the pool {pool}") from None
            return
        cmd = [sys.executable, "-m", "gfuse.cli", "mount", pool, path, "--timeout", str(max(1.0, self.timeout - 5))]
        if opts:
            cmd += ["-o", ",".join(opts)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise CsiError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"mounting the pool {pool}: no answer within {self.timeout:g}s") from None
        if p.returncode != 0:
            msg = (p.stderr or p.stdout).strip().splitlines()
            raise CsiError(grpc.StatusCode.UNAVAILABLE,
                           f"mounting the pool {pool} failed: {msg[-1] if msg else p.returncode}")

    def _unmount(self, path: str) -> None:
        if self.mounter == "agent" and self.agent is not None:
            with contextlib.suppress(AgentError):
                self.agent.unmount(path, timeout=self.timeout)
        with contextlib.suppress(CsiError):
            unmount_all(path, "pool mount")

    def close(self) -> None:
        """Unmount every pool (at shutdown)."""
        with self._mu:
            fds = list(self._fds.values()) + self._retired
            self._fds.clear()
            self._retired.clear()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if not self.base.is_dir():
            return
        for entry in sorted(self.base.iterdir()):
            p = str(entry)
            if mount_at(p) is not None:
                log.info("unmounting pool mount %s", p)
                self._unmount(p)
            with contextlib.suppress(OSError):
                os.rmdir(p)


# ------------------------------------------------------------------------------------------------
# records


def _write_json(path: Path, data: dict[str, Any]) -> None:
    jsonfile.write_atomic(path, data)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return jsonfile.read(path)
    except ValueError as e:
        raise CsiError(grpc.StatusCode.INTERNAL, f"{path}: corrupt volume record: {e}") from None


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, driver_name: str, pools: PoolMounts) -> None:
        self.driver_name = driver_name
        self.pools = pools
        self.locks = OpLocks()

    def _volume(self, rec: dict[str, Any]) -> Any:
        return csi_pb2.Volume(volume_id=rec["volume_id"], capacity_bytes=int(rec.get("capacity_bytes", 0)),
                              volume_context=rec.get("context", {}))

    @staticmethod
    def _meta(root: Path) -> Path:
        d = root / META_DIR / "volumes"
        if not d.is_dir():
            d.mkdir(parents=True, exist_ok=True)
            (root / META_DIR).chmod(0o700)
        return d

    # -- create / delete -----------------------------------------------------------------------

    @rpc
    def CreateVolume(self, request, context):  # noqa: N802 - gRPC names
        require(request.name, "name")
        if len(request.volume_capabilities) == 0:
            raise invalid("volume_capabilities is required")
        for i, cap in enumerate(request.volume_capabilities):
            check_capability(cap, f"volume_capabilities[{i}]")
        if request.HasField("volume_content_source"):
            raise invalid("volume_content_source (snapshots, clones) is not supported")
        required, limit = check_capacity(request.capacity_range)
        params = parse_params(dict(request.parameters))
        dirname = dir_name(request.name)
        volume_id = f"{SUBDIR_PREFIX}{params.pool}/{dirname}"
        if len(volume_id.encode()) > MAX_ID_BYTES:
            raise invalid(f"the volume id {volume_id!r} would exceed {MAX_ID_BYTES} bytes: use a shorter pool name")
        capacity = required or limit
        with self.locks.hold("name:" + request.name, "volume:" + volume_id):
            root = self.pools.get(params.pool, params.backup_servers)
            rec_path = self._meta(root) / f"{dirname}.json"
            rec = _read_json(rec_path)
            if rec is not None:
                self._check_compatible(rec, request.name, params, required, limit)
            elif os.path.lexists(root / dirname):
                # the record is written before the directory: a directory without one is not ours
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                               f"{params.pool} already has a /{dirname} that is not a volume of this driver; "
                               f"not taking it over")
            else:
                rec = {"name": request.name, "volume_id": volume_id, "pool": params.pool, "dir": dirname,
                       "capacity_bytes": capacity, "context": params.context(dirname),
                       "parameters": dict(request.parameters), "driver": self.driver_name,
                       "created": time.time(), "state": "creating"}
                _write_json(rec_path, rec)
            if rec.get("state") != "ready":
                vdir = root / dirname
                log.info("creating volume %s (%s) as %s, %d bytes", request.name, volume_id, vdir, capacity)
                try:
                    vdir.mkdir(mode=0o700)
                except FileExistsError:
                    pass
                os.chmod(vdir, params.dir_mode)
                rec["state"] = "ready"
                _write_json(rec_path, rec)
        return csi_pb2.CreateVolumeResponse(volume=self._volume(rec))

    @staticmethod
    def _check_compatible(rec: dict[str, Any], name: str, params: Params, required: int, limit: int) -> None:
        def conflict(why: str) -> CsiError:
            return CsiError(grpc.StatusCode.ALREADY_EXISTS, f"volume {name!r} exists with {why}")

        if rec.get("name") != name:
            raise conflict(f"a directory that belongs to volume {rec.get('name')!r}")
        if rec.get("pool") != params.pool or rec.get("context") != params.context(rec["dir"]):
            raise conflict(f"other parameters (pool {rec.get('pool')}, context {rec.get('context')})")
        cap = int(rec.get("capacity_bytes", 0))
        if (required and cap < required) or (limit and cap > limit):
            raise conflict(f"capacity {cap} bytes, outside the requested range "
                           f"[{required or 0}, {limit or 'unlimited'}]")

    @rpc
    def DeleteVolume(self, request, context):  # noqa: N802
        require(request.volume_id, "volume_id")
        parsed = parse_id(request.volume_id)
        if parsed is None:
            log.info("delete %s: not a volume of this controller; nothing to do", request.volume_id)
            return csi_pb2.DeleteVolumeResponse()
        pool, dirname = parsed
        with self.locks.hold("volume:" + request.volume_id):
            root = self.pools.get(pool)
            rec_path = root / META_DIR / "volumes" / f"{dirname}.json"
            rec = _read_json(rec_path)
            if rec is None or rec.get("volume_id") != request.volume_id:
                log.info("delete %s: no record on the pool; already deleted", request.volume_id)
                return csi_pb2.DeleteVolumeResponse()
            trash = root / META_DIR / "trash"
            trash.mkdir(exist_ok=True)
            vdir = root / dirname
            log.info("deleting volume %s (%s)", rec.get("name"), request.volume_id)
            if vdir.exists():
                os.rename(vdir, trash / f"{dirname}.{int(time.time())}.{secrets.token_hex(3)}")
            os.unlink(rec_path)
            self._empty_trash(trash)
        return csi_pb2.DeleteVolumeResponse()

    @staticmethod
    def _empty_trash(trash: Path) -> None:
        for entry in trash.iterdir():
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError as e:
                log.warning("cannot remove %s from the trash yet: %s", entry, e)

    # -- the rest ------------------------------------------------------------------------------

    def _record(self, volume_id: str) -> tuple[Path, dict[str, Any]]:
        parsed = parse_id(volume_id)
        if parsed is None:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {volume_id!r} was not made by this controller")
        pool, dirname = parsed
        root = self.pools.get(pool)
        rec_path = root / META_DIR / "volumes" / f"{dirname}.json"
        rec = _read_json(rec_path)
        if rec is None or rec.get("volume_id") != volume_id or rec.get("state") != "ready":
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {volume_id!r} does not exist")
        return rec_path, rec

    @rpc
    def ValidateVolumeCapabilities(self, request, context):  # noqa: N802
        require(request.volume_id, "volume_id")
        if len(request.volume_capabilities) == 0:
            raise invalid("volume_capabilities is required")
        if parse_id(request.volume_id) is not None:
            self._record(request.volume_id)  # NOT_FOUND if it is gone
        else:
            volume_from(request.volume_id, request.volume_context)  # a static volume: NOT_FOUND if none
        for cap in request.volume_capabilities:
            why = unsupported_capability(cap)
            if why:
                return csi_pb2.ValidateVolumeCapabilitiesResponse(message=why)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
            ))

    @rpc
    def ControllerExpandVolume(self, request, context):  # noqa: N802
        require(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise invalid("capacity_range is required")
        required, limit = check_capacity(request.capacity_range)
        if not required and not limit:
            raise invalid("capacity_range: required_bytes or limit_bytes must be set")
        with self.locks.hold("volume:" + request.volume_id):
            rec_path, rec = self._record(request.volume_id)
            cap = int(rec.get("capacity_bytes", 0))
            new = max(cap, required or limit)
            if limit and new > limit:
                raise CsiError(grpc.StatusCode.OUT_OF_RANGE,
                               f"volume is already {cap} bytes, more than limit_bytes {limit} (no shrinking)")
            if new != cap:
                log.info("expanding volume %s from %d to %d bytes", request.volume_id, cap, new)
                rec["capacity_bytes"] = new
                rec["expanded"] = time.time()
                _write_json(rec_path, rec)
        return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=new, node_expansion_required=False)

    @rpc
    def ControllerGetCapabilities(self, request, context):  # noqa: N802
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=CtrlRPC(type=t))
            for t in (CtrlRPC.CREATE_DELETE_VOLUME, CtrlRPC.EXPAND_VOLUME)
        ])

