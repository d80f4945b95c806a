"""A real GlusterFS test cluster on loopback: glusterd, throw-away volumes, native mounts.

This module drives the real ``gluster`` CLI (always with ``--mode=script``) so that tests can run
gfuse against real bricks. It is test tooling, not part of the client: stdlib only, every
subprocess has a timeout, every error says what was run and what gluster answered.

What was found on the test machines (Debian 12, glusterfs 10.3, root, no systemd)
---------------------------------------------------------------------------------
* ``glusterd`` is not running at boot and there is no systemd: :func:`ensure_glusterd` starts
  ``/usr/sbin/glusterd -p /run/glusterd.pid`` directly (it daemonizes itself) and waits until
  ``gluster pool list`` answers (about 2 s). With glusterd down the CLI fails at once with
  "Connection failed. Please check if gluster daemon is operational." (rc 1), no hang.
* Brick host: ``gluster volume create`` refuses ``localhost`` and ``127.0.0.1`` ("Please provide a
  valid hostname/ip other than localhost, 127.0.0.1 or loopback address"), but accepts any *other*
  address in 127.0.0.0/8 and treats it as local (glusterd calls every 127/8 address local).
  The machine's host name (``vm``) also works here, but only because /etc/hosts maps it to
  127.0.0.1 -- on another machine it may resolve to a routable address. So the brick host is the
  literal address **127.0.0.2** (override with ``GFUSE_TEST_BRICK_HOST``): no DNS, no /etc/hosts
  edit, and the volfiles' ``remote-host`` is a loopback address, so every byte between clients,
  glusterd (which listens on 0.0.0.0:24007) and the bricks stays on ``lo``. It is not one of
  the 127.1.1.N addresses that gluster's own regression suite uses for multi-glusterd clusters.
* Bricks are plain directories under :data:`STATE_DIR` on the root ext4 (needs ``force``;
  trusted.* xattrs work). Create + start + all bricks online: ~0.4 s (dist1), ~0.6 s (replica3),
  ~0.9 s (distrep). The self-heal daemon is one process shared by all replicated volumes; it
  goes away when the last one stops. Brick multiplexing is off: one glusterfsd per brick.
* A killed brick is shown offline by ``volume status`` within a fraction of a second (glusterd
  notices the brick's unix socket closing). But init (pid 1) on these VMs reaps orphaned
  processes only about once a second, and until then the dead brick is a zombie whose /proc
  entry exists: ``gluster volume start VOL force`` then logs "discovered already-running brick"
  and does *not* restart it. :meth:`Volume.start_force` therefore removes the pid file of any
  offline brick whose process is gone or a zombie, runs ``start force`` and waits until
  ``volume status`` shows every brick online with a pid and a port that accepts TCP
  connections (~1 s in all), retrying ``start force`` if needed.
* ``volume stop`` costs about 1 s per brick inside glusterd (serialized, also across volumes;
  killing the bricks first does not help), so deleting a 2 x 3 volume takes ~6 s.
* Concurrent CLI calls from several processes were serialized by glusterd without "Another
  transaction is in progress" errors in tests here; :func:`gluster` retries such answers anyway.

Ownership and cleanup
---------------------
Every volume this module creates is named ``gfuset_<kind>_<pid>_<hex>`` and has a marker file
``STATE_DIR/volumes/<name>.json`` written *before* ``volume create``, recording the owner process
(pid, its start time and the boot id, so a reused pid does not count as alive). Native mounts made
by :class:`NativeMount` get a marker under ``STATE_DIR/mounts``. :func:`cleanup_stale` deletes only
volumes that have such a marker *and* whose owner is dead, and unmounts only marked mounts whose
owner is dead: volumes and mounts it did not make are never touched.

Command line (for humans and CI jobs)::

    python -m testkit.cluster up [--kind replica3] [--name N] [--option K=V ...] [--keep]
    python -m testkit.cluster down NAME
    python -m testkit.cluster cleanup [--all]
    python -m testkit.cluster list

``up`` makes the *parent* process (the calling shell or script) the owner unless ``--owner PID``
or ``--keep`` is given; ``cleanup`` then removes the volume once that shell is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from flexvolume.storage.api import StorageError
from gfuse import mounttable
from flexvolume.storage.glusterd import Glusterd as GlusterCli

from . import procs

T = TypeVar("T")

__all__ = [
    "BRICK_HOST",
    "GLUSTERD_PORT",
    "KINDS",
    "STATE_DIR",
    "VOLUME_PREFIX",
    "BrickStatus",
    "GlusterError",
    "GlusterUnavailable",
    "GlusterdProcess",
    "NativeMount",
    "Volume",
    "VolumeInfo",
    "cleanup_stale",
    "create_volume",
    "ensure_glusterd",
    "gluster",
    "gluster_xml",
    "glusterd_pid",
    "is_mounted",
    "list_volumes",
    "native_mount_unavailable_reason",
    "wait_until",
    "new_volume_name",
    "our_volumes",
    "unavailable_reason",
    "volume_info",
]

#: Markers, bricks and default mount points live here (survives reboots, unlike /tmp on some hosts).
STATE_DIR = Path(os.environ.get("GFUSE_TESTCLUSTER_STATE", "/var/tmp/gfuse-testcluster"))
#: Host part of every brick; see the module docstring for why it is not 127.0.0.1.
BRICK_HOST = os.environ.get("GFUSE_TEST_BRICK_HOST", "127.0.0.2")
#: glusterd's management port (volfiles, portmap).
GLUSTERD_PORT = 24007
#: Every volume made here starts with this; nothing without it is ever deleted by cleanup.
VOLUME_PREFIX = "gfuset"
#: kind -> (number of bricks, replica count); replica 1 means plain distribute.
KINDS: dict[str, tuple[int, int]] = {
    "dist1": (1, 1),
    "replica3": (3, 3),
    "distrep": (6, 3),
    # replica 3 arbiter 1: the third brick keeps names and xattrs, never data (private volumes only)
    "arbiter": (3, 3),
}
#: the kinds the shared session volumes of the test suite are made of
SHARED_KINDS = ("dist1", "replica3", "distrep")
#: kind -> arbiter count
ARBITERS = {"arbiter": 1}

GLUSTERD_BIN = os.environ.get("GFUSE_GLUSTERD", "/usr/sbin/glusterd")
GLUSTERD_PIDFILE = Path("/run/glusterd.pid")
GLUSTERD_LOG = Path("/var/log/glusterfs/glusterd.log")

_VOLNAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class GlusterError(RuntimeError):
    """A gluster command (or a wait on gluster) failed; carries what was run and the answer."""

    def __init__(
        self,
        message: str,
        cmd: Sequence[str] | None = None,
        returncode: int | None = None,
        output: str = "",
    ) -> None:
        self.cmd = list(cmd) if cmd else None
        self.returncode = returncode
        self.output = output
        detail = message
        if cmd:
            detail += f"\n  command: {' '.join(cmd)}"
        if returncode is not None:
            detail += f"\n  exit status: {returncode}"
        if output.strip():
            detail += "\n  output: " + output.strip().replace("\n", "\n          ")
        super().__init__(detail)


class GlusterUnavailable(GlusterError):
    """GlusterFS cannot be used here at all (not root, not installed)."""


# --------------------------------------------------------------------------------------------
# small helpers


def wait_until(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.2,
               ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Poll ``pred`` until it returns something truthy (errors of the ``ignore`` types count as not yet);
    AssertionError naming ``what`` and the last value or error after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = pred()
            if last:
                return last
        except ignore as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout:g}s (last: {last!r})")
        time.sleep(interval)


def _run(
    cmd: Sequence[str], timeout: float, check: bool = True, what: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with a timeout, capturing text output; raise GlusterError on failure."""
    try:
        proc = subprocess.run(
            list(cmd),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise GlusterError(
            f"{what or cmd[0]} timed out after {timeout:.0f}s", cmd, None, out
        ) from None
    except FileNotFoundError as exc:
        raise GlusterUnavailable(f"{cmd[0]} not found: {exc}", cmd) from None
    if check and proc.returncode != 0:
        raise GlusterError(
            f"{what or cmd[0]} failed", cmd, proc.returncode, proc.stdout + proc.stderr
        )
    return proc


def _owner_alive(owner: Mapping[str, Any] | None) -> bool:
    """Leave it alone: kept on purpose (``--keep``) or its owner still runs."""
    return procs.kept(owner) or procs.same_process(owner)


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _tcp_accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _state_lock(name: str) -> Iterator[None]:
    """An exclusive flock on STATE_DIR/<name>.lock (serializes e.g. starting glusterd)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# availability and glusterd


def unavailable_reason() -> str | None:
    """Why real-cluster tests cannot run here (None if they can): not root / gluster missing."""
    if os.geteuid() != 0:
        return "needs root (glusterd, bricks and mounts are real); run: sudo ./scripts/test.sh"
    for binary in (GLUSTERD_BIN, "gluster", "glusterfsd"):
        if not (shutil.which(binary) or Path(binary).is_file()):
            return f"{binary} is not installed (run scripts/install-deps.sh: glusterfs-server)"
    return None


def native_mount_unavailable_reason() -> str | None:
    """Why ``mount -t glusterfs`` cannot be used here (None if it can)."""
    reason = unavailable_reason()
    if reason:
        return reason
    if not (shutil.which("mount.glusterfs") or Path("/sbin/mount.glusterfs").exists()):
        return "mount.glusterfs is not installed (run scripts/install-deps.sh: glusterfs-client)"
    if not Path("/dev/fuse").exists():
        return "/dev/fuse does not exist (no FUSE in this kernel/container)"
    return None


#: the CLI on the default glusterd socket, through the product's one wrapper (retries busy answers)
_CLI = GlusterCli(socket=None)


def gluster(*args: str, timeout: float = 60.0, check: bool = True) -> str:
    """Run ``gluster --mode=script ARGS`` and return its stdout.

    Answers that mean "glusterd is busy with another transaction" are retried until ``timeout``
    has passed. With ``check`` a non-zero exit raises :class:`GlusterError`.
    """
    try:
        return _CLI.text(*args, timeout=timeout, check=check)
    except StorageError as e:
        raise GlusterError(str(e), _CLI.argv(*args, xml=False)) from None


def gluster_xml(*args: str, timeout: float = 60.0) -> ET.Element:
    """Run ``gluster --mode=script --xml ARGS``; return the ``<cliOutput>`` root.

    Raises :class:`GlusterError` if the command fails or ``opRet`` is non-zero (with
    ``opErrstr``). Retries busy-glusterd answers like :func:`gluster`.
    """
    try:
        return _CLI.xml(*args, timeout=timeout)
    except StorageError as e:
        raise GlusterError(str(e), _CLI.argv(*args)) from None


def glusterd_pid() -> int | None:
    """Pid of the running glusterd (from its pid file, else by scanning /proc), or None."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(GLUSTERD_PIDFILE.read_text().strip())
        if procs.alive(pid) and _comm(pid) == "glusterd":
            return pid
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _comm(int(entry.name)) == "glusterd":
            if procs.alive(int(entry.name)):
                return int(entry.name)
    return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _glusterd_answers() -> bool:
    try:
        proc = _run(["gluster", "--mode=script", "pool", "list"], timeout=15, check=False)
    except GlusterError:
        return False
    return proc.returncode == 0


@dataclass(frozen=True)
class GlusterdProcess:
    """The running glusterd: its pid, the address clients should use, and its port."""

    pid: int
    host: str = BRICK_HOST
    port: int = GLUSTERD_PORT


def ensure_glusterd(timeout: float = 60.0) -> GlusterdProcess:
    """Start glusterd unless it runs, and wait until the CLI gets answers from it.

    Starts ``glusterd -p /run/glusterd.pid`` directly (no systemd needed). Raises
    :class:`GlusterUnavailable` if not root / not installed, :class:`GlusterError` (with the tail
    of glusterd's log) if it does not answer within ``timeout`` seconds.
    """
    reason = unavailable_reason()
    if reason:
        raise GlusterUnavailable(reason)
    deadline = time.monotonic() + timeout
    with _state_lock("glusterd"):
        if glusterd_pid() is None:
            GLUSTERD_PIDFILE.parent.mkdir(parents=True, exist_ok=True)
            _run([GLUSTERD_BIN, "-p", str(GLUSTERD_PIDFILE)], timeout=timeout, what="glusterd")
        while True:
            if _glusterd_answers():
                pid = glusterd_pid()
                if pid is not None:
                    return GlusterdProcess(pid=pid)
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    log_tail = ""
    with contextlib.suppress(OSError):
        log_tail = "\n".join(GLUSTERD_LOG.read_text(errors="replace").splitlines()[-20:])
    raise GlusterError(
        f"glusterd did not answer 'gluster pool list' within {timeout:.0f}s "
        f"(pid {glusterd_pid()}); tail of {GLUSTERD_LOG}:\n{log_tail}"
    )


# --------------------------------------------------------------------------------------------
# volume information


@dataclass(frozen=True)
class VolumeInfo:
    """What ``gluster volume info VOL --xml`` says about a volume."""

    name: str
    type: str  # typeStr: "Distribute", "Replicate", "Distributed-Replicate", ...
    status: str  # statusStr: "Created", "Started", "Stopped"
    brick_count: int
    replica_count: int
    dist_count: int
    bricks: tuple[str, ...]  # "host:/path", in volume order
    options: dict[str, str]


@dataclass(frozen=True)
class BrickStatus:
    """One brick's line in ``gluster volume status VOL --xml``."""

    host: str
    path: str
    online: bool
    port: int | None
    pid: int | None

    @property
    def spec(self) -> str:
        return f"{self.host}:{self.path}"


def list_volumes(timeout: float = 30.0) -> list[str]:
    """Names of all volumes glusterd knows (ours and anybody else's)."""
    root = gluster_xml("volume", "list", timeout=timeout)
    return [e.text or "" for e in root.iter("volume") if e.text]


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "", "N/A") else None
    except ValueError:
        return None


