"""Serving one mount: volfile → graph → bricks → FUSE (options in :mod:`gfuse.options`, the status socket in
:mod:`gfuse.status`).

Runs in the foreground inside ``trio.run``; ``gfuse mount`` without ``-f`` starts it in
a detached child and returns once the mount is live (see :mod:`gfuse.cli`).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat as st
import time
from typing import TYPE_CHECKING, Any, Callable

import pyfuse3
import trio

from .errors import leaf
from .graph import ClientGraph
from .iatt import ROOT_GFID
from .mgmt import MgmtError, VolfileWatcher, fetch_graph, parse_volume_spec
from .mounttable import mount_at
from .options import MountError, MountOptions
from .status import FuseStats, serve_status, status_socket_path
from .tls import TlsConfig, TlsError, check_graph as check_tls
from .untrusted import libfuse_escape
from .volfile import Graph, VolfileError
from .fuse import GlusterOperations
from .fuse_lowlevel import LowLevelHandlers
from .xlators.switch import GraphSwitch
from .takeover import gfuse_version, mode_of

if TYPE_CHECKING:
    from .takeover import Restart

log = logging.getLogger(__name__)

def set_read_ahead(mountpoint: str, kb: int) -> None:
    """Let reads arrive as large requests: FUSE bdi read_ahead_kb defaults to 128."""
    # never stat() our own mount from the serving thread: the request would wait for us
    try:
        top = mount_at(mountpoint)
        if top is None:
            return
        with open(f"/sys/class/bdi/{top.dev}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.info("could not set read_ahead_kb for %s: %s", mountpoint, e)


async def resolve_subdir(top: Any, subdir: str) -> bytes:
    gfid = ROOT_GFID
    for part in filter(None, subdir.split("/")):
        try:
            r = await top.lookup(gfid, part)
        except OSError as e:
            raise MountError(f"subdirectory {subdir!r} cannot be mounted: {part!r}: {os.strerror(e.errno or 5)}"
                             ) from None
        stat = r.need_stat()
        if not st.S_ISDIR(stat.mode):
            raise MountError(f"subdirectory {subdir!r}: {part!r} is not a directory")
        gfid = stat.gfid
    return gfid


class MountedVolume:
    def __init__(self, spec_text: str, mountpoint: str, opts: MountOptions, restart: Restart | None = None,
                 stack: bool = False) -> None:
        try:
            self.spec = parse_volume_spec(spec_text)
        except ValueError as e:
            raise MountError(str(e)) from None
        self.spec_text = spec_text
        # -o restartable / --takeover (gfuse.takeover): a takeover never touches the mount it serves
        self.restart = restart
        # --stack: mount over the dead FUSE mount at the mount point (takeover.fuse_mount_fd), never stat it
        self.stack = stack
        self._stack_dev: str | None = None
        self._stopping = self._handover = self._ended = self._live = False
        self.mountpoint = restart.mountpoint if restart is not None else (
            os.path.abspath(mountpoint) if stack else os.path.realpath(mountpoint))
        # computed before mounting: touching our own mount point from the serving thread would deadlock
        self.socket_path = status_socket_path(self.mountpoint)
        self.opts = opts
        self.tls = TlsConfig.from_options(opts)
        if self.spec.subdir and opts.subdir and self.spec.subdir != opts.subdir:
            raise MountError(f"two subdirectories asked: {self.spec.subdir!r} in {spec_text!r} and subdir="
                             f"{opts.subdir!r}; give one")
        if self.spec.subdir and not opts.subdir:
            opts.subdir = self.spec.subdir
        self.graph: ClientGraph | None = None
        self.ops: GlusterOperations | None = None
        self.started = time.time()

    def check_mountpoint(self) -> None:
        if not os.path.isdir(self.mountpoint):
            raise MountError(f"mount point {self.mountpoint} does not exist or is not a directory")
        if os.path.ismount(self.mountpoint):
            raise MountError(f"{self.mountpoint} is already a mount point")

    async def serve(self, ready: Callable[[str | None], None], timeout: float = 15.0) -> None:
        """Mount and serve until unmounted or signalled. ``ready(None)`` once live, ``ready(msg)`` on failure."""
        if self.restart is not None and self.restart.takeover:
            self.restart.take()  # the held FUSE fd (refused while another process serves the mount)
        elif not self.stack:
            self.check_mountpoint()
        servers = [self.spec.server, *self.opts.backup_servers]
        try:
            server, graph = await fetch_graph(servers, self.spec.volume, timeout, tls=self.tls)
            check_tls(graph, self.tls, self.spec.volume)  # never plain text to a TLS volume: fail in one line
        except (MgmtError, TlsError) as e:
            raise MountError(str(e)) from None
        except VolfileError as e:
            raise MountError(f"the volfile of {self.spec.volume!r} cannot be used: {e}") from None
        async with trio.open_nursery() as nursery:
            try:
                cg = ClientGraph(graph, server, self.spec.volume, ping_timeout=self.opts.ping_timeout, tls=self.tls)
            except VolfileError as e:
                raise MountError(str(e)) from None
            self.graph = cg
            self._graphs = {cg}
            self._nursery, self._server = nursery, server
            await nursery.start(cg.serve, timeout)
            if not any(b.is_up for b in cg.bricks):
                why = "; ".join(f"{b.name}: {b.last_error}" for b in cg.bricks)
                raise MountError(f"no brick of volume {self.spec.volume!r} is reachable ({why})")
            try:
                with trio.fail_after(timeout):
                    root = await resolve_subdir(cg.top, self.opts.subdir)
                    await cg.top.lookup_gfid(root)
            except trio.TooSlowError:
                raise MountError(f"volume {self.spec.volume!r} did not answer within {timeout:g}s") from None
            except OSError as e:
                raise MountError(f"volume {self.spec.volume!r} cannot be read: {e}") from None
            if self.restart is not None:
                root = self.restart.root_gfid(root)
            self.switch = GraphSwitch(cg.top)
            self.ops = ops = GlusterOperations(self.switch, root, read_only=self.opts.read_only,
                                               attr_timeout=self.opts.attr_timeout,
                                               entry_timeout=self.opts.entry_timeout)
            self._attach_cache(cg)
            fuse_opts = set(pyfuse3.default_options)
            # the spec is checked (volspec: no comma, backslash or space); escaped all the same, as libfuse
            # splits -o at commas (a comma could turn off nosuid/nodev)
            fuse_opts |= {f"fsname={libfuse_escape(self.spec_text.strip())}", "subtype=gfuse"}
            if self.opts.read_only:
                fuse_opts.add("ro")
            if self.opts.allow_other:
                fuse_opts.add("allow_other")
            fuse_opts.update(self.opts.libfuse_kernel_options())  # context= etc.: libfuse hands them to mount(2)
            if self.restart is not None:  # a standby waits here, its graph connected, until the server dies
                await self.restart.wait_turn()
            target = self.restart.fuse_target() if self.restart else self.mountpoint
            if self.stack:
                target = self._mount_over_dead()
            try:
                pyfuse3.init(ops, target, fuse_opts)
            except RuntimeError as e:
                raise MountError(f"FUSE mount on {self.mountpoint} failed: {e}") from None
            ops.kcache.start()  # md-cache may purge the kernel from now on (a worker thread, see fuse.KernelCache)
            try:
                nursery.start_soon(self._read_ahead_after_init, ops)
                nursery.start_soon(self._status_server)
                nursery.start_soon(self._signals)
                watcher = VolfileWatcher(servers, self.spec.volume, graph, self._volfile_changed, tls=self.tls)
                nursery.start_soon(watcher.run)
                if self.restart is not None and self.restart.standby:
                    nursery.start_soon(watcher._refetch)  # the volfile may have changed while it stood by
                log.info("mounted %s on %s (%s)", self.spec_text, self.mountpoint, graph.shape())
                # pyfuse3 lacks lock/fallocate handlers: add them; their tasks end before the session does
                lowlevel = LowLevelHandlers(ops)
                extended = lowlevel.install()
                if self.restart is not None:  # INIT, restored state, journal, resend, the holder's copy
                    await self.restart.start(ops, self.switch, nursery)
                    ops.kcache.everything()  # what the kernel kept for the previous server is not ours to vouch for
                ready(None)
                self._live = True
                async with trio.open_nursery() as requests:
                    if extended:
                        await requests.start(lowlevel.run)
                    await pyfuse3.main(min_tasks=4, max_tasks=64)
                    self._ended = True
                    requests.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    ops.kcache.stop()  # no notification after the session is closed
                    with trio.move_on_after(10):
                        for g in list(self._graphs):
                            await g.flush()
                    # a restartable mount stays for a successor unless it ends on purpose
                    keep = self.restart is not None and not self._stopping and (
                        self._handover or not self._ended) and (self._live or self.restart.takeover)
                    pyfuse3.close(unmount=not keep)
                    if self.restart is not None:
                        self.restart.finish(stopping=not keep)
                    if self._stack_dev is not None and self._stopping:
                        self._unmount_stacked()
                    try:
                        os.unlink(self.socket_path)
                    except OSError:
                        pass
                nursery.cancel_scope.cancel()
            log.info("unmounted %s", self.mountpoint)

    def _mount_over_dead(self) -> str:
        """--stack: our own mount(2) over the dead mount (libfuse would stat it first and fail); libfuse gets
        the fd (``/dev/fd/N``) and mounts nothing, as for a takeover."""
        from .takeover import fuse_mount_fd

        top = mount_at(self.mountpoint)
        if top is None or not top.fstype.startswith("fuse"):
            raise MountError(f"--stack: {self.mountpoint} is not a FUSE mount (nothing to stack over)")
        try:
            fd = fuse_mount_fd(self.mountpoint, self.spec_text.strip(), "gfuse", read_only=self.opts.read_only,
                               allow_other=self.opts.allow_other,
                               default_permissions="default_permissions" in pyfuse3.default_options,
                               kernel_options=self.opts.kernel_options)
        except OSError as e:
            raise MountError(f"FUSE mount over the dead mount on {self.mountpoint} failed: {e.strerror}") from None
        new = mount_at(self.mountpoint)
        self._stack_dev = new.dev if new is not None else None
        log.info("mounted over the dead FUSE mount of %s on %s (it stays underneath until unmounted)", top.source,
                 self.mountpoint)
        return f"/dev/fd/{fd}"

    def _unmount_stacked(self) -> None:
        """Stopped on purpose: libfuse unmounts only what it mounted; ours is unmounted here if it is still the
        top one (never the dead one underneath)."""
        import ctypes

        top = mount_at(self.mountpoint)
        if top is None or top.dev != self._stack_dev:
            return
        if ctypes.CDLL(None, use_errno=True).umount2(self.mountpoint.encode(), 2) != 0:  # MNT_DETACH
            log.warning("unmounting %s: %s", self.mountpoint, os.strerror(ctypes.get_errno()))

    def _attach_cache(self, cg: ClientGraph) -> None:
        """The kernel's timeouts come from ``cg``'s md-cache, which purges the kernel (gfuse/xlators/mdcache.py)."""
        assert self.ops is not None
        cg.mdcache.kernel = self.ops.kcache
        self.ops.kcache.cache = cg.mdcache
        log.info("%s: %s", self.spec.volume, cg.mdcache.describe())

    async def _read_ahead_after_init(self, ops: GlusterOperations) -> None:
        """The kernel clamps readahead to what INIT's reply says (128 KiB): raise it once INIT is answered
        (the reply is written synchronously after ``init()``, before this task runs again)."""
        await ops.initialized.wait()
        await trio.sleep(0)
        set_read_ahead(self.mountpoint, self.opts.read_ahead_kb)

    async def _volfile_changed(self, graph: Graph) -> None:
        """Build and connect a graph for the new volfile, then send new work to it (see GraphSwitch)."""
        shape = graph.shape()
        try:
            cg = ClientGraph(graph, self._server, self.spec.volume, ping_timeout=self.opts.ping_timeout,
                             tls=self.tls)
        except VolfileError as e:
            log.error("the new volfile of %s cannot be used (%s); keeping the current graph", self.spec.volume, e)
            return
        await self._nursery.start(cg.serve, 15.0)
        if not any(b.is_up for b in cg.bricks):
            log.error("no brick of the new volfile of %s is reachable; keeping the current graph", self.spec.volume)
            cg.stop()
            return
        old = self.graph
        assert old is not None, "the volfile watcher starts after serve() made the first graph"
        self._graphs.add(cg)
        self.graph = cg

        def retire() -> None:
            self._graphs.discard(old)
            old.stop()
            log.info("the previous graph of %s is stopped (no open file left on it)", self.spec.volume)
        self.switch.switch(cg.top, retire)
        if self.ops is not None:
            self._attach_cache(cg)
            self.ops.kcache.everything()  # the old graph's registrations end with it
        log.info("volfile of %s changed: new files and lookups now use the new graph (%s); "
                 "files already open stay on the previous one until closed", self.spec.volume, shape)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2) as sigs:
            async for s in sigs:
                if s == signal.SIGHUP or (s == signal.SIGUSR2 and self.restart is None):
                    continue
                # SIGUSR2: hand over — finish the requests read, leave the mount to a successor (gfuse.takeover)
                self._handover, self._stopping = s == signal.SIGUSR2, s != signal.SIGUSR2
                log.info("signal %d: unmounting %s", s, self.mountpoint)
                pyfuse3.terminate()
                return

    def status(self) -> dict[str, Any]:
        cg = self.graph
        bricks = []
        pending = 0
        for b in cg.bricks if cg else []:
            out = b.conn.outstanding if b.conn is not None and b.is_up else 0
            pending += out
            bricks.append({"name": b.name, "brick": f"{b.host}:{b.brick_path}", "up": b.is_up,
                           "error": "" if b.is_up else b.last_error, "outstanding": out, "open_fds": b.open_fds})
        return {"source": self.spec_text, "mountpoint": self.mountpoint, "volume": self.spec.volume,
                "shape": cg.graph.shape() if cg else "", "pid": os.getpid(), "since": self.started,
                "version": gfuse_version(), "mode": mode_of(self.restart),
                "bricks": bricks, "pending_brick_calls": pending,
                "fuse_requests_in_flight": self.ops.inflight if self.ops else 0,
                "inodes": len(self.ops.inodes) if self.ops else 0, "read_only": self.opts.read_only,
                "restart": self.restart.mode if self.restart is not None else "off",
                "fuse": self.ops.stats.snapshot() if self.ops else FuseStats().snapshot()}

    async def _status_server(self) -> None:
        await serve_status(self.socket_path, self.status)


def run_foreground(spec_text: str, mountpoint: str, opts: MountOptions,
                   ready: Callable[[str | None], None], restart: Restart | None = None, stack: bool = False) -> int:
    """Run a mount until it ends; returns the exit status. Errors are reported through ``ready``."""
    mv = MountedVolume(spec_text, mountpoint, opts, restart, stack)
    reported = False

    def report(msg: str | None) -> None:
        nonlocal reported
        reported = True
        ready(msg)

    try:
        trio.run(mv.serve, report)
        return 0
    except BaseException as exc:  # every failure becomes one line
        e = leaf(exc)
        if isinstance(e, KeyboardInterrupt):
            return 130
        if isinstance(e, MountError):
            msg = str(e)
        elif isinstance(e, OSError):
            msg = f"{e.strerror or e}" if e.errno != errno.EPERM else f"permission denied: {e}"
        else:
            log.error("gfuse mount crashed", exc_info=exc)
            msg = f"internal error: {type(e).__name__}: {e}"
        if not reported:
            report(msg)
        else:
            log.error("%s", msg)
        return 1
