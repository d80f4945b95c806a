"""Pool mounts (issue 13): the subdir PVs of one pool volume on a node share ONE gfuse mount of the pool.

Why: a gfuse server per PV costs tens of MiB of RSS and one TCP connection per brick each (measured: 10 subdir
PVs of one replica-3 pool = 10 processes, 342 MiB, 40 brick connections). A node with 100 PVs of one pool
would hold ~3.4 GiB and 400 connections, and a brick serving 1,000 such nodes 100,000 clients. The quota
that sizes a subdir PV is enforced by the bricks on its directory, so one client of the whole volume per
node loses no isolation.

How (``gfuse-agent --pool-subdirs yes``):

- a mount request whose source (or ``subdir=`` option) names a subdirectory is a *PV* of a *pool*: the
  source without the subdirectory, the options without ``subdir=``, read-only or not. Requests that differ
  in any of those get different pools (one gfuse mount per set of options that must differ);
- the pool is mounted once, by the agent, under ``--pool-dir`` (default ``<kubelet-dir>/gfuse-pools``, mode
  0700: root only, in the host's mount namespace like kubelet's own directory, never inside a pod's volume
  directory) at ``<volume>-<hash of source, options, ro>``;
- each PV's target is a bind mount of its subdirectory only (:func:`bind_subdir`, in a subprocess: the
  agent never touches a FUSE mount itself). The path is walked one component at a time with O_NOFOLLOW, so
  a symbolic link in the volume cannot point a PV elsewhere on the node; a PV never sees another PV's
  directory. A subdirectory that does not exist is an error and nothing is mounted;
- the reference count of a pool is the number of mount-table entries naming it (each entry's ``pool`` in
  the state file, the pools under ``pools``), so it survives agent restarts and cannot drift; CSI
  NodeStage/NodeUnstage and FlexVolume mount/unmount each add or drop one (CSI publish binds the staging
  path, which is already one of the pool's binds). Unmounting the last PV unmounts the pool;
- the pool is health-checked, taken over (restartable mounts, :mod:`gfuse.holder`) or repaired by the
  agent as one ordinary mount: one server, one repair. A takeover keeps the FUSE connection, so every bind
  keeps working. A repair makes a new connection (a new device); a bind keeps the superblock it was made
  from, so each PV still on the dead one gets a bind of the new pool mount stacked over it -- never detached
  first, as the agent's repairs never are (nothing can be written into the node's directory underneath).

statfs of a pooled PV (``df`` in a pod, the agent's ``stats``, NodeGetVolumeStats) is the PV's: the kernel names
the bound subdirectory's inode in STATFS and gfuse answers for it, so with the subdir backend's quota (and
``features.quota-deem-statfs``) a PV shows its quota as its size, not the pool's (tests/k8s/test_agent_pools.py
checks ``os.statvfs`` of a CSI target and NodeGetVolumeStats; tests/cluster/test_mount_statfs.py the bridge).
Writes past the quota fail with EDQUOT. The CLI default is still ``no`` (tests/k8s/test_csi.py's node tests
expect a gfuse mount per staged PV); the DaemonSet (daemonset/base/daemonset-node.yaml) runs the agent with
``--pool-subdirs=yes``.

Metrics (:mod:`flexvolume.metrics`): each PV keeps its series under its own target, answered by the pool's
server (``gfuse_mount_pool`` names the pool mount); the server's FUSE counters are the pool mount's, once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import stat
import sys
from typing import TYPE_CHECKING, Any

from gfuse.mounttable import mounts_at

from .state import MountRecord

if TYPE_CHECKING:
    from .agent import Agent, OpError

log = logging.getLogger("gfuse.agent.pools")

#: exit status of the bind helper when the subdirectory is missing or not a directory
EXIT_NO_SUBDIR = 2
POOL_DIR_NAME = "gfuse-pools"


def effective_source(source: str, root: str) -> str:
    """What a mount table entry serves: its filesystem's source plus the directory a bind shows (``root``)."""
    if root in ("", "/"):
        return source
    return source.rstrip("/") + "/" + root.strip("/")


