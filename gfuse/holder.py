"""The per-node holder of FUSE connections (issue 12): mounts outlive the process serving them.

A small, long-lived process (started by the node agent, or on demand by the first ``gfuse mount -o
restartable``; always in a session of its own, detached from its starter; ``python -m gfuse.holder``) keeps a
copy of the ``/dev/fuse`` fd of every restartable mount on the node. As long as it holds that copy the
kernel keeps the connection when the serving process dies: the mount stays, and requests wait in the kernel.
The holder then gives the fd to a successor (``gfuse mount --takeover MOUNTPOINT``), which answers them
(:mod:`gfuse.takeover`).

To keep the pause short the holder keeps, per mount, a *standby* successor: started a few seconds after
the mount is served, it has loaded gfuse (about a second of Python start-up on a busy node) and waits in
a ``take`` request; when the server dies it gets the fd at once. Without a standby (it died, or is not
ready yet) a successor is started then. A successor that fails is started again with back-off.

It never reads from a held fd (that would steal requests); it polls them for POLLERR only, which the
kernel raises when the connection ends (unmount, or ``/sys/fs/fuse/connections/N/abort``), and then
drops the copy (and the mount's takeover record). With ``--no-restart`` it only holds: successors are
started by someone else (the node agent takes a held mount over when nobody else does).

Protocol: one JSON object per line on a unix stream socket (0600), answered by one line; an fd travels
with SCM_RIGHTS.

* ``{"op": "put", "mountpoint": M, "pid": P, "restart": true}`` + fd — a serving process gives its fd. The
  connection stays open for the life of that process: its end (without ``bye``) means the process died.
* ``{"op": "take", "mountpoint": M, "pid": P, "wait": false}`` — a successor asks for the fd (refused while
  another process serves M, unless ``wait``: then answered when that process dies); the answer carries
  the fd, and the connection stays open as above. ``"handover": true`` (with ``wait``): a planned hand-over,
  e.g. to a new version: it replaces the mount's standby, and the server is sent SIGUSR2 (it finishes the
  requests it read and exits, leaving the connection to this one).
* ``put`` and ``take`` may say ``"python"`` and ``"path"`` (the interpreter and the directory holding the
  ``gfuse`` package the process runs): the mount's successors and standbys are started from that code.
* ``{"op": "bye", "mountpoint": M}`` — the mount ends on purpose: the copy is closed.
* ``{"op": "list"}`` — the held mounts; ``{"op": "quit"}`` — close every copy and exit.

If the holder itself is killed, each serving process notices its connection end and gives its fd to a
new holder it starts (the mounts do not depend on the holder while their server runs); mounts whose
server was dead at that moment end (their waiting requests fail with ENOTCONN). A node reboot ends every
FUSE connection anyway: nothing is kept across one.
"""

from __future__ import annotations

import argparse
import array
import fcntl
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("gfuse.holder")

#: a successor that fails is started again after this many seconds, doubling up to MAX_BACKOFF
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: a standby is started this long after its mount is served (not to slow the takeover it follows)
STANDBY_DELAY = 1.0
NO_REPLY: dict[str, Any] = {}


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    buf: bytes = b""
    fds: list[int] = field(default_factory=list)
    owns: str | None = None


@dataclass(eq=False)
class Successor:
    """A process we started for a mount: its ready pipe says OK once it serves."""
    pid: int
    ready_fd: int
    buf: bytes = b""
    #: a standby's ``take`` request, parked until the server dies, and what it said
    conn: Conn | None = None
    msg: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Held:
    mountpoint: str
    fd: int
    restart: bool = True
    pid: int = 0
    owner: Conn | None = None
    child: Successor | None = None
    standby: Successor | None = None
    standby_due: float = 0.0
    standby_failures: int = 0
    failures: int = 0
    next_try: float = 0.0
    restarts: int = 0
    died_at: float = 0.0
    #: seconds from a server's death to its successor taking the fd
    handoffs: list[float] = field(default_factory=list)
    #: when it was given to us (wall clock, as the takeover record's ``started``)
    since: float = field(default_factory=time.time)
    #: the code its last server ran (``python``, the directory holding its ``gfuse`` package): successors and
    #: standbys are started from it, so a mount handed over to a new version stays on it
    python: str = ""
    path: str = ""
    #: standbys replaced by a hand-over: one still starting when replaced must not stand by later (it runs
    #: the old code, and would be the successor after the upgrade)
    retired: set[int] = field(default_factory=set)


