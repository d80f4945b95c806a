"""The gfuse node agent (``gfuse-agent``): owns every gfuse mount on the node.

One long-running process per node. The FlexVolume driver and the CSI plugin are thin clients that
send it msgpack requests over a unix socket (framing: :mod:`flexvolume.protocol`):

=====================================================================  ===============================================
request                                                                response (``ok: False`` → ``error``, ``code``)
=====================================================================  ===============================================
``{"op": "ping"}``                                                     ``{"ok", "version", "protocol", "mounts",
                                                                       "health_passes"}``
``{"op": "mount", "source": "host:/vol[/sub]", "target": "/abs",       ``{"ok", "already": bool, "pid"}``
"options": ["gfuse -o item", …], "readonly": bool,
"timeout": seconds (optional), "context": {str: str} (optional)}``
``{"op": "unmount", "target": "/abs", "timeout": s (optional)}``       ``{"ok", "was_mounted": bool}``
``{"op": "list"}``                                                     ``{"ok", "mounts": [{"source", "target",
                                                                       "options", "readonly", "pid", "since",
                                                                       "context", "repairs", "restartable", "healthy",
                                                                       "state", "reason", "repair_error", "mode",
                                                                       "takeovers", "pause"}, …]}``
``{"op": "stats", "target": "/abs", "timeout": s (optional)}``         ``{"ok", "bytes_total", "bytes_used",
                                                                       "bytes_available", "inodes_total",
                                                                       "inodes_used", "inodes_available"}``
=====================================================================  ===============================================

How mounts survive the agent: each mount is served by its own daemonized ``gfuse mount`` process
(its own session, re-parented away from the agent), never a child the agent waits on. Killing the
agent (even SIGKILL) or replacing it with a new version leaves every mount serving. The agent keeps
its mount table in a msgpack state file (:mod:`flexvolume.state`, written atomically); on start it
re-adopts the mounts listed there.

Restartable mounts (issue 12; ``--restartable auto``, the default: when the kernel has FUSE_NOTIFY_RESEND,
Linux >= 6.9, probed once at start): every mount is made with ``-o restartable``, and the per-node holder
(:mod:`gfuse.holder`, found at ``--holder-socket`` or started by the agent in a session of its own, through
``--mount-wrapper``) keeps a copy of its ``/dev/fuse`` fd. When the serving process dies the kernel keeps the
connection and its requests; the holder's standby (or a successor it starts) takes the fd over, replays the
record the dead process kept and has the kernel re-send what it had read (:mod:`gfuse.takeover`). A running
container -- its own bind of the volume directory, propagation None -- keeps its open files and sees a pause,
never an error. The agent reports such a mount as ``restarting``, never dead; if no successor is on its way
after TAKEOVER_GRACE seconds it runs ``gfuse mount --takeover`` itself. The holder is not part of the agent:
a SIGKILL of the agent (and of its process group) leaves it holding every fd, and a new agent finds it, and
the mounts in its state file, again.

Health: every ``--health-interval`` seconds each mount's root is stat()ed *in a subprocess* with a
timeout (the agent itself never touches a mount, so a dead or stuck one cannot hang it). A mount
whose serving process died ("Transport endpoint is not connected", and neither the process nor its
status socket is alive; a repair-only mount, or a restartable one no holder had) is repaired: if glusterd
and at least one brick of the volume answer (``gfuse probe``), a fresh mount is stacked **over** the dead one
at the same target (``gfuse mount --stack``; the dead one stays underneath until the target is unmounted),
which propagates to pods whose kubelet directory is rshared/rslave. It is never detached first, so nothing
a pod writes can land in the node's directory underneath. Processes that hold file descriptors on the dead
mount, and containers that got the dead mount with propagation None, get errors (ENOTCONN) until their
pod restarts; new opens through the host path go to the new mount. If the volume cannot be reached the
dead mount is left in place and the agent retries on the next pass. A mount that answers too slowly (stuck
bricks, SIGSTOPped server) is reported unhealthy, not torn down. An entry whose target is not mounted is
mounted again (e.g. after a reboot: nothing of a FUSE connection survives one, kubelet mounts again) while
its directory exists, and dropped once the directory is gone.

What a request may ask: its fields come from Kubernetes objects (PVs, StorageClasses, CSI volume contexts),
so a target must lie below ``--kubelet-dir`` (or an ``--allow-dir``) and not be a symlink, the source must
be a plain ``SERVER:/VOLUME[/SUBDIR]`` (no ``..``, no comma or control character), and options naming files of
the node (``log-file=``, the TLS ``ssl-*`` files) are refused (:mod:`gfuse.untrusted`): the agent decides
them. A refused request changes nothing.

In a Kubernetes DaemonSet the agent needs the host's mount namespace for the kubelet directory
(``mountPropagation: Bidirectional``), ``hostPID: true`` (so it can see the serving processes it
re-adopts), and the serving processes must outlive the agent's container: run them outside its
cgroup, e.g. ``--mount-wrapper "systemd-run --scope --quiet --collect --"``; a container runtime
kills every process of a container's cgroup when the container stops.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import logging
import os
import reprlib
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import trio

from gfuse.mounttable import (
    canonical_target,
    is_serving_process,
    mounts_at,
    same_source,
    serving_pids,
)
from .protocol import (
    DEFAULT_SOCKET,
    IDLE_TIMEOUT,
    PROTOCOL_VERSION,
    FrameError,
    decode,
    encode,
    error,
    frame_length,
)
from gfuse.status import bind_unix_socket

from .state import DEFAULT_STATE, MountRecord, StateError, load_state, save_state

log = logging.getLogger("gfuse.agent")

C_ENV = {**os.environ, "LC_ALL": "C", "LANG": "C"}
#: kubelet's root directory: mount targets must lie below it (--kubelet-dir)
DEFAULT_KUBELET_DIR = "/var/lib/kubelet"
_PID_RE = re.compile(r"\(pid (\d+)")
#: a held mount without a server for this long, and nobody on the way to take it over, is taken over by the
#: agent itself (the holder starts a successor at once: this is for when it did not, or it keeps failing; a
#: holder that only holds, --no-restart, leaves it to the agent at once)
TAKEOVER_GRACE = 5.0
#: a holder the agent starts exits after this many seconds holding nothing (the agent starts one again for
#: the next restartable mount)
HOLDER_IDLE_EXIT = 60.0
#: restartable mounts: "auto" (when the kernel has FUSE_NOTIFY_RESEND, Linux >= 6.9), "yes", "no"
RESTARTABLE_CHOICES = ("auto", "yes", "no")
#: how request values are shown in answers: bounded in depth and length, whatever a client sends
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 120, 120, 8, 8


def _show(value: object) -> str:
    return _REPR.repr(value)


def agent_version() -> str:
    try:
        from importlib.metadata import version

        return version("gfuse")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout)
        from gfuse import __version__

        return __version__


class OpError(Exception):
    """A request that cannot be done; ``message`` is one line for an admin, ``code`` from protocol.ERROR_CODES."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class AgentStartError(Exception):
    """The agent cannot start (another agent runs, the socket cannot be bound, …)."""


