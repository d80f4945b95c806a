"""Provisioning backends: ``SubdirBackend`` (quota'd directories of a pool volume) and ``VolumeBackend``
(one gluster volume per PV, bricks from registered brick pools). Both implement
:class:`flexvolume.storage.api.Backend`; :func:`backend_for` picks one from StorageClass parameters.

Crash safety, in one sentence per backend
-----------------------------------------
* subdir: the **record** ``/.gfuse-provisioner/volumes/<dir>.json`` on the pool is written before
  anything is made and removed after everything is gone; the directory is made under
  ``/.gfuse-provisioner/staging/``, marked (xattr ``trusted.gfuse.pv`` = name, settable by root
  only) and renamed into place atomically; deletion removes the quota limit, renames the
  directory into ``/.gfuse-provisioner/trash/`` and empties it. A retry after a crash at any step
  reads the record and finishes the job; a directory without our marker is never touched.
  ``adopt`` (a directory made before sizes were enforced) goes the same way: record, marker,
  quota, ``ready``.
* volume: the gluster volume name is derived from the PV name (``gfuse_<name>``): the name *is* the
  intent record. glusterd's ``volume create`` is atomic; what follows (options — the size and the
  root's ownership recorded among them —, start, quota, the root's owner and mode through a mount of
  the volume, ``user.gfuse.state=ready``) is re-applied by a retry. A volume with our prefix and no
  ``user.gfuse.pv`` option is a create that crashed right after ``volume create`` and is adopted
  (or deleted). Brick directories are named ``<pool>/<volname>-<random>``, so leftovers of a
  deleted volume are found by name.

Both take the step list they go through (``CREATE_STEPS``/``DELETE_STEPS``/``EXPAND_STEPS``, subdir's
``ADOPT_STEPS``);
with ``GFUSE_STORAGE_CRASH_AT=<kind>.<op>.<step>`` in the environment the process exits
(``os._exit(CRASH_EXIT)``) right after that step, which is how the crash tests kill it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfuse import jsonfile
from .api import Backend, ProvisionedVolume, StorageError
from .glusterd import Brick, Glusterd, VolumeInfo

from gfuse.mounttable import mounts_at

log = logging.getLogger(__name__)

__all__ = [
    "CRASH_ENV",
    "CRASH_EXIT",
    "DEEM_STATFS_KEY",
    "MAX_ID",
    "MODE_BITS",
    "PARAMETERS",
    "VOLUME_PREFIX",
    "BrickPool",
    "BrickPoolRegistry",
    "GfuseMounter",
    "LocalBrickCleaner",
    "Ownership",
    "SubdirBackend",
    "VolumeBackend",
    "backend_for",
    "dir_name",
    "parse_mode",
    "volume_name",
]

CRASH_ENV = "GFUSE_STORAGE_CRASH_AT"
CRASH_EXIT = 86
META = ".gfuse-provisioner"
MARKER_XATTR = "trusted.gfuse.pv"
REGISTRY_KEY = "user.gfuse.brick-pools"
#: the volume backend's gluster volume of a PV named NAME is VOLUME_PREFIX + NAME (see volume_name)
VOLUME_PREFIX = "gfuse_"
DEFAULT_STATE_DIR = "/var/lib/gfuse/provisioner"
#: set on every volume we make *before it first starts*: usage is checked with quotad on every write
#: (gluster's own quota tests do the same). On volumes first started with the defaults (5 s / 60 s),
#: directory limits were not enforced in our runs on glusterfs 10.3 (README, Provisioning).
QUOTA_OPTIONS = {"features.hard-timeout": "0", "features.soft-timeout": "0"}
#: ``gluster volume set VOL group metadata-cache`` (extras/group-metadata-cache: features.cache-invalidation on,
#: features.cache-invalidation-timeout 600, performance.cache-invalidation on, md-cache-timeout 600, ...)
METADATA_CACHE_GROUP = {"group": "metadata-cache"}

#: StorageClass parameters (backend_for checks them; unknown ones are an error the user sees)
PARAMETERS = {
    "backend": "subdir (default) | volume",
    "pool": "subdir: the pool volume, VOLUME or SERVER:/VOLUME (default: the provisioner's pool)",
    "backupServers": "subdir: other glusterd hosts for the volfile, h2:h3 (default: the pool's other brick hosts)",
    "dirMode": "subdir: octal mode of a new volume directory (default 0777); the older name of mode",
    "uid": "both: owner of the PV's root, a number 0..4294967294 (default root)",
    "gid": "both: group of the PV's root, a number 0..4294967294 (default root)",
    "mode": "both: octal mode of the PV's root, permission bits with setgid/sticky, e.g. 0770 or 2775 "
            "(default: subdir 0777, volume as gluster makes it, 0755)",
    "replica": "volume: replica count (default 3)",
    "volumeOptions": "volume: gluster volume options, k=v,k=v",
}
#: statfs of a directory (or the root) with a quota limit answers the limit as the size: ``df`` in a pod
#: shows the PV's size. ``volume quota enable`` turns it on (glusterfs >= 3.7); set wherever we set a limit,
#: in case the pool's admin turned it off.
DEEM_STATFS_KEY = "features.quota-deem-statfs"
#: the largest uid/gid a StorageClass may give (``(uid_t)-1`` means "unchanged" to chown)
MAX_ID = (1 << 32) - 2
#: the mode bits a PV's root may get: permissions, setgid (new entries inherit the group) and sticky;
#: never setuid (meaningless on a directory, and never anything a StorageClass should set)
MODE_BITS = 0o3777
#: how a PV's ownership is recorded on a volume of the volume backend (JSON of Ownership.to_json)
OWNER_KEY = "user.gfuse.owner"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
_SAFE_VOLNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
_OPTION_KEY = re.compile(r"^[a-z][a-z0-9_.-]*$")


def dir_name(name: str) -> str:
    """The pool directory of a PV name: the name itself when it is a safe file name (``pvc-<uid>``),
    else ``sha-<hash>``. Pure: the same name always gives the same directory, two names never one."""
    if _SAFE_NAME.match(name) and not name.startswith("sha-"):
        return name
    return "sha-" + hashlib.sha256(name.encode()).hexdigest()[:40]


def volume_name(name: str, prefix: str = VOLUME_PREFIX) -> str:
    """The gluster volume of a PV name (``gfuse_pvc-<uid>``), same rules as :func:`dir_name`."""
    if _SAFE_VOLNAME.match(name) and not name.startswith("sha-"):
        return prefix + name
    return prefix + "sha-" + hashlib.sha256(name.encode()).hexdigest()[:40]


def _step(kind: str, op: str, step: str) -> None:
    log.debug("%s %s: %s done", kind, op, step)
    if os.environ.get(CRASH_ENV) == f"{kind}.{op}.{step}":
        log.warning("%s=%s: exiting now", CRASH_ENV, os.environ[CRASH_ENV])
        os._exit(CRASH_EXIT)


def _check_size(size_bytes: int) -> int:
    try:
        size = int(size_bytes)
    except (TypeError, ValueError):
        raise StorageError("invalid-parameters", f"size {size_bytes!r} is not a number of bytes") from None
    if size <= 0:
        raise StorageError("invalid-parameters", f"size must be positive, got {size}")
    return size


def _shown(value: str) -> str:
    """A parameter's value for a one-line message: quoted, escapes for control characters, at most 40 chars."""
    return repr(value if len(value) <= 40 else value[:40] + "...")