class Holder:
    def __init__(self, path: str, idle_exit: float, standby: bool = True, restart: bool = True) -> None:
        self.path = path
        self.idle_exit = idle_exit
        self.use_standby = standby
        #: False: hold only, never start a successor (someone else does: the node agent, an admin, a test)
        self.restart = restart
        self.held: dict[str, Held] = {}
        self.conns: dict[int, Conn] = {}
        self.running = True
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        self._lock = open(path + ".lock", "a")  # held (locked) for the life of the process
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SystemExit(f"gfuse holder: another holder serves {path}") from None
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(64)
        self.idle_since = time.monotonic()

    # --- the loop --------------------------------------------------------------------------------------

    def run(self) -> None:
        log.info("holding FUSE connections at %s (pid %d)", self.path, os.getpid())
        while self.running:
            p = select.poll()
            p.register(self.sock, select.POLLIN)
            for c in self.conns.values():
                p.register(c.sock, select.POLLIN)
            by_fd: dict[int, tuple[Held, Successor | None]] = {}
            for h in self.held.values():
                p.register(h.fd, 0)  # POLLERR/POLLHUP only: never look at (or steal) requests
                by_fd[h.fd] = (h, None)
                for s in (h.child, h.standby):
                    if s is not None and s.ready_fd >= 0:
                        p.register(s.ready_fd, select.POLLIN)
                        by_fd[s.ready_fd] = (h, s)
            for fd, ev in p.poll(self._timeout() * 1000):
                if fd == self.sock.fileno():
                    self._accept()
                elif fd in self.conns:
                    self._readable(self.conns[fd])
                elif fd in by_fd:
                    h, s = by_fd[fd]
                    if self.held.get(h.mountpoint) is not h:
                        continue
                    if s is None:
                        if ev & (select.POLLERR | select.POLLHUP):
                            self._drop(h, "the FUSE connection ended (unmounted)", ended=True)
                    elif s.ready_fd == fd:
                        self._ready(h, s)
            self._timers()
            if self.held or self.conns:
                self.idle_since = time.monotonic()
            elif self.idle_exit and time.monotonic() - self.idle_since > self.idle_exit:
                log.info("nothing held for %.0f s: exiting", self.idle_exit)
                break
        self._close_all()

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [t - now for h in self.held.values() for t in (h.next_try, h.standby_due) if t]
        return max(0.0, min([1.0, *due]))

    def _timers(self) -> None:
        now = time.monotonic()
        for h in list(self.held.values()):
            if h.next_try and now >= h.next_try and h.owner is None and h.child is None:
                h.next_try = 0.0
                self._spawn(h, standby=False)
            if h.standby_due and now >= h.standby_due:
                h.standby_due = 0.0
                if self.use_standby and h.restart and h.standby is None and h.owner is not None:
                    self._spawn(h, standby=True)

    def _close_all(self) -> None:
        for h in list(self.held.values()):
            self._drop(h, "the holder is exiting")
        for c in list(self.conns.values()):
            self._close_conn(c)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    # --- connections -----------------------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            s, _ = self.sock.accept()
        except OSError:
            return
        s.setblocking(False)
        self.conns[s.fileno()] = Conn(s)

    def _readable(self, c: Conn) -> None:
        fds = array.array("i")
        try:
            data, anc, _flags, _addr = c.sock.recvmsg(65536, socket.CMSG_LEN(16 * fds.itemsize),
                                                      socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError:
            data, anc = b"", []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        c.fds.extend(fds)
        if not data:
            self._close_conn(c)
            return
        c.buf += data
        while b"\n" in c.buf:
            line, c.buf = c.buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise ValueError("not an object")
                reply, fd = self._handle(c, msg)
            except (ValueError, KeyError, TypeError) as e:
                reply, fd = {"ok": False, "error": f"bad request: {e}"}, None
            if reply is not NO_REPLY:
                self._reply(c, reply, fd)
        for extra in c.fds:
            os.close(extra)
        c.fds.clear()

    def _reply(self, c: Conn, reply: dict[str, Any], fd: int | None = None) -> None:
        data = (json.dumps(reply) + "\n").encode()
        c.sock.settimeout(5)
        try:
            if fd is None:
                c.sock.sendall(data)
            else:
                c.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        except OSError as e:
            log.warning("answering a client: %s", e)
        finally:
            c.sock.setblocking(False)

    def _close_conn(self, c: Conn) -> None:
        self.conns.pop(c.sock.fileno(), None)
        c.sock.close()
        for fd in c.fds:
            os.close(fd)
        c.fds.clear()
        h = self.held.get(c.owns) if c.owns else None
        if h is None:
            return
        if h.standby is not None and h.standby.conn is c:
            h.standby.conn = None  # the standby is gone; its ready pipe ends too
        if h.owner is c:
            h.owner = None
            self._server_died(h)

    # --- requests --------------------------------------------------------------------------------------

    def _handle(self, c: Conn, msg: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        op = msg.get("op")
        if op == "list":
            now = time.monotonic()
            return {"ok": True, "pid": os.getpid(), "mounts": [
                {"mountpoint": h.mountpoint, "pid": h.pid, "served": h.owner is not None, "restarts": h.restarts,
                 "failures": h.failures, "standby": h.standby.pid if h.standby and h.standby.conn else 0,
                 "child": h.child.pid if h.child is not None and h.child.ready_fd >= 0 else 0, "restart": h.restart,
                 "unserved_for": now - h.died_at if h.owner is None and h.died_at else 0.0,
                 "handoffs": h.handoffs[-100:]} for h in self.held.values()]}, None
        if op == "quit":
            self.running = False
            return {"ok": True}, None
        mp = str(msg["mountpoint"])
        if op == "put":
            return self._put(c, mp, msg), None
        if op == "take":
            return self._take(c, mp, msg)
        if op == "bye":
            b = self.held.get(mp)
            if b is not None:
                self._drop(b, "unmounted by its server")
            return {"ok": True}, None
        return {"ok": False, "error": f"unknown op {op!r}"}, None

    def _put(self, c: Conn, mp: str, msg: dict[str, Any]) -> dict[str, Any]:
        if not c.fds:
            return {"ok": False, "error": "put without an fd"}
        fd = c.fds.pop(0)
        old = self.held.get(mp)
        if old is not None and old.owner is not None and old.owner is not c:
            os.close(fd)
            return {"ok": False, "error": f"{mp} is served by pid {old.pid}"}
        if old is not None:
            self._drop(old, "a new FUSE connection is mounted there")
        h = Held(mp, fd, self.restart and bool(msg.get("restart", True)), int(msg.get("pid", 0)), owner=c)
        _note_code(h, msg)
        h.standby_due = time.monotonic() + STANDBY_DELAY
        self.held[mp] = h
        c.owns = mp
        log.info("holding %s (served by pid %d)", mp, h.pid)
        return {"ok": True}

    def _take(self, c: Conn, mp: str, msg: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        h = self.held.get(mp)
        if h is None:
            return {"ok": False, "error": f"no FUSE connection of {mp} is held"}, None
        pid = int(msg.get("pid", 0))
        c.owns = mp
        if pid in h.retired:
            return {"ok": False, "error": f"pid {pid} was replaced as the standby of {mp} (a hand-over)"}, None
        if h.owner is not None:
            if not msg.get("wait"):
                return {"ok": False, "error": f"{mp} is still served by pid {h.pid}"}, None
            old = h.standby
            if msg.get("handover") and old is not None and old.pid != pid:
                self._retire(h, old, f"replaced by pid {pid}, which takes {mp} over (a hand-over)")
            elif old is not None and old.conn is not None:
                return {"ok": False, "error": f"{mp} has a standby already (pid {old.pid})"}, None
            if h.standby is None or h.standby.pid != pid:
                h.standby = Successor(pid, -1)
            h.standby.conn = c
            h.standby.msg = msg
            log.info("pid %d stands by to take over %s", pid, mp)
            if msg.get("handover"):  # a planned hand-over (an upgrade): the server finishes what it read and exits
                log.warning("hand-over of %s: asking its server (pid %d) to leave it to pid %d", mp, h.pid, pid)
                try:
                    os.kill(h.pid, signal.SIGUSR2)
                except OSError as e:
                    log.warning("cannot signal pid %d: %s", h.pid, e)
            return NO_REPLY, None
        _note_code(h, msg)
        s = h.standby
        if s is not None and s.pid == pid:  # our standby, arriving after the death
            if h.child is not None and h.child.ready_fd >= 0:
                os.close(h.child.ready_fd)  # a successor started meanwhile will be refused: not ours to watch
            h.standby, h.child, s.conn = None, s, None
            h.restarts += 1
        return self._give(h, c, pid), h.fd

    def _give(self, h: Held, c: Conn, pid: int) -> dict[str, Any]:
        h.owner, h.pid = c, pid
        if h.died_at:
            h.handoffs.append(time.monotonic() - h.died_at)
            h.died_at = 0.0
        log.info("%s taken over by pid %d", h.mountpoint, pid)
        return {"ok": True}

    # --- successors ------------------------------------------------------------------------------------

    def _server_died(self, h: Held) -> None:
        if _connection_ended(h.fd):
            self._drop(h, "the FUSE connection ended with its server", ended=True)
            return
        h.died_at = time.monotonic()
        if not h.restart:
            log.warning("the server of %s (pid %d) died; the mount waits for 'gfuse mount --takeover %s'",
                        h.mountpoint, h.pid, h.mountpoint)
            return
        s = h.standby
        if s is not None and s.conn is not None:
            log.warning("the server of %s (pid %d) died: standby pid %d takes over", h.mountpoint, h.pid, s.pid)
            h.standby, h.child = None, s
            _note_code(h, s.msg)
            self._reply(s.conn, self._give(h, s.conn, s.pid), h.fd)
            s.conn = None
            h.restarts += 1
            if s.ready_fd < 0:  # not one we started (a hand-over, a manual --standby): no ready pipe to tell us
                h.child = None
                h.standby_due = time.monotonic() + STANDBY_DELAY
            return
        if h.child is not None and h.child.ready_fd >= 0:
            return  # ours is on its way (or failing: its ready pipe says so)
        if h.failures:
            h.next_try = max(h.next_try, time.monotonic() + min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** h.failures))
            return
        log.warning("the server of %s (pid %d) died: starting a successor", h.mountpoint, h.pid)
        self._spawn(h, standby=False)

    def _spawn(self, h: Held, standby: bool) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        cmd = [h.python or sys.executable, "-m", "gfuse.cli", "mount", "--takeover", h.mountpoint, "--ready-fd", str(w)]
        if standby:
            cmd.append("--standby")
        env = None
        if h.path:  # the code of the mount's last server first: a successor runs what it ran
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [h.path, os.environ.get("PYTHONPATH")])))
        try:
            with open(os.devnull, "rb") as devnull_in, open(os.devnull, "wb") as devnull_out:
                p = subprocess.Popen(cmd, stdin=devnull_in, stdout=devnull_out, stderr=devnull_out, pass_fds=(w,),
                                     start_new_session=True, close_fds=True, env=env)
        except OSError as e:
            os.close(r)
            os.close(w)
            if standby:
                log.warning("cannot start a standby for %s: %s", h.mountpoint, e)
            else:
                self._failed(h, f"cannot start {cmd[0]}: {e}")
            return
        os.close(w)
        s = Successor(p.pid, r)
        if standby:
            h.standby = s
            log.info("started standby pid %d for %s", p.pid, h.mountpoint)
        else:
            h.child = s
            h.restarts += 1
            log.info("started pid %d to take over %s", p.pid, h.mountpoint)

    def _ready(self, h: Held, s: Successor) -> None:
        try:
            data = os.read(s.ready_fd, 4096)
        except OSError:
            data = b""
        s.buf += data
        if data and b"\n" not in s.buf:
            return
        os.close(s.ready_fd)
        s.ready_fd = -1
        answer = s.buf.decode(errors="replace").strip()
        if s is h.standby:  # a standby only answers by failing (or once it serves, as h.child)
            h.standby = None
            h.standby_failures += 1
            log.warning("standby pid %d of %s ended: %s", s.pid, h.mountpoint, answer or "exited")
            h.standby_due = time.monotonic() + min(MAX_BACKOFF, STANDBY_DELAY * 2 ** min(h.standby_failures, 4))
            return
        if s is not h.child:
            return
        h.child = None
        if answer == "OK":
            h.failures = h.standby_failures = 0
            h.standby_due = time.monotonic() + STANDBY_DELAY
            log.info("pid %d serves %s again", s.pid, h.mountpoint)
        elif h.owner is None or h.pid == s.pid:
            self._failed(h, answer.removeprefix("ERR ") or f"pid {s.pid} exited before serving")
        else:  # another process (a standby, a manual --takeover) serves: ours was refused
            log.info("pid %d did not take over %s: %s", s.pid, h.mountpoint, answer or "exited")

    def _failed(self, h: Held, why: str) -> None:
        h.failures += 1
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (h.failures - 1))
        h.next_try = time.monotonic() + delay
        log.warning("taking over %s failed (%d in a row): %s; next try in %.1f s", h.mountpoint, h.failures, why,
                    delay)

    def _retire(self, h: Held, s: Successor, why: str) -> None:
        """A standby that will not take over: told so (it exits), its ready pipe no longer watched; one still
        starting (not connected yet) is refused when it asks (no signal: its pid may be reused by then)."""
        h.retired.add(s.pid)
        if s.ready_fd >= 0:
            os.close(s.ready_fd)
            s.ready_fd = -1
        if s.conn is not None:
            self._reply(s.conn, {"ok": False, "error": why})
            s.conn = None
        if h.standby is s:
            h.standby = None
        log.info("standby pid %d of %s: %s", s.pid, h.mountpoint, why)

    def _drop(self, h: Held, why: str, ended: bool = False) -> None:
        """Close our copy. ``ended``: the connection is gone, so is any use of the mount's takeover record
        (a server killed, or a successor that failed, left it): removed, unless a newer mount there wrote it."""
        if self.held.get(h.mountpoint) is not h:
            return
        log.info("dropping %s: %s", h.mountpoint, why)
        if ended:
            _forget_record(h)
        del self.held[h.mountpoint]
        for s in (h.child, h.standby):
            if s is None:
                continue
            if s.ready_fd >= 0:
                os.close(s.ready_fd)
                s.ready_fd = -1
            if s.conn is not None:
                self._reply(s.conn, {"ok": False, "error": f"{h.mountpoint}: {why}"})
                s.conn = None
        try:
            os.close(h.fd)
        except OSError:
            pass


