"""Several real glusterd on one machine, one per loopback address 127.1.1.N: a multi-node cluster for tests.

This follows gluster's own regression suite (``tests/cluster.rc`` in github:gluster/glusterfs), which
starts each glusterd of a test cluster with::

    glusterd --xlator-option management.working-directory=$B/glusterd
             --xlator-option management.transport.socket.bind-address=127.1.1.N
             --xlator-option management.run-directory=$B/run/gluster
             --xlator-option management.glusterd-sockfile=$B/glusterd/gd.sock
             --xlator-option management.logging-directory=$LOGDIR/N
             --log-file=$LOGDIR/N/... --pid-file=$B/glusterd.pid

and talks to node N with ``gluster --glusterd-sock=$B/glusterd/gd.sock``. We pass exactly these
options. Two things the regression suite does not have to care about make a plain copy impossible on
a machine where a default glusterd already runs (measured here, glusterfs 10.3):

1. **Port conflict.** The default glusterd listens on ``0.0.0.0:24007``, and Linux refuses to bind
   ``127.1.1.N:24007`` while a wildcard listener holds the port (EADDRINUSE, even with
   SO_REUSEADDR). The management port cannot simply be moved either: ``gluster peer probe`` always
   probes port 24007, and bricks, self-heal daemons and clients find glusterd there. So the cluster
   gets its **own network namespace** (its own ``lo``, on which 127.0.0.0/8 routes locally as usual):
   inside it every glusterd binds 127.1.1.N:24007 and every brick 127.1.1.N:<port>, and nothing
   of it is reachable from, or collides with, the host's glusterd and bricks.
2. **Hard-coded host paths.** Some paths are compiled into gluster and ignore the options above:
   bricks reach the quota daemon at ``/var/run/gluster/quotad.socket`` (each quotad binds it: a
   second glusterd's quotad would steal the default glusterd's socket), the CLI reads
   ``/var/lib/glusterd/vols/VOL/quota.conf`` for ``volume quota VOL list`` (it would read the
   default glusterd's), the CLI talks to quotad only if ``/var/run/gluster/quotad/quotad.pid``
   exists, and quota's auxiliary mounts live under ``/var/run/gluster``. So each node
   also gets its **own mount namespace** in which ``/var/lib/glusterd``, ``/run/gluster`` and
   ``/var/log/glusterfs`` are bind mounts of that node's working, run and log directories --
   exactly what a real separate machine would have. Each is the same directory under both names,
   so the cluster.rc options and the hard-coded paths agree.
   One more is not covered by these binds: glfsheal, behind ``volume heal VOL info``, fetches the
   volfile from ``/var/run/glusterd.socket`` (the host's glusterd): use :meth:`MultiCluster.heal_info`.

The namespaces are held by small ``sleep`` processes (``holders``); every gluster process of the
cluster is started with ``nsenter`` into them. Unix sockets live in the file system, so a glusterd
socket is reachable from the host too, but the gluster CLI must run in the node's mount namespace
for quota (see 2.), hence :meth:`MultiCluster.gluster_command` returns the whole prefix
``nsenter -t HOLDER --net --mount gluster --glusterd-sock=SOCK``. Clients of the cluster (``gfuse
mount 127.1.1.1:/VOL DIR``) run in the cluster's network namespace but in the *host* mount
namespace (``nsenter --net`` only), so their FUSE mounts are visible to the test.

Nothing here touches the default glusterd, its volumes or its peers.

Ownership and cleanup
---------------------
Each cluster lives in ``ROOT/<id>/`` (``ROOT`` = ``/var/tmp/gfuse-multicluster``) with a
``cluster.json`` written *before* anything is started: owner process (pid, start time, boot id),
holder pids with their start times, the inode of the network namespace, and the mounts made. A
cluster is torn down by killing every process in its network namespace (identified by the recorded
namespace inode while a recorded holder still runs, else by its command line naming the cluster
directory), lazily unmounting its mounts and removing its directory. :func:`cleanup_stale` does
this for clusters whose owner is dead (a crashed test run); it is called by :meth:`MultiCluster.start`,
so leftovers never pile up.

Command line::

    python -m testkit.multicluster up [-n 3] [--keep]     # prints the cluster directory and node sockets
    python -m testkit.multicluster down ID|all
    python -m testkit.multicluster cleanup
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexvolume.storage.api import StorageError
from gfuse import mounttable
from flexvolume.storage.glusterd import Glusterd as GlusterCli

from . import procs

__all__ = ["PREFIX", "ROOT", "MultiCluster", "MultiClusterError", "Node", "cleanup_stale", "unavailable_reason"]

ROOT = Path(os.environ.get("GFUSE_MULTICLUSTER_ROOT", "/var/tmp/gfuse-multicluster"))
#: the option groups of the host's glusterd package, copied into each node's working directory
HOST_GROUPS = Path("/var/lib/glusterd/groups")
PREFIX = "127.1.1"
GLUSTERD_BIN = os.environ.get("GFUSE_GLUSTERD", "/usr/sbin/glusterd")
#: where packages put glfsheal (the program behind ``volume heal VOL info``): Debian, upstream, Fedora
GLFSHEAL_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/glusterfs/glfsheal", "/usr/sbin/glfsheal",
                       "/usr/libexec/glusterfs/glfsheal")


class MultiClusterError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------
# process helpers


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def is_mounted(path: str | Path) -> bool:
    return mounttable.is_mounted(str(path))


def _mount_targets() -> list[str]:
    return [m.target for m in mounttable.read_mounts()]


def _run(cmd: Sequence[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MultiClusterError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}") from None
    if check and proc.returncode != 0:
        raise MultiClusterError(f"failed (exit {proc.returncode}): {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return proc


def unavailable_reason() -> str | None:
    """Why a multi-glusterd cluster cannot run here (None if it can)."""
    if os.geteuid() != 0:
        return "needs root (namespaces, glusterd, mounts)"
    for b in (GLUSTERD_BIN, "gluster", "glusterfsd", "nsenter", "unshare", "ip"):
        if not (shutil.which(b) or Path(b).is_file()):
            return f"{b} is not installed"
    return None


# ------------------------------------------------------------------------------------------------
# teardown (shared by MultiCluster.stop and cleanup_stale)


def _cluster_pids(state: dict[str, Any], cdir: Path) -> list[int]:
    """Every process of the cluster: in its network namespace (trusted only while a holder runs), or
    naming the cluster directory on its command line."""
    holders = [state.get("net_holder"), *state.get("holders", [])]
    ns_trusted = any(procs.same_process(h) for h in holders if h)
    ns = state.get("netns")
    me = os.getpid()
    found = []
    needle = str(cdir)
    for pid in _pids():
        if pid == me:
            continue
        if ns_trusted and ns and _netns_inode(pid) == ns or needle in _cmdline(pid):
            found.append(pid)
    return found


def _teardown(cdir: Path, state: dict[str, Any], timeout: float = 20.0, reap: Any = None) -> list[str]:
    """Unmount, kill and remove everything of one cluster. Returns problems (empty if all went)."""
    problems: list[str] = []
    # client mounts first (lazily: their servers may be gone already); they live in the host mount ns
    for mp in state.get("mounts", []):
        if is_mounted(mp):
            _run(["umount", "-l", mp], timeout=15, check=False)
    for mp in reversed(_mount_targets()):
        if mp.startswith(str(cdir) + "/"):
            _run(["umount", "-l", mp], timeout=15, check=False)
    deadline = time.monotonic() + timeout
    sig = signal.SIGTERM
    while True:
        pids = _cluster_pids(state, cdir)
        if not pids:
            break
        if time.monotonic() > deadline - timeout / 2:
            sig = signal.SIGKILL
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, sig)
        if reap:
            reap()
        if time.monotonic() > deadline:
            problems.append(f"processes still alive: {pids}")
            break
        time.sleep(0.2)
    for mp in reversed(_mount_targets()):
        if mp.startswith(str(cdir) + "/"):
            problems.append(f"still mounted: {mp}")
    if not problems:
        shutil.rmtree(cdir, ignore_errors=True)
        if cdir.exists():
            problems.append(f"could not remove {cdir}")
    return problems


def cleanup_stale(all_clusters: bool = False, log: Any = None) -> list[str]:
    """Tear down clusters whose owner process is dead (all of ours with ``all_clusters``)."""
    say = log or (lambda *_a, **_k: None)
    done: list[str] = []
    if not ROOT.is_dir():
        return done
    for cdir in sorted(ROOT.iterdir()):
        if not cdir.is_dir():
            continue
        state = procs.read_json(cdir / "cluster.json") or {}
        owner = state.get("owner")
        if not all_clusters and (procs.kept(owner) or procs.same_process(owner)):
            continue  # alive, or kept on purpose (pid 0)
        if not state and time.time() - cdir.stat().st_mtime < 60:
            continue  # being created right now by someone
        say(f"tearing down stale multicluster {cdir.name}")
        problems = _teardown(cdir, state)
        if problems:
            say(f"  {cdir.name}: " + "; ".join(problems))
        done.append(cdir.name)
    return done


# ------------------------------------------------------------------------------------------------
# the cluster


@dataclass
class Node:
    index: int            # 1-based, as in cluster.rc
    host: str             # 127.1.1.N
    dir: Path             # B$N
    holder: int = 0       # pid of the process holding this node's mount namespace

    @property
    def workdir(self) -> Path:
        return self.dir / "glusterd"

    @property
    def rundir(self) -> Path:
        return self.dir / "run" / "gluster"

    @property
    def logdir(self) -> Path:
        return self.dir / "log"

    @property
    def socket(self) -> Path:
        return self.workdir / "gd.sock"

    @property
    def pidfile(self) -> Path:
        return self.dir / "glusterd.pid"

    @property
    def bricks(self) -> Path:
        """A directory for this node's bricks (a brick pool)."""
        return self.dir / "bricks"

    def glusterd_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        if procs.start_time(pid) is None or str(self.dir) not in _cmdline(pid):
            return None
        return pid