def _parse_id(key: str, value: str) -> int:
    if re.fullmatch(r"[0-9]{1,10}", value) is None or int(value) > MAX_ID:
        what = "user" if key == "uid" else "group"
        raise StorageError("invalid-parameters",
                           f"StorageClass parameter {key} {_shown(value)} is not a {what} id: give a decimal number "
                           f"0..{MAX_ID}, e.g. \"1000\"")
    return int(value)


def parse_mode(key: str, value: str) -> int:
    """The mode of an octal string (3 or 4 digits, a leading 0 allowed: ``0770``, ``2775``); StorageError
    ``invalid-parameters`` naming ``key`` for anything else, setuid included."""
    if re.fullmatch(r"0?[0-7]{3,4}", value) is None:
        raise StorageError("invalid-parameters",
                           f"StorageClass parameter {key} {_shown(value)} is not an octal mode: give 3 or 4 octal "
                           f"digits, e.g. \"0770\" (permission bits, setgid 2000, sticky 1000)")
    mode = int(value, 8)
    if mode & ~MODE_BITS:
        raise StorageError("invalid-parameters",
                           f"StorageClass parameter {key} {_shown(value)} sets setuid (4000), which a PV's root may "
                           f"not have: give permission bits with setgid 2000 or sticky 1000, e.g. \"0770\"")
    return mode


@dataclass(frozen=True)
class Ownership:
    """Owner, group and mode of a PV's root (StorageClass ``uid``, ``gid``, ``mode``); None: as made.

    Applied at provisioning through the provisioner's own client mount (subdir: the pool's; volume: a
    mount of the new volume), as root; nothing of it reaches the provisioner's host but through that
    mount. chown before chmod (a chown may clear setgid)."""

    uid: int | None = None
    gid: int | None = None
    mode: int | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, str], *, aliases: Sequence[str] = ()) -> Ownership:
        """The ownership asked for; StorageError ``invalid-parameters`` (one line naming the parameter) for a
        bad value. ``aliases``: older names of ``mode`` (subdir's ``dirMode``); two names with different
        modes are an error."""
        uid = _parse_id("uid", params["uid"]) if params.get("uid") else None
        gid = _parse_id("gid", params["gid"]) if params.get("gid") else None
        modes = {k: parse_mode(k, params[k]) for k in ("mode", *aliases) if params.get(k)}
        if len(set(modes.values())) > 1:
            raise StorageError("invalid-parameters",
                               "StorageClass parameters " + " and ".join(f"{k} {params[k]!r}" for k in modes)
                               + " disagree: give only mode")
        return cls(uid, gid, next(iter(modes.values()), None))

    def __bool__(self) -> bool:
        return not (self.uid is None and self.gid is None and self.mode is None)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in (("uid", self.uid), ("gid", self.gid),
                                  ("mode", None if self.mode is None else f"{self.mode:04o}")) if v is not None}

    @classmethod
    def from_json(cls, data: Any) -> Ownership:
        """Ownership.to_json's output read back (a record we wrote); StorageError if it is not one."""
        try:
            if not isinstance(data, dict) or set(data) - {"uid", "gid", "mode"}:
                raise ValueError(data)
            return cls.from_params({k: str(v) for k, v in data.items()})
        except (ValueError, StorageError) as e:
            raise StorageError("gluster-error", f"recorded ownership {data!r} is not one we write ({e}); "
                                                f"fix or remove it by hand") from None

    def apply(self, fd: int) -> None:
        """Set it on the directory open as ``fd`` (then checked: a brick that ignored it is an error)."""
        if self.uid is not None or self.gid is not None:
            os.fchown(fd, -1 if self.uid is None else self.uid, -1 if self.gid is None else self.gid)
        if self.mode is not None:
            os.fchmod(fd, self.mode)
        st = os.fstat(fd)
        got = Ownership(st.st_uid if self.uid is not None else None, st.st_gid if self.gid is not None else None,
                        (st.st_mode & 0o7777) if self.mode is not None else None)
        if got != self:
            raise StorageError("gluster-error", f"the PV's root has {got.to_json()} after setting {self.to_json()}")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


