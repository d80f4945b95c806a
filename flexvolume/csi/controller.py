"""CSI Controller service: volumes made by the provisioning backends of :mod:`flexvolume.storage`.

CreateVolume / DeleteVolume / ControllerExpandVolume / ValidateVolumeCapabilities are the CSI face of
:class:`flexvolume.storage.api.Backend`, the API the FlexVolume provisioner uses too: ``subdir``
(a directory of a pool volume whose size is a gluster directory quota, enforced by the bricks:
writes past it fail with EDQUOT; expansion raises the limit) and ``volume`` (a gluster volume per
PV, bricks from the brick pools registered on the cluster, replicas on distinct nodes, its size a
quota on the volume's root). The controller keeps no state of its own: what the backends record
on the cluster is the only record, so their crash safety is the controller's.

StorageClass parameters (CreateVolume ``parameters``)
-----------------------------------------------------
``backend``
    ``subdir`` (default) or ``volume``.
``pool``
    subdir: the pool volume, ``SERVER[:PORT]:/VOLUME`` (``SERVER`` is what nodes fetch the
    volfile from) or ``VOLUME``; default ``gfuse-csi --pool``. The volume backend ignores it: its
    bricks come from the brick pools registered on the controller's ``--pool`` volume.
``backupServers``
    subdir: other glusterd hosts for the volfile, ``h2:h3`` (default: the pool's other brick hosts).
``dirMode``
    subdir: octal mode of a new volume directory (default ``0777``: pods need not run as root); the
    older name of ``mode``.
``uid``, ``gid``, ``mode``
    both: owner, group (decimal, 0..4294967294) and octal mode (permission bits, setgid, sticky; no
    setuid) of the PV's root, set by the backend at provisioning (volume backend: default root 0755).
``replica``
    volume: replica count (default 3); more than the nodes with brick pools is RESOURCE_EXHAUSTED.
``volumeOptions``
    volume: gluster options of the new volume, ``k=v,k=v``.
``mountOptions``
    extra ``gfuse mount -o`` items the nodes use (volume context); the controller's own.

Unknown parameters are INVALID_ARGUMENT (``csi.storage.k8s.io/*`` ones are ignored). All parameters
but ``mountOptions`` go to :func:`flexvolume.storage.backends.backend_for` unchanged.

Names and volume ids
--------------------
The backends get :func:`backend_name` of the CreateVolume name: the name itself when both backends
use it unchanged (``pvc-<uid>``), else ``csi-sha-<sha256>``. So the id gives the name back:

- subdir: ``subdir:SERVER:/POOL/<name>`` — the directory ``/<name>`` of the pool; nodes mount it.
- volume: ``volume:SERVER:/gfuse_<name>`` — the gluster volume; ``SERVER`` is its first brick's host.

The volume context carries ``source``, ``backupServers`` and ``mountOptions`` for the nodes.

Volumes of the controller before it used the backends (issue 5) had the same subdir ids, a record
in ``/.gfuse-csi/volumes/<dir>.json`` on the pool and no quota. Any RPC on such an id (or a
CreateVolume of its name) first **adopts** it (:meth:`SubdirBackend.adopt
<flexvolume.storage.backends.SubdirBackend.adopt>`: the backend's record, marker and a quota of
the recorded size, none if it had none), then removes the old record (and the old trash of a
delete that crashed halfway); from then on it is an ordinary subdir volume.

Capacity: ``required_bytes``, else ``limit_bytes``, else :data:`DEFAULT_CAPACITY`. CreateVolume of
an existing name answers that volume if its size is within the requested range, else ALREADY_EXISTS
(other parameters are not compared: the backends do not record them). Expansion never shrinks;
a ``limit_bytes`` below the current size is OUT_OF_RANGE.

Errors: :data:`flexvolume.csi.volumes.STORAGE_CODES` maps each StorageError reason to a gRPC code
(pool full → RESOURCE_EXHAUSTED, glusterd unreachable → UNAVAILABLE, …); the message is the
backend's, with the reason in brackets.

One glusterd per controller: it reaches glusterd by running ``--gluster-command`` on
``--glusterd-socket`` (see :mod:`flexvolume.storage.glusterd`), so every pool must belong to that
cluster. Pools are mounted under ``--state-dir``/pools, by the controller's own ``gfuse mount``
(default) or by the node agent (``--pool-mounter agent``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shlex
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gfuse import jsonfile
from ..agentclient import AgentClient, AgentError
from ..storage.api import Backend, ProvisionedVolume, StorageError
from ..storage.backends import VOLUME_PREFIX as GLUSTER_VOLUME_PREFIX
from ..storage.backends import (
    GfuseMounter,
    SubdirBackend,
    backend_for,
    dir_name,
    volume_name,
)
from ..storage.glusterd import Glusterd
from .stubs import csi_pb2, csi_pb2_grpc
from .volumes import (
    MAX_ID_BYTES,
    SUBDIR_PREFIX,
    VOLUME_PREFIX,
    CsiError,
    OpLocks,
    check_capability,
    check_mount_options,
    check_source,
    invalid,
    parse_backup_servers,
    require,
    rpc,
    unsupported_capability,
    volume_from,
)

log = logging.getLogger(__name__)

CtrlRPC = csi_pb2.ControllerServiceCapability.RPC
#: StorageClass parameters of the controller itself (the volume context); all others are the backends'
CONTEXT_PARAMETERS = frozenset({"mountOptions"})
#: the size of a volume whose CreateVolume has no capacity range
DEFAULT_CAPACITY = 1 << 30
HASHED = "csi-sha-"
#: where the controller kept its records before it used the storage backends
LEGACY_META = ".gfuse-csi"


def backend_name(name: str) -> str:
    """The backends' name of a CreateVolume name: the name when both backends use it unchanged as
    directory and volume name (``pvc-<uid>``), else ``csi-sha-<sha256 of the name>`` (which they
    do). Pure and injective, so a retry finds the volume and the volume id gives the name back."""
    if dir_name(name) == name and volume_name(name, "") == name and not name.startswith(HASHED):
        return name
    return HASHED + hashlib.sha256(name.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class VolumeRef:
    """What a volume id of this controller names."""

    kind: str    # "subdir" | "volume"
    name: str    # the backends' name
    pool: str    # subdir: SERVER:/POOL; volume: ""


def parse_id(volume_id: str, volume_prefix: str = GLUSTER_VOLUME_PREFIX) -> VolumeRef | None:
    """The volume an id of this controller names, or None for any other id."""
    found = next(((p, k) for p, k in ((SUBDIR_PREFIX, "subdir"), (VOLUME_PREFIX, "volume"))
                  if volume_id.startswith(p)), None)
    if found is None:
        return None
    prefix, kind = found
    try:
        source = check_source(volume_id[len(prefix):])
    except CsiError:
        return None
    server, _, path = source.rpartition(":/")
    if kind == "subdir":
        pool, _, name = path.partition("/")
        if not pool or not name or "/" in name or dir_name(name) != name:
            return None
        return VolumeRef(kind, name, f"{server}:/{pool}")
    name = path[len(volume_prefix):]
    if "/" in path or not path.startswith(volume_prefix) or not name or volume_name(name, volume_prefix) != path:
        return None
    return VolumeRef(kind, name, "")


def check_capacity(cr: Any) -> tuple[int, int]:
    required, limit = cr.required_bytes, cr.limit_bytes
    if required < 0 or limit < 0:
        raise invalid("capacity_range: bytes must not be negative")
    if limit and required > limit:
        raise invalid(f"capacity_range: required_bytes {required} exceeds limit_bytes {limit}")
    return required, limit


def split_params(params: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(the volume context's parameters, the backend's parameters), the formats checked that the
    backends take as given (pool, backupServers, mountOptions)."""
    context = {k: v for k, v in params.items() if k in CONTEXT_PARAMETERS}
    backend = {k: v for k, v in params.items() if k not in CONTEXT_PARAMETERS}
    check_mount_options(context.get("mountOptions", ""), "parameter 'mountOptions'")
    if backend.get("pool"):
        text = backend["pool"]
        if ":/" in text:
            text = check_source(text, "parameter 'pool'")
            if "/" in text.rpartition(":/")[2]:
                raise invalid(f"parameter 'pool': {backend['pool']!r} must name a whole volume, SERVER:/VOLUME")
        elif volume_name(text, "") != text:
            raise invalid(f"parameter 'pool': {text!r} is neither SERVER:/VOLUME nor a volume name")
        backend["pool"] = text
    if backend.get("backupServers"):
        backend["backupServers"] = ":".join(parse_backup_servers(backend["backupServers"], "parameter 'backupServers'"))
    return context, backend


