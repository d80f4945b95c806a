"""An in-memory GlusterFS brick, for testing translators without servers, sockets or real time.

:class:`MemBrick` is the brick process (its store: inodes by gfid, names per directory, data,
xattrs; its locks and open fds); :class:`MemClient` is one client's session with it and implements
the same fop interface as :class:`gfuse.xlators.client.BrickClient` (``gfuse.xlators.api.Brick``):
replicate and distribute run over it unchanged. Everything happens in trio tasks and virtual time,
so tests run under ``trio.testing.MockClock(autojump_threshold=0)`` and a ping-timeout of 42 s
costs nothing.

What it models, because the translators depend on it:

- posix semantics of the fops gfuse sends (EEXIST, ENOENT, ENOTEMPTY, hard links, open-unlinked
  files, times: from the credential's ctime as gluster's utime does, else the virtual clock);
- xattrs, and ``xattrop``/``fxattrop`` as the posix translator does them: ``XATTROP_ADD_ARRAY`` adds
  big-endian int32 arrays (AFR's changelog triples), ``ADD_ARRAY64`` int64s; an entry changelog's
  ``glusterfs.xattrop-entry-create`` name is recorded in :attr:`MemBrick.entry_index`;
- the locks translator: ``inodelk``/``finodelk`` by domain and ``entrylk`` by name, blocking and
  non-blocking, owned by (connection, lock owner), an unlock must match exactly (else EINVAL), a
  blocked request tells the holders with an ``INODELK_CONTENTION`` callback; POSIX ``lk`` with
  GETLK, dropped by ``flush`` (of the owner) and ``release`` (of the fd);
- the session: a client is *up* or *down* exactly as BrickClient reports it (``is_up``,
  ``generation`` bumped on each connect, fds reopened by gfid before the up event, subscribers
  called synchronously on each transition); a call on a down client fails with ``ENOTCONN``;
- faults: :meth:`MemBrick.crash` (every fd and lock is gone, calls in flight fail, the data stays as
  after a SIGKILL), :meth:`~MemBrick.restart`, :meth:`~MemBrick.stop`/:meth:`~MemBrick.cont` (SIGSTOP:
  calls hang, and a client drops the session after its ping-timeout), per-call latency, and a fault
  plan: :meth:`~MemBrick.fail` (a call fails with an errno), :meth:`~MemBrick.crash_on` (the brick dies
  when a call arrives, before or after applying it), :meth:`~MemBrick.short_write`, and
  ``capacity``/``quota`` (ENOSPC/EDQUOT for writes past them), and ``arbiter`` (the data-less brick of
  ``replica 3 arbiter 1``);
- the upcall translator, with ``cache_invalidation=True``: a session is registered on an inode by every
  fop on it (a LOOKUP on the inode it finds, READDIRP on every entry), and a change notifies the other
  sessions registered within ``cache_invalidation_timeout`` with a ``CACHE_INVALIDATION`` callback, as
  10.3 does (flags and iatts per fop as in shared/CACHING.md §1: entry fops notify the *victim*, a create
  its parent; xattr changes only for keys matching a pattern some session registered with ``ipc``; FORGET
  to everyone registered when an inode is reaped); registrations and patterns die with a crash.

Inspection helpers (:meth:`~MemBrick.data`, :meth:`~MemBrick.changelog`, :meth:`~MemBrick.pending`,
:meth:`~MemBrick.names`, …) read the store by path, as a test reads a real brick's directory.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import itertools
import logging
import os
import stat as st
import struct
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import trio

from gfuse import fops as F
from gfuse.dicts import Dict
from gfuse.fops import DirEntry, Flock, Result
from gfuse.iatt import NULL_GFID, ROOT_GFID, SET_ATIME, SET_GID, SET_MODE, SET_MTIME, SET_UID, Iatt, Statfs
from gfuse.rpc import Credential
from gfuse.xlators.api import READDIR_SIZE, BrickEvents, Fops
from gfuse.xlators.handles import Handles
from gfuse.xlators.mdcache import (IPC_UPCALL, UP_FORGET, UP_MODE, UP_NLINK, UP_OWN, UP_PARENT_TIMES, UP_PERM,
                                   UP_RENAME, UP_SIZE, UP_TIMES, UP_XATTR, UP_XATTR_RM)

log = logging.getLogger(__name__)

#: the xdata key of an entry changelog naming the entry for granular entry heal (index translator)
ENTRY_INDEX_KEY = "glusterfs.xattrop-entry-create"
#: xdata key of a translator's own fop (DHT linkto files): see mknod
INTERNAL_FOP_KEY = "glusterfs-internal-fop"
AFR_PREFIX = "trusted.afr."
FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10
XATTR_CREATE, XATTR_REPLACE = 1, 2
EOF_ = 2**63 - 1


def _dtype(mode: int) -> int:
    return {st.S_IFDIR: 4, st.S_IFREG: 8, st.S_IFLNK: 10, st.S_IFCHR: 2, st.S_IFBLK: 6, st.S_IFIFO: 1,
            st.S_IFSOCK: 12}.get(st.S_IFMT(mode), 0)


def _end(start: int, length: int) -> int:
    return EOF_ if length == 0 else start + length - 1


@functools.cache
def _array(n: int, fmt: str) -> struct.Struct:
    """The codec of an xattrop array of ``n`` big-endian ints (``fmt`` "i": int32, "q": int64)."""
    return struct.Struct(f">{n}{fmt}")


def triple(value: object) -> tuple[int, int, int]:
    """An AFR changelog value as (data, metadata, entry) counts; zeros if absent or malformed."""
    if isinstance(value, (bytes, bytearray)) and len(value) >= 12:
        d, m, e = struct.unpack(">iii", bytes(value[:12]))
        return d, m, e
    return (0, 0, 0)


# ---------------------------------------------------------------------------------------------- store


@dataclass
class Inode:
    gfid: bytes
    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    rdev: int = 0
    data: bytearray = field(default_factory=bytearray)
    xattrs: dict[str, Any] = field(default_factory=dict)
    #: directories: name → gfid, and each name's stable directory offset
    entries: dict[str, bytes] = field(default_factory=dict)
    cookies: dict[str, int] = field(default_factory=dict)
    parent: bytes = NULL_GFID
    target: str = ""
    atime: int = 0
    mtime: int = 0
    ctime: int = 0

    @property
    def is_dir(self) -> bool:
        return st.S_ISDIR(self.mode)

    def iatt(self) -> Iatt:
        fmt = self.mode & 0o170000
        size = len(self.target) if fmt == st.S_IFLNK else 4096 if fmt == st.S_IFDIR else len(self.data)
        a, a_ns = divmod(self.atime, 1_000_000_000)
        m, m_ns = divmod(self.mtime, 1_000_000_000)
        c, c_ns = divmod(self.ctime, 1_000_000_000)
        return Iatt(gfid=self.gfid, ino=int.from_bytes(self.gfid[8:], "big") or 1, rdev=self.rdev, size=size,
                    blocks=(size + 511) // 512, blksize=4096, nlink=self.nlink, uid=self.uid, gid=self.gid,
                    mode=self.mode, atime=a, atime_nsec=a_ns, mtime=m, mtime_nsec=m_ns, ctime=c, ctime_nsec=c_ns)


@dataclass
class _BrickFd:
    gfid: bytes
    flags: int
    is_dir: bool
    conn: int


@dataclass
class _Lock:
    """A granted inodelk/entrylk/POSIX lock: owner = (connection, lock owner)."""

    conn: int
    owner: bytes
    type: int
    start: int = 0
    end: int = EOF_
    name: str | None = None  # entrylk: the basename (None: the whole directory)
    fd: int | None = None  # POSIX locks: the brick fd it was taken through
    pid: int = 0

    def same_owner(self, conn: int, owner: bytes) -> bool:
        return self.conn == conn and self.owner == owner


@dataclass
class Fault:
    """One planned fault. ``fop`` None matches every fop; ``when(fop, gfid)`` narrows it further."""

    fop: str | None
    action: str  # "fail" | "crash" | "crash_after" | "short"
    errno: int = errno.EIO
    times: int | None = 1  # None: forever
    when: Callable[[str, bytes], bool] | None = None
    keep: int = 0  # short: bytes actually written

    def matches(self, fop: str, gfid: bytes) -> bool:
        return (self.fop is None or self.fop == fop) and (self.when is None or self.when(fop, gfid))


@dataclass
class _Conn:
    client: MemClient
    fds: set[int] = field(default_factory=set)


class MemBrick:
    """One brick process and its store. Make sessions with :meth:`client`."""

    def __init__(self, name: str = "brick", *, capacity: int | None = None, quota: int | None = None,
                 latency: float | Callable[[str], float] = 0.0, cache_invalidation: bool = False,
                 cache_invalidation_timeout: float = 60.0, upcall_delay: float = 0.0, arbiter: bool = False) -> None:
        self.name = name
        #: the brick of an arbiter volume that keeps no data (gluster's features/arbiter on it): data fops
        #: succeed without storing anything (a write's count is what it was sent), reads fail with ENOSYS
        self.arbiter = arbiter
        #: features.cache-invalidation / -timeout; upcalls reach their client ``upcall_delay`` s after the change
        self.cache_invalidation = cache_invalidation
        self.cache_invalidation_timeout = cache_invalidation_timeout
        self.upcall_delay = upcall_delay
        #: gfid → session → when its last fop on the inode arrived; xattr key patterns registered by ipc
        self.up_clients: dict[bytes, dict[int, float]] = {}
        self.up_patterns: set[str] = set()
        self.upcalls_sent = 0
        self.capacity = capacity
        self.quota = quota
        #: seconds each call spends on its way (half before it is applied, half for the reply)
        self.latency = latency
        self.inodes: dict[bytes, Inode] = {ROOT_GFID: Inode(ROOT_GFID, st.S_IFDIR | 0o755, nlink=2,
                                                            parent=ROOT_GFID)}
        self.running = True
        self.stopped = False
        self._stops = 0
        #: set (and replaced) when a SIGSTOP ends or a hung session is dropped: hung calls look again
        self._resumed = trio.Event()
        self.clients: list[MemClient] = []
        self._conns: dict[int, _Conn] = {}
        self._conn_ids = itertools.count(1)
        self.fds: dict[int, _BrickFd] = {}
        self._fd_ids = itertools.count(1)
        #: (gfid, domain) → granted inodelks; (gfid, domain) → granted entrylks; gfid → POSIX locks
        self.inodelks: dict[tuple[bytes, str], list[_Lock]] = {}
        self.entrylks: dict[tuple[bytes, str], list[_Lock]] = {}
        self.posix_locks: dict[bytes, list[_Lock]] = {}
        self._lock_changed = trio.Event()
        self._waiting: list[tuple[str, object, _Lock]] = []  # blocked requests in arrival order
        self.faults: list[Fault] = []
        #: fops received (counted when they reach the brick), by name
        self.calls: Counter[str] = Counter()
        #: directory gfid → names an entry changelog recorded (granular entry heal's index)
        self.entry_index: dict[bytes, set[str]] = {}
        self._clock_ns = 0
        self.crashes = 0

    def __repr__(self) -> str:
        state = "down" if not self.running else "stopped" if self.stopped else "up"
        return f"<MemBrick {self.name} {state}>"

    def client(self, name: str | None = None, *, ping_timeout: float = 42.0, connect: bool = True) -> MemClient:
        """A session with this brick (named like the volfile's ``VOL-client-N``), connected unless told not."""
        c = MemClient(self, name or self.name, ping_timeout=ping_timeout)
        self.clients.append(c)
        if connect:
            c.connect()
        return c

    # ------------------------------------------------------------------ process faults

    def crash(self) -> None:
        """SIGKILL: every session breaks, every fd and lock is forgotten; the data stays."""
        if not self.running:
            return
        self.running = False
        self.crashes += 1
        for conn_id in list(self._conns):
            self._drop_conn(conn_id, "brick crashed (connection reset by peer)")
        self.fds.clear()
        self.inodelks.clear()
        self.entrylks.clear()
        self.posix_locks.clear()
        self.up_clients.clear()
        self.up_patterns.clear()
        self._wake()
        self._reap_all()

    def restart(self, reconnect: bool = True) -> None:
        """The brick process is back (``start force``); clients reconnect at once unless told not."""
        self.running = True
        self.stopped = False
        self._resumed.set()
        self._resumed = trio.Event()
        if reconnect:
            for c in self.clients:
                if not c.is_up and not c.detached:
                    c.connect()

    def stop(self) -> None:
        """SIGSTOP: calls hang; each client drops its session ``ping_timeout`` seconds from now."""
        if self.stopped or not self.running:
            return
        self.stopped = True
        self._stops += 1
        for conn_id, conn in list(self._conns.items()):
            trio.lowlevel.spawn_system_task(self._ping_timeout, conn_id, conn.client, self._stops)

    def cont(self) -> None:
        """SIGCONT: hung calls go on; clients that timed out reconnect."""
        if not self.stopped:
            return
        self.stopped = False
        self._resumed.set()
        self._resumed = trio.Event()
        for c in self.clients:
            if not c.is_up and not c.detached and self.running:
                c.connect()

    async def _ping_timeout(self, conn_id: int, client: MemClient, stop: int) -> None:
        await trio.sleep(client.ping_timeout)
        if self.stopped and self._stops == stop and conn_id in self._conns:
            self._drop_conn(conn_id, f"ping timer expired ({client.ping_timeout:g} s)")

    # ------------------------------------------------------------------ planned faults

    def fail(self, fop: str | None, err: int = errno.EIO, *, times: int | None = 1,
             when: Callable[[str, bytes], bool] | None = None) -> Fault:
        """The next ``times`` calls of ``fop`` (None: any) fail with ``err`` and change nothing."""
        return self._plan(Fault(fop, "fail", err, times, when))

    def crash_on(self, fop: str | None, *, after: bool = False, times: int | None = 1,
                 when: Callable[[str, bytes], bool] | None = None) -> Fault:
        """The brick crashes when ``fop`` arrives: before applying it, or (``after``) before replying."""
        return self._plan(Fault(fop, "crash_after" if after else "crash", errno.ENOTCONN, times, when))

    def short_write(self, keep: int, *, times: int | None = 1,
                    when: Callable[[str, bytes], bool] | None = None) -> Fault:
        """The next write stores only its first ``keep`` bytes and says so (ret = keep)."""
        return self._plan(Fault("write", "short", 0, times, when, keep))

    def clear_faults(self) -> None:
        self.faults.clear()

    def _plan(self, f: Fault) -> Fault:
        self.faults.append(f)
        return f

    def _take_fault(self, fop: str, gfid: bytes) -> Fault | None:
        for f in self.faults:
            if f.matches(fop, gfid):
                if f.times is not None:
                    f.times -= 1
                    if f.times <= 0:
                        self.faults.remove(f)
                return f
        return None

    # ------------------------------------------------------------------ sessions (for MemClient)

    def _open_conn(self, client: MemClient) -> int | None:
        if not self.running or self.stopped:
            return None
        cid = next(self._conn_ids)
        self._conns[cid] = _Conn(client)
        return cid

    def _drop_conn(self, conn_id: int, reason: str) -> None:
        """A session ends: the server forgets its fds and locks (as protocol/server's cleanup)."""
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return
        for fd in conn.fds:
            self.fds.pop(fd, None)
        for table in (self.inodelks, self.entrylks):
            for key, locks in list(table.items()):
                table[key] = [lk for lk in locks if lk.conn != conn_id]
        for gfid, plocks in list(self.posix_locks.items()):
            self.posix_locks[gfid] = [lk for lk in plocks if lk.conn != conn_id]
        for clients in self.up_clients.values():
            clients.pop(conn_id, None)
        self._wake()
        self._reap_all()
        if self.stopped:
            self._resumed.set()
            self._resumed = trio.Event()
        conn.client._lost(conn_id, reason)  # the session's other half

    def _latency(self, fop: str) -> float:
        return self.latency(fop) if callable(self.latency) else self.latency

    def _now(self, cred: Credential | None) -> int:
        if cred is not None and cred.ctime_sec:
            return cred.ctime_sec * 10**9 + cred.ctime_nsec
        try:
            t = int(trio.current_time() * 1e9)
        except RuntimeError:
            t = 0
        self._clock_ns = max(self._clock_ns + 1, t)
        return self._clock_ns

    # ------------------------------------------------------------------ store helpers

    def _inode(self, gfid: bytes) -> Inode:
        i = self.inodes.get(gfid)
        if i is None:
            raise OSError(errno.ENOENT, f"{self.name}: no inode {gfid.hex()}")
        return i

    def _dir(self, gfid: bytes) -> Inode:
        d = self.inodes.get(gfid)
        if d is None:
            raise OSError(errno.ESTALE, f"{self.name}: parent {gfid.hex()} is gone")
        if not d.is_dir:
            raise OSError(errno.ENOTDIR, f"{self.name}: {gfid.hex()} is not a directory")
        return d

    def _dir_inode(self, gfid: bytes) -> Inode:
        """A directory named by its own gfid (opendir, entrylk): ENOENT if gone, ENOTDIR if not one."""
        d = self._inode(gfid)
        if not d.is_dir:
            raise OSError(errno.ENOTDIR, f"{self.name}: {gfid.hex()} is not a directory")
        return d

    def _used(self) -> int:
        return sum(len(i.data) for i in self.inodes.values())

    def _check_space(self, grow: int) -> None:
        if grow <= 0:
            return
        used = self._used()
        if self.quota is not None and used + grow > self.quota:
            raise OSError(errno.EDQUOT, f"{self.name}: disk quota exceeded")
        if self.capacity is not None and used + grow > self.capacity:
            raise OSError(errno.ENOSPC, f"{self.name}: no space left on device")

    def _reply_xattrs(self, ino: Inode, xdata: Dict | None) -> Dict | None:
        """posix answers the xattrs a lookup/readdirp asked for (by key in xdata) that the inode has."""
        if not xdata:
            return None
        out = {k: ino.xattrs[k] for k in xdata if k in ino.xattrs}
        return out or None

    def _link_entry(self, parent: Inode, name: str, ino: Inode, now: int) -> None:
        parent.entries[name] = ino.gfid
        parent.cookies[name] = max(parent.cookies.values(), default=2) + 1
        parent.mtime = parent.ctime = now

    def _unlink_entry(self, parent: Inode, name: str, now: int) -> None:
        del parent.entries[name]
        del parent.cookies[name]
        parent.mtime = parent.ctime = now

    def _reap(self, gfid: bytes) -> None:
        """An inode with no name and no open fd is gone (as the posix translator's unlink directory)."""
        ino = self.inodes.get(gfid)
        if ino is not None and ino.nlink <= 0 and gfid != ROOT_GFID and \
                not any(fd.gfid == gfid for fd in self.fds.values()):
            del self.inodes[gfid]
            self.posix_locks.pop(gfid, None)
            self.upcall(None, gfid, UP_FORGET)
            self.up_clients.pop(gfid, None)

    def _reap_all(self) -> None:
        for gfid in [g for g, i in self.inodes.items() if i.nlink <= 0]:
            self._reap(gfid)

    def _new_inode(self, parent: Inode, name: str, gfid: bytes, mode: int, cred: Credential | None,
                   xdata: Dict | None) -> Inode:
        if name in parent.entries:
            raise OSError(errno.EEXIST, f"{self.name}: {name!r} exists")
        if not name or "/" in name or name in (".", ".."):
            raise OSError(errno.EINVAL, f"{self.name}: bad name {name!r}")
        if len(gfid) != 16 or gfid == NULL_GFID:
            raise OSError(errno.EINVAL, f"{self.name}: a gfid is required to create {name!r}")
        if gfid in self.inodes:
            raise OSError(errno.EEXIST, f"{self.name}: gfid {gfid.hex()} is in use")
        now = self._now(cred)
        ino = Inode(gfid, mode, uid=cred.uid if cred else 0, gid=cred.gid if cred else 0, parent=parent.gfid,
                    atime=now, mtime=now, ctime=now)
        for k, v in (xdata or {}).items():
            if k.startswith(("trusted.", "user.", "security.")):
                ino.xattrs[k] = v
        self.inodes[gfid] = ino
        self._link_entry(parent, name, ino, now)
        return ino

    # ------------------------------------------------------------------ upcall (features/upcall)

    def up_touch(self, conn: int, *gfids: bytes) -> None:
        """Session ``conn`` did a fop on these inodes: it hears of other sessions' changes from now on."""
        if not self.cache_invalidation:
            return
        now = trio.current_time()
        for g in gfids:
            if g != NULL_GFID:
                self.up_clients.setdefault(g, {})[conn] = now

    def upcall(self, origin: int | None, gfid: bytes, flags: int, stat: Iatt | None = None,
               parent: Iatt | None = None, oldparent: Iatt | None = None,
               xattrs: dict[str, bytes] | None = None) -> None:
        """``origin`` changed ``gfid``: tell every other session registered on it in time."""
        if not self.cache_invalidation:
            return
        if xattrs is not None:
            xattrs = {k: v for k, v in xattrs.items() if any(fnmatch.fnmatchcase(k, p) for p in self.up_patterns)}
            if not xattrs:
                return  # no registered key: gluster sends nothing at all
        if origin is not None:
            self.up_touch(origin, gfid)
        now = trio.current_time()
        clients = self.up_clients.get(gfid, {})
        for conn, t in list(clients.items()):
            c = self._conns.get(conn)
            if c is None or now - t > self.cache_invalidation_timeout:
                del clients[conn]
                continue
            if conn == origin:
                continue
            msg = F.CacheInvalidation(gfid, 1, flags, int(self.cache_invalidation_timeout), stat or Iatt(),
                                      parent or Iatt(), oldparent or Iatt(), dict(xattrs or {}))
            self.upcalls_sent += 1
            if self.upcall_delay:
                trio.lowlevel.spawn_system_task(self._late_upcall, conn, c.client, msg)
            else:
                c.client._deliver(F.Cbk.CACHE_INVALIDATION, msg)

    async def _late_upcall(self, conn: int, client: MemClient, msg: F.CacheInvalidation) -> None:
        await trio.sleep(self.upcall_delay)
        if conn in self._conns:
            client._deliver(F.Cbk.CACHE_INVALIDATION, msg)

    # ------------------------------------------------------------------ locks

    def _wake(self) -> None:
        self._lock_changed.set()
        self._lock_changed = trio.Event()

    @staticmethod
    def _conflicts(a: _Lock, b: _Lock, entry: bool) -> bool:
        if a.conn == b.conn and a.owner == b.owner:
            return False
        if a.type != F.WRLCK and b.type != F.WRLCK and not entry:
            return False  # two read locks
        if entry:
            if a.type == F.ENTRYLK_RDLCK and b.type == F.ENTRYLK_RDLCK:
                return False
            return a.name is None or b.name is None or a.name == b.name
        return a.start <= b.end and b.start <= a.end

    async def _acquire(self, client: MemClient, conn: int, kind: str, key: object, req: _Lock, blocking: bool,
                       gfid: bytes, domain: str) -> None:
        """Grant ``req`` in table ``kind`` under ``key``; wait (blocking) or EAGAIN while others conflict."""
        table: dict[Any, list[_Lock]] = (self.inodelks if kind == "inode" else self.entrylks if kind == "entry"
                                         else self.posix_locks)
        entry = kind == "entry"
        waiter = (kind, key, req)
        queued = False
        try:
            while True:
                held = table.get(key, [])
                blockers = [lk for lk in held if self._conflicts(lk, req, entry)]
                if blocking:  # no overtaking an earlier blocked request that conflicts (starvation)
                    earlier = self._waiting[:self._waiting.index(waiter)] if queued else list(self._waiting)
                    blockers += [w[2] for w in earlier if w[0] == kind and w[1] == key
                                 and self._conflicts(w[2], req, entry)]
                if not blockers:
                    if kind == "posix":
                        self._posix_apply(table.setdefault(key, []), req)
                    else:
                        table.setdefault(key, []).append(req)
                    return
                if not blocking:
                    raise OSError(errno.EAGAIN, f"{self.name}: lock held by another owner")
                if not queued:
                    self._waiting.append(waiter)
                    queued = True
                    if kind != "posix":
                        self._notify_contention(kind, gfid, domain, [lk for lk in held
                                                                     if self._conflicts(lk, req, entry)])
                changed = self._lock_changed
                await changed.wait()
                client._check_conn(conn)  # a crash or disconnect ends the wait
        finally:
            if queued:
                self._waiting.remove(waiter)
                self._wake()

    def _notify_contention(self, kind: str, gfid: bytes, domain: str, holders: list[_Lock]) -> None:
        for conn_id in {lk.conn for lk in holders}:
            conn = self._conns.get(conn_id)
            if conn is None:
                continue
            lk = next(x for x in holders if x.conn == conn_id)
            if kind == "inode":
                msg: object = F.InodelkContention(gfid, Flock(lk.type, 0, lk.start,
                                                              0 if lk.end == EOF_ else lk.end - lk.start + 1,
                                                              lk.pid, lk.owner), lk.pid, domain, b"")
                conn.client._deliver(F.Cbk.INODELK_CONTENTION, msg)
            else:
                msg = F.EntrylkContention(gfid, lk.type, lk.pid, lk.name or "", domain, b"")
                conn.client._deliver(F.Cbk.ENTRYLK_CONTENTION, msg)

    def _unlock(self, table: dict[Any, list[_Lock]], key: object, req: _Lock, entry: bool) -> None:
        locks = table.get(key, [])
        for lk in locks:
            if lk.same_owner(req.conn, req.owner) and (lk.name == req.name if entry else
                                                       (lk.start, lk.end) == (req.start, req.end)):
                locks.remove(lk)
                self._wake()
                return
        raise OSError(errno.EINVAL, f"{self.name}: unlock of a lock not held")

    def _posix_apply(self, locks: list[_Lock], req: _Lock) -> None:
        """A POSIX lock (or unlock) replaces what the same owner held on its range (split as needed)."""
        kept: list[_Lock] = []
        for lk in locks:
            if not lk.same_owner(req.conn, req.owner) or lk.end < req.start or lk.start > req.end:
                kept.append(lk)
                continue
            if lk.start < req.start:
                kept.append(replace(lk, end=req.start - 1))
            if lk.end > req.end:
                kept.append(replace(lk, start=req.end + 1))
        if req.type != F.UNLCK:
            kept.append(req)
        locks[:] = sorted(kept, key=lambda x: x.start)
        self._wake()

    # ------------------------------------------------------------------ inspection (as a test reads a brick)

    def resolve(self, path: str) -> bytes | None:
        """The gfid of ``path`` (relative to the brick root), None if there is no such name."""
        gfid = ROOT_GFID
        for part in filter(None, path.split("/")):
            d = self.inodes.get(gfid)
            if d is None or not d.is_dir or part not in d.entries:
                return None
            gfid = d.entries[part]
        return gfid

    def inode(self, path: str) -> Inode | None:
        g = self.resolve(path)
        return None if g is None else self.inodes.get(g)

    def exists(self, path: str) -> bool:
        return self.resolve(path) is not None

    def data(self, path: str) -> bytes:
        ino = self.inode(path)
        if ino is None:
            raise FileNotFoundError(path)
        return bytes(ino.data)

    def names(self, path: str = "") -> list[str]:
        ino = self.inode(path)
        if ino is None:
            raise FileNotFoundError(path)
        return sorted(ino.entries)

    def xattr(self, path: str, key: str) -> Any:
        ino = self.inode(path)
        return None if ino is None else ino.xattrs.get(key)

    def changelog(self, path: str, key: str) -> tuple[int, int, int]:
        """(data, metadata, entry) of AFR changelog ``key`` (e.g. ``trusted.afr.VOL-client-1``) on ``path``."""
        return triple(self.xattr(path, key))

    def pending(self, path: str) -> dict[str, tuple[int, int, int]]:
        """The non-zero AFR changelogs of ``path`` (blame of other bricks, and dirty)."""
        ino = self.inode(path)
        if ino is None:
            return {}
        return {k: triple(v) for k, v in ino.xattrs.items() if k.startswith(AFR_PREFIX) and triple(v) != (0, 0, 0)}

    def heal_pending(self) -> set[bytes]:
        """Every gfid with a non-zero AFR changelog (what ``heal info`` would list from this brick)."""
        return {g for g, i in self.inodes.items()
                if any(k.startswith(AFR_PREFIX) and triple(v) != (0, 0, 0) for k, v in i.xattrs.items())}

    def locks_held(self, domain: str | None = None) -> int:
        return sum(len(v) for k, v in self.inodelks.items() if domain is None or k[1] == domain) + \
            sum(len(v) for k, v in self.entrylks.items() if domain is None or k[1] == domain)


# ---------------------------------------------------------------------------------------------- session


@dataclass
class _ClientFd:
    gfid: bytes
    flags: int
    is_dir: bool
    remote: int | None
    generation: int


class MemClient(BrickEvents, Fops):
    """One client's session with a :class:`MemBrick`: the double of ``BrickClient`` for translator tests."""

    def __init__(self, brick: MemBrick, name: str, *, ping_timeout: float = 42.0) -> None:
        self.brick = brick
        self.name = name
        self.ping_timeout = ping_timeout
        BrickEvents.__init__(self)
        self.generation = 0
        self.last_error = "not connected yet"
        #: a detached client stays down across brick restarts (its own network is cut)
        self.detached = False
        self.lk_owner = os.urandom(8)
        self._conn: int | None = None
        self._fds: Handles[_ClientFd] = Handles(name)

    def __repr__(self) -> str:
        return f"<MemClient {self.name} {'up' if self.is_up else 'down'}>"

    # ------------------------------------------------------------------ events (as BrickClient)

    async def wait_up(self, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            await self.up.wait()
        return self.is_up

    # ------------------------------------------------------------------ session

    def connect(self) -> bool:
        """(Re)connect now if the brick answers: new generation, fds reopened by gfid, then *up*."""
        self.detached = False
        if self.is_up:
            return True
        conn = self.brick._open_conn(self)
        if conn is None:
            self.last_error = "Connection refused" if not self.brick.running else "handshake timed out"
            return False
        self._conn = conn
        self.generation += 1
        for fd in self._fds.values():
            if fd.generation == self.generation:
                continue
            ino = self.brick.inodes.get(fd.gfid)
            if ino is None:
                fd.remote = None
            else:
                fd.remote = self._new_remote(conn, fd.gfid, fd.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC),
                                             fd.is_dir)
            fd.generation = self.generation
        self._emit(True, "")
        return True

    def disconnect(self, reason: str = "disconnected") -> None:
        """Cut this client off the brick (its network): the brick drops the session's fds and locks."""
        self.detached = True
        if self._conn is not None:
            self.brick._drop_conn(self._conn, reason)
        else:
            self._emit(False, reason)

    def _lost(self, conn: int, reason: str) -> None:
        if self._conn != conn:
            return
        self._conn = None
        self.last_error = reason
        self._emit(False, reason)

    def _check_conn(self, conn: int) -> None:
        if self._conn != conn or not self.brick.running:
            raise OSError(errno.ENOTCONN, f"{self.name}: Transport endpoint is not connected ({self.last_error})")

    def _new_remote(self, conn: int, gfid: bytes, flags: int, is_dir: bool) -> int:
        b = self.brick
        rfd = next(b._fd_ids)
        b.fds[rfd] = _BrickFd(gfid, flags, is_dir, conn)
        b._conns[conn].fds.add(rfd)
        return rfd

    async def _enter(self, fop: str, gfid: bytes) -> tuple[int, Fault | None]:
        """A call reaches the brick: ENOTCONN if the session is down; waits out latency and SIGSTOP."""
        await trio.lowlevel.checkpoint()
        if self._conn is None or not self.is_up:
            raise OSError(errno.ENOTCONN, f"{self.name}: Transport endpoint is not connected ({self.last_error})")
        conn = self._conn
        b = self.brick
        if b.latency:
            delay = b._latency(fop)
            if delay:
                await trio.sleep(delay / 2)
        while b.stopped and self._conn == conn:
            await b._resumed.wait()  # a ping-timeout drops the session meanwhile
        if self._conn != conn or not b.running:
            self._check_conn(conn)
        b.calls[fop] += 1
        if b.cache_invalidation and fop != "lookup":
            b.up_touch(conn, gfid)
        fault = b._take_fault(fop, gfid) if b.faults else None
        if fault is not None and fault.action == "fail":
            raise OSError(fault.errno, f"{os.strerror(fault.errno)} ({self.name} {fop.upper()}, injected)")
        if fault is not None and fault.action == "crash":
            b.crash()
            self._check_conn(conn)
        return conn, fault

    async def _leave(self, fop: str, conn: int, fault: Fault | None) -> None:
        """The reply's way back: lost if the brick died or the session broke meanwhile."""
        b = self.brick
        if fault is not None and fault.action == "crash_after":
            b.crash()
        if b.latency:
            delay = b._latency(fop)
            if delay:
                await trio.sleep(delay / 2)
        while b.stopped and self._conn == conn:
            await b._resumed.wait()
        if self._conn != conn or not b.running:
            self._check_conn(conn)

    def _rfd(self, handle: int) -> tuple[bytes, int]:
        fd = self._fds.get(handle)
        if fd.remote is None or fd.generation != self.generation:
            raise OSError(errno.EBADFD, f"{self.name}: fd {handle} was lost when the brick restarted")
        return fd.gfid, fd.remote

    def _bfd(self, rfd: int, conn: int) -> _BrickFd:
        bfd = self.brick.fds.get(rfd)
        if bfd is None or bfd.conn != conn:
            raise OSError(errno.EBADF, f"{self.name}: the brick does not know fd {rfd}")
        return bfd

    def _owner(self, cred: Credential | None) -> bytes:
        return cred.lk_owner if cred is not None else self.lk_owner

    @property
    def open_fds(self) -> int:
        return len(self._fds)

    # ------------------------------------------------------------------ fops: inode

    async def lookup(self, pargfid: bytes, name: str, xdata: Dict | None = None, *, gfid: bytes = NULL_GFID,
                     cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("lookup", gfid if not name else pargfid)
        b = self.brick
        if not name:
            ino = b.inodes.get(gfid)
            if ino is None:
                raise OSError(errno.ENOENT, f"{self.name}: no inode {gfid.hex()}")
            parent = b.inodes.get(ino.parent)
        else:
            parent = b._dir(pargfid)
            g = parent.entries.get(name)
            if g is None:
                raise OSError(errno.ENOENT, f"{self.name}: {name!r}: no such file or directory")
            ino = b.inodes[g]
        b.up_touch(conn, ino.gfid)
        r = Result(0, 0, b._reply_xattrs(ino, xdata), stat=ino.iatt(),
                   postparent=parent.iatt() if parent is not None else None)
        await self._leave("lookup", conn, fault)
        return r

    async def lookup_gfid(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self.lookup(NULL_GFID, "", xdata, gfid=gfid, cred=cred)

    async def stat(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("stat", gfid)
        ino = self.brick._inode(gfid)
        r = Result(0, 0, self.brick._reply_xattrs(ino, xdata), stat=ino.iatt())
        await self._leave("stat", conn, fault)
        return r

    async def readlink(self, gfid: bytes, size: int = 4096, cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("readlink", gfid)
        ino = self.brick._inode(gfid)
        if not st.S_ISLNK(ino.mode):
            raise OSError(errno.EINVAL, f"{self.name}: not a symlink")
        r = Result(0, 0, stat=ino.iatt(), path=ino.target[:size])
        await self._leave("readlink", conn, fault)
        return r

    async def access(self, gfid: bytes, mask: int, cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("access", gfid)
        self.brick._inode(gfid)
        await self._leave("access", conn, fault)
        return Result(0, 0)

    async def statfs(self, gfid: bytes = ROOT_GFID, xdata: Dict | None = None) -> Result:
        conn, fault = await self._enter("statfs", gfid)
        b = self.brick
        total = (b.capacity if b.capacity is not None else 1 << 40) // 4096
        free = max(total - b._used() // 4096, 0)
        r = Result(0, 0, statfs=Statfs(4096, 4096, total, free, free, 1 << 20, (1 << 20) - len(b.inodes),
                                       (1 << 20) - len(b.inodes), 0, 0, 255))
        await self._leave("statfs", conn, fault)
        return r

    def _setattr(self, ino: Inode, stbuf: Iatt, valid: int, cred: Credential | None) -> Result:
        pre = ino.iatt()
        if valid & SET_MODE:
            ino.mode = st.S_IFMT(ino.mode) | (stbuf.mode & 0o7777)
        if valid & SET_UID:
            ino.uid = stbuf.uid
        if valid & SET_GID:
            ino.gid = stbuf.gid
        if valid & SET_ATIME:
            ino.atime = stbuf.atime * 10**9 + stbuf.atime_nsec
        if valid & SET_MTIME:
            ino.mtime = stbuf.mtime * 10**9 + stbuf.mtime_nsec
        ino.ctime = self.brick._now(cred)
        return Result(0, 0, pre=pre, post=ino.iatt())

    def _up_setattr(self, conn: int, gfid: bytes, valid: int, r: Result) -> None:
        flags = UP_SIZE | UP_TIMES | UP_OWN | UP_MODE | UP_PERM | (UP_XATTR if valid & SET_MODE else 0)
        self.brick.upcall(conn, gfid, flags, r.post)

    async def setattr(self, gfid: bytes, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("setattr", gfid)
        r = self._setattr(self.brick._inode(gfid), stbuf, valid, cred)
        self._up_setattr(conn, gfid, valid, r)
        await self._leave("setattr", conn, fault)
        return r

    def _truncate(self, ino: Inode, size: int, cred: Credential | None) -> Result:
        if ino.is_dir:
            raise OSError(errno.EISDIR, f"{self.name}: is a directory")
        pre = ino.iatt()
        if self.brick.arbiter:
            return Result(0, 0, pre=pre, post=pre)
        if size > len(ino.data):
            ino.data.extend(bytes(size - len(ino.data)))
        else:
            del ino.data[size:]
        ino.mtime = ino.ctime = self.brick._now(cred)
        return Result(0, 0, pre=pre, post=ino.iatt())

    async def truncate(self, gfid: bytes, size: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("truncate", gfid)
        r = self._truncate(self.brick._inode(gfid), size, cred)
        self.brick.upcall(conn, gfid, UP_SIZE | UP_TIMES, r.post)
        await self._leave("truncate", conn, fault)
        return r

    def _getxattr(self, ino: Inode, name: str) -> Result:
        if not name:
            return Result(0, 0, dict=dict(ino.xattrs))
        if name not in ino.xattrs:
            raise OSError(errno.ENODATA, f"{self.name}: no xattr {name}")
        return Result(0, 0, dict={name: ino.xattrs[name]})

    def _setxattr(self, ino: Inode, d: Dict, flags: int, cred: Credential | None) -> Result:
        for k in d:
            if flags & XATTR_CREATE and k in ino.xattrs:
                raise OSError(errno.EEXIST, f"{self.name}: xattr {k} exists")
            if flags & XATTR_REPLACE and k not in ino.xattrs:
                raise OSError(errno.ENODATA, f"{self.name}: no xattr {k}")
        ino.xattrs.update(d)
        ino.ctime = self.brick._now(cred)
        return Result(0, 0)

    def _removexattr(self, ino: Inode, name: str, cred: Credential | None) -> Result:
        if name not in ino.xattrs:
            raise OSError(errno.ENODATA, f"{self.name}: no xattr {name}")
        del ino.xattrs[name]
        ino.ctime = self.brick._now(cred)
        return Result(0, 0)

    def _xattrop(self, ino: Inode, op: int, d: Dict, xdata: Dict | None) -> Result:
        if op not in (F.XATTROP_ADD_ARRAY, F.XATTROP_ADD_ARRAY64):
            raise OSError(errno.EINVAL, f"{self.name}: xattrop {op} is not supported")
        width, fmt, bits = (4, "i", 32) if op == F.XATTROP_ADD_ARRAY else (8, "q", 64)
        half, full = 1 << (bits - 1), 1 << bits
        out: Dict = {}
        new: dict[str, bytes] = {}
        for k, v in d.items():
            if not isinstance(v, (bytes, bytearray)) or len(v) % width:
                raise OSError(errno.EINVAL, f"{self.name}: xattrop value of {k} is not an array")
            codec = _array(len(v) // width, fmt)
            old = ino.xattrs.get(k)
            delta = codec.unpack(v)
            if isinstance(old, (bytes, bytearray)) and len(old) == len(v):
                # wraps as the brick's int math
                total = [((x + y + half) % full) - half for x, y in zip(codec.unpack(old), delta)]
                new[k] = out[k] = codec.pack(*total)
            else:
                new[k] = out[k] = bytes(v)  # added to zeros
        ino.xattrs.update(new)
        entry = (xdata or {}).get(ENTRY_INDEX_KEY)
        if isinstance(entry, str) and entry:
            self.brick.entry_index.setdefault(ino.gfid, set()).add(entry)
        return Result(0, 0, dict=out)

    def _up_xattr(self, conn: int, gfid: bytes, d: Dict, removed: bool) -> None:
        ino = self.brick.inodes.get(gfid)
        values = {k: (v if isinstance(v, bytes) else str(v).encode()) for k, v in d.items()}
        self.brick.upcall(conn, gfid, UP_TIMES | (UP_XATTR_RM if removed else UP_XATTR),
                          ino.iatt() if ino is not None else None, xattrs=values)

    async def ipc(self, op: int, xdata: Dict | None = None) -> Result:
        """IPC: op 2 registers xattr key patterns with the upcall translator (per brick, until it dies)."""
        conn, fault = await self._enter("ipc", NULL_GFID)
        if op != IPC_UPCALL:
            raise OSError(errno.EOPNOTSUPP, f"{self.name}: ipc op {op}")
        self.brick.up_patterns.update(xdata or {})
        await self._leave("ipc", conn, fault)
        return Result(0, 0)

    async def getxattr(self, gfid: bytes, name: str = "", xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("getxattr", gfid)
        r = self._getxattr(self.brick._inode(gfid), name)
        await self._leave("getxattr", conn, fault)
        return r

    async def setxattr(self, gfid: bytes, d: Dict, flags: int = 0, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("setxattr", gfid)
        r = self._setxattr(self.brick._inode(gfid), d, flags, cred)
        self._up_xattr(conn, gfid, d, False)
        await self._leave("setxattr", conn, fault)
        return r

    async def removexattr(self, gfid: bytes, name: str, xdata: Dict | None = None,
                          cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("removexattr", gfid)
        r = self._removexattr(self.brick._inode(gfid), name, cred)
        self._up_xattr(conn, gfid, {name: b"\0"}, True)
        await self._leave("removexattr", conn, fault)
        return r

    async def xattrop(self, gfid: bytes, op: int, d: Dict, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("xattrop", gfid)
        r = self._xattrop(self.brick._inode(gfid), op, d, xdata)
        await self._leave("xattrop", conn, fault)
        return r

    async def _inodelk(self, fop: str, conn: int, gfid: bytes, domain: str, cmd: int, flock: Flock,
                       cred: Credential | None) -> Result:
        b = self.brick
        if not (flock.type == F.UNLCK and (gfid, domain) in b.inodelks):
            b._inode(gfid)  # a granted lock keeps its inode reachable by gfid, even once unlinked (as posix)
        if cmd == F.GETLK:
            raise OSError(errno.ENOTSUP, f"{self.name}: GETLK is not supported for {fop}")
        req = _Lock(conn, self._owner(cred), flock.type, flock.start, _end(flock.start, flock.len), pid=flock.pid)
        if flock.type == F.UNLCK:
            b._unlock(b.inodelks, (gfid, domain), req, False)
        else:
            await b._acquire(self, conn, "inode", (gfid, domain), req, cmd == F.SETLKW, gfid, domain)
        return Result(0, 0)

    async def inodelk(self, gfid: bytes, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("inodelk", gfid)
        r = await self._inodelk("inodelk", conn, gfid, domain, cmd, flock, cred)
        await self._leave("inodelk", conn, fault)
        return r

    async def _entrylk(self, conn: int, gfid: bytes, domain: str, name: str | None, cmd: int, type_: int,
                       cred: Credential | None) -> Result:
        b = self.brick
        b._dir_inode(gfid)
        req = _Lock(conn, self._owner(cred), type_, name=name)
        if cmd == F.ENTRYLK_UNLOCK:
            b._unlock(b.entrylks, (gfid, domain), req, True)
        else:
            await b._acquire(self, conn, "entry", (gfid, domain), req, cmd == F.ENTRYLK_LOCK, gfid,
                             domain)
        return Result(0, 0)

    async def entrylk(self, gfid: bytes, domain: str, name: str | None, cmd: int, type_: int = F.ENTRYLK_WRLCK,
                      xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("entrylk", gfid)
        r = await self._entrylk(conn, gfid, domain, name, cmd, type_, cred)
        await self._leave("entrylk", conn, fault)
        return r

    # ------------------------------------------------------------------ fops: entries

    async def mknod(self, pargfid: bytes, name: str, mode: int, rdev: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("mknod", pargfid)
        b = self.brick
        parent = b._dir(pargfid)
        pre = parent.iatt()
        old = b.inodes.get(gfid)
        if xdata and INTERNAL_FOP_KEY in xdata and old is not None and not old.is_dir:
            # DHT's linkto of a hard-linked file: posix links the name to the inode of that gfid
            # (posix_create_link_if_gfid_exists) instead of failing on the gfid in use
            if name in parent.entries:
                raise OSError(errno.EEXIST, f"{self.name}: {name!r} exists")
            now = b._now(cred)
            b._link_entry(parent, name, old, now)
            old.nlink += 1
            old.ctime = now
            ino = old
        else:
            ino = b._new_inode(parent, name, gfid, (mode & ~0o7777) | (mode & 0o7777 & ~umask), cred,
                               xdata)
            ino.rdev = rdev
        r = await self._entry_made("mknod", conn, fault, pargfid, parent, pre, ino)
        return r

    async def _entry_made(self, op: str, conn: int, fault: Fault | None, pargfid: bytes, parent: Inode, pre: Iatt,
                          ino: Inode) -> Result:
        """The reply of a fop that made ``ino`` in ``parent``, and the upcalls the brick sends for it."""
        r = Result(0, 0, stat=ino.iatt(), preparent=pre, postparent=parent.iatt())
        self.brick.up_touch(conn, ino.gfid)
        self.brick.upcall(conn, pargfid, UP_TIMES, r.postparent)
        await self._leave(op, conn, fault)
        return r

    async def mkdir(self, pargfid: bytes, name: str, mode: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("mkdir", pargfid)
        b = self.brick
        parent = b._dir(pargfid)
        pre = parent.iatt()
        ino = b._new_inode(parent, name, gfid, st.S_IFDIR | (mode & 0o7777 & ~umask), cred, xdata)
        ino.nlink = 2
        parent.nlink += 1
        r = await self._entry_made("mkdir", conn, fault, pargfid, parent, pre, ino)
        return r

    async def symlink(self, pargfid: bytes, name: str, target: str, gfid: bytes, umask: int = 0,
                      xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("symlink", pargfid)
        b = self.brick
        parent = b._dir(pargfid)
        pre = parent.iatt()
        ino = b._new_inode(parent, name, gfid, st.S_IFLNK | 0o777, cred, xdata)
        ino.target = target
        r = await self._entry_made("symlink", conn, fault, pargfid, parent, pre, ino)
        return r

    async def create(self, pargfid: bytes, name: str, flags: int, mode: int, gfid: bytes, umask: int = 0,
                     xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("create", pargfid)
        b = self.brick
        parent = b._dir(pargfid)
        pre = parent.iatt()
        ino = b._new_inode(parent, name, gfid, st.S_IFREG | (mode & 0o7777 & ~umask), cred, xdata)
        rfd = self._new_remote(conn, gfid, flags, False)
        r = await self._entry_made("create", conn, fault, pargfid, parent, pre, ino)
        return self._fds.adopt(r, _ClientFd(gfid, flags, False, rfd, self.generation))

    async def link(self, gfid: bytes, newpar: bytes, newname: str, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("link", gfid)
        b = self.brick
        ino = b._inode(gfid)
        parent = b._dir(newpar)
        if ino.is_dir:
            raise OSError(errno.EPERM, f"{self.name}: hard link to a directory")
        if newname in parent.entries:
            raise OSError(errno.EEXIST, f"{self.name}: {newname!r} exists")
        pre = parent.iatt()
        now = b._now(cred)
        b._link_entry(parent, newname, ino, now)
        ino.nlink += 1
        ino.ctime = now
        r = Result(0, 0, stat=ino.iatt(), preparent=pre, postparent=parent.iatt())
        b.upcall(conn, gfid, UP_NLINK | UP_TIMES | UP_PARENT_TIMES, parent=r.postparent)
        await self._leave("link", conn, fault)
        return r

    async def unlink(self, pargfid: bytes, name: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("unlink", pargfid)
        b = self.brick
        parent = b._dir(pargfid)
        g = parent.entries.get(name)
        if g is None:
            raise OSError(errno.ENOENT, f"{self.name}: {name!r}: no such file or directory")
        ino = b.inodes[g]
        if ino.is_dir:
            raise OSError(errno.EISDIR, f"{self.name}: {name!r} is a directory")
        pre = parent.iatt()
        now = b._now(cred)
        b._unlink_entry(parent, name, now)
        ino.nlink -= 1
        ino.ctime = now
        b.upcall(conn, g, UP_NLINK | UP_TIMES | UP_PARENT_TIMES, parent=parent.iatt())
        b._reap(g)
        r = Result(0, 0, preparent=pre, postparent=parent.iatt())
        await self._leave("unlink", conn, fault)
        return r

    async def rmdir(self, pargfid: bytes, name: str, flags: int = 0, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("rmdir", pargfid)
        b = self.brick
        parent = b._dir(pargfid)
        g = parent.entries.get(name)
        if g is None:
            raise OSError(errno.ENOENT, f"{self.name}: {name!r}: no such file or directory")
        ino = b.inodes[g]
        if not ino.is_dir:
            raise OSError(errno.ENOTDIR, f"{self.name}: {name!r} is not a directory")
        if ino.entries:
            raise OSError(errno.ENOTEMPTY, f"{self.name}: {name!r} is not empty")
        pre = parent.iatt()
        b._unlink_entry(parent, name, b._now(cred))
        parent.nlink -= 1
        ino.nlink = 0
        b.upcall(conn, g, UP_NLINK | UP_TIMES | UP_PARENT_TIMES, parent=parent.iatt())
        b._reap(g)
        r = Result(0, 0, preparent=pre, postparent=parent.iatt())
        await self._leave("rmdir", conn, fault)
        return r

    async def rename(self, oldpar: bytes, oldname: str, newpar: bytes, newname: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("rename", oldpar)
        b = self.brick
        op, np_ = b._dir(oldpar), b._dir(newpar)
        g = op.entries.get(oldname)
        if g is None:
            raise OSError(errno.ENOENT, f"{self.name}: {oldname!r}: no such file or directory")
        src = b.inodes[g]
        pre_op, pre_np = op.iatt(), np_.iatt()
        now = b._now(cred)
        dg = np_.entries.get(newname)
        if dg == g:
            r = Result(0, 0, stat=src.iatt(), preoldparent=pre_op, postoldparent=op.iatt(), preparent=pre_np,
                       postparent=np_.iatt())
            await self._leave("rename", conn, fault)
            return r
        if src.is_dir:
            p = np_
            while True:  # no directory into itself
                if p.gfid == g:
                    raise OSError(errno.EINVAL, f"{self.name}: cannot move a directory into itself")
                if p.gfid == ROOT_GFID:
                    break
                p = b.inodes[p.parent]
        if dg is not None:
            dst = b.inodes[dg]
            if src.is_dir and not dst.is_dir:
                raise OSError(errno.ENOTDIR, f"{self.name}: {newname!r} is not a directory")
            if not src.is_dir and dst.is_dir:
                raise OSError(errno.EISDIR, f"{self.name}: {newname!r} is a directory")
            if dst.is_dir and dst.entries:
                raise OSError(errno.ENOTEMPTY, f"{self.name}: {newname!r} is not empty")
            b._unlink_entry(np_, newname, now)
            if dst.is_dir:
                dst.nlink = 0
                np_.nlink -= 1
            else:
                dst.nlink -= 1
            dst.ctime = now
            b._reap(dg)
        b._unlink_entry(op, oldname, now)
        b._link_entry(np_, newname, src, now)
        if src.is_dir and op is not np_:
            op.nlink -= 1
            np_.nlink += 1
            src.parent = np_.gfid
        src.ctime = now
        r = Result(0, 0, stat=src.iatt(), preoldparent=pre_op, postoldparent=op.iatt(), preparent=pre_np,
                   postparent=np_.iatt())
        b.upcall(conn, g, UP_RENAME | UP_PARENT_TIMES, r.stat, r.postparent, r.postoldparent)
        await self._leave("rename", conn, fault)
        return r

    # ------------------------------------------------------------------ fops: open files

    async def open(self, gfid: bytes, flags: int, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("open", gfid)
        ino = self.brick._inode(gfid)
        if ino.is_dir and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EISDIR, f"{self.name}: is a directory")
        if flags & os.O_TRUNC and not ino.is_dir:
            self._truncate(ino, 0, cred)
        rfd = self._new_remote(conn, gfid, flags, ino.is_dir)
        await self._leave("open", conn, fault)
        return self._fds.adopt(Result(0, 0), _ClientFd(gfid, flags, ino.is_dir, rfd, self.generation))

    async def opendir(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        conn, fault = await self._enter("opendir", gfid)
        self.brick._dir_inode(gfid)
        rfd = self._new_remote(conn, gfid, 0, True)
        await self._leave("opendir", conn, fault)
        return self._fds.adopt(Result(0, 0), _ClientFd(gfid, 0, True, rfd, self.generation))

    async def release(self, fd: int) -> None:
        f = self._fds.pop(fd)
        if f is None:
            raise OSError(errno.EBADF, f"{self.name}: unknown fd {fd}")
        if f.remote is None or f.generation != self.generation or not self.is_up or self._conn is None:
            return  # the brick dropped it with the old connection
        b = self.brick
        b.calls["release"] += 1
        bfd = b.fds.pop(f.remote, None)
        conn = b._conns.get(self._conn)
        if conn is not None:
            conn.fds.discard(f.remote)
        if bfd is not None:
            plocks = b.posix_locks.get(bfd.gfid)
            if plocks:
                plocks[:] = [lk for lk in plocks if lk.fd != f.remote]
                b._wake()
            b._reap(bfd.gfid)
        await trio.lowlevel.checkpoint()

    releasedir = release

    async def _fd_op(self, fop: str, handle: int) -> tuple[int, Fault | None, Inode, int]:
        gfid, rfd = self._rfd(handle)
        conn, fault = await self._enter(fop, gfid)
        bfd = self._bfd(rfd, conn)
        ino = self.brick.inodes.get(bfd.gfid)
        if ino is None:
            raise OSError(errno.EBADF, f"{self.name}: the inode of fd {rfd} is gone")
        return conn, fault, ino, rfd

    async def read(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        conn, fault, ino, _ = await self._fd_op("read", fd)
        if ino.is_dir:
            raise OSError(errno.EISDIR, f"{self.name}: is a directory")
        if self.brick.arbiter:
            raise OSError(errno.ENOSYS, f"{self.name}: the arbiter keeps no data")
        data = bytes(ino.data[offset:offset + size])
        r = Result(len(data), 0, stat=ino.iatt(), data=data)
        await self._leave("read", conn, fault)
        return r

    async def write(self, fd: int, offset: int, data: bytes, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        conn, fault, ino, rfd = await self._fd_op("write", fd)
        b = self.brick
        if self.brick.fds[rfd].flags & os.O_APPEND:
            offset = len(ino.data)
        payload = bytes(data)
        if fault is not None and fault.action == "short":
            payload = payload[:fault.keep]
        if b.arbiter:
            r = Result(len(payload), 0, pre=ino.iatt(), post=ino.iatt())
            await self._leave("write", conn, fault)
            return r
        b._check_space(offset + len(payload) - len(ino.data))
        pre = ino.iatt()
        if offset > len(ino.data):
            ino.data.extend(bytes(offset - len(ino.data)))
        ino.data[offset:offset + len(payload)] = payload
        ino.mtime = ino.ctime = b._now(cred)
        r = Result(len(payload), 0, pre=pre, post=ino.iatt())
        b.upcall(conn, ino.gfid, UP_SIZE | UP_TIMES, r.post)
        await self._leave("write", conn, fault)
        return r

    async def fstat(self, fd: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        conn, fault, ino, _ = await self._fd_op("fstat", fd)
        r = Result(0, 0, stat=ino.iatt())
        await self._leave("fstat", conn, fault)
        return r

    async def flush(self, fd: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        conn, fault, ino, _ = await self._fd_op("flush", fd)
        plocks = self.brick.posix_locks.get(ino.gfid)
        if plocks and cred is not None:
            plocks[:] = [lk for lk in plocks if not lk.same_owner(conn, cred.lk_owner)]
            self.brick._wake()
        await self._leave("flush", conn, fault)
        return Result(0, 0)

    async def fsync(self, fd: int, datasync: bool = False, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        conn, fault, ino, _ = await self._fd_op("fsync", fd)
        r = Result(0, 0, pre=ino.iatt(), post=ino.iatt())
        await self._leave("fsync", conn, fault)
        return r

    async def ftruncate(self, fd: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        conn, fault, ino, _ = await self._fd_op("ftruncate", fd)
        r = self._truncate(ino, size, cred)
        self.brick.upcall(conn, ino.gfid, UP_SIZE | UP_TIMES, r.post)
        await self._leave("ftruncate", conn, fault)
        return r

    async def fsetattr(self, fd: int, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        conn, fault, ino, _ = await self._fd_op("fsetattr", fd)
        r = self._setattr(ino, stbuf, valid, cred)
        self._up_setattr(conn, ino.gfid, valid, r)
        await self._leave("fsetattr", conn, fault)
        return r

    async def fgetxattr(self, fd: int, name: str = "", xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        conn, fault, ino, _ = await self._fd_op("fgetxattr", fd)
        r = self._getxattr(ino, name)
        await self._leave("fgetxattr", conn, fault)
        return r

    async def fsetxattr(self, fd: int, d: Dict, flags: int = 0, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        conn, fault, ino, _ = await self._fd_op("fsetxattr", fd)
        r = self._setxattr(ino, d, flags, cred)
        self._up_xattr(conn, ino.gfid, d, False)
        await self._leave("fsetxattr", conn, fault)
        return r

    async def fremovexattr(self, fd: int, name: str, xdata: Dict | None = None,
                           cred: Credential | None = None) -> Result:
        conn, fault, ino, _ = await self._fd_op("fremovexattr", fd)
        r = self._removexattr(ino, name, cred)
        self._up_xattr(conn, ino.gfid, {name: b"\0"}, True)
        await self._leave("fremovexattr", conn, fault)
        return r

    async def fxattrop(self, fd: int, op: int, d: Dict, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        conn, fault, ino, _ = await self._fd_op("fxattrop", fd)
        r = self._xattrop(ino, op, d, xdata)
        await self._leave("fxattrop", conn, fault)
        return r

    async def finodelk(self, fd: int, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        conn, fault, ino, _ = await self._fd_op("finodelk", fd)
        r = await self._inodelk("finodelk", conn, ino.gfid, domain, cmd, flock, cred)
        await self._leave("finodelk", conn, fault)
        return r

    async def fentrylk(self, fd: int, domain: str, name: str | None, cmd: int, type_: int = F.ENTRYLK_WRLCK,
                       xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        conn, fault, ino, _ = await self._fd_op("fentrylk", fd)
        r = await self._entrylk(conn, ino.gfid, domain, name, cmd, type_, cred)
        await self._leave("fentrylk", conn, fault)
        return r

    async def lk(self, fd: int, cmd: int, flock: Flock, xdata: Dict | None = None,
                 cred: Credential | None = None) -> Result:
        conn, fault, ino, rfd = await self._fd_op("lk", fd)
        b = self.brick
        req = _Lock(conn, self._owner(cred), flock.type, flock.start, _end(flock.start, flock.len), fd=rfd,
                    pid=flock.pid)
        if cmd == F.GETLK:
            other = next((lk for lk in b.posix_locks.get(ino.gfid, []) if b._conflicts(lk, req, False)), None)
            if other is None:
                out = replace(flock, type=F.UNLCK)
            else:
                out = Flock(other.type, 0, other.start, 0 if other.end == EOF_ else other.end - other.start + 1,
                            other.pid, other.owner)
            r = Result(0, 0, flock=out)
        else:
            if flock.type == F.UNLCK:
                b._posix_apply(b.posix_locks.setdefault(ino.gfid, []), req)
            else:
                await b._acquire(self, conn, "posix", ino.gfid, req, cmd == F.SETLKW, ino.gfid, "")
            r = Result(0, 0, flock=flock)
        await self._leave("lk", conn, fault)
        return r

    def _zero(self, ino: Inode, offset: int, size: int, extend: bool, cred: Credential | None) -> Result:
        pre = ino.iatt()
        if self.brick.arbiter:
            return Result(0, 0, pre=pre, post=pre)
        end = offset + size
        if end > len(ino.data):
            if extend:
                self.brick._check_space(end - len(ino.data))
                ino.data.extend(bytes(end - len(ino.data)))
            end = min(end, len(ino.data))
        if end > offset:
            ino.data[offset:end] = bytes(end - offset)
        ino.mtime = ino.ctime = self.brick._now(cred)
        return Result(0, 0, pre=pre, post=ino.iatt())

    async def fallocate(self, fd: int, mode: int, offset: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        conn, fault, ino, _ = await self._fd_op("fallocate", fd)
        keep = bool(mode & FALLOC_KEEP_SIZE)
        if mode & (FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE):
            r = self._zero(ino, offset, size, not keep, cred)
        elif self.brick.arbiter:
            r = Result(0, 0, pre=ino.iatt(), post=ino.iatt())
        else:
            pre = ino.iatt()
            end = offset + size
            if end > len(ino.data) and not keep:
                self.brick._check_space(end - len(ino.data))
                ino.data.extend(bytes(end - len(ino.data)))
            ino.ctime = self.brick._now(cred)
            r = Result(0, 0, pre=pre, post=ino.iatt())
        self.brick.upcall(conn, ino.gfid, UP_SIZE | UP_TIMES, r.post)
        await self._leave("fallocate", conn, fault)
        return r

    async def discard(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        conn, fault, ino, _ = await self._fd_op("discard", fd)
        r = self._zero(ino, offset, size, False, cred)
        self.brick.upcall(conn, ino.gfid, UP_SIZE | UP_TIMES, r.post)
        await self._leave("discard", conn, fault)
        return r

    async def zerofill(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        conn, fault, ino, _ = await self._fd_op("zerofill", fd)
        r = self._zero(ino, offset, size, True, cred)
        self.brick.upcall(conn, ino.gfid, UP_SIZE | UP_TIMES, r.post)
        await self._leave("zerofill", conn, fault)
        return r

    async def _list(self, fop: str, fd: int, offset: int, size: int, xdata: Dict | None, plus: bool) -> Result:
        conn, fault, d, _ = await self._fd_op(fop, fd)
        if not d.is_dir:
            raise OSError(errno.ENOTDIR, f"{self.name}: not a directory")
        b = self.brick
        listing = [(1, ".", d), (2, "..", b.inodes.get(d.parent, d))]
        listing += sorted(((d.cookies[n], n, b.inodes[g]) for n, g in d.entries.items()), key=lambda x: x[0])
        out: list[DirEntry] = []
        used = 0
        for cookie, name, ino in listing:
            if cookie <= offset:
                continue
            cost = 24 + len(name.encode()) + (148 if plus else 0)
            if out and used + cost > size:
                break
            used += cost
            a = ino.iatt()
            if plus:
                b.up_touch(conn, ino.gfid)
            out.append(DirEntry(a.ino, cookie, _dtype(ino.mode), name, a if plus else None,
                                b._reply_xattrs(ino, xdata) if plus else None))
        r = Result(0, 0, entries=out)
        await self._leave(fop, conn, fault)
        return r

    async def readdirp(self, fd: int, offset: int = 0, size: int = READDIR_SIZE, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self._list("readdirp", fd, offset, size, xdata, True)

    async def readdir(self, fd: int, offset: int = 0, size: int = READDIR_SIZE, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        return await self._list("readdir", fd, offset, size, xdata, False)


def replica_set(volume: str, n: int, *, first: int = 0, arbiter: bool = False,
                **brick_options: Any) -> tuple[list[MemBrick], list[MemClient]]:
    """``n`` bricks named as a volfile names their clients (``VOLUME-client-K``), each with a session;
    with ``arbiter`` the last one is the arbiter (``replica 3 arbiter 1``)."""
    bricks = [MemBrick(f"{volume}-client-{k}", arbiter=arbiter and k == first + n - 1, **brick_options)
              for k in range(first, first + n)]
    return bricks, [b.client() for b in bricks]