class _Locks:
    """One operation per key at a time: a thread lock and an flock on ``dir/<key>.lock`` (other processes)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._mu = threading.Lock()
        self._held: dict[str, threading.Lock] = {}

    @contextlib.contextmanager
    def hold(self, key: str, timeout: float = 120.0) -> Iterator[None]:
        with self._mu:
            lk = self._held.setdefault(key, threading.Lock())
        if not lk.acquire(timeout=timeout):
            raise StorageError("busy", f"another operation on {key} is in progress; retry")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.dir / f"{key}.lock", "w") as fh:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise StorageError("busy", f"another process works on {key}; retry") from None
                        time.sleep(0.05)
                yield
        finally:
            lk.release()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    jsonfile.write_atomic(path, data)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return jsonfile.read(path)
    except ValueError as e:
        raise StorageError("gluster-error", f"{path}: corrupt record ({e}); fix or remove it by hand") from None


# ------------------------------------------------------------------------------------------------
# mounting the pool


class GfuseMounter:
    """Keeps gfuse mounts for the backends (``gfuse mount SOURCE DIR``, daemonized).

    ``prefix`` runs the command elsewhere (tests: ``nsenter -t PID --net``).
    """

    def __init__(self, prefix: Sequence[str] = (), *, gfuse: Sequence[str] = (sys.executable, "-m", "gfuse.cli"),
                 options: Sequence[str] = (), timeout: float = 60.0) -> None:
        self.prefix = list(prefix)
        self.gfuse = list(gfuse)
        self.options = list(options)
        self.timeout = timeout

    def mounted(self, path: Path, source: str | None = None) -> bool:
        p = os.path.abspath(path)
        return any(source is None or m.source == source for m in mounts_at(p))

    def ensure(self, source: str, path: Path, backup_servers: Sequence[str] = ()) -> Path:
        """``path`` with ``source`` mounted and answering; (re)mounts if needed."""
        path = Path(path)
        if self.mounted(path, source):
            try:
                os.statvfs(path)
                return path
            except OSError as e:
                log.warning("pool mount %s is dead (%s); remounting", path, e)
        if self.mounted(path):
            self.unmount(path)
        path.mkdir(parents=True, exist_ok=True)
        opts = list(self.options)
        if backup_servers:
            opts.append("backup-volfile-servers=" + ":".join(backup_servers))
        self._mount(source, path, opts)
        if not self.mounted(path):
            raise StorageError("pool-unavailable", f"cannot mount the pool {source}: not mounted at {path} afterwards")
        return path

    def _mount(self, source: str, path: Path, opts: Sequence[str]) -> None:
        """Mount ``source`` on ``path`` (a subclass may have someone else do it, e.g. the node agent)."""
        cmd = [*self.prefix, *self.gfuse, "mount", source, str(path)]
        if opts:
            cmd += ["-o", ",".join(opts)]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise StorageError("pool-unavailable",
                               f"gfuse mount {source} did not finish in {self.timeout:.0f}s") from None
        if proc.returncode != 0:
            raise StorageError("pool-unavailable",
                               f"cannot mount the pool {source}: {(proc.stderr or proc.stdout).strip()}")

    def unmount(self, path: Path) -> None:
        if self.mounted(path):
            if subprocess.run(["umount", str(path)], capture_output=True, timeout=60).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)


# ------------------------------------------------------------------------------------------------
# subdir


class SubdirBackend:
    """Each PV is the directory ``/<dir_name(name)>`` of the pool volume, its size a gluster quota limit.

    Layout on the pool: ``/<dir>`` (the PV; mounted by nodes as ``SERVER:/POOL/<dir>``),
    ``/.gfuse-provisioner/volumes/<dir>.json`` (record: name, size, owner, state creating|ready|deleting),
    ``/.gfuse-provisioner/staging/`` and ``/trash/`` (directories being made / deleted). The directory
    gets the StorageClass's ``uid``/``gid``/``mode`` (``dirMode`` is mode's older name) in staging.
    The pool must have quota enabled (``gfuse cluster init`` does; otherwise it is enabled on first
    use) and quota-deem-statfs on (turned on if it is off), so that ``df`` of a PV shows its limit.
    Capacity: the sum of the PVs' sizes may not exceed ``capacity_bytes`` (default: the size of the
    pool's file system) times ``overcommit``; beyond that create/expand fail with ``pool-full``.
    """

    kind = "subdir"
    CREATE_STEPS = ("record", "mkdir", "mark", "rename", "quota", "ready")
    DELETE_STEPS = ("mark", "unquota", "trash", "rmtree", "forget")
    EXPAND_STEPS = ("quota", "record")
    ADOPT_STEPS = ("record", "mark", "quota", "ready")

    def __init__(self, glusterd: Glusterd, pool: str, *, server: str | None = None,
                 backup_servers: Sequence[str] | None = None, state_dir: str | Path = DEFAULT_STATE_DIR,
                 mounter: GfuseMounter | None = None, capacity_bytes: int | None = None,
                 overcommit: float = 1.0, dir_mode: int = 0o777) -> None:
        if ":/" in pool:
            server, pool = pool.split(":/", 1)
        self.glusterd = glusterd
        self.pool = pool
        self._server = server
        self._backups = list(backup_servers) if backup_servers is not None else None
        self.state_dir = Path(state_dir)
        self.mounter = mounter or GfuseMounter()
        self.capacity_bytes = capacity_bytes
        self.overcommit = overcommit
        self.dir_mode = dir_mode
        self.locks = _Locks(self.state_dir / "locks" / f"subdir-{pool}")
        self._checked = False

    # -- the pool --------------------------------------------------------------------------------

    def _check_pool(self) -> None:
        if self._checked:
            return
        info = self.glusterd.volume_info(self.pool)
        if info is None:
            raise StorageError("pool-unavailable",
                               f"the pool volume {self.pool} does not exist (run `gfuse cluster init`)")
        if not info.started:
            raise StorageError("pool-unavailable", f"the pool volume {self.pool} is {info.status}, not started")
        if not self.glusterd.quota_enabled(self.pool, info):
            log.warning("quota is off on the pool %s: enabling it (sizes are enforced with directory quotas)",
                        self.pool)
            self.glusterd.quota_enable(self.pool)
            info = self.glusterd.volume_info(self.pool) or info
        if info.options.get(DEEM_STATFS_KEY) != "on":
            log.warning("pool %s has %s %r: turning it on (df in a pod then shows the PV's size, not the pool's)",
                        self.pool, DEEM_STATFS_KEY, info.options.get(DEEM_STATFS_KEY))
            self.glusterd.set_options(self.pool, {DEEM_STATFS_KEY: "on"})
        if any(info.options.get(k) != v for k, v in QUOTA_OPTIONS.items()):
            log.warning("pool %s does not have %s: on glusterfs 10.3 directory quotas may then not be enforced "
                        "(set them and restart the volume)", self.pool,
                        ", ".join(f"{k}={v}" for k, v in QUOTA_OPTIONS.items()))
        hosts = list(dict.fromkeys(b.host for b in info.bricks))
        if self._server is None:
            self._server = hosts[0]
        if self._backups is None:
            self._backups = [h for h in hosts if h != self._server]
        self._checked = True

    @property
    def server(self) -> str:
        self._check_pool()
        assert self._server is not None
        return self._server

    @property
    def backup_servers(self) -> list[str]:
        self._check_pool()
        return list(self._backups or [])

    def root(self) -> Path:
        """The provisioner's own mount of the pool (made if needed)."""
        self._check_pool()
        mp = self.state_dir / "pools" / f"{self.server}_{self.pool}".replace("/", "_")
        root = self.mounter.ensure(f"{self.server}:/{self.pool}", mp, self.backup_servers)
        for sub in ("volumes", "staging", "trash"):
            d = root / META / sub
            if not d.is_dir():
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(root / META, 0o700)
        return root

    def close(self) -> None:
        """Unmount the pool (the next operation mounts it again)."""
        mp = self.state_dir / "pools" / f"{self._server}_{self.pool}".replace("/", "_")
        self.mounter.unmount(mp)

    def _records(self, root: Path) -> list[dict[str, Any]]:
        out = []
        for p in (root / META / "volumes").glob("*.json"):
            with contextlib.suppress(StorageError):
                rec = _read_json(p)
                if rec:
                    out.append(rec)
        return out

    def _capacity(self, root: Path) -> int:
        if self.capacity_bytes:
            return int(self.capacity_bytes * self.overcommit)
        st = os.statvfs(root)
        return int(st.f_blocks * st.f_frsize * self.overcommit)

    def _check_room(self, root: Path, more: int, exclude: str | None = None) -> None:
        allocated = sum(int(r.get("size_bytes", 0)) for r in self._records(root) if r.get("dir") != exclude)
        cap = self._capacity(root)
        if allocated + more > cap:
            raise StorageError("pool-full",
                               f"pool {self.pool} is full: {_human(allocated)} of {_human(cap)} allocated, "
                               f"{_human(more)} more requested; add storage to the pool or ask for less")

    def _pv(self, rec: dict[str, Any]) -> ProvisionedVolume:
        return ProvisionedVolume(
            name=rec["name"], source=f"{self.server}:/{self.pool}/{rec['dir']}", backup_servers=self.backup_servers,
            size_bytes=int(rec["size_bytes"]), backend=self.kind,
            extra={"pool": self.pool, "dir": rec["dir"], "server": self.server, "quota_path": "/" + rec["dir"]})

    @staticmethod
    def _marker(path: Path) -> str | None:
        try:
            return os.getxattr(path, MARKER_XATTR).decode()
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOENT, errno.ENOTSUP, getattr(errno, "ENOATTR", errno.ENODATA)):
                return None
            raise

    # -- Backend ---------------------------------------------------------------------------------

    def create(self, name: str, size_bytes: int, params: Mapping[str, str]) -> ProvisionedVolume:
        size = _check_size(size_bytes)
        asked = Ownership.from_params(params, aliases=("dirMode",))
        owner = Ownership(asked.uid, asked.gid, self.dir_mode if asked.mode is None else asked.mode)
        d = dir_name(name)
        with self.locks.hold(d):
            root = self.root()
            rec_path = root / META / "volumes" / f"{d}.json"
            final, staging = root / d, root / META / "staging" / d
            rec = _read_json(rec_path)
            if rec is not None:
                if rec.get("name") != name:
                    raise StorageError("name-conflict", f"directory /{d} of {self.pool} belongs to {rec.get('name')!r}")
                if rec.get("state") == "deleting":
                    raise StorageError("busy", f"volume {name} is being deleted; retry the delete first")
                if rec.get("state") == "ready":
                    return self._pv(rec)
                size = int(rec["size_bytes"])  # finish what was started
                if "owner" in rec:
                    owner = Ownership.from_json(rec["owner"])
            else:
                if os.path.lexists(final) and self._marker(final) != name:
                    raise StorageError("name-conflict", f"{self.pool} already has a /{d} that this provisioner did not "
                                                         f"make; it is left alone")
                self._check_room(root, size)
                rec = {"name": name, "dir": d, "size_bytes": size, "state": "creating", "created": time.time(),
                       "pool": self.pool, "owner": owner.to_json()}
                _write_json(rec_path, rec)
                log.info("creating %s as %s:/%s/%s (%s)", name, self.server, self.pool, d, _human(size))
            _step(self.kind, "create", "record")
            if not os.path.lexists(final):
                with contextlib.suppress(FileExistsError):
                    staging.mkdir(mode=0o700)
                _step(self.kind, "create", "mkdir")
                os.setxattr(staging, MARKER_XATTR, name.encode())
                fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    owner.apply(fd)
                finally:
                    os.close(fd)
                _step(self.kind, "create", "mark")
                os.rename(staging, final)
                _step(self.kind, "create", "rename")
            elif self._marker(final) != name:
                raise StorageError("name-conflict", f"/{d} of {self.pool} is not marked as {name}'s; left alone")
            return self._limit_and_ready("create", rec_path, rec)

    def _limit_and_ready(self, op: str, rec_path: Path, rec: dict[str, Any]) -> ProvisionedVolume:
        """The last steps of create and adopt: the quota limit (none for size 0), then the record ``ready``."""
        if int(rec["size_bytes"]):
            self.glusterd.quota_limit(self.pool, "/" + rec["dir"], int(rec["size_bytes"]))
        _step(self.kind, op, "quota")
        rec["state"] = "ready"
        _write_json(rec_path, rec)
        _step(self.kind, op, "ready")
        return self._pv(rec)

    def delete(self, name: str) -> None:
        d = dir_name(name)
        with self.locks.hold(d):
            root = self.root()
            rec_path = root / META / "volumes" / f"{d}.json"
            rec = _read_json(rec_path)
            if rec is None:
                log.info("delete %s: no record on %s; nothing to do", name, self.pool)
                return
            if rec.get("name") != name:
                log.warning("delete %s: /%s belongs to %r; not touching it", name, d, rec.get("name"))
                return
            if rec.get("state") != "deleting":
                rec["state"] = "deleting"
                _write_json(rec_path, rec)
            _step(self.kind, "delete", "mark")
            final, trash = root / d, root / META / "trash" / d
            if os.path.lexists(final):
                owner = self._marker(final)
                if owner == name:
                    self.glusterd.quota_remove(self.pool, "/" + d)
                    _step(self.kind, "delete", "unquota")
                    if os.path.lexists(trash):
                        shutil.rmtree(trash)
                    os.rename(final, trash)
                    _step(self.kind, "delete", "trash")
                else:
                    log.warning("delete %s: /%s is not marked as ours (%r); leaving it", name, d, owner)
            staging = root / META / "staging" / d
            if os.path.lexists(staging):
                shutil.rmtree(staging)
            if os.path.lexists(trash):
                shutil.rmtree(trash)
            _step(self.kind, "delete", "rmtree")
            rec_path.unlink(missing_ok=True)
            _step(self.kind, "delete", "forget")
            log.info("deleted %s (%s:/%s/%s)", name, self.server, self.pool, d)

    def expand(self, name: str, size_bytes: int) -> ProvisionedVolume:
        size = _check_size(size_bytes)
        d = dir_name(name)
        with self.locks.hold(d):
            root = self.root()
            rec_path = root / META / "volumes" / f"{d}.json"
            rec = _read_json(rec_path)
            if rec is None or rec.get("name") != name or rec.get("state") != "ready":
                raise StorageError("not-found", f"no volume {name} on pool {self.pool}")
            if size <= int(rec["size_bytes"]):
                return self._pv(rec)
            self._check_room(root, size, exclude=d)
            self.glusterd.quota_limit(self.pool, "/" + d, size)
            _step(self.kind, "expand", "quota")
            rec["size_bytes"] = size
            rec["expanded"] = time.time()
            _write_json(rec_path, rec)
            _step(self.kind, "expand", "record")
            log.info("expanded %s to %s", name, _human(size))
            return self._pv(rec)

    def adopt(self, name: str, size_bytes: int = 0) -> ProvisionedVolume:
        """Take over the existing directory ``/<dir_name(name)>`` of the pool as the volume ``name``: a
        PV made before its size was enforced (the CSI controller's directories of before issue 5).
        Record, marker, quota limit (none for ``size_bytes`` 0: the PV stays unlimited until expanded).
        Idempotent and resumable like create; ``not-found`` without the directory, ``name-conflict``
        if the directory or the record belongs to another name."""
        size = int(size_bytes or 0)
        if size < 0:
            raise StorageError("invalid-parameters", f"size must not be negative, got {size}")
        d = dir_name(name)
        with self.locks.hold(d):
            root = self.root()
            rec_path, final = root / META / "volumes" / f"{d}.json", root / d
            rec = _read_json(rec_path)
            if rec is not None:
                if rec.get("name") != name:
                    raise StorageError("name-conflict", f"directory /{d} of {self.pool} belongs to {rec.get('name')!r}")
                if rec.get("state") == "ready":
                    return self._pv(rec)
                if rec.get("state") == "deleting" or not rec.get("adopted"):
                    raise StorageError("busy", f"volume {name} is half made or half deleted (state "
                                               f"{rec.get('state')}); retry its create or delete first")
            else:
                if not final.is_dir() or final.is_symlink():
                    raise StorageError("not-found", f"{self.pool} has no directory /{d} to adopt as {name}")
                if self._marker(final) not in (None, name):
                    raise StorageError("name-conflict", f"/{d} of {self.pool} is marked as another volume's")
                rec = {"name": name, "dir": d, "size_bytes": size, "state": "creating", "adopted": True,
                       "created": time.time(), "pool": self.pool}
                _write_json(rec_path, rec)
                log.info("adopting %s:/%s/%s as %s (%s)", self.server, self.pool, d, name,
                         _human(size) if size else "no size limit")
            _step(self.kind, "adopt", "record")
            os.setxattr(final, MARKER_XATTR, name.encode())
            _step(self.kind, "adopt", "mark")
            return self._limit_and_ready("adopt", rec_path, rec)

    def get(self, name: str) -> ProvisionedVolume | None:
        d = dir_name(name)
        root = self.root()
        rec = _read_json(root / META / "volumes" / f"{d}.json")
        if rec is None or rec.get("name") != name or rec.get("state") != "ready":
            return None
        return self._pv(rec)

    def list(self) -> list[ProvisionedVolume]:
        return [self._pv(r) for r in self._records(self.root()) if r.get("state") == "ready"]