@dataclass
class RunResult:
    rc: int | None
    stdout: str
    stderr: str
    timed_out: bool

    def last_line(self) -> str:
        for text in (self.stderr, self.stdout):
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if lines:
                return lines[-1]
        return ""


async def _sigkill(proc: trio.Process) -> None:
    proc.kill()


async def run_bounded(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> RunResult:
    """Run a command with a hard time limit (SIGKILL when it is up); never raises for its failure."""
    with trio.move_on_after(timeout):
        try:
            p = await trio.run_process(cmd, stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True,
                                       check=False, env=env or C_ENV, deliver_cancel=_sigkill)
        except OSError as e:
            return RunResult(127, "", f"cannot run {cmd[0]}: {e.strerror}", False)
        return RunResult(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"), False)
    return RunResult(None, "", "", True)


class _FrameReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return False
            self.buf += chunk
        return True

    async def next(self) -> bytes | None:
        """The next frame's body; None at a clean end of the connection."""
        if not await self._fill(4):
            if self.buf:
                raise FrameError("connection closed inside a frame header")
            return None
        n = frame_length(bytes(self.buf[:4]))
        if not await self._fill(4 + n):
            raise FrameError("connection closed inside a frame")
        body = bytes(self.buf[4:4 + n])
        del self.buf[:4 + n]
        return body


class Agent:
    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        state_path: str = DEFAULT_STATE,
        *,
        health_interval: float = 10.0,
        probe_timeout: float = 5.0,
        mount_timeout: float = 45.0,
        gfuse_command: list[str] | None = None,
        mount_wrapper: list[str] | None = None,
        lock_wait: float = 10.0,
        restartable: str = "auto",
        upgrade_mounts: bool = True,
        holder_socket: str | None = None,
        holder_log: str | None = None,
        kubelet_dir: str = DEFAULT_KUBELET_DIR,
        allowed_dirs: list[str] | None = None,
        node_options: list[str] | None = None,
        metrics_address: tuple[str, int] | None = None,
        events: Any = None,
        pool_subdirs: bool = False,
        pool_dir: str | None = None,
    ) -> None:
        self.socket_path = os.path.abspath(socket_path)
        #: (host, port) of the Prometheus endpoint (flexvolume.metrics), None: off; metrics_port: the port bound
        self.metrics_address = metrics_address
        self.metrics_port: int | None = None
        #: posts repairs as Events on the pods (flexvolume.kubeevents.RepairEvents), None: off
        self.events = events
        #: ``-o`` options the node's admin gives every mount and probe (TLS files, secure-mgmt, log level):
        #: what a PV or StorageClass may not ask for (gfuse.untrusted) but a node may need
        self.node_options = list(node_options or [])
        #: mount targets are accepted only below these (kubelet's directory, then --allow-dir ones), each
        #: as given and with its symlinks resolved (targets are compared with their parents resolved)
        self.mount_roots: list[str] = []
        for d in [kubelet_dir, *(allowed_dirs or [])]:
            for r in (os.path.normpath(os.path.abspath(d)), os.path.realpath(d)):
                if r not in self.mount_roots:
                    self.mount_roots.append(r)
        self.state_path = os.path.abspath(state_path)
        self.health_interval = health_interval
        self.probe_timeout = probe_timeout
        self.mount_timeout = mount_timeout
        self.gfuse_command = gfuse_command or [sys.executable, "-m", "gfuse.cli"]
        self.mount_wrapper = mount_wrapper or []
        self.lock_wait = lock_wait
        self.table: dict[str, MountRecord] = {}
        self.health_passes = 0
        self._locks: dict[str, trio.Lock] = {}
        self._health: dict[str, tuple[str, str]] = {}
        self._repair_errors: dict[str, str] = {}
        self._lock_fd: int | None = None
        self._limiter = trio.CapacityLimiter(8)
        # restartable mounts (issue 12): the per-node holder keeps a copy of each one's FUSE fd, so the death of
        # its server is a pause; "auto" is resolved at start (the kernel must have FUSE_NOTIFY_RESEND)
        if restartable not in RESTARTABLE_CHOICES:
            raise ValueError(f"restartable must be one of {', '.join(RESTARTABLE_CHOICES)}, not {restartable!r}")
        self.restartable_choice = restartable
        #: at start, hand every restartable mount served by another gfuse version over to this one's
        self.upgrade_mounts = upgrade_mounts
        self.restartable = restartable == "yes"
        self.holder_socket = os.path.abspath(holder_socket or os.environ.get("GFUSE_HOLDER_SOCKET")
                                             or "/run/gfuse/holder.sock")
        self.holder_log = holder_log or os.environ.get("GFUSE_HOLDER_LOG") or "/var/log/gfuse/holder.log"
        #: what every gfuse command the agent runs gets: the holder it hands fds to (successors ask the same one)
        self.env = {**C_ENV, "GFUSE_HOLDER_SOCKET": self.holder_socket, "GFUSE_HOLDER_LOG": self.holder_log}
        self._holder_proc: subprocess.Popen[bytes] | None = None
        #: the holder's entry of each held mount, as the last probe saw it
        self._held: dict[str, dict[str, Any]] = {}
        #: subdir PVs share one gfuse mount of their pool volume (flexvolume.pools; --pool-subdirs)
        from .pools import POOL_DIR_NAME, Pools

        self.pool_subdirs = pool_subdirs
        self.pools = Pools(self, pool_dir or os.path.join(kubelet_dir, POOL_DIR_NAME))

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._take_lock()
        try:
            self._load()
            listener = await self._listen()
            log.info("gfuse agent %s on %s, state %s, %d mount(s) to re-adopt", agent_version(), self.socket_path,
                     self.state_path, len(self.table))
            await self._choose_restartable()
            if self.restartable or any(r.restartable for r in self.table.values()):
                await self._ensure_holder()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, nursery.cancel_scope)
                nursery.start_soon(self._upgrade_mounts)
                nursery.start_soon(self._health_loop)
                nursery.start_soon(trio.serve_listeners, self._handle_stream, [listener])
                if self.metrics_address is not None:
                    from .metrics import MetricsServer

                    metrics = MetricsServer(self, *self.metrics_address, version=agent_version())
                    try:
                        listeners = await metrics.listen()
                    except OSError as e:
                        raise AgentStartError(f"cannot serve metrics on {metrics.where}: {e.strerror or e}") from None
                    self.metrics_port = listeners[0].socket.getsockname()[1]
                    nursery.start_soon(metrics.serve, listeners)
                if self.events is not None:
                    nursery.start_soon(self.events.run, self)
                task_status.started()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    async def _take_lock(self) -> None:
        os.makedirs(os.path.dirname(self.state_path), mode=0o700, exist_ok=True)
        path = self.state_path + ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.lock_wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise AgentStartError(f"another gfuse agent holds {path} (it owns the mounts of "
                                          f"{self.state_path}); stop it first") from None
                await trio.sleep(0.1)
        self._lock_fd = fd

    def _load(self) -> None:
        # temp files of a previous agent killed while it wrote the state (the state file itself is intact)
        directory, base = os.path.split(self.state_path)
        for name in os.listdir(directory):
            if name.startswith(base + ".tmp."):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
        dropped: list[str] = []
        try:
            self.table = load_state(self.state_path, dropped, self.pools.table)
            for pool_dir, rec in list(self.pools.table.items()):
                why = self.pools.record_problem(rec)
                if why:
                    del self.pools.table[pool_dir]
                    dropped.append(f"{why} (a mount there keeps serving)")
            for target, rec in list(self.table.items()):
                why = self._record_problem(rec)
                if why:  # e.g. written by an agent that accepted more, or with another --kubelet-dir
                    del self.table[target]
                    dropped.append(f"entry for {target} that this agent would refuse ({why}; a mount there "
                                   f"keeps serving)")
            if dropped:
                # the good entries are kept; a copy of the file as it was is kept for the admin
                aside = f"{self.state_path}.dropped-{int(time.time())}"
                try:
                    shutil.copyfile(self.state_path, aside)
                except OSError as e:
                    aside = f"(could not copy it: {e.strerror})"
                for why in dropped:
                    log.error("state file %s: dropped an invalid %s (the file as it was: %s)", self.state_path,
                              why, aside)
        except StateError as e:
            aside = f"{self.state_path}.corrupt-{int(time.time())}"
            try:
                os.replace(self.state_path, aside)
            except OSError:
                aside = "(could not move it aside)"
            log.error("%s; moved to %s, starting with an empty mount table (existing gfuse mounts keep "
                      "serving; unmount requests for them still work)", e, aside)
            self.table = {}

    def _record_problem(self, rec: MountRecord) -> str | None:
        """Why a mount request for ``rec`` would be refused (the checks of :meth:`op_mount`), or None."""
        from gfuse.mgmt import parse_volume_spec
        from gfuse.options import MountError, parse_options
        from gfuse.untrusted import check_options

        if not self._under_roots(rec.target):
            return f"outside the kubelet directory {self.mount_roots[0]}"
        try:
            spec = parse_volume_spec(rec.source)
            check_options(rec.options, "the state file")
            parsed = parse_options(",".join(rec.options))
        except (ValueError, MountError) as e:
            return str(e)
        if spec.subdir and parsed.subdir and spec.subdir != parsed.subdir:
            return "two subdirectories"
        if rec.pool and os.path.dirname(rec.pool) != self.pools.root:
            return f"its pool mount {rec.pool} is outside the pool directory {self.pools.root}"
        return None

    def _under_roots(self, target: str) -> bool:
        return any(target.startswith(root.rstrip("/") + "/") for root in self.mount_roots)

    def _save(self) -> None:
        try:
            save_state(self.state_path, self.table, self.pools.table)
        except OSError as e:
            log.error("cannot write state file %s: %s — mounts made now will not be re-adopted after an agent "
                      "restart", self.state_path, e.strerror or e)

    async def _listen(self) -> trio.SocketListener:
        os.makedirs(os.path.dirname(self.socket_path), mode=0o755, exist_ok=True)
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISSOCK(st.st_mode):
            raise AgentStartError(f"{self.socket_path} exists and is not a socket; remove it or use --socket")
        if st is not None:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(self.socket_path)
            except OSError:
                os.unlink(self.socket_path)  # stale: its agent died
            else:
                raise AgentStartError(f"another process answers on {self.socket_path}; stop it or use --socket")
            finally:
                probe.close()
        try:
            raw = bind_unix_socket(self.socket_path)  # root only (0600) from the start: no bind-then-chmod
        except OSError as e:
            raise AgentStartError(f"cannot bind {self.socket_path}: {e.strerror}") from None
        raw.listen(128)
        return trio.SocketListener(trio.socket.from_stdlib_socket(raw))

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for s in sigs:
                log.info("signal %d: stopping; the %d mount(s) keep serving (they belong to the pods)", s,
                         len(self.table))
                scope.cancel()
                return

    def _lock(self, target: str) -> trio.Lock:
        lock = self._locks.get(target)
        if lock is None:
            lock = self._locks[target] = trio.Lock()
        return lock

    # -- requests -----------------------------------------------------------------------------

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        try:
            await self._serve_connection(stream)
        except Exception:
            log.exception("error on a client connection")

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            reader = _FrameReader(stream)
            while True:
                body = None
                try:
                    with trio.move_on_after(IDLE_TIMEOUT):
                        body = await reader.next()
                except FrameError as e:
                    await self._reply(stream, error(f"bad frame: {e}", "invalid"))
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if body is None:
                    return
                try:
                    req = decode(body)
                except FrameError as e:
                    resp = error(f"bad request: {e}", "invalid")
                else:
                    resp = await self.dispatch(req)
                if not await self._reply(stream, resp):
                    return

    @staticmethod
    async def _reply(stream: trio.SocketStream, resp: dict[str, Any]) -> bool:
        try:
            try:
                frame = encode(resp)
            except (FrameError, TypeError, ValueError) as e:
                log.error("cannot encode a response: %s", e)
                frame = encode(error(f"the agent cannot encode its answer: {e}", "internal"))
            await stream.send_all(frame)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False

    async def dispatch(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        handler = {"ping": self.op_ping, "mount": self.op_mount, "unmount": self.op_unmount, "list": self.op_list,
                   "stats": self.op_stats}.get(op if isinstance(op, str) else "")
        if handler is None:
            return error(f"unknown op {_show(op)} (known: ping, mount, unmount, list, stats)", "invalid")
        try:
            return await handler(req)
        except OpError as e:
            log.info("%s failed: %s", op, e.message)
            return error(e.message, e.code)
        except Exception as e:
            log.exception("internal error in %s", op)
            return error(f"internal error in {op}: {type(e).__name__}: {e} (see the gfuse agent log)", "internal")

    @staticmethod
    def _str(req: dict[str, Any], key: str) -> str:
        v = req.get(key)
        if not isinstance(v, str) or not v.strip():
            raise OpError(f"{req.get('op')}: {key!r} is required (a non-empty string)", "invalid")
        if "\0" in v:
            raise OpError(f"{req.get('op')}: {key!r} contains a NUL byte", "invalid")
        return v.strip()

    def _target(self, req: dict[str, Any]) -> str:
        """The request's target, canonical; it must lie below a mount root (kubelet's directory) unless it
        is in the mount table already (an unmount or stats of what this agent mounted before)."""
        t = self._str(req, "target")
        if not t.startswith("/"):
            raise OpError(f"{req.get('op')}: target {_show(t)} must be an absolute path", "invalid")
        if len(t.encode(errors="surrogateescape")) > 4095:
            raise OpError(f"{req.get('op')}: target of {len(t)} characters is longer than a path can be", "invalid")
        target = canonical_target(t)
        if target in self.table and req.get("op") != "mount":
            return target
        if not self._under_roots(target):
            raise OpError(f"{req.get('op')}: target {target} is outside the kubelet directory "
                          f"{self.mount_roots[0]} (gfuse-agent --kubelet-dir, --allow-dir)", "invalid")
        return target

    @staticmethod
    def _timeout(req: dict[str, Any], default: float) -> float:
        v = req.get("timeout", default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise OpError(f"{req.get('op')}: timeout must be a positive number of seconds, not {_show(v)}",
                          "invalid")
        return float(min(v, 600.0))

    async def op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "version": agent_version(), "protocol": PROTOCOL_VERSION, "mounts": len(self.table),
                "health_passes": self.health_passes}

    async def op_mount(self, req: dict[str, Any]) -> dict[str, Any]:
        from gfuse.mgmt import parse_volume_spec
        from gfuse.options import MountError, parse_options, split_options
        from gfuse.untrusted import check_options

        source = self._str(req, "source")
        target = self._target(req)
        budget = self._timeout(req, self.mount_timeout)
        raw = req.get("options", [])
        if not isinstance(raw, (list, tuple)) or not all(isinstance(o, str) for o in raw):
            raise OpError("mount: 'options' must be a list of strings (gfuse -o items)", "invalid")
        readonly = req.get("readonly", False)
        if not isinstance(readonly, bool):
            raise OpError(f"mount: 'readonly' must be true or false, not {_show(readonly)}", "invalid")
        ctx = req.get("context") or {}
        if not isinstance(ctx, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ctx.items()):
            raise OpError("mount: 'context' must be a map of strings", "invalid")
        try:
            spec = parse_volume_spec(source)
        except ValueError as e:
            raise OpError(f"mount: bad source: {e}", "invalid") from None
        options = [item for o in raw for item in split_options(o)]  # context="…:c1,c2" is one item
        if "ro" in options:
            readonly = True
            options = [o for o in options if o != "ro"]
        try:
            # what reaches the agent comes from Kubernetes objects: nothing naming the node's files
            check_options(options, "the mount request's options")
            parsed = parse_options(",".join(options))
        except MountError as e:
            raise OpError(f"mount: {e}", "invalid") from None
        if spec.subdir and parsed.subdir and spec.subdir != parsed.subdir:
            raise OpError(f"mount: two subdirectories asked: {spec.subdir!r} in {source!r} and subdir="
                          f"{parsed.subdir!r}", "invalid")
        want = MountRecord(source=source, target=target, options=options, readonly=readonly,
                           context={str(k): str(v) for k, v in ctx.items()})
        pooled = self.pools.pool_for(want) if self.pool_subdirs else None
        async with self._lock(target):
            if pooled is not None:  # a subdir PV: a bind of its directory of the pool's one gfuse mount
                return await self.pools.mount(want, *pooled, budget)
            return await self._mount_locked(want, budget)

    @staticmethod
    def _check_existing(top: Any, want: MountRecord) -> None:
        """Refuse a mount request on a target where something else than what it asks is mounted."""
        from .pools import effective_source

        if not top.is_gfuse:
            raise OpError(f"{want.target} is already mounted ({top.fstype} from {top.source}); unmount it first or "
                          f"use another directory", "conflict")
        have = effective_source(top.source, top.root)
        if not same_source(have, want.source):
            raise OpError(f"{want.target} is already mounted by gfuse from {have}, not {want.source}; "
                          f"unmount it first", "conflict")
        if top.readonly != want.readonly:
            asked = ("read-only", "read-write") if top.readonly else ("read-write", "read-only")
            raise OpError(f"{want.target} is already mounted {asked[0]} from {have}, asked {asked[1]}; unmount it "
                          f"first", "conflict")

    @staticmethod
    def _prepare_dir(target: str) -> None:
        """The mount directory exists, and is a directory, not a symbolic link (nothing is mounted there)."""
        try:
            os.makedirs(target, mode=0o750, exist_ok=True)
            st = os.lstat(target)  # nothing is mounted there: it cannot hang
        except OSError as e:
            raise OpError(f"cannot create the mount directory {target}: {e.strerror}", "invalid") from None
        if stat.S_ISLNK(st.st_mode):  # a mount follows it: the volume would cover wherever it points
            raise OpError(f"{target} is a symbolic link; the mount directory must be a directory", "invalid")
        if not stat.S_ISDIR(st.st_mode):
            raise OpError(f"{target} exists and is not a directory", "invalid")

    async def _mount_locked(self, want: MountRecord, budget: float) -> dict[str, Any]:
        target = want.target
        stack = mounts_at(target)
        if stack:
            top = stack[-1]
            self._check_existing(top, want)
            rec = self.table.get(target)
            if rec is None:
                rec = want
                rec.pid = self._find_pid(rec)
                rec.restartable = target in (await self._holder_list() or {})
                log.info("adopting existing gfuse mount of %s on %s (pid %s, %s)", rec.source, target, rec.pid,
                         self._mode(rec, {} if rec.restartable else None))
            elif want.context:
                rec.context = want.context
            state, reason = await self._probe(rec)
            if state == "dead":
                await self._repair(rec, reason, budget)
            self._health[target] = ("healthy", "") if state == "dead" else (state, reason)
            self.table[target] = rec
            self._save()
            return {"ok": True, "already": True, "pid": rec.pid}
        self._prepare_dir(target)
        want.restartable = self.restartable
        if want.restartable:
            await self._ensure_holder()
        want.pid = await self._spawn_mount(want, budget)
        self.table[target] = want
        self._health[target] = ("healthy", "")
        self._save()
        log.info("mounted %s on %s (pid %s%s)", want.source, target, want.pid,
                 f", {', '.join(f'{k}={v}' for k, v in want.context.items())}" if want.context else "")
        return {"ok": True, "already": False, "pid": want.pid}

    async def _spawn_mount(self, rec: MountRecord, budget: float, stack: bool = False) -> int | None:
        """``gfuse mount`` (it daemonizes and returns once live); the serving process's pid. ``stack``: over the
        dead mount at the target (``gfuse mount --stack``)."""
        opts = [*self.node_options, *rec.options] + (["ro"] if rec.readonly else [])
        if rec.restartable and "restartable" not in opts:
            opts.append("restartable")
        cmd = [*self.mount_wrapper, *self.gfuse_command, "mount", rec.source, rec.target,
               "--timeout", f"{max(1.0, budget - 6):g}", *(["--stack"] if stack else [])]
        if opts:
            cmd += ["-o", ",".join(opts)]
        below = mounts_at(rec.target)
        res = await run_bounded(cmd, budget, self.env)
        if res.timed_out:
            await self._cleanup_failed(rec.target, below)
            raise OpError(f"mounting {rec.source} on {rec.target} did not finish within {budget:g}s; the volume's "
                          f"servers are slow or unreachable", "timeout")
        if res.rc != 0:
            msg = res.last_line() or f"gfuse mount exited with status {res.rc}"
            msg = msg.removeprefix("gfuse: ").removeprefix("Error: ")
            await self._cleanup_failed(rec.target, below)
            raise OpError(f"cannot mount {rec.source} on {rec.target}: {msg}", "unavailable")
        m = _PID_RE.search(res.stdout)
        pid = int(m.group(1)) if m else None
        if not any(e.is_gfuse for e in mounts_at(rec.target)):
            raise OpError(f"gfuse mount reported success but {rec.target} is not mounted (see the gfuse log)",
                          "internal")
        return pid if is_serving_process(pid, rec.target) else self._find_pid(rec)

    async def _cleanup_failed(self, target: str, below: list[Any] | None = None) -> None:
        """After a failed or timed-out mount: no half-made mount, no serving process left behind (and never
        the dead mount ``below`` it was to be stacked on: detaching that one would expose the node's directory)."""
        pids = serving_pids(target)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stack = mounts_at(target)
        if stack and stack[-1].is_gfuse and pids and stack != (below or []):
            await run_bounded(["umount", "-c", "-l", target], 20)

    @staticmethod
    def _find_pid(rec: MountRecord) -> int | None:
        if is_serving_process(rec.pid, rec.target):
            return rec.pid
        pids = serving_pids(rec.target)
        return pids[-1] if pids else None

    async def op_unmount(self, req: dict[str, Any]) -> dict[str, Any]:
        target = self._target(req)
        budget = self._timeout(req, 30.0)
        async with self._lock(target):
            with trio.move_on_after(budget) as cs:
                return await self._unmount_locked(target, budget)
            assert cs.cancelled_caught
            raise OpError(f"unmounting {target} did not finish within {budget:g}s (see the agent log)", "timeout")

    async def _unmount_locked(self, target: str, budget: float) -> dict[str, Any]:
        rec = self.table.get(target)
        stack = mounts_at(target)
        if stack and not stack[-1].is_gfuse:
            raise OpError(f"{target} is mounted with {stack[-1].fstype} from {stack[-1].source}, which is not a "
                          f"gfuse mount; not unmounting it", "conflict")
        was_mounted = bool(stack)
        pids = set(serving_pids(target))
        if rec is not None and is_serving_process(rec.pid, target):
            pids.add(rec.pid)  # type: ignore[arg-type]
        if rec is not None:
            # forget it first: if the unmount fails or is cut short, the health check must not mount it
            # again; a retried unmount handles gfuse mounts that are not in the table
            self.table.pop(target, None)
            self._save()
        self._health.pop(target, None)
        self._repair_errors.pop(target, None)
        for _ in range(len(stack)):
            top = mounts_at(target)
            if not top or not top[-1].is_gfuse:
                break
            res = await run_bounded(["umount", "-c", target], min(20.0, budget))
            if res.rc != 0 and mounts_at(target):
                log.info("umount %s: %s; detaching it lazily", target, res.last_line() or "timed out")
                res = await run_bounded(["umount", "-c", "-l", target], min(20.0, budget))
                if res.rc != 0 and mounts_at(target) == top:
                    raise OpError(f"cannot unmount {target}: {res.last_line() or 'umount timed out'}", "internal")
        killed = await self._reap(target, pids, 10.0)
        if killed:
            log.warning("serving process(es) %s of %s did not exit after the unmount; killed", killed, target)
            self._remove_status_socket(target)
        self._held.pop(target, None)
        if not mounts_at(target):
            from gfuse.takeover import state_dir

            # a restartable mount's takeover record (its server removes it when it ends on purpose; not if killed)
            shutil.rmtree(state_dir(target), ignore_errors=True)
        if was_mounted or rec is not None:
            log.info("unmounted %s%s", target, f" ({rec.source})" if rec else "")
        if rec is not None and rec.pool:
            await self.pools.release(rec.pool, budget)  # the last PV of its pool: the pool goes too
        return {"ok": True, "was_mounted": was_mounted}

    @staticmethod
    async def _reap(target: str, pids: set[int], timeout: float) -> list[int]:
        """Wait for the serving processes of ``target`` to exit; SIGKILL those that do not."""
        deadline = trio.current_time() + timeout
        while any(is_serving_process(p, target) for p in pids) and trio.current_time() < deadline:
            await trio.sleep(0.05)
        killed = []
        for p in pids:
            if is_serving_process(p, target):
                try:
                    os.kill(p, signal.SIGKILL)
                    killed.append(p)
                except ProcessLookupError:
                    pass
        with trio.move_on_after(5):
            while any(is_serving_process(p, target) for p in killed):
                await trio.sleep(0.05)
        return killed

    @staticmethod
    def _remove_status_socket(target: str) -> None:
        try:
            from gfuse.status import status_socket_path

            os.unlink(status_socket_path(target))
        except (OSError, ImportError):
            pass

    async def op_list(self, req: dict[str, Any]) -> dict[str, Any]:
        records = list(self.table.values())
        probes: dict[str, tuple[str, str]] = {}

        async def probe(rec: MountRecord) -> None:
            async with self._limiter:
                probes[rec.target] = await self._probe(rec, min(self.probe_timeout, 3.0))

        async with trio.open_nursery() as nursery:
            for rec in records:
                nursery.start_soon(probe, rec)
        pools = list(self.pools.table.values())
        view = (await self._holder_list() or {}) if any(r.restartable for r in records + pools) else {}
        out = []
        for rec in records:
            state, reason = probes[rec.target]
            d = rec.to_wire()
            srv = self._server_rec(rec)  # a subdir PV's server is its pool's (d["pool"] names the pool mount)
            d["pid"] = self._find_pid(srv)
            held = view.get(srv.target)
            if held is not None and held.get("served"):
                d["pid"] = held.get("pid") or d["pid"]
            # mode: restartable/held (a server's death is a pause), restartable/unheld, repair-only; takeovers:
            # how many times a successor took the held connection; pause: the last one's wait, seconds
            handoffs = (held or {}).get("handoffs") or []
            d.update(mode=self._mode(srv, held), takeovers=int((held or {}).get("restarts") or 0),
                     pause=float(handoffs[-1]) if handoffs else None)
            d.update(healthy=state == "healthy", state=state, reason=reason,
                     repair_error="" if state == "healthy" else self._repair_errors.get(rec.target, ""))
            out.append(d)
        return {"ok": True, "mounts": out, "pools": self.pools.view(view)}

    def _server_rec(self, rec: MountRecord) -> MountRecord:
        """The record of the gfuse mount whose server serves ``rec``: its pool's for a subdir PV."""
        return self.pools.table.get(rec.pool, rec) if rec.pool else rec

    async def op_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        target = self._target(req)
        timeout = self._timeout(req, self.probe_timeout)
        res = await run_bounded(["stat", "-f", "-c", "%S %b %f %a %c %d", "--", target], timeout)
        if res.timed_out:
            raise OpError(f"statfs of {target} did not answer within {timeout:g}s: the volume's bricks are "
                          f"unreachable or the mount is stuck (see `gfuse status {target}`)", "timeout")
        if res.rc != 0:
            msg = res.last_line() or f"stat exited with status {res.rc}"
            code = "not_found" if "No such file" in msg else "unavailable"
            raise OpError(f"statfs of {target} failed: {msg.removeprefix('stat: ')}", code)
        try:
            bsize, blocks, bfree, bavail, files, ffree = (int(x) for x in res.stdout.split())
        except ValueError:
            raise OpError(f"statfs of {target}: unexpected output {res.stdout!r:.100}", "internal") from None
        return {"ok": True, "bytes_total": blocks * bsize, "bytes_used": (blocks - bfree) * bsize,
                "bytes_available": bavail * bsize, "inodes_total": files, "inodes_used": files - ffree,
                "inodes_available": ffree}

    # -- restartable mounts (the holder) -------------------------------------------------------

    async def _choose_restartable(self) -> None:
        """``auto``: restartable iff this kernel re-queues the requests a dead server had read (FUSE_NOTIFY_RESEND,
        Linux >= 6.9), asked once of a throwaway FUSE connection in a private mount namespace."""
        if self.restartable_choice == "auto":
            res = await run_bounded([sys.executable, "-m", "gfuse.takeover", "--probe-resend"], 20, self.env)
            if res.rc in (0, 1):
                self.restartable = res.rc == 0
                why = "the kernel has FUSE_NOTIFY_RESEND" if self.restartable else \
                    "the kernel has no FUSE_NOTIFY_RESEND (Linux < 6.9)"
            else:
                from gfuse.takeover import kernel_resend_guess

                self.restartable = kernel_resend_guess()
                why = (f"could not probe the kernel ({res.last_line() or 'no answer'}); Linux "
                       f"{os.uname().release} {'>=' if self.restartable else '<'} 6.9")
        else:
            why = f"--restartable={self.restartable_choice}"
        if self.restartable:
            log.info("new mounts are restartable (%s): the holder at %s keeps their FUSE connections, the death of "
                     "a server is a pause for the pods", why, self.holder_socket)
        else:
            log.info("new mounts are repair-only (%s): a dead server's mount is repaired by a fresh mount stacked "
                     "over it; running pods keep errors on it unless they mount with HostToContainer", why)

    async def _holder_list(self) -> dict[str, dict[str, Any]] | None:
        """The holder's mounts by mount point; None when no holder answers."""
        from gfuse.takeover import TakeoverError, holder_request

        try:
            reply, fd = await trio.to_thread.run_sync(functools.partial(
                holder_request, {"op": "list"}, timeout=3.0, path=self.holder_socket))
        except (OSError, ValueError, TakeoverError):
            return None
        if fd is not None:
            os.close(fd)
        mounts = reply.get("mounts")
        if not reply.get("ok") or not isinstance(mounts, list):
            return None
        return {str(m.get("mountpoint")): m for m in mounts if isinstance(m, dict)}

    async def _ensure_holder(self) -> bool:
        """A holder answers at ``holder_socket``: the one found there, or one started now in a session of its
        own (through --mount-wrapper, so it also leaves the agent's cgroup): a SIGKILL of the agent, even of its
        process group, leaves it holding every fd. False (logged) if none could be started."""
        from gfuse.takeover import spawn_holder

        if self._holder_proc is not None and self._holder_proc.poll() is not None:
            self._holder_proc = None  # reaped: it exited (idle, or killed)
        if await self._holder_list() is not None:
            return True
        try:
            proc = await trio.to_thread.run_sync(functools.partial(
                spawn_holder, self.holder_socket, log_file=self.holder_log, wrapper=self.mount_wrapper,
                idle_exit=HOLDER_IDLE_EXIT, env=self.env))
            self._holder_proc, pid = proc, proc.pid  # kept to be reaped (poll) once it exits
        except OSError as e:
            log.error("cannot start the gfuse holder: %s (restartable mounts start their own)", e.strerror or e)
            return False
        with trio.move_on_after(10):
            while await self._holder_list() is None:
                await trio.sleep(0.1)
            log.info("started the gfuse holder on %s (pid %d, log %s)", self.holder_socket, pid, self.holder_log)
            return True
        log.error("the gfuse holder started (pid %d) does not answer on %s (see %s)", pid, self.holder_socket,
                  self.holder_log)
        return False

    async def _upgrade_mounts(self) -> None:
        """In-place upgrade (the DaemonSet's rolling update of the node image): every restartable mount whose
        server runs another version of gfuse than this agent's is handed over to this one, one at a time --
        ``gfuse mount --takeover --handover``: the new process connects its graph, the holder asks the old
        one (SIGUSR2) to finish the requests it read and leave; running containers see a pause."""
        from gfuse.status import query_status
        from gfuse.takeover import gfuse_version

        mine = gfuse_version()
        view = await self._holder_list() if self.upgrade_mounts else None
        for target, rec in [*self.table.items(), *self.pools.table.items()] if view else []:
            h = view.get(target) if view else None
            if not rec.restartable or h is None or not h.get("served"):
                continue
            try:
                st = await trio.to_thread.run_sync(functools.partial(query_status, target, 3.0))
            except (OSError, ValueError):
                continue  # not answering: the health check deals with it
            theirs = str(st.get("version") or "older than 0.1.0")
            if theirs == mine:
                continue
            async with self._lock(target):
                cmd = [*self.mount_wrapper, *self.gfuse_command, "mount", "--takeover", target, "--handover",
                       "--timeout", f"{max(1.0, self.mount_timeout - 6):g}"]
                res = await run_bounded(cmd, self.mount_timeout, self.env)
                m = _PID_RE.search(res.stdout)
                if res.rc == 0 and m:
                    rec.pid = int(m.group(1))
                    self._save()
                    log.warning("upgraded %s in place: gfuse %s -> %s (pid %d serves it; running pods saw a pause)",
                                target, theirs, mine, rec.pid)
                else:
                    log.error("in-place upgrade of %s from gfuse %s to %s failed: %s (it goes on serving)", target,
                              theirs, mine, "no answer" if res.timed_out else res.last_line() or f"status {res.rc}")

    @staticmethod
    def _mode(rec: MountRecord, held: dict[str, Any] | None) -> str:
        """As ``gfuse status`` says it (gfuse.takeover.mode_of)."""
        if not rec.restartable:
            return "repair-only"
        return "restartable/held" if held is not None else "restartable/unheld"

    async def _takeover(self, rec: MountRecord, budget: float) -> None:
        """A held mount without a server: ``gfuse mount --takeover`` serves the same FUSE connection again (the
        kernel kept the requests; running containers keep their fds and see a pause)."""
        target = rec.target
        cmd = [*self.mount_wrapper, *self.gfuse_command, "mount", "--takeover", target,
               "--timeout", f"{max(1.0, budget - 6):g}"]
        res = await run_bounded(cmd, budget, self.env)
        view = await self._holder_list() or {}
        h = view.get(target)
        if res.rc != 0 and not (h is not None and h.get("served")):
            msg = "no answer" if res.timed_out else (res.last_line().removeprefix("gfuse: ").removeprefix("Error: ")
                                                     or f"status {res.rc}")
            raise OpError(f"cannot take over {target}: {msg}", "unavailable")
        m = _PID_RE.search(res.stdout)
        pid = int(m.group(1)) if m and res.rc == 0 else (int(h["pid"]) if h and h.get("served") else None)
        rec.pid = pid if pid and is_serving_process(pid, target) else self._find_pid(rec)
        self._save()
        log.warning("took over %s (%s) on the connection the holder kept: pid %s serves it again (running pods "
                    "saw a pause, not an error)", target, rec.source, rec.pid)

    # -- health -------------------------------------------------------------------------------

    async def _probe(self, rec: MountRecord, timeout: float | None = None) -> tuple[str, str]:
        """("healthy" | "dead" | "hung" | "error" | "unmounted" | "foreign", reason)."""
        target = rec.target
        stack = mounts_at(target)
        if not stack:
            return "unmounted", f"{target} is not mounted"
        top = stack[-1]
        if not top.is_gfuse:
            return "foreign", f"{target} is covered by a {top.fstype} mount from {top.source}"
        srv = self._server_rec(rec)
        if srv.restartable:
            # a held connection without a server: the kernel holds the requests (a stat would wait for the
            # successor); not dead, and never to be unmounted or covered
            h = (await self._holder_list() or {}).get(srv.target)
            if h is None:
                self._held.pop(srv.target, None)
            else:
                self._held[srv.target] = h
                if not h.get("served"):
                    return "restarting", self._restarting_reason(h)
        timeout = timeout or self.probe_timeout
        res = await run_bounded(["stat", "-c", "%i", "--", target], timeout)
        if res.timed_out:
            pid = self._find_pid(srv)
            return "hung", (f"{target} did not answer within {timeout:g}s (serving process "
                            f"{pid if pid else 'not found'}; bricks unreachable or the server is stuck)")
        if res.rc == 0:
            return "healthy", ""
        msg = res.last_line().removeprefix("stat: ") or f"stat exited with status {res.rc}"
        # "Transport endpoint is not connected" is what the kernel answers once the serving process is
        # gone -- and also what gfuse itself answers while every brick is down. Only a serving process
        # that is really gone makes the mount dead (and repaired); otherwise it is unhealthy and left alone.
        if await self._server_alive(srv):
            return "error", msg
        return "dead", msg

    @staticmethod
    def _restarting_reason(h: dict[str, Any]) -> str:
        since = float(h.get("unserved_for") or 0.0)
        who = (f"pid {h['child']} is taking over" if h.get("child") else
               f"{h.get('failures')} takeover(s) failed in a row" if h.get("failures") else "no successor yet")
        return (f"its server died {since:.1f}s ago; {who} (the holder keeps the FUSE connection: requests wait, "
                f"running pods see a pause, not an error)")

    async def _server_alive(self, rec: MountRecord) -> bool:
        """Evidence that the mount's serving process lives: its pid (needs the host's pid namespace), or
        its status socket in /run/gfuse answering (needs that directory shared with the host)."""
        if self._find_pid(rec) is not None:
            return True
        from gfuse.status import status_socket_path

        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            with trio.move_on_after(2.0):
                try:
                    await sock.connect(status_socket_path(rec.target))
                except OSError:
                    return False  # no socket, or nobody listening on it: the process is gone
                return True
        return True  # connect() did not finish: something holds the socket; do not call it dead

    async def _health_loop(self) -> None:
        while True:
            await self.check_all()
            self.health_passes += 1
            await trio.sleep(self.health_interval)

    async def check_all(self) -> None:
        await self.pools.check_pools()  # first: a pool repaired now has its PVs bound again below
        async with trio.open_nursery() as nursery:
            for target in list(self.table):
                nursery.start_soon(self._check_one_safely, target)

    async def _check_one_safely(self, target: str) -> None:
        try:
            await self._check_one(target)
        except Exception:
            log.exception("health check of %s failed", target)  # a bug here must not stop the agent

    async def _check_one(self, target: str) -> None:
        lock = self._lock(target)
        if lock.locked():
            return  # a request is working on it
        async with self._limiter, lock:
            rec = self.table.get(target) or self.pools.table.get(target)
            if rec is None:
                return
            if rec.pool:
                await self.pools.check(rec)
                return
            state, reason = await self._probe(rec)
            prev = self._health.get(target)
            self._health[target] = (state, reason)
            if state == "healthy":
                if prev is not None and prev[0] != "healthy":
                    log.info("%s is healthy again", target)
                pid = self._find_pid(rec)
                if pid != rec.pid:
                    rec.pid = pid
                    self._save()
                return
            if state == "unmounted" and not os.path.isdir(target):
                log.info("%s is gone (its pod was removed); dropping it from the mount table", target)
                self.table.pop(target, None)
                self._health.pop(target, None)
                self._save()
                return
            if state == "restarting":
                h = self._held.get(target) or {}
                # the holder starts a successor itself unless it only holds (--no-restart): then at once
                if h.get("child") or (h.get("restart", True) and float(h.get("unserved_for") or 0.0) < TAKEOVER_GRACE):
                    if prev is None or prev[0] != state:
                        log.warning("%s (%s): %s", target, rec.source, reason)
                    return  # the holder's successor is on its way
                log.warning("%s (%s): %s; taking it over", target, rec.source, reason)
            if state in ("dead", "unmounted", "restarting"):
                if state != "restarting" and (prev is None or prev[0] != state):
                    log.warning("%s (%s): %s; repairing", target, rec.source, reason)
                try:
                    if state == "restarting":
                        await self._takeover(rec, self.mount_timeout)
                    else:
                        await self._repair(rec, reason, self.mount_timeout)
                except OpError as e:
                    if self._repair_errors.get(target) != e.message:
                        log.error("repair of %s failed (retrying every %gs): %s", target, self.health_interval,
                                  e.message)
                    self._repair_errors[target] = e.message
                    return
                self._repair_errors.pop(target, None)
                self._health[target] = ("healthy", "")
                return
            if prev != (state, reason):
                log.warning("%s (%s) is unhealthy: %s", target, rec.source, reason)

    async def _repair(self, rec: MountRecord, reason: str, budget: float) -> None:
        """A dead mount (its FUSE connection ended with its server: not restartable, or no holder had it) gets
        a fresh mount stacked over it -- never detached first, so nothing written in between can land in the
        node's directory underneath, and nothing is mounted over it unless the volume can be mounted (pods keep
        getting errors meanwhile). Processes that got the dead mount keep it: their open files and their view
        of the directory fail (ENOTCONN) until their pod restarts, unless their volume mount propagates host
        mounts to them (HostToContainer). An unmounted target is simply mounted again."""
        target = rec.target
        stack = mounts_at(target)
        over = bool(stack) and stack[-1].is_gfuse
        if over:
            await self._volume_reachable(rec, min(5.0, budget / 4))
            old = {p for p in [rec.pid, *serving_pids(target)] if p}
            await self._reap(target, old, 2.0)
        rec.restartable = self.restartable
        if rec.restartable:
            await self._ensure_holder()
        rec.pid = await self._spawn_mount(rec, budget, stack=over)
        rec.repairs += 1
        self._save()
        log.warning("repaired %s: mounted %s %s (pid %s, %s, repair #%d; open files on the dead mount keep "
                    "failing, new opens work)", target, rec.source, "over the dead mount" if over else "again",
                    rec.pid, self._mode(rec, {}), rec.repairs)

    async def _volume_reachable(self, rec: MountRecord, timeout: float) -> None:
        """Raise OpError unless glusterd gives the volfile and at least one brick answers -- what a
        new ``gfuse mount`` needs (``gfuse probe``: exit 0 when every brick answered, 1 with
        "N of M brick(s) did not answer" when some did not)."""
        from gfuse.mgmt import parse_volume_spec
        from gfuse.options import MountError, parse_options

        try:
            spec = parse_volume_spec(rec.source)
            backups = parse_options(",".join(rec.options)).backup_servers
        except (ValueError, MountError) as e:
            raise OpError(f"{rec.source}: {e}", "invalid") from None
        cmd = [*self.gfuse_command, "probe", f"{spec.server}:/{spec.volume}", "--timeout", f"{timeout:g}"]
        if backups:
            cmd += ["--backup-volfile-servers", ",".join(str(b) for b in backups)]
        if self.node_options:
            cmd += ["-o", ",".join(self.node_options)]
        res = await run_bounded(cmd, 3 * timeout + 10)
        if res.rc == 0:
            return
        m = re.search(r"(\d+) of (\d+) brick\(s\) did not answer", res.stderr)
        if m and int(m.group(1)) < int(m.group(2)):
            return  # some bricks are down; the volume can still be mounted
        why = "no answer" if res.timed_out else (res.last_line().removeprefix("gfuse: ") or f"status {res.rc}")
        if m:
            why = f"none of its {m.group(2)} bricks answers"
        raise OpError(f"the volume {rec.source} cannot be reached: {why}", "unavailable")

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gfuse-agent", description="gfuse node agent: owns the gfuse mounts of this "
                                "node and serves the FlexVolume driver and the CSI plugin over a unix socket.")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="unix socket to listen on (default %(default)s)")
    p.add_argument("--state", default=DEFAULT_STATE, help="mount table file (default %(default)s)")
    p.add_argument("--health-interval", type=float, default=10.0, metavar="S",
                   help="seconds between health checks of every mount (default %(default)s)")
    p.add_argument("--probe-timeout", type=float, default=5.0, metavar="S",
                   help="a mount not answering stat() within S seconds is unhealthy (default %(default)s)")
    p.add_argument("--mount-timeout", type=float, default=45.0, metavar="S",
                   help="default time limit of one gfuse mount (default %(default)s)")
    p.add_argument("--gfuse-command", default=None, metavar="CMD",
                   help="how to run gfuse (default: this Python's '-m gfuse.cli')")
    p.add_argument("--mount-wrapper", default="", metavar="CMD",
                   help="prefix for 'gfuse mount', e.g. 'systemd-run --scope --quiet --collect --' so serving "
                        "processes live outside the agent container's cgroup")
    p.add_argument("--lock-wait", type=float, default=10.0, metavar="S",
                   help="wait up to S seconds for a previous agent to release the state file (default %(default)s)")
    p.add_argument("--kubelet-dir", default=DEFAULT_KUBELET_DIR, metavar="DIR",
                   help="kubelet's root directory: mount targets are accepted only below it (default %(default)s; "
                        "k3s and microk8s use other paths)")
    p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="another directory below which mount targets are accepted (repeatable), e.g. the CSI "
                        "controller's --state-dir with --pool-mounter agent")
    p.add_argument("--node-option", action="append", default=[], metavar="OPT",
                   help="a gfuse -o option given to every mount and probe of this node, e.g. ssl-dir=/etc/gfuse/tls "
                        "or secure-mgmt=yes (repeatable); the options a PV may not ask for (node files, TLS) "
                        "are set here")
    p.add_argument("--metrics-address", default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics of every mount on http://HOST:PORT/metrics (':PORT': every "
                        "interface; default: off)")
    p.add_argument("--pool-subdirs", default="no", choices=("yes", "no"),
                   help="serve every subdir PV (a source or subdir= naming a subdirectory) of one pool volume from "
                        "one gfuse mount of the pool, each PV a bind of its subdirectory (flexvolume.pools; "
                        "default %(default)s: a gfuse mount per PV, whose df shows the PV's quota)")
    p.add_argument("--pool-dir", default=None, metavar="DIR",
                   help="where pool mounts live, root only (default: <kubelet-dir>/gfuse-pools)")
    p.add_argument("--restartable", default="auto", choices=RESTARTABLE_CHOICES,
                   help="make mounts restartable: the holder keeps their FUSE connections and a dead server is "
                        "taken over, a pause for running pods (auto: when the kernel has FUSE_NOTIFY_RESEND, Linux "
                        ">= 6.9; no: repair-only, a fresh mount stacked over a dead one; default %(default)s)")
    p.add_argument("--no-upgrade-mounts", action="store_true",
                   help="leave restartable mounts served by another gfuse version as they are (default: hand each "
                        "over to this version at start, a pause for running pods)")
    p.add_argument("--holder-socket", default=None, metavar="PATH",
                   help="the gfuse holder's socket (default $GFUSE_HOLDER_SOCKET or /run/gfuse/holder.sock); "
                        "started by the agent when none answers there")
    p.add_argument("--holder-log", default=None, metavar="FILE",
                   help="log of a holder the agent starts (default $GFUSE_HOLDER_LOG or /var/log/gfuse/holder.log)")
    p.add_argument("--kubeconfig", default=None, metavar="FILE",
                   help="API server for Events on the pods of repaired mounts (default: the pod's service account "
                        "when the agent runs in a cluster; elsewhere no events)")
    p.add_argument("--no-events", action="store_true", help="post no Events (repairs are in the agent's log)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = p.parse_args(argv)
    metrics_address = None
    if args.metrics_address is not None:
        try:
            from .metrics import parse_address

            metrics_address = parse_address(args.metrics_address)
        except ImportError as missing:
            print(f"gfuse-agent: --metrics-address needs the prometheus_client package ({missing})", file=sys.stderr)
            sys.exit(2)
        except ValueError as bad_address:
            print(f"gfuse-agent: --metrics-address {bad_address}", file=sys.stderr)
            sys.exit(2)
    for d in [args.kubelet_dir, *args.allow_dir]:
        if not os.path.isabs(d) or os.path.normpath(d) == "/":
            p.error(f"{d!r}: mount roots must be absolute directories other than /")
    node_options = [o.strip() for item in args.node_option for o in item.split(",") if o.strip()]
    try:
        from gfuse.options import MountError, parse_options

        parse_options(",".join(node_options))
    except MountError as bad:
        p.error(f"--node-option: {bad}")
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    events = None
    if not args.no_events:
        from .kubeevents import agent_events

        try:
            events = agent_events(args.kubeconfig, os.environ.get("NODE_NAME") or socket.gethostname())
        except ValueError as bad_events:
            print(f"gfuse-agent: {bad_events}", file=sys.stderr)
            sys.exit(2)
    agent = Agent(args.socket, args.state, health_interval=args.health_interval, probe_timeout=args.probe_timeout,
                  mount_timeout=args.mount_timeout,
                  gfuse_command=shlex.split(args.gfuse_command) if args.gfuse_command else None,
                  mount_wrapper=shlex.split(args.mount_wrapper), lock_wait=args.lock_wait,
                  restartable=args.restartable, upgrade_mounts=not args.no_upgrade_mounts,
                  holder_socket=args.holder_socket, holder_log=args.holder_log,
                  kubelet_dir=args.kubelet_dir, allowed_dirs=args.allow_dir, node_options=node_options,
                  metrics_address=metrics_address, events=events, pool_subdirs=args.pool_subdirs == "yes",
                  pool_dir=args.pool_dir)
    try:
        trio.run(agent.run)
    except KeyboardInterrupt:
        pass
    except BaseException as exc:
        from gfuse.errors import leaf

        e = leaf(exc)
        if isinstance(e, AgentStartError):
            print(f"gfuse-agent: {e}", file=sys.stderr)
            sys.exit(1)
        if isinstance(e, OSError):
            print(f"gfuse-agent: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
            sys.exit(1)
        raise
    sys.exit(0)


if __name__ == "__main__":
    main()