def volume_info(name: str, timeout: float = 30.0) -> VolumeInfo:
    """Parse ``gluster volume info NAME --xml``. Raises GlusterError if there is no such volume."""
    root = gluster_xml("volume", "info", name, timeout=timeout)
    vol = root.find("./volInfo/volumes/volume")
    if vol is None:
        raise GlusterError(f"volume info {name}: no <volume> in the answer")
    bricks = tuple(
        (b.findtext("name") or b.text or "").strip() for b in vol.findall("./bricks/brick")
    )
    options = {
        o.findtext("name") or "": o.findtext("value") or "" for o in vol.findall("./options/option")
    }
    return VolumeInfo(
        name=vol.findtext("name") or name,
        type=vol.findtext("typeStr") or "",
        status=vol.findtext("statusStr") or "",
        brick_count=_int(vol.findtext("brickCount")) or 0,
        replica_count=_int(vol.findtext("replicaCount")) or 1,
        dist_count=_int(vol.findtext("distCount")) or 1,
        bricks=bricks,
        options=options,
    )


def _volume_status(name: str, timeout: float = 30.0) -> list[BrickStatus]:
    root = gluster_xml("volume", "status", name, timeout=timeout)
    out: list[BrickStatus] = []
    for node in root.iter("node"):
        path = node.findtext("path") or ""
        if not path.startswith("/"):  # "Self-heal Daemon" on "localhost" and the like
            continue
        out.append(
            BrickStatus(
                host=node.findtext("hostname") or "",
                path=path,
                online=node.findtext("status") == "1",
                port=_int(node.findtext("port")),
                pid=_int(node.findtext("pid")),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# volumes


def new_volume_name(kind: str = "vol") -> str:
    """A fresh name ``gfuset_<kind>_<pid>_<hex>``: unique per run, recognisable by cleanup."""
    return f"{VOLUME_PREFIX}_{kind}_{os.getpid()}_{secrets.token_hex(3)}"


def _marker_path(name: str) -> Path:
    return STATE_DIR / "volumes" / f"{name}.json"


def _bricks_root() -> Path:
    return STATE_DIR / "bricks"


@dataclass(eq=False)  # identity semantics: usable as a dict key / in sets
class Volume:
    """A volume created by :func:`create_volume` (or re-attached with :meth:`from_marker`).

    Brick ``i`` is ``bricks[i]`` ("host:/path") backed by the local directory ``brick_dirs[i]``;
    bricks are in volume order, so for "distrep" bricks 0-2 are replica set 0 and 3-5 set 1.
    """

    name: str
    kind: str
    host: str
    brick_dirs: list[Path]
    replica: int
    brick_root: Path
    options: dict[str, str] = field(default_factory=dict)
    _paused: set[int] = field(default_factory=set, repr=False)
    _known_pids: list[int] = field(default_factory=list, repr=False)
    _mounts: list[NativeMount] = field(default_factory=list, repr=False)

    # -- names ---------------------------------------------------------------------------
    @property
    def bricks(self) -> list[str]:
        """Brick specs "host:/path" in volume order."""
        return [f"{self.host}:{d}" for d in self.brick_dirs]

    @property
    def server(self) -> str:
        """Address of glusterd for this volume (volfile server)."""
        return self.host

    @property
    def source(self) -> str:
        """``HOST:/VOL``, what ``mount -t glusterfs`` (and gfuse mount) take."""
        return f"{self.host}:/{self.name}"

    def brick(self, i: int) -> str:
        return self.bricks[i]

    def brick_dir(self, i: int) -> Path:
        return self.brick_dirs[i]

    # -- state ---------------------------------------------------------------------------
    def info(self, timeout: float = 30.0) -> VolumeInfo:
        return volume_info(self.name, timeout=timeout)

    def status(self, timeout: float = 30.0) -> list[BrickStatus]:
        """Per-brick status in volume order (bricks gluster does not list come out offline)."""
        by_path = {s.path: s for s in _volume_status(self.name, timeout=timeout)}
        return [
            by_path.get(str(d), BrickStatus(self.host, str(d), False, None, None))
            for d in self.brick_dirs
        ]

    def brick_pid(self, i: int) -> int | None:
        """Pid of brick ``i``'s glusterfsd (None if it is not running)."""
        st = self.status()[i]
        if st.pid and st.pid > 0 and procs.alive(st.pid):
            return st.pid
        # fall back to the pid file glusterd keeps for the brick
        pidfile = self._pidfile(i)
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if procs.alive(pid) and self._is_brick_process(pid, i):
                return pid
        return None

    def _pidfile(self, i: int) -> Path:
        """glusterd's pid file for brick ``i``: /run/gluster/vols/VOL/HOST-path-with-dashes.pid"""
        flat = str(self.brick_dirs[i]).replace("/", "-")
        return Path("/run/gluster/vols", self.name, f"{self.host}{flat}.pid")

    def _drop_dead_pidfile(self, i: int) -> None:
        """Remove brick ``i``'s pid file if its process is gone or a zombie.

        Init on these machines reaps orphans only about once a second; until then a killed
        brick is a zombie whose /proc entry exists, glusterd's ``start force`` then says
        "discovered already-running brick" and does not restart it.
        """
        pidfile = self._pidfile(i)
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        if not (procs.alive(pid) and self._is_brick_process(pid, i)):
            with contextlib.suppress(FileNotFoundError):
                pidfile.unlink()

    def brick_port(self, i: int) -> int | None:
        """TCP port brick ``i`` listens on (None if offline)."""
        st = self.status()[i]
        return st.port if st.online else None

    def _is_brick_process(self, pid: int, i: int) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return str(self.brick_dirs[i]).encode() in argv

    def wait_bricks(
        self, online: bool = True, bricks: Sequence[int] | None = None, timeout: float = 30.0
    ) -> None:
        """Wait until the given bricks (default: all) are online (listening) or offline."""
        wanted = list(range(len(self.brick_dirs))) if bricks is None else list(bricks)
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if online:
                ok = all(
                    st[i].online
                    and st[i].pid
                    and st[i].port
                    and _tcp_accepts(self.host, st[i].port or 0)
                    for i in wanted
                )
            else:
                ok = all(not st[i].online for i in wanted)
            if ok:
                if online and all(s.online and s.pid for s in st):
                    self._known_pids = [s.pid or 0 for s in st]
                return
            if time.monotonic() > deadline:
                raise GlusterError(
                    f"volume {self.name}: bricks {wanted} not {'online' if online else 'offline'}"
                    f" after {timeout:.0f}s: {st}"
                )
            time.sleep(0.1)

    # -- fault injection -------------------------------------------------------------------
    def kill_brick(self, i: int, sig: int = signal.SIGKILL, wait: bool = True) -> int:
        """Send ``sig`` (default SIGKILL) to brick ``i``; for SIGKILL/SIGTERM/SIGINT wait until
        the process is dead and glusterd shows the brick offline (~0.1 s).

        Returns the pid. Raises GlusterError if the brick is not running. Bring it back with
        :meth:`start_force`.
        """
        pid = self.brick_pid(i)
        if pid is None:
            raise GlusterError(f"volume {self.name}: brick {i} ({self.brick(i)}) is not running")
        self._paused.discard(i)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # a stopped process would hold a catchable signal
            os.kill(pid, sig)
        if wait and sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            deadline = time.monotonic() + 15
            while procs.alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            self.wait_bricks(online=False, bricks=[i], timeout=15)
        return pid

    def pause_brick(self, i: int) -> int:
        """SIGSTOP brick ``i`` (a hung brick: TCP stays up, nothing answers). Returns its pid."""
        pid = self.brick_pid(i)
        if pid is None:
            raise GlusterError(f"volume {self.name}: brick {i} is not running")
        os.kill(pid, signal.SIGSTOP)
        self._paused.add(i)
        deadline = time.monotonic() + 10
        while procs.state(pid) not in ("T", "t") and time.monotonic() < deadline:
            time.sleep(0.01)  # signal delivery is asynchronous
        return pid

    def resume_brick(self, i: int) -> None:
        """SIGCONT a brick stopped by :meth:`pause_brick`."""
        pid = self.brick_pid(i)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._paused.discard(i)

    def _resume_all(self) -> None:
        for i in list(self._paused):
            with contextlib.suppress(GlusterError):
                self.resume_brick(i)
        self._paused.clear()

    def start(self, timeout: float = 60.0) -> None:
        """``gluster volume start VOL`` and wait until every brick is online."""
        gluster("volume", "start", self.name, timeout=timeout)
        self.wait_bricks(online=True, timeout=timeout)

    def start_force(self, timeout: float = 60.0) -> None:
        """``gluster volume start VOL force`` (restarts dead bricks); wait until all are online."""
        self._resume_all()
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            for i, s in enumerate(st):
                if not s.online:
                    self._drop_dead_pidfile(i)
            gluster("volume", "start", self.name, "force", timeout=timeout)
            remaining = deadline - time.monotonic()
            try:
                self.wait_bricks(online=True, timeout=min(10.0, max(remaining, 1.0)))
                return
            except GlusterError:
                if time.monotonic() >= deadline:
                    raise

    def looks_healthy(self) -> bool:
        """Cheap check without asking glusterd: every brick pid seen at the last start still runs
        and is not stopped (SIGSTOP). False if unknown."""
        if not self._known_pids or self._paused:
            return False
        for pid in self._known_pids:
            state = procs.state(pid)
            if state is None or state in ("T", "t", "Z", "X"):
                return False
        return True

    def ensure_online(self, timeout: float = 60.0) -> bool:
        """Resume stopped bricks and restart dead ones. Returns True if anything had to be done."""
        if self.looks_healthy():
            return False
        self._resume_all()
        for pid in self._known_pids:
            if procs.state(pid) in ("T", "t"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        st = self.status()
        if all(s.online and s.pid and procs.alive(s.pid) for s in st):
            self._known_pids = [s.pid or 0 for s in st]
            return True
        self.start_force(timeout=timeout)
        return True

    def stop(self, force: bool = True, timeout: float = 60.0) -> None:
        self._resume_all()
        gluster("volume", "stop", self.name, *(["force"] if force else []), timeout=timeout)

    # -- options ---------------------------------------------------------------------------
    def set_option(self, key: str, value: str | int | bool, timeout: float = 30.0) -> None:
        """``gluster volume set VOL KEY VALUE`` (bools become on/off)."""
        if isinstance(value, bool):
            value = "on" if value else "off"
        gluster("volume", "set", self.name, key, str(value), timeout=timeout)
        self.options[key] = str(value)

    def reset_option(self, key: str, timeout: float = 30.0) -> None:
        """``gluster volume reset VOL KEY`` (back to the default)."""
        gluster("volume", "reset", self.name, key, timeout=timeout)
        self.options.pop(key, None)

    def get_option(self, key: str, timeout: float = 30.0) -> str:
        """The effective value of ``key`` (``gluster volume get VOL KEY``)."""
        root = gluster_xml("volume", "get", self.name, key, timeout=timeout)
        for opt in root.iter("Opt"):
            if opt.findtext("Option") == key:
                value = opt.findtext("Value") or ""
                return value.removesuffix(" (DEFAULT)")
        raise GlusterError(f"volume get {self.name} {key}: option not in the answer")

    # -- mounts ----------------------------------------------------------------------------
    def mount(self, mountpoint: str | Path | None = None, **kwargs: Any) -> NativeMount:
        """A :class:`NativeMount` of this volume (use it as a context manager)."""
        m = NativeMount(self, mountpoint, **kwargs)
        self._mounts.append(m)
        return m

    # -- teardown --------------------------------------------------------------------------
    def release(self) -> None:
        """Unmount every mount of this volume and resume stopped bricks: after this nothing of the
        test that used it is left but the volume itself (which :meth:`delete` may remove later)."""
        for m in self._mounts:
            with contextlib.suppress(Exception):
                m.unmount()
        self._mounts.clear()
        _unmount_sources_of(self.name)
        self._resume_all()

    def delete(self, timeout: float = 60.0) -> None:
        """Stop and delete the volume, remove its brick dirs and marker.

        Robust when things are half gone: a volume that does not exist, is not started, or
        whose brick dirs are missing is fine. Mounts of this volume are unmounted first.
        """
        errors: list[str] = []
        self.release()
        _delete_volume_named(self.name, timeout=timeout, errors=errors)
        _kill_brick_processes_of(self.name)
        if _is_within(self.brick_root, _bricks_root()):
            shutil.rmtree(self.brick_root, ignore_errors=True)
        if self.brick_root.exists():
            errors.append(f"could not remove {self.brick_root}")
        if errors:
            raise GlusterError(f"deleting volume {self.name}: " + "; ".join(errors))
        with contextlib.suppress(FileNotFoundError):
            _marker_path(self.name).unlink()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    # -- persistence -------------------------------------------------------------------------
    def _marker(self, owner: Mapping[str, Any] | None) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "host": self.host,
            "replica": self.replica,
            "brick_root": str(self.brick_root),
            "brick_dirs": [str(d) for d in self.brick_dirs],
            "options": self.options,
            "owner": owner,
            "created": time.time(),
        }

    @classmethod
    def from_marker(cls, name: str) -> Volume:
        """Re-attach to a volume this module made (e.g. for ``down NAME``)."""
        data = procs.read_json(_marker_path(name))
        if data is None:
            raise GlusterError(
                f"no marker {_marker_path(name)}: {name} was not made by testkit.cluster"
            )
        return cls(
            name=data["name"],
            kind=data.get("kind", "?"),
            host=data.get("host", BRICK_HOST),
            brick_dirs=[Path(p) for p in data.get("brick_dirs", [])],
            replica=int(data.get("replica", 1)),
            brick_root=Path(data.get("brick_root", _bricks_root() / name)),
            options=dict(data.get("options") or {}),
        )


def create_volume(
    kind: str = "replica3",
    name: str | None = None,
    options: Mapping[str, str | int | bool] | None = None,
    *,
    start: bool = True,
    host: str = BRICK_HOST,
    owner_pid: int | None = None,
    timeout: float = 60.0,
) -> Volume:
    """Create (and by default start) a throw-away volume on loopback.

    ``kind`` is one of :data:`KINDS`: "dist1" (1 brick), "replica3" (replica 3), "distrep"
    (2 x 3). Bricks are new directories under ``STATE_DIR/bricks/<name>/``. ``options`` are set
    with ``gluster volume set`` before the start (none by default: gluster's defaults are what
    gfuse must cope with). ``owner_pid`` is the process whose death makes the volume stale for
    :func:`cleanup_stale` (default: this process; 0 means never stale). On any failure the
    half-made volume is deleted again.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown volume kind {kind!r}; choose one of {sorted(KINDS)}")
    name = name or new_volume_name(kind)
    if not _VOLNAME_RE.match(name):
        raise ValueError(f"bad volume name {name!r} (letters, digits, '-', '_', at most 64)")
    if not name.startswith(VOLUME_PREFIX):
        raise ValueError(f"volume names must start with {VOLUME_PREFIX!r} so cleanup can find them")
    if _marker_path(name).exists():
        raise GlusterError(f"a marker for {name} exists already: volume name in use")
    n_bricks, replica = KINDS[kind]
    brick_root = _bricks_root() / name
    vol = Volume(
        name=name,
        kind=kind,
        host=host,
        brick_dirs=[brick_root / f"b{i}" for i in range(n_bricks)],
        replica=replica,
        brick_root=brick_root,
        options={
            k: ("on" if v is True else "off" if v is False else str(v))
            for k, v in (options or {}).items()
        },
    )
    owner = (
        procs.record(os.getpid() if owner_pid is None else owner_pid)
    )
    # marker first: if we die after this point, cleanup_stale finds whatever we made
    procs.write_json(_marker_path(name), vol._marker(owner))
    try:
        for d in vol.brick_dirs:
            d.mkdir(parents=True, exist_ok=False)
        args = ["volume", "create", name]
        if replica > 1:
            args += ["replica", str(replica)]
        if kind in ARBITERS:
            args += ["arbiter", str(ARBITERS[kind])]
        gluster(*args, *vol.bricks, "force", timeout=timeout)
        for key, value in vol.options.items():
            gluster("volume", "set", name, key, value, timeout=timeout)
        if start:
            vol.start(timeout=timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            vol.delete()
        raise
    return vol


def _delete_volume_named(name: str, timeout: float, errors: list[str]) -> None:
    """volume stop force + volume delete, tolerating 'does not exist' / 'not started'."""
    try:
        existing = set(list_volumes(timeout=timeout))
    except GlusterError as exc:
        errors.append(f"volume list: {exc}")
        return
    if name not in existing:
        return
    try:
        gluster("volume", "stop", name, "force", timeout=timeout)
    except GlusterError as exc:
        if not re.search(r"not in started state|does not exist", exc.output, re.IGNORECASE):
            errors.append(f"stop: {exc.output.strip() or exc}")
    try:
        gluster("volume", "delete", name, timeout=timeout)
    except GlusterError as exc:
        if not re.search(r"does not exist", exc.output, re.IGNORECASE):
            errors.append(f"delete: {exc.output.strip() or exc}")


def _kill_brick_processes_of(name: str) -> None:
    """SIGKILL glusterfsd processes still serving bricks of volume ``name`` (a last resort)."""
    needle = f"{name}.".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"glusterfsd"):
            continue
        for j, arg in enumerate(argv[:-1]):
            if arg == b"--volfile-id" and argv[j + 1].startswith(needle):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(entry.name), signal.SIGCONT)
                    os.kill(int(entry.name), signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# native mounts


def is_mounted(path: str | Path) -> bool:
    """True if ``path`` is a mount point of this mount namespace."""
    return mounttable.is_mounted(str(path))


def _umount(path: str | Path, timeout: float = 30.0) -> None:
    """umount, falling back to a lazy umount (busy mount, dead FUSE server)."""
    p = str(path)
    proc = None
    with contextlib.suppress(GlusterError):
        proc = _run(["umount", p], timeout=timeout, check=False)
    if proc is not None and proc.returncode == 0 and not is_mounted(p):
        return
    if is_mounted(p):
        _run(["umount", "-l", p], timeout=timeout, check=False)
    if is_mounted(p):
        raise GlusterError(f"could not unmount {p}")


def _unmount_sources_of(volname: str) -> None:
    """Lazily unmount every mount whose source is ``*:/volname`` (our volumes only)."""
    for m in reversed(mounttable.read_mounts()):
        source, mp = m.source, m.target
        if source.endswith(f":/{volname}") or source.endswith(f":{volname}"):
            with contextlib.suppress(GlusterError):
                _umount(mp, timeout=15)


class NativeMount:
    """``mount -t glusterfs HOST:/VOL DIR`` for the lifetime of a ``with`` block.

    ``mountpoint`` defaults to a fresh directory under ``STATE_DIR/mnt`` (removed again on exit).
    ``options`` are passed as ``-o a,b,c`` (e.g. ``["log-level=DEBUG"]``). On exit the mount is
    unmounted, lazily if it is busy. A marker under ``STATE_DIR/mounts`` lets
    :func:`cleanup_stale` unmount it if this process dies first.
    """

    def __init__(
        self,
        volume: Volume | str,
        mountpoint: str | Path | None = None,
        *,
        server: str | None = None,
        options: Sequence[str] = (),
        timeout: float = 60.0,
    ) -> None:
        if isinstance(volume, Volume):
            self.volname = volume.name
            self.server = server or volume.host
        else:
            self.volname = volume
            self.server = server or BRICK_HOST
        self._made_dir = mountpoint is None
        self.path = (
            Path(mountpoint)
            if mountpoint is not None
            else (STATE_DIR / "mnt" / f"{self.volname}-{secrets.token_hex(3)}")
        )
        self.options = list(options)
        self.timeout = timeout
        self._marker = STATE_DIR / "mounts" / f"{self.path.name}-{secrets.token_hex(3)}.json"
        self.mounted = False

    @property
    def source(self) -> str:
        return f"{self.server}:/{self.volname}"

    def mount(self) -> NativeMount:
        self.path.mkdir(parents=True, exist_ok=True)
        procs.write_json(
            self._marker,
            {
                "mountpoint": str(self.path),
                "source": self.source,
                "owner": procs.record(os.getpid()),
                "made_dir": self._made_dir,
            },
        )
        cmd = ["mount", "-t", "glusterfs"]
        if self.options:
            cmd += ["-o", ",".join(self.options)]
        cmd += [self.source, str(self.path)]
        try:
            _run(cmd, timeout=self.timeout, what="mount -t glusterfs")
            if not is_mounted(self.path):
                raise GlusterError(
                    f"mount -t glusterfs {self.source} {self.path}: not in /proc/mounts"
                )
            os.stat(self.path)  # the client answers
        except BaseException:
            with contextlib.suppress(Exception):
                self.unmount()
            raise
        self.mounted = True
        return self

    def unmount(self) -> None:
        if is_mounted(self.path):
            _umount(self.path, timeout=self.timeout)
        self.mounted = False
        if self._made_dir:
            with contextlib.suppress(OSError):
                self.path.rmdir()
        with contextlib.suppress(FileNotFoundError):
            self._marker.unlink()

    def __enter__(self) -> NativeMount:
        return self.mount()

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def __repr__(self) -> str:
        return f"NativeMount({self.source!r} on {str(self.path)!r}, mounted={self.mounted})"


class GfuseMount(NativeMount):
    """``gfuse mount HOST:/VOL DIR`` (daemonized, as users run it) for the lifetime of a ``with`` block.

    On exit the mount is unmounted and the serving process is waited for (killed if it
    lingers), so no FUSE server outlives a test.
    """

    def mount(self) -> "GfuseMount":
        self.path.mkdir(parents=True, exist_ok=True)
        procs.write_json(self._marker, {"mountpoint": str(self.path), "source": self.source,
                                   "owner": procs.record(os.getpid()), "made_dir": self._made_dir})
        cmd = [sys.executable, "-m", "gfuse.cli", "mount", self.source, str(self.path)]
        if self.options:
            cmd += ["-o", ",".join(self.options)]
        try:
            out = _run(cmd, timeout=self.timeout, what="gfuse mount")
            m = re.search(r"\(pid (\d+),", out.stdout or "")
            self.pid = int(m.group(1)) if m else None
            if not is_mounted(self.path):
                raise GlusterError(f"gfuse mount {self.source} {self.path}: not in /proc/mounts")
            os.stat(self.path)
        except BaseException:
            with contextlib.suppress(Exception):
                self.unmount()
            raise
        self.mounted = True
        return self

    def unmount(self) -> None:
        super().unmount()
        pid = getattr(self, "pid", None)
        if pid:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and procs.alive(pid):
                time.sleep(0.05)
            if procs.alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.pid = None

    def __enter__(self) -> "GfuseMount":
        return self.mount()

    def __repr__(self) -> str:
        return f"GfuseMount({self.source!r} on {str(self.path)!r}, mounted={self.mounted})"


# --------------------------------------------------------------------------------------------
# cleanup


def our_volumes() -> dict[str, dict[str, Any]]:
    """Markers of every volume this module made (and has not deleted), by name."""
    out: dict[str, dict[str, Any]] = {}
    d = STATE_DIR / "volumes"
    if d.is_dir():
        for p in sorted(d.glob("*.json")):
            data = procs.read_json(p)
            if data and data.get("name") == p.stem and str(p.stem).startswith(VOLUME_PREFIX):
                out[p.stem] = data
    return out


def cleanup_stale(all_ours: bool = False, timeout: float = 60.0, log: Any = None) -> list[str]:
    """Delete volumes this module made whose owner process is dead; unmount stale mounts.

    Only volumes with a marker in ``STATE_DIR/volumes`` (and our name prefix) are considered;
    volumes anybody else made are never touched. ``all_ours`` also deletes ours whose owner still
    runs. Returns the names of the deleted volumes. ``log`` is an optional print-like callable.
    """
    say = log or (lambda *_a, **_k: None)
    # stale mounts first (a mount keeps a client connected to the bricks we are about to stop)
    mdir = STATE_DIR / "mounts"
    if mdir.is_dir():
        for p in sorted(mdir.glob("*.json")):
            data = procs.read_json(p) or {}
            if _owner_alive(data.get("owner")) and not all_ours:
                continue
            mp = data.get("mountpoint")
            if mp and is_mounted(mp):
                say(f"unmounting stale mount {data.get('source')} on {mp}")
                with contextlib.suppress(GlusterError):
                    _umount(mp, timeout=15)
            if mp and data.get("made_dir") and _is_within(Path(mp), STATE_DIR / "mnt"):
                with contextlib.suppress(OSError):
                    Path(mp).rmdir()
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    deleted: list[str] = []
    failures: list[str] = []
    for name, data in our_volumes().items():
        if _owner_alive(data.get("owner")) and not all_ours:
            continue
        say(f"deleting stale volume {name} (owner {data.get('owner')})")
        try:
            Volume.from_marker(name).delete(timeout=timeout)
            deleted.append(name)
        except GlusterError as exc:
            failures.append(str(exc))
    # brick dirs whose marker is gone (deleted volume, rmtree interrupted), if old and unused
    broot = _bricks_root()
    if broot.is_dir():
        with contextlib.suppress(GlusterError):
            existing = set(list_volumes(timeout=timeout))
            markers = set(our_volumes())
            for d in broot.iterdir():
                if (
                    d.name.startswith(VOLUME_PREFIX)
                    and d.name not in markers
                    and d.name not in existing
                    and time.time() - d.stat().st_mtime > 600
                ):
                    say(f"removing orphan brick dir {d}")
                    shutil.rmtree(d, ignore_errors=True)
    if failures:
        raise GlusterError("cleanup_stale: " + "\n".join(failures))
    return deleted


# --------------------------------------------------------------------------------------------
# command line


def _parse_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testkit.cluster",
        description="Throw-away GlusterFS volumes on loopback for gfuse tests.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start glusterd if needed and create + start a volume")
    up.add_argument("--kind", choices=sorted(KINDS), default="replica3")
    up.add_argument("--name", help=f"volume name (must start with {VOLUME_PREFIX!r})")
    up.add_argument(
        "--option",
        "-o",
        action="append",
        type=_parse_option,
        default=[],
        metavar="KEY=VALUE",
        help="volume option to set before the start",
    )
    owner = up.add_mutually_exclusive_group()
    owner.add_argument(
        "--owner",
        type=int,
        default=None,
        help="pid whose exit makes the volume stale (default: the parent process)",
    )
    owner.add_argument(
        "--keep",
        action="store_true",
        help="never stale: only 'down NAME' or 'cleanup --all' delete it",
    )
    up.add_argument("--print-name", action="store_true", help="print only the volume name")
    down = sub.add_parser("down", help="delete a volume made by 'up' (and unmount its mounts)")
    down.add_argument("name")
    clean = sub.add_parser("cleanup", help="delete our volumes whose owner process is dead")
    clean.add_argument(
        "--all",
        action="store_true",
        help="delete all volumes made by this tool, owners alive or not",
    )
    sub.add_parser("list", help="list the volumes made by this tool and their owners")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "up":
            gd = ensure_glusterd()
            owner_pid = 0 if args.keep else (args.owner if args.owner is not None else os.getppid())
            vol = create_volume(args.kind, args.name, dict(args.option), owner_pid=owner_pid)
            if args.print_name:
                print(vol.name)
                return 0
            print(f"glusterd running (pid {gd.pid}), volfile server {vol.server}:{GLUSTERD_PORT}")
            print(
                f"created and started volume {vol.name} ({vol.kind}, {len(vol.bricks)} bricks,"
                f" replica {vol.replica})"
            )
            for b in vol.bricks:
                print(f"  brick {b}")
            for k, v in vol.options.items():
                print(f"  option {k} = {v}")
            print("owner: " + ("none (--keep)" if owner_pid == 0 else f"pid {owner_pid}"))
            print(f"mount it:  mount -t glusterfs {vol.source} /mnt/DIR")
            print(f"remove it: python -m testkit.cluster down {vol.name}")
        elif args.cmd == "down":
            if not args.name.startswith(VOLUME_PREFIX) or args.name not in our_volumes():
                print(
                    f"{args.name}: not a volume made by testkit.cluster; not touching it",
                    file=sys.stderr,
                )
                return 2
            Volume.from_marker(args.name).delete()
            print(f"deleted volume {args.name} and its brick directories")
        elif args.cmd == "cleanup":
            ensure_glusterd()
            deleted = cleanup_stale(all_ours=args.all, log=print)
            print(
                f"cleanup: deleted {len(deleted)} volume(s)"
                + (f": {' '.join(deleted)}" if deleted else "")
            )
        elif args.cmd == "list":
            for name, data in our_volumes().items():
                owner_rec = data.get("owner")
                state = (
                    "kept"
                    if not owner_rec
                    else (
                        f"owner pid {owner_rec.get('pid')} "
                        + ("alive" if _owner_alive(owner_rec) else "dead")
                    )
                )
                print(f"{name}\t{data.get('kind')}\t{state}")
    except GlusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