# ------------------------------------------------------------------------------------------------
# volume


@dataclass(frozen=True)
class BrickPool:
    """A directory on a storage node under which bricks are made; ``size_bytes`` 0 = not accounted."""

    host: str
    path: str
    size_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "path": self.path, "size_bytes": self.size_bytes}


class BrickPoolRegistry:
    """The brick pools of a cluster, kept by glusterd itself: the option ``user.gfuse.brick-pools``
    (a JSON list) of the registry volume (the pool volume ``gfuse cluster init`` makes).

    Why there: glusterd replicates volume options to every peer and keeps them across restarts,
    so the registry lives as long as the cluster, needs no extra storage, no mount and no file on
    the provisioner's node, and any provisioner replica reads the same one. ``volume set all``
    refuses ``user.*`` keys (glusterfs 10.3), hence a volume. It is written only by ``cluster init``
    (registering pools); allocations are *not* recorded in it: what is used is computed from the
    volumes that exist (their bricks and their ``user.gfuse.size`` option), so a crash can never
    leave the registry and reality disagreeing.
    """

    def __init__(self, glusterd: Glusterd, volume: str) -> None:
        self.glusterd = glusterd
        self.volume = volume

    def load(self) -> list[BrickPool]:
        info = self.glusterd.volume_info(self.volume)
        if info is None:
            raise StorageError("no-brick-pools",
                               f"the registry volume {self.volume} does not exist (run `gfuse cluster init`)")
        return self.parse(info.options.get(REGISTRY_KEY, ""))

    @staticmethod
    def parse(text: str) -> list[BrickPool]:
        if not text:
            return []
        try:
            items = json.loads(text)
            return [BrickPool(str(i["host"]), str(i["path"]), int(i.get("size_bytes", 0))) for i in items]
        except (ValueError, KeyError, TypeError) as e:
            raise StorageError("gluster-error", f"option {REGISTRY_KEY} is not a brick pool list: {e}") from None

    def register(self, pools: Sequence[BrickPool]) -> list[BrickPool]:
        """Add or update pools (by host and path); returns the whole list. Idempotent."""
        current = {(p.host, p.path): p for p in self.load()}
        for p in pools:
            if not p.path.startswith("/"):
                raise StorageError("invalid-parameters", f"brick pool path {p.path!r} is not absolute")
            current[(p.host, p.path)] = p
        merged = sorted(current.values(), key=lambda p: (p.host, p.path))
        text = json.dumps([p.to_json() for p in merged], separators=(",", ":"))
        if self.glusterd.volume_info(self.volume).options.get(REGISTRY_KEY) != text:  # type: ignore[union-attr]
            self.glusterd.set_options(self.volume, {REGISTRY_KEY: text})
        return merged