# ------------------------------------------------------------------------------------------------
# the backends of this controller


class AgentMounter(GfuseMounter):
    """Pool mounts made by the node agent (``--pool-mounter agent``): they are the agent's, repaired
    by it, and released when the controller stops."""

    def __init__(self, agent: AgentClient, timeout: float = 60.0) -> None:
        super().__init__(timeout=timeout)
        self.agent = agent

    def _mount(self, source: str, path: Path, opts: Any) -> None:
        try:
            self.agent.mount(source, str(path), options=list(opts), timeout=self.timeout,
                             context={"csi.role": "controller-pool"})
        except AgentError as e:
            raise StorageError("pool-unavailable", f"the gfuse agent cannot mount the pool {source}: {e}") from None

    def unmount(self, path: Path) -> None:
        with contextlib.suppress(AgentError):
            self.agent.unmount(str(path), timeout=self.timeout)
        super().unmount(path)


class Backends:
    """The storage of one controller: one glusterd (so one cluster), the backends StorageClass
    parameters ask for (one per pool, sharing its mount under ``state_dir``/pools)."""

    def __init__(self, glusterd: Glusterd, state_dir: str | Path, pool: str | None = None,
                 mounter: GfuseMounter | None = None) -> None:
        self.glusterd = glusterd
        self.state_dir = Path(state_dir)
        self.pool = pool
        self.mounter = mounter or GfuseMounter()
        self._cache: dict[Any, Backend] = {}
        self._mu = threading.Lock()

    def for_params(self, params: Mapping[str, str]) -> Backend:
        registry = self.pool.rpartition(":/")[2] if self.pool else None
        with self._mu:
            return backend_for(params, glusterd=self.glusterd, pool=registry if params.get("backend") == "volume"
                               else self.pool, state_dir=self.state_dir, mounter=self.mounter, _cache=self._cache)

    def of(self, ref: VolumeRef) -> Backend:
        return self.for_params({"backend": ref.kind, **({"pool": ref.pool} if ref.pool else {})})

    def close(self) -> None:
        """Unmount every pool (at shutdown)."""
        with self._mu:
            backends = list(self._cache.values())
        for b in backends:
            if isinstance(b, SubdirBackend):
                try:
                    b.close()
                except Exception:  # shutting down anyway
                    log.exception("unmounting the pool %s failed", b.pool)