class Pools:
    """The agent's pool mounts (by mount directory) and the PVs bound from them (entries of the agent's table)."""

    def __init__(self, agent: Agent, root: str) -> None:
        self.agent = agent
        # the agent's own module: ``python -m flexvolume.agent`` runs it as __main__, whose OpError is the one
        # its dispatch catches (flexvolume.agent.OpError would be another class)
        agent_module = sys.modules[type(agent).__module__]
        self.OpError: type[OpError] = agent_module.OpError
        self.run_bounded = agent_module.run_bounded
        self.root = os.path.normpath(os.path.abspath(root))
        self.table: dict[str, MountRecord] = {}

    # -- which pool ----------------------------------------------------------------------------

    def pool_for(self, want: MountRecord) -> tuple[MountRecord, str] | None:
        """(the pool's record, the PV's subdirectory) of a mount request, or None when it names no subdirectory."""
        from gfuse.mgmt import parse_volume_spec

        spec = parse_volume_spec(want.source)
        subdirs = [o.partition("=")[2].strip("/") for o in want.options if o.partition("=")[0] == "subdir"]
        subdir = spec.subdir or (subdirs[-1] if subdirs else "")
        if not subdir:
            return None
        m = re.match(r"^(.*?):/?" + re.escape(spec.volume) + r"(/|$)", want.source.strip())
        prefix = m.group(1) if m else f"{spec.server.host}:{spec.server.port}"
        source = f"{prefix}:/{spec.volume}"
        options = [o for o in want.options if o.partition("=")[0] != "subdir"]
        key = json.dumps([source, sorted(options), want.readonly])
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        target = os.path.join(self.root, f"{spec.volume}-{digest}")
        existing = self.table.get(target)
        if existing is not None:
            return existing, subdir
        return MountRecord(source=source, target=target, options=options, readonly=want.readonly), subdir

    def refs(self, pool_dir: str) -> list[MountRecord]:
        """The PVs a pool serves: its reference count is their number."""
        return [r for r in self.agent.table.values() if r.pool == pool_dir]

    def record_problem(self, rec: MountRecord) -> str | None:
        """Why a pool entry of the state file would not be one this agent makes, or None."""
        if os.path.dirname(rec.target) != self.root:
            return f"pool mount {rec.target} outside the pool directory {self.root}"
        if any(o.partition("=")[0] == "subdir" for o in rec.options):
            return f"pool mount {rec.target} with a subdirectory"
        return None

    # -- requests (under the PV target's lock) -------------------------------------------------

    async def mount(self, want: MountRecord, pool: MountRecord, subdir: str, budget: float) -> dict[str, Any]:
        OpError = self.OpError
        a = self.agent
        target = want.target
        stack = mounts_at(target)
        if stack:
            top = stack[-1]
            rec = a.table.get(target)
            pstack = mounts_at(pool.target)
            pooled = (rec is not None and bool(rec.pool)) or bool(pstack and pstack[-1].dev == top.dev)
            if not pooled:  # a mount of its own (made before pooling was on): kept as it is
                return await a._mount_locked(want, budget)
            a._check_existing(top, want)
            if rec is None:
                rec = want
                rec.pool, rec.subdir = pool.target, subdir
                log.info("adopting the bind of %s of pool %s on %s", subdir, pool.target, target)
            elif want.context:
                rec.context = want.context
            a.table[target] = rec
            a._save()
            await self.check(rec)  # on the dead pool mount: bound again to the live one
            return {"ok": True, "already": True, "pid": a._find_pid(self.table.get(rec.pool, rec))}
        a._prepare_dir(target)
        async with a._lock(pool.target):
            try:
                pool = await self._ensure(pool, budget)
            except OpError as e:
                msg = e.message.removeprefix(f"cannot mount {pool.source} on {pool.target}: ")
                raise OpError(f"cannot mount {want.source} on {target}: {msg} (pool mount of {pool.source})",
                              e.code) from None
            try:
                await self._bind(pool, subdir, target, budget, over=False, source=want.source)
            except OpError:
                if not self.refs(pool.target):
                    await self._release_locked(pool.target, budget)
                raise
            want.pool, want.subdir, want.pid, want.restartable = pool.target, subdir, pool.pid, pool.restartable
            a.table[target] = want
            a._health[target] = ("healthy", "")
            a._save()
        log.info("bound %s of pool %s (pid %s, %d PV(s)) on %s", subdir, pool.target, pool.pid,
                 len(self.refs(pool.target)), target)
        return {"ok": True, "already": False, "pid": pool.pid}

    async def release(self, pool_dir: str, budget: float) -> None:
        """After a PV left the table: unmount its pool if no other PV uses it."""
        async with self.agent._lock(pool_dir):
            await self._release_locked(pool_dir, budget)

    async def _release_locked(self, pool_dir: str, budget: float) -> None:
        if self.refs(pool_dir):
            return
        rec = self.table.pop(pool_dir, None)
        self.agent._save()
        self.agent._health.pop(pool_dir, None)
        self.agent._repair_errors.pop(pool_dir, None)
        if mounts_at(pool_dir):
            await self.agent._unmount_locked(pool_dir, budget)
            log.info("unmounted pool %s (%s): no PV uses it any more", pool_dir, rec.source if rec else "?")
        with contextlib.suppress(OSError):
            os.rmdir(pool_dir)

    async def _ensure(self, pool: MountRecord, budget: float) -> MountRecord:
        """The pool mounted and in the table (under the pool's lock): mounted now, adopted, or repaired."""
        OpError = self.OpError
        a = self.agent
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)  # root only: the pools hold every PV of a volume
        rec = self.table.get(pool.target) or pool
        stack = mounts_at(rec.target)
        if not stack:
            os.makedirs(rec.target, mode=0o700, exist_ok=True)
            rec.restartable = a.restartable
            if rec.restartable:
                await a._ensure_holder()
            rec.pid = await a._spawn_mount(rec, budget)
            log.info("mounted pool %s on %s (pid %s, %s)", rec.source, rec.target, rec.pid, a._mode(rec, {}))
        elif not stack[-1].is_gfuse:
            raise OpError(f"the pool directory {rec.target} is covered by a {stack[-1].fstype} mount", "conflict")
        else:
            if rec.target not in self.table:
                rec.pid = a._find_pid(rec)
                rec.restartable = rec.target in (await a._holder_list() or {})
            state, reason = await a._probe(rec)
            if state == "dead":
                await a._repair(rec, reason, budget)
        a._health[rec.target] = ("healthy", "")
        self.table[rec.target] = rec
        a._save()
        return rec

    async def _bind(self, pool: MountRecord, subdir: str, target: str, budget: float, *, over: bool,
                    source: str) -> None:
        """``target`` becomes a bind of ``subdir`` of the pool mount (stacked over what is there if ``over``)."""
        OpError, run_bounded = self.OpError, self.run_bounded
        a = self.agent
        timeout = max(5.0, min(budget, 30.0))
        cmd = [sys.executable, "-m", "flexvolume.pools", "bind", pool.target, subdir, target]
        if pool.readonly:
            cmd.append("--ro")
        res = await run_bounded(cmd, timeout, a.env)
        if res.timed_out:
            raise OpError(f"cannot mount {source} on {target}: the pool mount {pool.target} did not answer the "
                          f"lookup of {subdir!r} within {timeout:g}s", "timeout")
        if res.rc != 0:
            why = res.last_line() or f"status {res.rc}"
            raise OpError(f"cannot mount {source} on {target}: {why}",
                          "unavailable" if res.rc == EXIT_NO_SUBDIR else "internal")
        pstack, tstack = mounts_at(pool.target), mounts_at(target)
        if not tstack or not pstack or tstack[-1].dev != pstack[-1].dev:
            raise OpError(f"the bind of {subdir!r} of {pool.target} on {target} is not in the mount table", "internal")
        if over:
            log.warning("bound %s of pool %s over %s again: the bind kept the pool's dead mount (pid %s serves "
                        "the pool now; open files on the dead one keep failing, new opens work)", subdir,
                        pool.target, target, pool.pid)

    # -- health --------------------------------------------------------------------------------

    async def check_pools(self) -> None:
        """Every pool: one without PVs is unmounted; the others are checked, taken over or repaired as one mount."""
        a = self.agent
        for pool_dir in list(self.table):
            try:
                if not self.refs(pool_dir):
                    if not a._lock(pool_dir).locked():
                        await self.release(pool_dir, a.mount_timeout)
                    continue
                if not mounts_at(pool_dir):  # never stat a mount point: its server may be dead or stuck
                    os.makedirs(pool_dir, mode=0o700, exist_ok=True)
                await a._check_one(pool_dir)
            except Exception:
                log.exception("health check of pool %s failed", pool_dir)

    async def check(self, rec: MountRecord) -> None:
        """One PV (under its target's lock): bound again if its target lost its bind or kept a dead pool mount."""
        OpError = self.OpError
        a = self.agent
        target = rec.target
        pool = self.table.get(rec.pool)
        if pool is None:  # not in the state file (an older or damaged one): the pool is made again
            found = self.pool_for(rec)
            if found is None:
                return
            pool = found[0]
            rec.pool = pool.target
        if a._lock(pool.target).locked():
            return  # the pool is being mounted, repaired or released
        tstack, pstack = mounts_at(target), mounts_at(pool.target)
        try:
            if not tstack:
                if not os.path.isdir(target):
                    log.info("%s is gone (its pod was removed); dropping it from the mount table", target)
                    a.table.pop(target, None)
                    a._health.pop(target, None)
                    a._save()
                    await self.release(pool.target, a.mount_timeout)
                    return
                async with a._lock(pool.target):  # a reboot, or unmounted behind the agent's back
                    pool = await self._ensure(pool, a.mount_timeout)
                    await self._bind(pool, rec.subdir, target, a.mount_timeout, over=False, source=rec.source)
                rec.repairs += 1
                rec.pid = pool.pid
                a._save()
                log.warning("%s was not mounted: bound %s of pool %s on it again", target, rec.subdir, pool.target)
            elif tstack[-1].is_gfuse and pstack and pstack[-1].is_gfuse and tstack[-1].dev != pstack[-1].dev:
                state, _ = await a._probe(pool)
                if state == "healthy":  # the pool was repaired (a new connection): this bind kept the dead one
                    await self._bind(pool, rec.subdir, target, a.mount_timeout, over=True, source=rec.source)
                    rec.repairs += 1
                    rec.pid = pool.pid
                    a._save()
        except OpError as e:
            if a._repair_errors.get(target) != e.message:
                log.error("repair of %s failed (retrying every %gs): %s", target, a.health_interval, e.message)
            a._repair_errors[target] = e.message
            return
        a._repair_errors.pop(target, None)
        state, reason = await a._probe(rec)
        prev = a._health.get(target)
        a._health[target] = (state, reason)
        if state != "healthy" and prev != (state, reason):
            log.warning("%s (%s, pool %s) is unhealthy: %s", target, rec.source, pool.target, reason)

    def view(self, held: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """The pools as ``list`` shows them: each with its reference count and the PV targets it serves."""
        a = self.agent
        out = []
        for rec in sorted(self.table.values(), key=lambda r: r.target):
            d = rec.to_wire()
            state, reason = a._health.get(rec.target, ("unknown", ""))
            targets = sorted(r.target for r in self.refs(rec.target))
            h = held.get(rec.target)
            pid = (h.get("pid") if h is not None and h.get("served") else None) or a._find_pid(rec)  # as a PV's
            handoffs = (h or {}).get("handoffs") or []
            d.update(pid=pid, takeovers=int((h or {}).get("restarts") or 0),
                     pause=float(handoffs[-1]) if handoffs else None, refs=len(targets), targets=targets,
                     state=state, reason=reason, healthy=state == "healthy", mode=a._mode(rec, h))
            out.append(d)
        return out


# -- the bind helper (a subprocess of the agent: lookups on a FUSE mount may hang) -------------

MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096


def bind_subdir(pool_dir: str, subdir: str, target: str, readonly: bool = False) -> None:
    """Bind ``subdir`` of the mount at ``pool_dir`` on ``target``, following no symbolic link inside the volume.

    FileNotFoundError/NotADirectoryError name the component; OSError for the mount itself."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    fd = os.open(pool_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in subdir.strip("/").split("/"):
            if part in ("", ".", ".."):
                raise NotADirectoryError(errno.EINVAL, f"subdirectory {subdir!r} must be a plain path")
            try:
                nfd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise NotADirectoryError(errno.ENOTDIR, f"{part!r} is not a directory (a file or a symbolic "
                                                            f"link)") from None
                raise type(e)(e.errno, f"{part!r}: {os.strerror(e.errno or errno.EIO)}") from None
            os.close(fd)
            fd = nfd
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        src = f"/proc/self/fd/{fd}".encode()
        if libc.mount(src, target.encode(), None, MS_BIND, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"bind mount on {target}: {os.strerror(err)}")
        if readonly and libc.mount(None, target.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"read-only remount of {target}: {os.strerror(err)}")
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (4, 5) or args[0] != "bind" or (len(args) == 5 and args[4] != "--ro"):
        print("usage: python -m flexvolume.pools bind POOL_DIR SUBDIR TARGET [--ro]", file=sys.stderr)
        return 64
    _, pool_dir, subdir, target, *ro = args
    try:
        bind_subdir(pool_dir, subdir, target, readonly=bool(ro))
    except (FileNotFoundError, NotADirectoryError) as e:
        print(f"subdirectory {subdir!r} of the volume: {e.strerror}", file=sys.stderr)
        return EXIT_NO_SUBDIR
    except OSError as e:
        print(f"subdirectory {subdir!r}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