class LocalBrickCleaner:
    """Removes brick directories of deleted volumes on nodes whose brick pools this machine sees
    (all-in-one test clusters, or a provisioner pod with the brick pools mounted). Without a cleaner
    the (emptied-by-nobody) directories stay; ``gfuse cluster gc`` run on a node removes them."""

    def __init__(self, hosts: Sequence[str] | None = None) -> None:
        self.hosts = set(hosts) if hosts is not None else None

    def handles(self, host: str) -> bool:
        return self.hosts is None or host in self.hosts

    def leftovers(self, pool: BrickPool, volname: str) -> list[Path]:
        base = Path(pool.path)
        if not base.is_dir():
            return []
        return sorted(p for p in base.iterdir() if p.name.startswith(volname + "-"))

    def remove(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


class VolumeBackend:
    """Each PV is its own gluster volume ``gfuse_<name>``, bricks from the registered brick pools.

    Replica ``r`` (StorageClass ``replica``, default 3) needs ``r`` different nodes with a brick
    pool, else ``insufficient-nodes``; nodes whose pools lack room (``size_bytes`` of the pool minus
    the sizes of the volumes already on it) are skipped, and if too few remain, ``pool-full``.
    The size is enforced with a quota limit on the volume's root, raised by expand (with
    quota-deem-statfs, ``df`` shows it). StorageClass ``uid``/``gid``/``mode`` are given to the root
    through a gfuse mount of the new volume (``mounter``, under ``state_dir``/volumes), made and
    unmounted again; without them nothing is mounted.
    """

    kind = "volume"
    CREATE_STEPS = ("create", "options", "start", "quota", "owner", "ready")
    DELETE_STEPS = ("stop", "delete", "bricks")
    EXPAND_STEPS = ("quota", "record")

    def __init__(self, glusterd: Glusterd, registry: BrickPoolRegistry, *, prefix: str = VOLUME_PREFIX,
                 default_replica: int = 3, cleaner: LocalBrickCleaner | None = None,
                 state_dir: str | Path = DEFAULT_STATE_DIR, mounter: GfuseMounter | None = None) -> None:
        if not _SAFE_VOLNAME.match(prefix):
            raise ValueError(f"bad volume prefix {prefix!r}")
        self.glusterd = glusterd
        self.registry = registry
        self.prefix = prefix
        self.default_replica = default_replica
        self.cleaner = cleaner
        self.state_dir = Path(state_dir)
        self.mounter = mounter or GfuseMounter()
        self.locks = _Locks(self.state_dir / "locks" / "volume")

    # -- helpers ---------------------------------------------------------------------------------

    def _params(self, params: Mapping[str, str]) -> tuple[int, dict[str, str]]:
        try:
            replica = int(params.get("replica") or self.default_replica)
        except ValueError:
            raise StorageError("invalid-parameters", f"replica {params.get('replica')!r} is not a number") from None
        if not 1 <= replica <= 16:
            raise StorageError("invalid-parameters", f"replica {replica} is out of range 1..16")
        options: dict[str, str] = {}
        for item in re.split(r"[,\s]+", params.get("volumeOptions", "") or ""):
            if not item:
                continue
            k, sep, v = item.partition("=")
            if not sep or not _OPTION_KEY.match(k) or k.startswith("user.gfuse."):
                raise StorageError("invalid-parameters",
                                   f"volumeOptions: {item!r} is not KEY=VALUE with a gluster option key")
            options[k] = v
        return replica, options

    def _set_owner(self, volname: str, pv: ProvisionedVolume, owner: Ownership) -> None:
        """Give the new volume's root ``owner`` through a gfuse mount of it (made, then unmounted)."""
        mp = self.state_dir / "volumes" / volname
        self.mounter.ensure(pv.source, mp, pv.backup_servers)
        try:
            fd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                if os.fstat(fd).st_dev == os.stat(mp.parent).st_dev:  # never the node's own directory
                    raise StorageError("pool-unavailable", f"{pv.source} is not mounted on {mp}")
                owner.apply(fd)
            finally:
                os.close(fd)
            log.info("root of %s: %s", volname, owner.to_json())
        finally:
            self.mounter.unmount(mp)
            with contextlib.suppress(OSError):
                mp.rmdir()

    def _ours(self, info: VolumeInfo, name: str) -> bool:
        owner = info.options.get("user.gfuse.pv")
        return owner is None or owner == name

    def _usage(self, pools: Sequence[BrickPool], volumes: Sequence[VolumeInfo]) -> dict[BrickPool, int]:
        used = {p: 0 for p in pools}
        for v in volumes:
            size = int(v.options.get("user.gfuse.size", "0") or 0)
            for b in v.bricks:
                for p in pools:
                    if b.host == p.host and (b.path + "/").startswith(p.path.rstrip("/") + "/"):
                        used[p] += size
        return used

    def _allocate(self, name: str, volname: str, replica: int, size: int) -> list[Brick]:
        pools = self.registry.load()
        if not pools:
            raise StorageError("no-brick-pools", "no brick pools are registered (run `gfuse cluster init`)")
        hosts = sorted({p.host for p in pools})
        if replica > len(hosts):
            raise StorageError("insufficient-nodes",
                               f"replica {replica} needs {replica} storage nodes, but only {len(hosts)} have brick "
                               f"pools ({', '.join(hosts)}); ask for replica {len(hosts)} or add nodes")
        used = self._usage(pools, self.glusterd.all_volume_info())
        best: dict[str, tuple[int, BrickPool]] = {}
        for p in pools:
            free = (p.size_bytes - used[p]) if p.size_bytes else 1 << 62
            if free < size:
                continue
            if p.host not in best or free > best[p.host][0]:
                best[p.host] = (free, p)
        if len(best) < replica:
            raise StorageError("pool-full",
                               f"only {len(best)} node(s) have {_human(size)} free in their brick pools, "
                               f"replica {replica} needs {replica}; add brick pools or ask for less")
        # most free first; ties broken by a hash of the name so volumes spread over equal nodes
        order = sorted(best.items(), key=lambda kv: (-kv[1][0], hashlib.sha256((name + kv[0]).encode()).hexdigest()))
        tag = secrets.token_hex(3)
        return [Brick(host, f"{pool.path.rstrip('/')}/{volname}-{tag}") for host, (_free, pool) in order[:replica]]

    def _pv(self, name: str, info: VolumeInfo) -> ProvisionedVolume:
        hosts = list(dict.fromkeys(b.host for b in info.bricks))
        return ProvisionedVolume(
            name=name, source=f"{hosts[0]}:/{info.name}", backup_servers=hosts[1:],
            size_bytes=int(info.options.get("user.gfuse.size", "0") or 0), backend=self.kind,
            extra={"volume": info.name, "replica": info.replica, "bricks": [b.spec for b in info.bricks]})

    # -- Backend ---------------------------------------------------------------------------------

    def create(self, name: str, size_bytes: int, params: Mapping[str, str]) -> ProvisionedVolume:
        size = _check_size(size_bytes)
        replica, options = self._params(params)
        owner = Ownership.from_params(params)
        volname = volume_name(name, self.prefix)
        with self.locks.hold(volname):
            info = self.glusterd.volume_info(volname)
            if info is not None and not self._ours(info, name):
                raise StorageError("name-conflict", f"volume {volname} exists and belongs to "
                                                    f"{info.options.get('user.gfuse.pv')!r}")
            if info is None:
                bricks = self._allocate(name, volname, replica, size)
                log.info("creating volume %s for %s: replica %d on %s (%s)", volname, name, replica,
                         ", ".join(b.spec for b in bricks), _human(size))
                self.glusterd.create_volume(volname, bricks, replica)
                info = self.glusterd.volume_info(volname)
                if info is None:
                    raise StorageError("gluster-error", f"volume {volname} vanished right after volume create")
            _step(self.kind, "create", "create")
            if info.options.get("user.gfuse.state") == "ready":
                return self._pv(name, info)
            if "user.gfuse.pv" not in info.options:
                # the metadata-cache group (cache-invalidation on both sides, 600 s): gfuse's md-cache and the
                # kernel then keep metadata until a brick says another client changed it (gfuse probe says so);
                # before the options that mark this step done, and the StorageClass's own options may override it
                self.glusterd.set_options(volname, METADATA_CACHE_GROUP)
                # the ownership is recorded with the intent, as the size: a retry finishes what was started
                self.glusterd.set_options(volname, {**QUOTA_OPTIONS, **options, "user.gfuse.pv": name,
                                                    "user.gfuse.size": str(size),
                                                    OWNER_KEY: json.dumps(owner.to_json(), separators=(",", ":"))})
            elif OWNER_KEY in info.options:
                owner = Ownership.from_json(_json_or_none(info.options[OWNER_KEY]))
            _step(self.kind, "create", "options")
            if not info.started:
                self.glusterd.start_volume(volname)
            _step(self.kind, "create", "start")
            self.glusterd.quota_enable(volname)
            recorded = int(info.options.get("user.gfuse.size") or size)
            self.glusterd.quota_limit(volname, "/", recorded)
            now = self.glusterd.volume_info(volname)
            if DEEM_STATFS_KEY not in options and now is not None and now.options.get(DEEM_STATFS_KEY) != "on":
                self.glusterd.set_options(volname, {DEEM_STATFS_KEY: "on"})
            _step(self.kind, "create", "quota")
            if owner:
                self._set_owner(volname, self._pv(name, info), owner)
            _step(self.kind, "create", "owner")
            self.glusterd.set_options(volname, {"user.gfuse.state": "ready"})
            _step(self.kind, "create", "ready")
            info = self.glusterd.volume_info(volname)
            assert info is not None
            return self._pv(name, info)

    def delete(self, name: str) -> None:
        volname = volume_name(name, self.prefix)
        with self.locks.hold(volname):
            info = self.glusterd.volume_info(volname)
            if info is not None:
                if not self._ours(info, name):
                    log.warning("delete %s: volume %s belongs to %r; not touching it", name, volname,
                                info.options.get("user.gfuse.pv"))
                    return
                self.glusterd.stop_volume(volname)
                _step(self.kind, "delete", "stop")
                self.glusterd.delete_volume(volname)
                _step(self.kind, "delete", "delete")
                log.info("deleted volume %s (%s)", volname, name)
            self._clean_bricks(volname)
            _step(self.kind, "delete", "bricks")

    def _clean_bricks(self, volname: str) -> None:
        if self.cleaner is None:
            return
        in_use = {b.path for v in self.glusterd.all_volume_info() for b in v.bricks}
        for pool in self.registry.load():
            if not self.cleaner.handles(pool.host):
                continue
            for path in self.cleaner.leftovers(pool, volname):
                if str(path) not in in_use:
                    log.info("removing brick directory %s:%s of deleted volume %s", pool.host, path, volname)
                    self.cleaner.remove(path)

    def expand(self, name: str, size_bytes: int) -> ProvisionedVolume:
        size = _check_size(size_bytes)
        volname = volume_name(name, self.prefix)
        with self.locks.hold(volname):
            info = self.glusterd.volume_info(volname)
            if info is None or not self._ours(info, name) or info.options.get("user.gfuse.state") != "ready":
                raise StorageError("not-found", f"no volume {name} ({volname})")
            current = int(info.options.get("user.gfuse.size", "0") or 0)
            if size <= current:
                return self._pv(name, info)
            pools = self.registry.load()
            used = self._usage(pools, self.glusterd.all_volume_info())
            for b in info.bricks:
                for p in pools:
                    if p.size_bytes and b.host == p.host and b.path.startswith(p.path.rstrip("/") + "/"):
                        if used[p] - current + size > p.size_bytes:
                            raise StorageError("pool-full", f"brick pool {p.host}:{p.path} has no room to grow "
                                                            f"{volname} to {_human(size)}")
            self.glusterd.quota_limit(volname, "/", size)
            _step(self.kind, "expand", "quota")
            self.glusterd.set_options(volname, {"user.gfuse.size": str(size)})
            _step(self.kind, "expand", "record")
            info = self.glusterd.volume_info(volname)
            assert info is not None
            return self._pv(name, info)

    def get(self, name: str) -> ProvisionedVolume | None:
        info = self.glusterd.volume_info(volume_name(name, self.prefix))
        if info is None or info.options.get("user.gfuse.pv") != name or info.options.get("user.gfuse.state") != "ready":
            return None
        return self._pv(name, info)

    def list(self) -> list[ProvisionedVolume]:
        out = []
        for info in self.glusterd.all_volume_info():
            if info.name.startswith(self.prefix) and info.options.get("user.gfuse.state") == "ready":
                out.append(self._pv(info.options.get("user.gfuse.pv", ""), info))
        return out


# ------------------------------------------------------------------------------------------------


def backend_for(params: Mapping[str, str], *, glusterd: Glusterd, pool: str | None = None,
                state_dir: str | Path = DEFAULT_STATE_DIR, mounter: GfuseMounter | None = None,
                cleaner: LocalBrickCleaner | None = None, _cache: dict[Any, Backend] | None = None) -> Backend:
    """The backend a StorageClass' parameters ask for (see :data:`PARAMETERS`).

    ``pool`` is the provisioner's default pool volume (also the brick pool registry); a ``pool``
    parameter overrides it for the subdir backend. Unknown parameters raise ``invalid-parameters``
    (``csi.storage.k8s.io/*`` keys are ignored). Pass the same dict as ``_cache`` to reuse backends
    (and their pool mounts) across calls.
    """
    unknown = sorted(k for k in params if k not in PARAMETERS and not k.startswith("csi.storage.k8s.io/"))
    if unknown:
        raise StorageError("invalid-parameters",
                           f"unknown StorageClass parameter(s) {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(PARAMETERS))}")
    kind = params.get("backend") or "subdir"
    Ownership.from_params(params, aliases=("dirMode",) if kind == "subdir" else ())  # bad values: before anything
    pool_name = params.get("pool") or pool
    if kind == "subdir":
        if not pool_name:
            raise StorageError("invalid-parameters", "the subdir backend needs a pool (StorageClass parameter 'pool')")
        server = None
        if ":/" in pool_name:
            server, pool_name = pool_name.split(":/", 1)
        backups = [h for h in re.split(r"[:,\s]+", params.get("backupServers", "")) if h] or None
        key: Any = ("subdir", server, pool_name, tuple(backups or ()))
        if _cache is not None and key in _cache:
            return _cache[key]
        b: Backend = SubdirBackend(glusterd, pool_name, server=server, backup_servers=backups, state_dir=state_dir,
                                   mounter=mounter)
    elif kind == "volume":
        if not pool:
            raise StorageError("invalid-parameters",
                               "the volume backend needs the registry (pool) volume of the provisioner")
        key = ("volume", pool)
        if _cache is not None and key in _cache:
            return _cache[key]
        b = VolumeBackend(glusterd, BrickPoolRegistry(glusterd, pool), cleaner=cleaner, state_dir=state_dir,
                          mounter=mounter)
    else:
        raise StorageError("invalid-parameters", f"backend {kind!r} is unknown (subdir or volume)")
    if _cache is not None:
        _cache[key] = b
    return b