def backends_from_args(args: Any, agent: AgentClient | None = None) -> Backends:
    """The controller's storage from gfuse-csi's command line."""
    mounter = AgentMounter(agent, args.mount_timeout) if args.pool_mounter == "agent" and agent is not None \
        else GfuseMounter(timeout=args.mount_timeout)
    glusterd = Glusterd(args.glusterd_socket or None, command=shlex.split(args.gluster_command))
    return Backends(glusterd, args.state_dir, args.pool, mounter)


# ------------------------------------------------------------------------------------------------


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, driver_name: str, backends: Backends) -> None:
        self.driver_name = driver_name
        self.backends = backends
        self.locks = OpLocks()

    @staticmethod
    def _volume(pv: ProvisionedVolume, context_params: Mapping[str, str]) -> Any:
        prefix = SUBDIR_PREFIX if pv.backend == "subdir" else VOLUME_PREFIX
        context = {"source": pv.source}
        if pv.backup_servers:
            context["backupServers"] = ":".join(pv.backup_servers)
        opts = check_mount_options(context_params.get("mountOptions", ""))
        if opts:
            context["mountOptions"] = ",".join(opts)
        return csi_pb2.Volume(volume_id=prefix + check_source(pv.source), capacity_bytes=pv.size_bytes,
                              volume_context=context)

    # -- volumes of the controller before issue 5 ------------------------------------------------

    @staticmethod
    def _adopt_legacy(backend: SubdirBackend, d: str, csi_name: str | None = None) -> bool:
        """If ``/<d>`` of the pool has a record of the earlier controller, make it the backend's
        volume ``d`` (see the module docstring). Each step is redone by a retry after a crash: the
        old record goes last."""
        root = backend.root()
        meta = root / LEGACY_META
        if not meta.is_dir():
            return False
        rec_path = meta / "volumes" / f"{d}.json"
        try:
            rec = jsonfile.read(rec_path)
        except ValueError as e:
            raise CsiError(grpc.StatusCode.INTERNAL, f"{rec_path}: corrupt volume record: {e}") from None
        if rec is None or rec.get("dir", d) != d or (csi_name is not None and rec.get("name") != csi_name):
            return False
        made = (root / d).is_dir()
        if made:  # ready, or a create that got as far as its mkdir
            backend.adopt(d, int(rec.get("capacity_bytes") or 0))
        # else a create that crashed before its mkdir, or a delete after moving the directory to the trash
        trash = meta / "trash"
        for entry in (trash.iterdir() if trash.is_dir() else ()):
            if entry.name.rsplit(".", 2)[0] == d:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        rec_path.unlink(missing_ok=True)
        log.info("volume %s of the earlier controller: %s", d, "adopted" if made else "its record removed")
        return made

    def _backend_of(self, ref: VolumeRef) -> Backend:
        backend = self.backends.of(ref)
        if isinstance(backend, SubdirBackend):
            self._adopt_legacy(backend, ref.name)
        return backend

    # -- create / delete -----------------------------------------------------------------------

    @rpc
    def CreateVolume(self, request, context):
        require(request.name, "name")
        if len(request.volume_capabilities) == 0:
            raise invalid("volume_capabilities is required")
        for i, cap in enumerate(request.volume_capabilities):
            check_capability(cap, f"volume_capabilities[{i}]")
            # the StorageClass's mountOptions: refused here, before anything is made, as NodeStage would
            check_mount_options(list(cap.mount.mount_flags), f"volume_capabilities[{i}].mount.mount_flags "
                                                             f"(the StorageClass's mountOptions)")
        if request.HasField("volume_content_source"):
            raise invalid("volume_content_source (snapshots, clones) is not supported")
        required, limit = check_capacity(request.capacity_range)
        context_params, params = split_params(request.parameters)
        with self.locks.hold("name:" + request.name):
            backend = self.backends.for_params(params)
            name = backend_name(request.name)
            size = required or limit or DEFAULT_CAPACITY
            if (isinstance(backend, SubdirBackend) and name != request.name and dir_name(request.name) == request.name
                    and self._adopt_legacy(backend, request.name, request.name)):
                name = request.name  # the earlier controller's directory of a name with a dot
            try:
                pv = backend.create(name, size, params)
            except StorageError as e:
                # the earlier controller's directory of this name (no marker): adopt it, then it is ours
                if not (e.reason == "name-conflict" and isinstance(backend, SubdirBackend)
                        and self._adopt_legacy(backend, name, request.name)):
                    raise
                pv = backend.create(name, size, params)
            volume = self._volume(pv, context_params)
            if len(volume.volume_id.encode()) > MAX_ID_BYTES:
                backend.delete(name)
                raise invalid(f"the volume id {volume.volume_id!r} exceeds {MAX_ID_BYTES} bytes: use shorter "
                              f"server or pool names")
        if pv.size_bytes < required or (limit and pv.size_bytes > limit):
            raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                           f"volume {request.name!r} exists with {pv.size_bytes} bytes, outside the requested range "
                           f"[{required}, {limit or 'unlimited'}]")
        return csi_pb2.CreateVolumeResponse(volume=volume)

    @rpc
    def DeleteVolume(self, request, context):
        require(request.volume_id, "volume_id")
        ref = parse_id(request.volume_id)
        if ref is None:
            log.info("delete %s: not a volume of this controller; nothing to do", request.volume_id)
            return csi_pb2.DeleteVolumeResponse()
        with self.locks.hold("id:" + request.volume_id):
            self._backend_of(ref).delete(ref.name)
        return csi_pb2.DeleteVolumeResponse()

    # -- the rest ------------------------------------------------------------------------------

    def _get(self, volume_id: str) -> tuple[VolumeRef, Backend, ProvisionedVolume]:
        ref = parse_id(volume_id)
        if ref is None:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {volume_id!r} was not made by this controller")
        backend = self._backend_of(ref)
        pv = backend.get(ref.name)
        if pv is None:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {volume_id!r} does not exist")
        return ref, backend, pv

    @rpc
    def ValidateVolumeCapabilities(self, request, context):
        require(request.volume_id, "volume_id")
        if len(request.volume_capabilities) == 0:
            raise invalid("volume_capabilities is required")
        if parse_id(request.volume_id) is not None:
            with self.locks.hold("id:" + request.volume_id):
                self._get(request.volume_id)  # NOT_FOUND if it is gone
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
    def ControllerExpandVolume(self, request, context):
        require(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise invalid("capacity_range is required")
        required, limit = check_capacity(request.capacity_range)
        if not required and not limit:
            raise invalid("capacity_range: required_bytes or limit_bytes must be set")
        with self.locks.hold("id:" + request.volume_id):
            ref, backend, pv = self._get(request.volume_id)
            new = max(pv.size_bytes, required or limit)
            if limit and new > limit:
                raise CsiError(grpc.StatusCode.OUT_OF_RANGE,
                               f"volume is already {pv.size_bytes} bytes, more than limit_bytes {limit} (no shrinking)")
            if new > pv.size_bytes:
                log.info("expanding volume %s from %d to %d bytes", request.volume_id, pv.size_bytes, new)
                pv = backend.expand(ref.name, new)
        return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=pv.size_bytes, node_expansion_required=False)

    @rpc
    def ControllerGetCapabilities(self, request, context):
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=CtrlRPC(type=t))
            for t in (CtrlRPC.CREATE_DELETE_VOLUME, CtrlRPC.EXPAND_VOLUME)
        ])