def _note_code(h: Held, msg: dict[str, Any]) -> None:
    """A server (or a successor taking over) says which code it runs: successors are started from it."""
    python, path = msg.get("python"), msg.get("path")
    if isinstance(python, str) and python.startswith("/") and isinstance(path, str):
        h.python, h.path = python, path


def _forget_record(h: Held) -> None:
    from .takeover import state_dir

    d = state_dir(h.mountpoint)
    try:
        started = float(json.loads((d / "mount.json").read_text()).get("started", 0.0))
    except (OSError, ValueError, AttributeError):
        return
    if started <= h.since:  # a mount made there since wrote its own: not ours to remove
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def _connection_ended(fd: int) -> bool:
    p = select.poll()
    p.register(fd, 0)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))


def main(argv: list[str] | None = None) -> None:
    from .takeover import holder_socket

    ap = argparse.ArgumentParser(prog="python -m gfuse.holder", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--socket", default=holder_socket())
    ap.add_argument("--idle-exit", type=float, default=300.0,
                    help="exit after this many seconds holding nothing (0: never)")
    ap.add_argument("--no-standby", action="store_true", help="start a successor only when a server dies")
    ap.add_argument("--no-restart", action="store_true",
                    help="hold only: never start a successor (the node agent or 'gfuse mount --takeover' does)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # successors are reaped by the kernel
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    os.environ["GFUSE_HOLDER_SOCKET"] = args.socket  # successors talk to this holder
    Holder(args.socket, args.idle_exit, standby=not args.no_standby, restart=not args.no_restart).run()


if __name__ == "__main__":
    main()
