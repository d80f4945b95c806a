"""How the provisioners talk to glusterd: the ``gluster`` CLI on glusterd's unix socket, with ``--xml``.

Why the CLI on the unix socket, and not glusterd's management RPC over TCP
--------------------------------------------------------------------------
glusterd serves the CLI's RPC program (GlusterD svc cli, the same XDR ``gf_cli_req`` that the
``gluster`` binary sends) on two listeners, and they are not equal:

* on its **unix socket** (``/var/run/glusterd.socket``, or ``management.glusterd-sockfile``) the
  full program: create/start/stop/delete volumes, set options, quota, peer probe;
* on **TCP 24007** only the program ``GlusterD svc cli read-only``: ``volume info``, ``volume
  status``, ``volume list``, ``peer status`` work (``gluster --remote-host=H``), every change is
  refused. Measured on glusterfs 10.3: ``gluster --remote-host=127.1.1.1 volume set V user.x y``
  and ``volume create`` fail, and glusterd logs ``RPC Program procedure not available for procedure
  12 in GlusterD svc cli read-only``. This is deliberate: the TCP port has no authentication
  for management (anyone who reaches 24007 could otherwise delete volumes), while the unix socket
  is protected by file permissions (root only).

So a provisioner that changes anything must reach the unix socket of *some* glusterd of the
cluster; speaking the RPC ourselves would not get around that, it would only re-implement the CLI
(op codes and dict keys that change between gluster versions, the quota auxiliary mount the CLI and
glusterd cooperate on) for no gain. The CLI's ``--xml`` output is gluster's stable, documented
machine interface (``opRet``/``opErrno``/``opErrstr`` + typed elements), and ``--mode=script``
never prompts.

Where the CLI runs is the one deployment choice, and it is a command prefix (:class:`Glusterd`
``command``), never SSH:

* **converged** (gluster server pods): the CLI inside a storage pod, e.g. ``kubectl exec -n
  glusterfs ds/glusterfs -- gluster`` (or the provisioner pod mounts the node's
  ``/var/run/glusterd.socket`` through a hostPath and runs its own ``gluster --glusterd-sock``);
* **independent** (nodes with gluster installed): the provisioner runs on a storage node (or on
  any machine given that node's socket), ``gluster --glusterd-sock=/var/run/glusterd.socket``;
  ``gfuse cluster init`` runs there too and peers the others over glusterd's own TCP (peer probe);
* **tests** (testkit.multicluster): ``nsenter -t PID --net --mount gluster --glusterd-sock=...``.

Read-only information could come over TCP from any node; we use the same socket for everything so
that one path is tested.

Errors become :class:`~flexvolume.storage.api.StorageError`: ``glusterd-unreachable`` when the CLI
cannot connect (glusterd down, wrong socket) or times out, ``gluster-error`` with gluster's own
message otherwise. "Another transaction is in progress" / "Locking failed" answers (glusterd's
cluster-wide lock is held by another command) are retried until the timeout.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from .api import StorageError

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/run/glusterd.socket"

_RETRYABLE = re.compile(r"another transaction|locking failed|lock.*(held|failed)|try again|"
                        r"staging failed on .*(not|connected)|quorum", re.IGNORECASE)
_UNREACHABLE = re.compile(r"connection failed|is the gluster daemon|daemon is operational|no such file", re.IGNORECASE)


@dataclass
class Brick:
    host: str
    path: str
    online: bool | None = None

    @property
    def spec(self) -> str:
        return f"{self.host}:{self.path}"


@dataclass
class VolumeInfo:
    name: str
    status: str                      # Created | Started | Stopped
    type: str                        # Replicate, Distribute, Distributed-Replicate, ...
    replica: int
    bricks: list[Brick]
    options: dict[str, str] = field(default_factory=dict)

    @property
    def started(self) -> bool:
        return self.status == "Started"


@dataclass
class Peer:
    uuid: str
    hostname: str
    connected: bool
    state: str


@dataclass
class QuotaLimit:
    path: str
    hard_limit: int
    used: int


class Glusterd:
    """One glusterd, reached by running ``command --glusterd-sock=SOCKET --mode=script --xml ARGS``.

    ``command`` is the CLI to run with any prefix (see the module docstring); ``socket`` None means
    the CLI's default socket. Every call has a timeout.
    """

    def __init__(self, socket: str | None = DEFAULT_SOCKET, *, command: Sequence[str] = ("gluster",),
                 timeout: float = 120.0) -> None:
        self.socket = socket
        self.command = list(command)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Glusterd({self.socket!r}, command={shlex.join(self.command)!r})"

    # -- raw ---------------------------------------------------------------------------------------

    def argv(self, *args: str, xml: bool = True) -> list[str]:
        cmd = list(self.command)
        if self.socket and not any(a.startswith("--glusterd-sock") for a in cmd):
            cmd.append(f"--glusterd-sock={self.socket}")
        return [*cmd, "--mode=script", *(["--xml"] if xml else []), *args]

    def _attempts(self, cmd: list[str], what: str, timeout: float | None
                  ) -> Iterator[subprocess.CompletedProcess[str]]:
        """Run ``cmd`` until the caller stops asking: each answer in turn, with the busy-glusterd back-off
        between them; StorageError when the CLI cannot run, does not answer, or time is up."""
        limit = timeout or self.timeout
        deadline = time.monotonic() + limit
        delay = 0.2
        while True:
            remaining = max(deadline - time.monotonic(), 1.0)
            try:
                yield subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                     timeout=remaining)
            except subprocess.TimeoutExpired:
                raise StorageError("glusterd-unreachable",
                                   f"{what}: no answer from glusterd ({self.socket or 'its default socket'}) "
                                   f"within {limit:.0f}s") from None
            except FileNotFoundError as e:
                raise StorageError("glusterd-unreachable",
                                   f"cannot run the gluster CLI ({self.command[0]}): {e}") from None
            if time.monotonic() + delay >= deadline:
                return
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def text(self, *args: str, timeout: float | None = None, check: bool = True) -> str:
        """Run one CLI command without --xml (for the few whose XML output is broken); its stdout.

        Busy-glusterd answers are retried like :meth:`xml`; with ``check=False`` the stdout of a failing
        command is returned instead of raising.
        """
        what = "gluster " + " ".join(args[:3])
        out = ""
        for proc in self._attempts(self.argv(*args, xml=False), what, timeout):
            out = proc.stdout + proc.stderr
            if proc.returncode == 0 or not check:
                return proc.stdout
            if _UNREACHABLE.search(out):
                raise StorageError("glusterd-unreachable", f"{what}: {out.strip()}")
            if not _RETRYABLE.search(out):
                break
            log.info("%s: %s; retrying", what, out.strip())
        raise StorageError("gluster-error", f"{what}: {out.strip()}")

    def xml(self, *args: str, timeout: float | None = None) -> ET.Element:
        """Run one CLI command; its ``<cliOutput>`` on success, StorageError otherwise."""
        what = "gluster " + " ".join(args[:3])
        err, code = "", 0
        for proc in self._attempts(self.argv(*args), what, timeout):
            root = None
            if proc.stdout.strip().startswith("<"):
                try:
                    root = ET.fromstring(proc.stdout)
                except ET.ParseError:
                    root = None
            if root is not None and root.findtext("opRet") == "0":
                log.debug("%s: ok", what)
                return root
            code = proc.returncode
            err = ((root.findtext("opErrstr") if root is not None else None) or proc.stderr or proc.stdout).strip()
            if root is None and _UNREACHABLE.search(err):
                raise StorageError("glusterd-unreachable",
                                   f"{what}: glusterd does not answer on {self.socket or 'its default socket'}: "
                                   f"{err or f'exit status {code}'}")
            if not _RETRYABLE.search(err):
                break
            log.info("%s: %s; retrying", what, err)
        failure = StorageError("gluster-error", f"{what}: {err or f'no output, exit status {code}'}")
        failure.gluster_errstr = err  # type: ignore[attr-defined]
        raise failure

    def ping(self) -> None:
        """StorageError('glusterd-unreachable') unless glusterd answers."""
        self.xml("volume", "list", timeout=min(self.timeout, 30))

    # -- volumes -----------------------------------------------------------------------------------

    def volumes(self) -> list[str]:
        root = self.xml("volume", "list")
        return [v.text or "" for v in root.iter("volume") if v.text]

    def volume_info(self, name: str) -> VolumeInfo | None:
        """The volume, or None if there is no such volume."""
        try:
            root = self.xml("volume", "info", name)
        except StorageError as e:
            if e.reason == "gluster-error" and re.search(r"does not exist|not found", e.message, re.IGNORECASE):
                return None
            raise
        vol = root.find("volInfo/volumes/volume")
        if vol is None:
            return None
        bricks = []
        for b in vol.iter("brick"):
            spec = b.findtext("name") or (b.text or "").strip()
            host, _, path = spec.partition(":")
            bricks.append(Brick(host, path))
        options = {o.findtext("name") or "": o.findtext("value") or "" for o in vol.iter("option")}
        return VolumeInfo(
            name=vol.findtext("name") or name,
            status=vol.findtext("statusStr") or "",
            type=vol.findtext("typeStr") or "",
            replica=int(vol.findtext("replicaCount") or 1),
            bricks=bricks,
            options=options,
        )

    def all_volume_info(self) -> list[VolumeInfo]:
        root = self.xml("volume", "info", "all")
        out = []
        for vol in root.iter("volume"):
            if vol.find("name") is None:
                continue
            bricks = []
            for b in vol.iter("brick"):
                spec = b.findtext("name") or (b.text or "").strip()
                host, _, path = spec.partition(":")
                bricks.append(Brick(host, path))
            out.append(VolumeInfo(vol.findtext("name") or "", vol.findtext("statusStr") or "",
                                  vol.findtext("typeStr") or "", int(vol.findtext("replicaCount") or 1), bricks,
                                  {o.findtext("name") or "": o.findtext("value") or "" for o in vol.iter("option")}))
        return out

    def create_volume(self, name: str, bricks: Sequence[Brick], replica: int = 1, force: bool = True) -> None:
        args = ["volume", "create", name]
        if replica > 1:
            args += ["replica", str(replica)]
        args += [b.spec for b in bricks]
        if force:
            args.append("force")
        self.xml(*args)

    def set_options(self, name: str, options: Mapping[str, str]) -> None:
        if not options:
            return
        args = ["volume", "set", name]
        for k, v in options.items():
            args += [k, str(v)]
        self.xml(*args)

    def reset_option(self, name: str, key: str) -> None:
        self.xml("volume", "reset", name, key)

    def start_volume(self, name: str, force: bool = False) -> None:
        try:
            self.xml("volume", "start", name, *(["force"] if force else []))
        except StorageError as e:
            if not force and "already started" in e.message:
                return
            raise

    def stop_volume(self, name: str) -> None:
        try:
            self.xml("volume", "stop", name, "force")
        except StorageError as e:
            if "not in the started state" in e.message or "is not started" in e.message:
                return
            raise

    def delete_volume(self, name: str) -> None:
        try:
            self.xml("volume", "delete", name)
        except StorageError as e:
            if re.search(r"does not exist", e.message, re.IGNORECASE):
                return
            raise

    def brick_status(self, name: str) -> list[Brick]:
        root = self.xml("volume", "status", name)
        out = []
        for node in root.iter("node"):
            host = node.findtext("hostname") or ""
            path = node.findtext("path") or ""
            if not path.startswith("/"):
                continue  # self-heal daemon, quotad, ...
            out.append(Brick(host, path, node.findtext("status") == "1"))
        return out

    # -- peers -------------------------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        root = self.xml("peer", "status")
        return [Peer(p.findtext("uuid") or "", p.findtext("hostname") or "", p.findtext("connected") == "1",
                     p.findtext("stateStr") or "") for p in root.iter("peer")]

    def pool(self) -> list[Peer]:
        """Every node of the trusted pool, this one included (hostname 'localhost')."""
        root = self.xml("pool", "list")
        return [Peer(p.findtext("uuid") or "", p.findtext("hostname") or "", p.findtext("connected") == "1",
                     p.findtext("stateStr") or "") for p in root.iter("peer")]

    def peer_probe(self, host: str) -> None:
        self.xml("peer", "probe", host)

    # -- quota -------------------------------------------------------------------------------------

    def quota_enabled(self, name: str, info: VolumeInfo | None = None) -> bool:
        info = info or self.volume_info(name)
        return bool(info and info.options.get("features.quota") == "on")

    def quota_enable(self, name: str) -> None:
        try:
            self.xml("volume", "quota", name, "enable")
        except StorageError as e:
            if "already enabled" in e.message:
                return
            raise

    def quota_limit(self, name: str, path: str, size_bytes: int) -> None:
        self.xml("volume", "quota", name, "limit-usage", path, str(int(size_bytes)))

    def quota_remove(self, name: str, path: str) -> None:
        """Remove the limit on ``path`` (fine if it has none or is gone)."""
        try:
            self.xml("volume", "quota", name, "remove", path)
        except StorageError as e:
            if re.search(r"no (such file|limit|quota|data available)|not (set|configured)|does not exist|"
                         r"Failed to get trusted.gfid",
                         e.message, re.IGNORECASE):
                return
            raise

    def quota_paths(self, name: str) -> list[str]:
        """Every path with a limit. (``quota VOL list --xml`` without paths prints nothing in
        glusterfs 10.3, so this reads the table of the plain output.)"""
        out = self.text("volume", "quota", name, "list")
        return [line.split()[0] for line in out.splitlines() if line.startswith("/")]

    def quota_list(self, name: str, paths: Iterable[str] | None = None) -> list[QuotaLimit]:
        """Limits (exact bytes) of ``paths``, or of every limited path."""
        paths = list(paths) if paths is not None else self.quota_paths(name)
        if not paths:
            return []
        try:
            root = self.xml("volume", "quota", name, "list", *paths)
        except StorageError as e:
            if re.search(r"no quota configured|quota is disabled|not enabled", e.message, re.IGNORECASE):
                return []
            raise
        out = []
        for lim in root.iter("limit"):
            try:
                out.append(QuotaLimit(lim.findtext("path") or "", int(lim.findtext("hard_limit") or 0),
                                      int(lim.findtext("used_space") or 0)))
            except ValueError:
                continue
        return out