class MultiCluster:
    """``n`` glusterd on 127.1.1.1..n in a private network namespace, each node in its own mount namespace.

    Use as a context manager (``with MultiCluster(3) as mc:``) or call :meth:`start`/:meth:`stop`.
    ``start`` only starts the glusterds (unconfigured, unpeered: an "independent mode" cluster
    before ``gfuse cluster init``); :meth:`peer_all` peers them for tests that need it.
    """

    def __init__(self, n: int = 3, *, name: str | None = None, owner_pid: int | None = None,
                 timeout: float = 30.0) -> None:
        if not 1 <= n <= 9:
            raise ValueError("1..9 nodes")
        self.id = name or f"mc{os.getpid()}-{secrets.token_hex(3)}"
        self.dir = ROOT / self.id
        self.nodes = [Node(i, f"{PREFIX}.{i}", self.dir / str(i)) for i in range(1, n + 1)]
        self.timeout = timeout
        self.owner_pid = os.getpid() if owner_pid is None else owner_pid
        self.net_holder = 0
        self._children: list[subprocess.Popen[bytes]] = []
        self.state: dict[str, Any] = {}

    # -- state -----------------------------------------------------------------------------------

    def _save(self) -> None:
        procs.write_json(self.dir / "cluster.json", self.state)

    def _record_mount(self, path: str) -> None:
        self.state.setdefault("mounts", []).append(path)
        self._save()

    def _forget_mount(self, path: str) -> None:
        with contextlib.suppress(ValueError):
            self.state.setdefault("mounts", []).remove(path)
        self._save()

    # -- start / stop ----------------------------------------------------------------------------

    def _holder(self, cmd: list[str], what: str) -> int:
        """Start a namespace-holding process that prints 'ready' once set up, then sleeps."""
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        self._children.append(proc)
        assert proc.stdout is not None
        import select

        r, _, _ = select.select([proc.stdout], [], [], self.timeout)
        line = proc.stdout.readline().decode().strip() if r else ""
        if line != "ready":
            err = b""
            with contextlib.suppress(Exception):
                proc.kill()
                err = proc.communicate(timeout=5)[1] or b""
            raise MultiClusterError(f"{what} holder did not come up: {line!r} {err.decode(errors='replace')}")
        return proc.pid

    def start(self) -> MultiCluster:
        reason = unavailable_reason()
        if reason:
            raise MultiClusterError(reason)
        cleanup_stale()
        self.dir.mkdir(parents=True, exist_ok=False)
        owner = procs.record(self.owner_pid) if self.owner_pid else {"pid": 0}
        self.state = {"id": self.id, "owner": owner, "holders": [], "mounts": [],
                      "nodes": [n.host for n in self.nodes], "created": time.time()}
        self._save()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.net_holder = self._holder(
            ["unshare", "--net", "sh", "-c", "ip link set lo up && echo ready && exec sleep infinity"], "netns")
        self.state["net_holder"] = procs.record(self.net_holder)
        self.state["netns"] = _netns_inode(self.net_holder)
        self._save()
        for node in self.nodes:
            binds = []
            for src, target in ((node.workdir, "/var/lib/glusterd"), (node.rundir, "/run/gluster"),
                                (node.logdir, "/var/log/glusterfs")):
                src.mkdir(parents=True, exist_ok=True)
                binds.append(f"mkdir -p {shlex.quote(target)} && "
                             f"mount --bind {shlex.quote(str(src))} {shlex.quote(target)}")
            node.rundir.mkdir(parents=True, exist_ok=True)
            node.bricks.mkdir(parents=True, exist_ok=True)
            # an installed glusterd ships its option groups there (`volume set V group metadata-cache`)
            if HOST_GROUPS.is_dir():
                shutil.copytree(HOST_GROUPS, node.workdir / "groups", dirs_exist_ok=True)
            script = " && ".join(binds) + " && echo ready && exec sleep infinity"
            node.holder = self._holder(
                ["nsenter", "-t", str(self.net_holder), "--net",
                 "unshare", "--mount", "--propagation", "private", "sh", "-c", script], f"node {node.host}")
            self.state["holders"].append(procs.record(node.holder))
            self._save()
        # glusterd daemonizes only after its initialisation (~3 s): start all at once
        starters = [subprocess.Popen([*self.node_prefix(n.index), *self.glusterd_cmd(n.index)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                    for n in self.nodes]
        for node, proc in zip(self.nodes, starters):
            try:
                _out, err = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise MultiClusterError(f"glusterd {node.host} did not daemonize within {self.timeout:.0f}s") from None
            if proc.returncode != 0:
                raise MultiClusterError(f"glusterd {node.host} failed (exit {proc.returncode}): "
                                        f"{err.decode(errors='replace')}")
        for node in self.nodes:
            self.wait_glusterd(node.index)

    def glusterd_cmd(self, i: int) -> list[str]:
        """The glusterd command line of node ``i``, with cluster.rc's options."""
        node = self.node(i)
        return [GLUSTERD_BIN,
                "--xlator-option", f"management.working-directory={node.workdir}",
                "--xlator-option", f"management.transport.socket.bind-address={node.host}",
                "--xlator-option", f"management.run-directory={node.rundir}",
                "--xlator-option", f"management.glusterd-sockfile={node.socket}",
                "--xlator-option", f"management.logging-directory={node.logdir}",
                f"--log-file={node.logdir / 'glusterd.log'}",
                f"--pid-file={node.pidfile}"]

    def node(self, i: int) -> Node:
        return self.nodes[i - 1]

    def node_prefix(self, i: int) -> list[str]:
        """Run a command as on node ``i`` (its network and mount namespace)."""
        return ["nsenter", "-t", str(self.node(i).holder), "--net", "--mount"]

    def net_prefix(self) -> list[str]:
        """Run a command as a client of the cluster (its network namespace, the host's mounts)."""
        return ["nsenter", "-t", str(self.net_holder), "--net"]

    def gluster_command(self, i: int = 1) -> list[str]:
        """``gluster`` for node ``i``: add ``--mode=script --xml ARGS``."""
        node = self.node(i)
        return [*self.node_prefix(i), "gluster", f"--glusterd-sock={node.socket}",
                f"--log-file={node.logdir / 'cli.log'}"]

    def cli(self, i: int = 1, timeout: float = 60.0) -> GlusterCli:
        """The product's CLI wrapper for node ``i`` (what the provisioners use, here through nsenter)."""
        return GlusterCli(None, command=self.gluster_command(i), timeout=timeout)

    def gluster(self, i: int, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        try:
            return self.cli(i, timeout).text(*args, check=check)
        except StorageError as e:
            raise MultiClusterError(str(e)) from None

    def gluster_xml(self, i: int, *args: str, timeout: float = 60.0) -> ET.Element:
        try:
            return self.cli(i, timeout).xml(*args)
        except StorageError as e:
            raise MultiClusterError(str(e)) from None

    def heal_info(self, i: int, volume: str, timeout: float = 120.0) -> list[tuple[str, str, int | None]]:
        """``heal info`` of ``volume`` as node ``i`` sees it: (brick, status, pending entries or None) per brick.

        Not ``gluster volume heal VOL info``: the CLI runs glfsheal, which fetches the volfile from the
        compiled-in ``/var/run/glusterd.socket`` -- the *host's* glusterd (the node's mount namespace binds
        only /var/lib/glusterd, /run/gluster and /var/log/glusterfs), so it answers "Volume VOL does not
        exist", or with another volume of that name. glfsheal is run here directly with its own
        ``glusterd-sock FILE`` argument (which takes no ``xml``: the text answer is parsed).
        """
        prog = next((p for p in GLFSHEAL_CANDIDATES if Path(p).is_file()), None)
        if prog is None:
            raise MultiClusterError(f"glfsheal not found (looked at {', '.join(GLFSHEAL_CANDIDATES)})")
        proc = _run([*self.node_prefix(i), prog, volume, "glusterd-sock", str(self.node(i).socket)],
                    timeout=timeout, check=False)
        out: list[tuple[str, str, int | None]] = []
        for line in proc.stdout.splitlines():
            key, _, value = line.partition(":")
            if line.startswith("Brick "):
                out.append((line[len("Brick "):].strip(), "", None))
            elif out and key == "Status":
                out[-1] = (out[-1][0], value.strip(), out[-1][2])
            elif out and key == "Number of entries":
                n = value.strip()
                out[-1] = (out[-1][0], out[-1][1], int(n) if n.isdigit() else None)
        if proc.returncode != 0 or not out:
            raise MultiClusterError(f"heal info {volume} on {self.node(i).host} failed (exit {proc.returncode}): "
                                    f"{(proc.stdout + proc.stderr).strip()[-500:]}")
        return out

    def start_glusterd(self, i: int, wait: bool = True) -> None:
        node = self.node(i)
        if node.glusterd_pid() is None:
            _run([*self.node_prefix(i), *self.glusterd_cmd(i)], timeout=self.timeout)
        if wait:
            self.wait_glusterd(i)

    def wait_glusterd(self, i: int) -> None:
        node = self.node(i)
        deadline = time.monotonic() + self.timeout
        while True:
            proc = _run([*self.gluster_command(i), "--mode=script", "pool", "list"], timeout=15, check=False)
            if proc.returncode == 0 and node.glusterd_pid():
                return
            if time.monotonic() > deadline:
                tail = ""
                with contextlib.suppress(OSError):
                    tail = "\n".join((node.logdir / "glusterd.log").read_text(errors="replace").splitlines()[-15:])
                raise MultiClusterError(f"glusterd {node.host} does not answer within {self.timeout:.0f}s:\n{tail}")
            time.sleep(0.2)

    def kill_glusterd(self, i: int, sig: int = signal.SIGTERM) -> None:
        """Stop node ``i``'s glusterd (its bricks keep running, as in cluster.rc's kill_glusterd)."""
        pid = self.node(i).glusterd_pid()
        if pid:
            os.kill(pid, sig)
            deadline = time.monotonic() + self.timeout
            while procs.start_time(pid) is not None and time.monotonic() < deadline:
                time.sleep(0.05)

    def peer_all(self) -> None:
        """Peer every node from node 1 and wait until all are 'Peer in Cluster (Connected)'."""
        for node in self.nodes[1:]:
            self.gluster(1, "peer", "probe", node.host)
        self.wait_peers()

    def wait_peers(self) -> None:
        deadline = time.monotonic() + self.timeout
        want = len(self.nodes) - 1
        while True:
            ok = 0
            for node in self.nodes:
                root = self.gluster_xml(node.index, "peer", "status")
                ok += sum(1 for p in root.iter("peer")
                          if p.findtext("connected") == "1" and p.findtext("state") == "3") == want
            if ok == len(self.nodes):
                return
            if time.monotonic() > deadline:
                raise MultiClusterError(f"peers not all connected within {self.timeout:.0f}s")
            time.sleep(0.2)

    def stop(self) -> None:
        """Tear everything down (idempotent): mounts, every process of the cluster, its directory."""
        if not self.state and not self.dir.exists():
            return
        problems = _teardown(self.dir, self.state or (procs.read_json(self.dir / "cluster.json") or {}),
                             reap=lambda: [p.poll() for p in self._children])
        for p in self._children:
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(timeout=5)
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()
        self._children.clear()
        if problems:
            raise MultiClusterError(f"multicluster {self.id}: " + "; ".join(problems))

    def __enter__(self) -> MultiCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients ---------------------------------------------------------------------------------

    def mountpoint(self, name: str) -> Path:
        p = self.dir / "mnt" / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    @contextlib.contextmanager
    def gfuse_mount(self, source: str, mountpoint: str | Path | None = None,
                    options: Sequence[str] = ()) -> Iterator[Path]:
        """``gfuse mount SOURCE DIR`` run as a client of the cluster; unmounted (and its server reaped) on exit."""
        mp = Path(mountpoint) if mountpoint else self.mountpoint(re.sub(r"[^A-Za-z0-9_.-]", "_", source) + "-"
                                                                    + secrets.token_hex(2))
        mp.mkdir(parents=True, exist_ok=True)
        self._record_mount(str(mp))
        cmd = [*self.net_prefix(), sys.executable, "-m", "gfuse.cli", "mount", source, str(mp)]
        if options:
            cmd += ["-o", ",".join(options)]
        try:
            out = _run(cmd, timeout=60).stdout
            m = re.search(r"\(pid (\d+),", out)
            pid = int(m.group(1)) if m else None
            if not is_mounted(mp):
                raise MultiClusterError(f"gfuse mount {source} {mp}: not mounted")
            yield mp
        finally:
            if is_mounted(mp):
                if _run(["umount", str(mp)], timeout=30, check=False).returncode != 0:
                    _run(["umount", "-l", str(mp)], timeout=30, check=False)
            pid = locals().get("pid")
            if pid:
                deadline = time.monotonic() + 10
                while procs.start_time(pid) is not None and time.monotonic() < deadline:
                    time.sleep(0.05)
                with contextlib.suppress(ProcessLookupError):
                    if procs.start_time(pid) is not None:
                        os.kill(pid, signal.SIGKILL)
            self._forget_mount(str(mp))


# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testkit.multicluster", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start n glusterd (unpeered unless --peer)")
    up.add_argument("-n", type=int, default=3)
    up.add_argument("--peer", action="store_true")
    up.add_argument("--keep", action="store_true", help="no owner: only 'down' removes it")
    down = sub.add_parser("down")
    down.add_argument("id")
    sub.add_parser("cleanup")
    sub.add_parser("list")
    args = ap.parse_args(argv)
    if args.cmd == "up":
        mc = MultiCluster(args.n, owner_pid=0 if args.keep else os.getppid())
        mc.start()
        if args.peer:
            mc.peer_all()
        print(mc.dir)
        for n in mc.nodes:
            print(f"{n.host} {shlex.join(mc.gluster_command(n.index))}")
        print(f"client: {shlex.join(mc.net_prefix())}")
        for p in mc._children:  # the holders outlive us on purpose
            p.stdout and p.stdout.close()
            p.stderr and p.stderr.close()
        return 0
    if args.cmd == "down":
        ids = [d.name for d in ROOT.iterdir()] if args.id == "all" and ROOT.is_dir() else [args.id]
        rc = 0
        for cid in ids:
            cdir = ROOT / cid
            problems = _teardown(cdir, procs.read_json(cdir / "cluster.json") or {})
            if problems:
                print(f"{cid}: {'; '.join(problems)}", file=sys.stderr)
                rc = 1
        return rc
    if args.cmd == "cleanup":
        for cid in cleanup_stale(log=print):
            print(f"removed {cid}")
        return 0
    if args.cmd == "list":
        if ROOT.is_dir():
            for d in sorted(ROOT.iterdir()):
                st = procs.read_json(d / "cluster.json") or {}
                print(d.name, "owner alive" if procs.same_process(st.get("owner")) else "owner gone", st.get("nodes"))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
