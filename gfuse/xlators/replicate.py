"""cluster/replicate: AFR-compatible replication on the client.

Every modification is a transaction that gluster's self-heal daemon understands:
lock in the replicate translator's domain, pre-op changelog (``trusted.afr.dirty``),
the fop on every replica *concurrently* with one credential (same gfid, same ctime),
post-op that clears dirty and blames (``trusted.afr.<client>``) the replicas that
missed it, unlock. Reads go to one replica that no other replica blames.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import struct
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

import trio

from .. import fops as F
from ..bounded import BoundedDict
from ..cred import now_cred
from ..dicts import Dict, UInt
from ..fops import Flock, Proc, Result
from ..heldlocks import HeldLocks
from ..iatt import NULL_GFID, ROOT_GFID, Iatt
from ..rpc import Credential
from .api import READDIR_SIZE, Brick, BrickEvent, Fops, attrs
from .handles import Handles

log = logging.getLogger(__name__)

DIRTY = "trusted.afr.dirty"
DATA, METADATA, ENTRY = 0, 1, 2
LLONG_MAX = (1 << 63) - 1
ZERO = bytes(12)


def changelog(slot: int, delta: int = 1) -> bytes:
    v = [0, 0, 0]
    v[slot] = delta
    return struct.pack(">iii", *v)


def parse_changelog(value: Any) -> tuple[int, int, int]:
    if isinstance(value, (bytes, bytearray)) and len(value) >= 12:
        d, m, e = struct.unpack(">iii", bytes(value[:12]))
        return d, m, e
    return (0, 0, 0)


T = TypeVar("T")
X = TypeVar("X")


async def each(fn: Callable[[X], Awaitable[T]], items: Iterable[X]) -> list[T | OSError]:
    """``fn(item)`` for every item, concurrently; each slot holds the result or the OSError it raised."""
    args = list(items)
    out: list[T | OSError] = [OSError(errno.EIO, "not run")] * len(args)

    async def one(k: int) -> None:
        try:
            out[k] = await fn(args[k])
        except OSError as e:
            out[k] = e

    async with trio.open_nursery() as nursery:
        for k in range(len(args)):
            nursery.start_soon(one, k)
    return out


def _errno(r: object) -> int | None:
    """The errno of a failed slot of :func:`each` (None for a success)."""
    return r.errno if isinstance(r, OSError) else None


def _pick_error(results: Sequence[object]) -> OSError:
    """The most telling error among replica failures (a real errno beats ENOTCONN)."""
    errs = [r for r in results if isinstance(r, OSError)]
    for e in errs:
        if e.errno not in (errno.ENOTCONN, errno.EBADFD):
            return e
    return errs[0] if errs else OSError(errno.EIO, "no replica answered")


def _first_ok(results: Sequence[Result | OSError]) -> Result:
    """The first replica's answer among those that succeeded (the most telling error if none did)."""
    for r in results:
        if isinstance(r, Result):
            return r
    raise _pick_error(results)


def _quorum_error(name: str, what: str, done: int, quorum: int, results: Sequence[object]) -> OSError:
    """Too few replicas took the change: the bricks' own reason (EDQUOT, ENOSPC, …) when they gave one."""
    err = _pick_error(results)
    if err.errno not in (errno.ENOTCONN, errno.EBADFD):
        return err
    return OSError(errno.ENOTCONN, f"{name}: {what} succeeded on only {done} replica(s), quorum is {quorum}")


class _AfrFd:
    """An open file or directory: one handle per replica (None where it could not be opened)."""

    __slots__ = ("gfid", "flags", "is_dir", "handles", "read_child", "locks")

    def __init__(self, gfid: bytes, flags: int, is_dir: bool, handles: list[int | None]) -> None:
        self.gfid = gfid
        self.flags = flags
        self.is_dir = is_dir
        self.handles = handles
        self.read_child: int | None = None
        #: POSIX locks granted through this fd, to grant again on a replica that restarted
        self.locks: HeldLocks | None = None


def _h(fd: _AfrFd, i: int) -> int:
    """``fd``'s handle on replica ``i`` (callers choose replicas where it is open)."""
    h = fd.handles[i]
    if h is None:
        raise OSError(errno.EBADFD, f"fd not open on child {i}")
    return h


class _EagerLock:
    """A data lock kept across consecutive writes to one file (gluster's eager lock + delayed post-op).

    Lock and pre-op are paid by the first write; later writes go straight to the replicas.
    The post-op (clear dirty, blame replicas that missed a write) and unlock happen when
    the file is idle for ``EAGER_DELAY``, on fsync/flush/close, on another modification of
    the inode, or when a brick tells us another client waits for the lock.
    """

    __slots__ = ("gfid", "fd", "locked", "failed", "inflight", "last_use", "ready", "error", "closing", "drained",
                 "unlock", "generations")

    def __init__(self, gfid: bytes, fd: "_AfrFd") -> None:
        self.gfid = gfid
        self.fd = fd
        self.locked: list[int] = []
        self.failed: set[int] = set()
        self.inflight = 0
        self.last_use = trio.current_time()
        self.ready = trio.Event()
        self.error: BaseException | None = None
        self.closing = False
        self.drained = trio.Event()
        self.unlock: UnlockFn | None = None
        #: each locked brick's connection generation: a brick that reconnected has dropped our lock
        self.generations: dict[int, int] = {}


EAGER_DELAY = 1.0
#: a lock call of a transaction on replica ``i`` with ``cmd`` (SETLK/SETLKW, ENTRYLK_LOCK_NB/ENTRYLK_LOCK)
LockFn = Callable[[int, int], Awaitable[Result]]
#: its unlock on replica ``i`` (never raises: a failed unlock is logged)
UnlockFn = Callable[[int], Awaitable[object]]
#: (lock, unlock, non-blocking cmd, blocking cmd)
Locks = list[tuple[LockFn, UnlockFn, int, int]]
#: xdata of an entry changelog: the brick's index xlator records this name for granular entry heal
#: (for every entry fop — "-delete" would mean "forget the name", not "this was a delete")
ENTRY_INDEX_KEY = "glusterfs.xattrop-entry-create"
ANON_INODE_PREFIX = ".glusterfs-anonymous-inode-"


class Replicate(Fops):
    """The fop interface over N replicas (children implement the same interface)."""

    def __init__(self, name: str, children: Sequence[Brick], pending: Sequence[str] | None = None,
                 quorum: str | int = "auto") -> None:
        self.name = name
        self.children = list(children)
        n = len(self.children)
        names = list(pending) if pending else [c.name for c in self.children]
        if len(names) != n:
            raise ValueError(f"{name}: afr-pending-xattr names {len(names)} entries for {n} children")
        self.pending_keys = [f"trusted.afr.{x}" for x in names]
        if quorum == "auto":
            self.quorum = n // 2 + 1 if n % 2 else n // 2  # even counts: half, with the first child up
            self._first_breaks_tie = n % 2 == 0
        elif quorum in ("none", 0, "0"):
            self.quorum, self._first_breaks_tie = 1, False
        else:
            self.quorum, self._first_breaks_tie = int(quorum), False
        self._fds: Handles[_AfrFd] = Handles(name)
        self._rr = itertools.count()
        #: gfid → replicas that may be read (not blamed by another replica)
        self._readable: BoundedDict[bytes, list[int]] = BoundedDict()
        self._eager: dict[bytes, _EagerLock] = {}
        self._eager_kick = trio.Event()
        #: background tasks (unlocks after the caller got its answer), owned by :meth:`run`
        self._bg: trio.Nursery | None = None
        for i, c in enumerate(self.children):
            c.subscribe_callbacks(self._on_callback)
            c.subscribe(functools.partial(self._child_event, i))

    def __repr__(self) -> str:
        return f"<Replicate {self.name} {len(self.children)} children>"

    # ------------------------------------------------------------ state

    def up(self) -> list[int]:
        return [i for i, c in enumerate(self.children) if c.is_up]

    @property
    def is_up(self) -> bool:
        return bool(self.up())

    def _check_quorum(self, idx: Sequence[int], what: str) -> None:
        ok = len(idx) >= self.quorum and (not self._first_breaks_tie or len(idx) > len(self.children) // 2
                                          or 0 in idx)
        if not ok:
            raise OSError(errno.ENOTCONN, f"{self.name}: {what} refused, client quorum not met "
                                          f"({len(idx)} of {len(self.children)} replicas up, need {self.quorum})")

    def _readable_children(self, gfid: bytes) -> list[int]:
        up = self.up()
        good = [i for i in self._readable.get(gfid, up) if i in up]
        return good

    def _learn(self, gfid: bytes, results: Sequence[Result | OSError | None]) -> None:
        """Who may be read, from the changelogs the replicas returned on lookup."""
        ok = {i: r for i, r in enumerate(results) if isinstance(r, Result) and r.stat is not None}
        blamed: set[int] = set()
        for i, r in ok.items():
            x = r.xdata or {}
            is_dir = attrs(r).is_dir  # a directory's "data" is its entries, as in AFR
            for j, key in enumerate(self.pending_keys):
                if j != i:
                    d, m, e = parse_changelog(x.get(key))
                    if (e if is_dir else d) or m:
                        blamed.add(j)
        self._readable[gfid] = [i for i in ok if i not in blamed]

    def _lookup_xdata(self, xdata: Dict | None) -> Dict:
        out: Dict = dict(xdata or {})
        for k in (*self.pending_keys, DIRTY):
            out[k] = UInt(12)
        return out

    # ------------------------------------------------------------ reads

    async def _read_one(self, gfid: bytes, call: Callable[[int], Awaitable[Result]], what: str) -> Result:
        """Try readable replicas in turn (spread by round robin); split-brain → EIO."""
        if gfid not in self._readable and self.up():
            try:
                await self.lookup_gfid(gfid)  # learn who may be read before reading
            except OSError:
                pass
        good = self._readable_children(gfid)
        if not good:
            if gfid in self._readable and self.up():
                raise OSError(errno.EIO, f"{self.name}: {what}: no readable replica (split-brain?)")
            good = self.up()
        if not good:
            raise OSError(errno.ENOTCONN, f"{self.name}: {what}: no replica is up")
        k = next(self._rr) % len(good)
        order = good[k:] + good[:k]
        last: OSError | None = None
        for i in order:
            try:
                return await call(i)
            except OSError as e:
                if e.errno not in (errno.ENOTCONN, errno.EBADFD):
                    raise
                last = e
        assert last is not None
        raise last

    async def lookup(self, pargfid: bytes, name: str, xdata: Dict | None = None, *, gfid: bytes = NULL_GFID,
                     cred: Credential | None = None) -> Result:
        up = self.up()
        if not up:
            raise OSError(errno.ENOTCONN, f"{self.name}: no replica is up")
        x = self._lookup_xdata(xdata)
        res = await each(lambda i: self.children[i].lookup(pargfid, name, x, gfid=gfid, cred=cred), up)
        results: list[Result | OSError | None] = [None] * len(self.children)
        for i, r in zip(up, res):
            results[i] = r
        ok = [r for r in results if isinstance(r, Result)]
        if not ok:
            raise _pick_error(res)
        absent = [i for i in up if _errno(results[i]) == errno.ENOENT]
        if absent and name and pargfid != NULL_GFID:
            ok = await self._trusted_entry(pargfid, name, results, absent) or ok
        gfids = {attrs(r).gfid for r in ok}
        if len(gfids) > 1:
            log.error("%s: gfid mismatch for %s/%s across replicas", self.name, pargfid.hex(), name)
            raise OSError(errno.EIO, f"{self.name}: gfid split-brain on {name!r}")
        g = attrs(ok[0]).gfid
        self._learn(g, results)
        good = self._readable.get(g) or [i for i, r in enumerate(results) if isinstance(r, Result)]
        if not self._readable.get(g) and len(ok) > 1 and not attrs(ok[0]).is_dir:
            log.warning("%s: %s is in split-brain", self.name, name or g.hex())
        found = results[good[0]]
        assert isinstance(found, Result)
        return found

    async def _trusted_entry(self, pargfid: bytes, name: str, results: list[Result | OSError | None],
                             absent: list[int]) -> list[Result]:
        """Replicas disagree whether ``name`` exists: believe those the parent's entry changelog does not
        blame (an entry operation that missed a replica leaves it blamed until healed), as AFR does."""
        try:
            await self.lookup_gfid(pargfid)
        except OSError:
            return []
        trusted = self._readable.get(pargfid) or []
        hits = [r for r in (results[i] for i in trusted) if isinstance(r, Result)]
        if not hits and any(i in absent for i in trusted):
            raise OSError(errno.ENOENT, f"{self.name}: {name!r}: gone on the replicas not blamed for the directory")
        return hits

    async def lookup_gfid(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self.lookup(bytes(16), "", xdata, gfid=gfid, cred=cred)

    async def stat(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self._read_one(gfid, lambda i: self.children[i].stat(gfid, xdata, cred=cred), "stat")

    async def readlink(self, gfid: bytes, size: int = 4096, cred: Credential | None = None) -> Result:
        return await self._read_one(gfid, lambda i: self.children[i].readlink(gfid, size, cred=cred), "readlink")

    async def access(self, gfid: bytes, mask: int, cred: Credential | None = None) -> Result:
        return await self._read_one(gfid, lambda i: self.children[i].access(gfid, mask, cred=cred), "access")

    async def getxattr(self, gfid: bytes, name: str = "", xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self._read_one(gfid, lambda i: self.children[i].getxattr(gfid, name, xdata, cred=cred),
                                    "getxattr")

    async def statfs(self, gfid: bytes = ROOT_GFID, xdata: Dict | None = None) -> Result:
        up = self.up()
        res = await each(lambda i: self.children[i].statfs(gfid, xdata), up)
        ok = [r for r in res if isinstance(r, Result) and r.statfs is not None]
        if not ok:
            raise _pick_error(res)
        return min(ok, key=lambda r: r.statfs.bavail * r.statfs.frsize if r.statfs else 0)

    # ------------------------------------------------------------ locks

    async def _lock(self, idx: list[int], lock: LockFn, unlock: UnlockFn, nb: int, blocking: int) -> list[int]:
        """Non-blocking on all; on contention unlock and take them one by one, blocking, in order."""
        res = await each(lambda i: lock(i, nb), idx)
        got = [i for i, r in zip(idx, res) if isinstance(r, Result)]
        if not got and res:
            err = _pick_error(res)
            if err.errno not in (errno.ENOTCONN, errno.EAGAIN):
                raise err  # e.g. ENOENT/ESTALE for an inode gone everywhere: not a quorum problem
        if any(_errno(r) == errno.EAGAIN for r in res):
            await each(unlock, got)
            got = []
            for i in idx:
                try:
                    await lock(i, blocking)
                    got.append(i)
                except OSError as e:
                    if e.errno not in (errno.ENOTCONN, errno.EBADFD):
                        await each(unlock, got)
                        raise
        return got

    def _inodelk_fns(self, gfid: bytes, fd: _AfrFd | None, start: int, length: int,
                     owner: bytes) -> tuple[LockFn, UnlockFn]:
        """Lock/unlock calls of one transaction; the brick matches them by the (non-null) lock owner."""
        dom = self.name
        cred = now_cred(lk_owner=owner)

        def fl(t: int) -> Flock:
            return Flock(type=t, start=start, len=length, owner=owner)

        async def lock(i: int, cmd: int) -> Result:
            c = self.children[i]
            h = fd.handles[i] if fd is not None else None
            if h is not None:
                return await c.finodelk(h, dom, cmd, fl(F.WRLCK), cred=cred)
            return await c.inodelk(gfid, dom, cmd, fl(F.WRLCK), cred=cred)

        async def unlock(i: int) -> Result | None:
            c = self.children[i]
            h = fd.handles[i] if fd is not None else None
            try:
                if h is not None:
                    return await c.finodelk(h, dom, F.SETLK, fl(F.UNLCK), cred=cred)
                return await c.inodelk(gfid, dom, F.SETLK, fl(F.UNLCK), cred=cred)
            except OSError as e:
                log.debug("%s: unlock on child %d failed: %s", self.name, i, e)
                return None

        return lock, unlock

    def _entrylk_fns(self, pargfid: bytes, name: str, owner: bytes) -> tuple[LockFn, UnlockFn]:
        dom = self.name
        cred = now_cred(lk_owner=owner)

        async def lock(i: int, cmd: int) -> Result:
            return await self.children[i].entrylk(pargfid, dom, name, cmd, F.ENTRYLK_WRLCK, cred=cred)

        async def unlock(i: int) -> Result | None:
            try:
                return await self.children[i].entrylk(pargfid, dom, name, F.ENTRYLK_UNLOCK, F.ENTRYLK_WRLCK,
                                                      cred=cred)
            except OSError as e:
                log.debug("%s: entry unlock on child %d failed: %s", self.name, i, e)
                return None

        return lock, unlock

    # ------------------------------------------------------------ transactions

    async def _changelog(self, idx: Sequence[int], gfid: bytes, fd: _AfrFd | None, d: Dict,
                         xdata: Dict | None = None) -> list[Result | OSError]:
        async def one(i: int) -> Result:
            c = self.children[i]
            h = fd.handles[i] if fd is not None else None
            if h is not None:
                return await c.fxattrop(h, F.XATTROP_ADD_ARRAY, d, xdata)
            return await c.xattrop(gfid, F.XATTROP_ADD_ARRAY, d, xdata)

        return await each(one, idx)

    async def _transaction(self, what: str, slot: int, gfid: bytes, fd: _AfrFd | None, locks: Locks,
                           op: Callable[[int], Awaitable[Result]], *, always_changelog: bool = True,
                           preop_xdata: Dict | None = None,
                           targets: list[tuple[bytes, Dict | None]] | None = None) -> Result:
        """lock → pre-op → op on every replica → post-op → unlock (in the background).

        ``targets`` are the inodes whose changelog records the operation (by default ``gfid``;
        a rename records both parents, each with its own name in the xdata that tells the
        brick's index which names granular entry heal must look at).
        """
        tgts = targets or [(gfid, preop_xdata)]
        up = self.up()
        if fd is not None:
            up = [i for i in up if fd.handles[i] is not None]
        self._check_quorum(up, what)
        locked_sets: list[tuple[UnlockFn, list[int]]] = []

        async def log_all(idx: Sequence[int], d: Dict, with_xdata: bool) -> list[Result | OSError]:
            """Changelog on every target; a replica counts as done only if all its targets took it."""
            per = [await self._changelog(idx, g, fd if g == gfid else None, d, x if with_xdata else None)
                   for g, x in tgts]
            return [next((r for r in rs if not isinstance(r, Result)), rs[0]) for rs in zip(*per)] if per else []

        try:
            idx = up
            for lock, unlock, nb, blocking in locks:
                got = await self._lock(idx, lock, unlock, nb, blocking)
                locked_sets.append((unlock, got))
                idx = [i for i in idx if i in got]
            self._check_quorum(idx, what)
            degraded = len(idx) < len(self.children)
            changelog_on = always_changelog or degraded
            preop_done: list[int] = []
            if changelog_on:
                res = await log_all(idx, {DIRTY: changelog(slot, 1)}, True)
                idx = preop_done = [i for i, r in zip(idx, res) if isinstance(r, Result)]
                if not idx and res and _pick_error(res).errno != errno.ENOTCONN:
                    raise _pick_error(res)  # e.g. the inode is gone everywhere: say so, not "quorum"
                self._check_quorum(idx, what)
            res = await each(op, idx)
            done = [i for i, r in zip(idx, res) if isinstance(r, Result)]
            if not done:
                # failed everywhere alike (EEXIST, EACCES, …): consistent, nobody to blame
                if preop_done:
                    await log_all(preop_done, {DIRTY: changelog(slot, -1)}, False)
                raise _pick_error(res)
            failed = [i for i in range(len(self.children)) if i not in done]
            if changelog_on or failed:
                post: Dict = {DIRTY: changelog(slot, -1 if changelog_on else 0)}
                for j in failed:
                    post[self.pending_keys[j]] = changelog(slot, 1)
                await log_all(done, post, bool(failed))
                if failed:
                    log.warning("%s: %s missed on replica(s) %s; marked for self-heal", self.name, what,
                                [self.children[j].name for j in failed])
                    for g, _ in tgts:
                        self._readable[g] = [i for i in self._readable.get(g, done) if i in done] or done
            if len(done) < self.quorum:
                raise _quorum_error(self.name, what, len(done), self.quorum, res)
            return _first_ok(res)
        finally:
            await self._unlock_later(locked_sets)

    async def _unlock_later(self, locked_sets: list[tuple[UnlockFn, list[int]]]) -> None:
        """Unlock without making the caller wait a round trip (as AFR unwinds before unlocking).

        A later transaction on the same entry that meets our lock still waits for it: it
        falls back to a blocking lock, so ordering is kept.
        """
        async def unlock_all() -> None:
            for unlock, got in reversed(locked_sets):
                with trio.CancelScope(shield=True):
                    await each(unlock, got)

        if not any(got for _, got in locked_sets):
            return
        if self._bg is not None:
            self._bg.start_soon(unlock_all)
        else:
            await unlock_all()

    def _data_locks(self, gfid: bytes, fd: _AfrFd | None) -> Locks:
        lock, unlock = self._inodelk_fns(gfid, fd, 0, 0, os.urandom(8))
        return [(lock, unlock, F.SETLK, F.SETLKW)]

    def _meta_locks(self, gfid: bytes) -> Locks:
        lock, unlock = self._inodelk_fns(gfid, None, LLONG_MAX - 1, 0, os.urandom(8))
        return [(lock, unlock, F.SETLK, F.SETLKW)]

    def _entry_locks(self, *entries: tuple[bytes, str]) -> Locks:
        out: Locks = []
        owner = os.urandom(8)
        for pargfid, name in sorted(set(entries)):
            lock, unlock = self._entrylk_fns(pargfid, name, owner)
            out.append((lock, unlock, F.ENTRYLK_LOCK_NB, F.ENTRYLK_LOCK))
        return out

    async def _entry_op(self, what: str, pargfid: bytes, name: str, op: Callable[[int], Awaitable[Result]],
                        extra_locks: Locks | None = None) -> Result:
        locks = self._entry_locks((pargfid, name)) + (extra_locks or [])
        return await self._transaction(what, ENTRY, pargfid, None, locks, op, always_changelog=False,
                                       preop_xdata={ENTRY_INDEX_KEY: name})

    # ------------------------------------------------------------ entry fops

    def _cred(self, proc: Proc, cred: Credential | None, valid: int = 0) -> Credential:
        """One credential for every replica: same ctime everywhere, or the replicas drift apart."""
        return cred if cred is not None else now_cred(proc, valid=valid)

    async def mknod(self, pargfid: bytes, name: str, mode: int, rdev: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        c = self._cred(Proc.MKNOD, cred)
        return await self._entry_op("mknod", pargfid, name, lambda i: self.children[i].mknod(
            pargfid, name, mode, rdev, gfid, umask, xdata, cred=c))

    async def mkdir(self, pargfid: bytes, name: str, mode: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        c = self._cred(Proc.MKDIR, cred)
        return await self._entry_op("mkdir", pargfid, name, lambda i: self.children[i].mkdir(
            pargfid, name, mode, gfid, umask, xdata, cred=c))

    async def symlink(self, pargfid: bytes, name: str, target: str, gfid: bytes, umask: int = 0,
                      xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        c = self._cred(Proc.SYMLINK, cred)
        return await self._entry_op("symlink", pargfid, name, lambda i: self.children[i].symlink(
            pargfid, name, target, gfid, umask, xdata, cred=c))

    async def link(self, gfid: bytes, newpar: bytes, newname: str, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        c = self._cred(Proc.LINK, cred)
        return await self._entry_op("link", newpar, newname, lambda i: self.children[i].link(
            gfid, newpar, newname, xdata, cred=c))

    async def unlink(self, pargfid: bytes, name: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        c = self._cred(Proc.UNLINK, cred)
        return await self._entry_op("unlink", pargfid, name, lambda i: self.children[i].unlink(
            pargfid, name, xdata, cred=c))

    async def rmdir(self, pargfid: bytes, name: str, flags: int = 0, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        c = self._cred(Proc.RMDIR, cred)
        return await self._entry_op("rmdir", pargfid, name, lambda i: self.children[i].rmdir(
            pargfid, name, flags, xdata, cred=c))

    async def rename(self, oldpar: bytes, oldname: str, newpar: bytes, newname: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        c = self._cred(Proc.RENAME, cred)
        locks = self._entry_locks((oldpar, oldname), (newpar, newname))
        return await self._transaction("rename", ENTRY, oldpar, None, locks, lambda i: self.children[i].rename(
            oldpar, oldname, newpar, newname, xdata, cred=c), always_changelog=False,
            targets=[(oldpar, {ENTRY_INDEX_KEY: oldname}), (newpar, {ENTRY_INDEX_KEY: newname})])

    async def create(self, pargfid: bytes, name: str, flags: int, mode: int, gfid: bytes, umask: int = 0,
                     xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        c = self._cred(Proc.CREATE, cred)
        handles: list[int | None] = [None] * len(self.children)

        async def op(i: int) -> Result:
            r = await self.children[i].create(pargfid, name, flags, mode, gfid, umask, xdata, cred=c)
            handles[i] = r.fd
            return r

        try:
            r = await self._entry_op("create", pargfid, name, op)
        except BaseException:
            await self._release_handles(handles)
            raise
        self._fds.adopt(r, _AfrFd(gfid, flags, False, handles))
        self._readable[gfid] = [i for i, h in enumerate(handles) if h is not None]
        return r

    # ------------------------------------------------------------ metadata fops

    async def _meta(self, what: str, gfid: bytes, op: Callable[[int], Awaitable[Result]]) -> Result:
        await self._release_eager(gfid)
        return await self._transaction(what, METADATA, gfid, None, self._meta_locks(gfid), op)

    async def setattr(self, gfid: bytes, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        c = self._cred(Proc.SETATTR, cred, valid)
        return await self._meta("setattr", gfid, lambda i: self.children[i].setattr(gfid, stbuf, valid, xdata,
                                                                                    cred=c))

    async def setxattr(self, gfid: bytes, d: Dict, flags: int = 0, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        c = self._cred(Proc.SETXATTR, cred)
        return await self._meta("setxattr", gfid, lambda i: self.children[i].setxattr(gfid, d, flags, xdata,
                                                                                      cred=c))

    async def removexattr(self, gfid: bytes, name: str, xdata: Dict | None = None,
                          cred: Credential | None = None) -> Result:
        c = self._cred(Proc.REMOVEXATTR, cred)
        return await self._meta("removexattr", gfid, lambda i: self.children[i].removexattr(gfid, name, xdata,
                                                                                            cred=c))

    async def truncate(self, gfid: bytes, size: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        c = self._cred(Proc.TRUNCATE, cred)
        await self._release_eager(gfid)
        return await self._transaction("truncate", DATA, gfid, None, self._data_locks(gfid, None),
                                       lambda i: self.children[i].truncate(gfid, size, xdata, cred=c))

    # ------------------------------------------------------------ eager locking

    def _on_callback(self, proc: int, msg: object) -> None:
        if proc == F.Cbk.INODELK_CONTENTION and isinstance(msg, F.InodelkContention) and msg.domain == self.name:
            el = self._eager.get(msg.gfid)
            if el is not None:
                log.debug("%s: another client waits for %s: releasing our eager lock", self.name, msg.gfid.hex())
                el.closing = True
                self._eager_kick.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Owner of delayed post-ops: releases eager locks that went idle or are wanted elsewhere."""
        try:
            async with trio.open_nursery() as bg:
                self._bg = bg
                task_status.started()
                while True:
                    with trio.move_on_after(EAGER_DELAY / 4):
                        await self._eager_kick.wait()
                    self._eager_kick = trio.Event()
                    now = trio.current_time()
                    for gfid, el in list(self._eager.items()):
                        if el.ready.is_set() and el.inflight == 0 and (el.closing
                                                                       or now - el.last_use >= EAGER_DELAY):
                            await self._release_eager(gfid)
        finally:
            self._bg = None
            with trio.CancelScope(shield=True):
                for gfid in list(self._eager):
                    await self._release_eager(gfid)

    def _child_event(self, i: int, ev: BrickEvent) -> None:
        if ev.up and self._bg is not None and any(fd.locks for fd in self._fds.values()):
            self._bg.start_soon(self._heal_locks, i)

    async def _heal_locks(self, i: int) -> None:
        """A replica came back without our POSIX locks (a restarted brick forgets them): grant them again."""
        done = failed = 0
        for fd in list(self._fds.values()):
            h = fd.handles[i] if fd.locks else None
            if h is None or fd.locks is None:
                continue
            for owner, seg in fd.locks.items():
                try:
                    await self.children[i].lk(h, F.SETLK, Flock(seg.type, 0, seg.start, seg.len, seg.pid, owner),
                                              cred=now_cred(lk_owner=owner))
                    done += 1
                except OSError as e:
                    failed += 1
                    log.warning("%s: could not grant a lock of %s again on %s: %s", self.name, fd.gfid.hex(),
                                self.children[i].name, e)
        if done or failed:
            log.info("%s: re-granted %d POSIX lock(s) on %s after it came back (%d failed)", self.name, done,
                     self.children[i].name, failed)

    async def release_all(self) -> None:
        for gfid in list(self._eager):
            await self._release_eager(gfid)

    async def _release_eager(self, gfid: bytes) -> None:
        """Post-op and unlock a held eager lock, after the writes in flight on it finish."""
        el = self._eager.get(gfid)
        if el is None:
            return
        el.closing = True
        await el.ready.wait()
        while el.inflight:
            await el.drained.wait()
        if self._eager.get(gfid) is not el:
            return
        del self._eager[gfid]
        if el.error is not None or el.unlock is None:
            return
        with trio.CancelScope(shield=True):
            done = [i for i in el.locked if i not in el.failed and self.children[i].is_up]
            post: Dict = {DIRTY: changelog(DATA, -1)}
            for j in range(len(self.children)):
                if j not in done:
                    post[self.pending_keys[j]] = changelog(DATA, 1)
            if len(done) < len(self.children):
                log.warning("%s: writes to %s missed replica(s) %s; marked for self-heal", self.name,
                            gfid.hex(), [self.children[j].name for j in range(len(self.children)) if j not in done])
            await self._changelog(done, gfid, el.fd, post)
            await each(el.unlock, el.locked)

    async def _eager_write(self, fd: "_AfrFd", op: Callable[[int], Awaitable[Result]]) -> Result:
        gfid = fd.gfid
        el = self._eager.get(gfid)
        while el is not None and el.closing:
            await self._release_eager(gfid)
            el = self._eager.get(gfid)
        if el is None:
            el = _EagerLock(gfid, fd)
            self._eager[gfid] = el
            try:
                up = [i for i in self.up() if fd.handles[i] is not None]
                self._check_quorum(up, "write")
                lock, unlock = self._data_locks(gfid, fd)[0][:2]
                got = await self._lock(up, lock, unlock, F.SETLK, F.SETLKW)
                el.unlock = unlock
                el.locked = got
                el.generations = {i: self.children[i].generation for i in got}
                self._check_quorum(got, "write")
                res = await self._changelog(got, gfid, fd, {DIRTY: changelog(DATA, 1)})
                el.failed |= {i for i, r in zip(got, res) if not isinstance(r, Result)}
                self._check_quorum([i for i in got if i not in el.failed], "write")
            except BaseException as e:
                el.error = e
                del self._eager[gfid]
                el.ready.set()
                if el.unlock is not None:
                    with trio.CancelScope(shield=True):
                        await each(el.unlock, el.locked)
                raise
            el.ready.set()
        else:
            await el.ready.wait()
            if el.error is not None:
                return await self._eager_write(fd, op)
        el.inflight += 1
        el.drained = trio.Event() if el.drained.is_set() else el.drained
        try:
            for i in el.locked:
                c = self.children[i]
                if i not in el.failed and (not c.is_up or c.generation != el.generations.get(i, 0)):
                    el.failed.add(i)  # down now, or back without our lock: it must not get this write
            idx = [i for i in el.locked if i not in el.failed and fd.handles[i] is not None]
            # quorum is judged before anything is written, as AFR does: a refused write reaches no brick
            self._check_quorum(idx, "write")
            res = await each(op, idx)
            done = [i for i, r in zip(idx, res) if isinstance(r, Result)]
            lost = [i for i in idx if i not in done]
            if lost:
                el.failed |= set(lost)
                self._readable[gfid] = [i for i in self._readable.get(gfid, done) if i in done] or done
            if not done:
                raise _pick_error(res)
            if len(done) < self.quorum:
                raise _quorum_error(self.name, "write", len(done), self.quorum, res)
            return _first_ok(res)
        finally:
            el.inflight -= 1
            el.last_use = trio.current_time()
            if el.inflight == 0:
                el.drained.set()
                if el.closing:
                    self._eager_kick.set()

    # ------------------------------------------------------------ fds

    def _fd(self, handle: int) -> _AfrFd:
        return self._fds.get(handle)

    async def _release_handles(self, handles: list[int | None]) -> None:
        async def one(ih: tuple[int, int]) -> None:
            await self.children[ih[0]].release(ih[1])
        await each(one, [(i, h) for i, h in enumerate(handles) if h is not None])

    async def _open_all(self, gfid: bytes, opener: Callable[[int], Awaitable[Result]], flags: int,
                        is_dir: bool) -> Result:
        up = self.up()
        if not up:
            raise OSError(errno.ENOTCONN, f"{self.name}: no replica is up")
        res = await each(opener, up)
        handles: list[int | None] = [None] * len(self.children)
        first: Result | None = None
        for i, r in zip(up, res):
            if isinstance(r, Result):
                handles[i] = r.fd
                first = first or r
        if first is None:
            raise _pick_error(res)
        return self._fds.adopt(first, _AfrFd(gfid, flags, is_dir, handles))

    async def open(self, gfid: bytes, flags: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self._open_all(gfid, lambda i: self.children[i].open(gfid, flags, xdata, cred=cred), flags,
                                    False)

    async def opendir(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self._open_all(gfid, lambda i: self.children[i].opendir(gfid, xdata, cred=cred), 0, True)

    async def release(self, fd: int) -> None:
        afd = self._fds.get(fd)
        el = self._eager.get(afd.gfid)
        if el is not None and el.fd is afd:
            await self._release_eager(afd.gfid)  # the lock lives on this fd's brick fds
        self._fds.pop(fd)
        await self._release_handles(afd.handles)

    releasedir = release

    async def _fd_read(self, handle: int, call: Callable[[int, int], Awaitable[Result]], what: str) -> Result:
        fd = self._fd(handle)

        async def one(i: int) -> Result:
            h = fd.handles[i]
            if h is None:
                raise OSError(errno.EBADFD, f"{self.name}: fd not open on child {i}")
            return await call(i, h)

        if fd.is_dir:
            # a directory stream must stay on one replica: offsets are per brick
            if fd.read_child is None or not self.children[fd.read_child].is_up:
                cands = [i for i in self._readable_children(fd.gfid) if fd.handles[i] is not None] or \
                        [i for i in self.up() if fd.handles[i] is not None]
                if not cands:
                    raise OSError(errno.ENOTCONN, f"{self.name}: {what}: no replica is up")
                fd.read_child = cands[0]
            return await one(fd.read_child)
        return await self._read_one(fd.gfid, one, what)

    async def read(self, handle: int, offset: int, size: int, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        return await self._fd_read(handle, lambda i, h: self.children[i].read(h, offset, size, xdata, cred=cred),
                                   "read")

    async def fstat(self, handle: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self._fd_read(handle, lambda i, h: self.children[i].fstat(h, xdata, cred=cred), "fstat")

    async def fgetxattr(self, handle: int, name: str = "", xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        return await self._fd_read(handle, lambda i, h: self.children[i].fgetxattr(h, name, xdata, cred=cred),
                                   "fgetxattr")

    async def readdirp(self, handle: int, offset: int = 0, size: int = READDIR_SIZE, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self._readdir(handle, offset, size, xdata, cred, True)

    async def readdir(self, handle: int, offset: int = 0, size: int = READDIR_SIZE, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        return await self._readdir(handle, offset, size, xdata, cred, False)

    async def _readdir(self, handle: int, offset: int, size: int, xdata: Dict | None, cred: Credential | None,
                       plus: bool) -> Result:
        async def page(i: int, h: int) -> Result:
            c = self.children[i]
            if plus:
                return await c.readdirp(h, offset, size, xdata, cred=cred)
            return await c.readdir(h, offset, size, xdata, cred=cred)

        while True:
            r = await self._fd_read(handle, page, "readdirp" if plus else "readdir")
            if not any(e.name.startswith(ANON_INODE_PREFIX) for e in r.entries):
                return r
            # AFR's own holding directory for entries being healed is never shown to users
            last = r.entries[-1].off
            r.entries = [e for e in r.entries if not e.name.startswith(ANON_INODE_PREFIX)]
            if r.entries:
                r.entries[-1].off = last
                return r
            offset = last

    async def _fd_all(self, handle: int, call: Callable[[int, int], Awaitable[Result]]) -> Result:
        fd = self._fd(handle)
        idx = [i for i in self.up() if fd.handles[i] is not None]
        if not idx:
            raise OSError(errno.ENOTCONN, f"{self.name}: no replica is up")
        res = await each(lambda i: call(i, _h(fd, i)), idx)
        return _first_ok(res)

    async def flush(self, handle: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        fd = self._fd(handle)
        await self._release_eager(fd.gfid)
        if cred is not None and fd.locks:
            # bricks drop the POSIX locks of the flushing lock owner on this file (close() semantics)
            for other in self._fds.values():
                if other.gfid == fd.gfid and other.locks:
                    other.locks.drop_owner(cred.lk_owner)
        return await self._fd_all(handle, lambda i, h: self.children[i].flush(h, xdata, cred=cred))

    async def fsync(self, handle: int, datasync: bool = False, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        await self._release_eager(self._fd(handle).gfid)
        return await self._fd_all(handle, lambda i, h: self.children[i].fsync(h, datasync, xdata, cred=cred))

    async def write(self, handle: int, offset: int, data: bytes, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        fd = self._fd(handle)
        c = self._cred(Proc.WRITE, cred)
        return await self._eager_write(fd, lambda i: self.children[i].write(_h(fd, i), offset, data, xdata, cred=c))

    async def _data_op(self, what: str, proc: Proc, handle: int, cred: Credential | None,
                       call: Callable[[Brick, int, Credential], Awaitable[Result]]) -> Result:
        """A data transaction on an open file, after the eager lock on it (if any) is given back."""
        fd = self._fd(handle)
        c = self._cred(proc, cred)
        await self._release_eager(fd.gfid)
        return await self._transaction(what, DATA, fd.gfid, fd, self._data_locks(fd.gfid, fd),
                                       lambda i: call(self.children[i], _h(fd, i), c))

    async def ftruncate(self, handle: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        return await self._data_op("ftruncate", Proc.FTRUNCATE, handle, cred,
                                   lambda ch, h, c: ch.ftruncate(h, size, xdata, cred=c))

    async def fallocate(self, handle: int, mode: int, offset: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        return await self._data_op("fallocate", Proc.FALLOCATE, handle, cred,
                                   lambda ch, h, c: ch.fallocate(h, mode, offset, size, xdata, cred=c))

    async def discard(self, handle: int, offset: int, size: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        return await self._data_op("discard", Proc.DISCARD, handle, cred,
                                   lambda ch, h, c: ch.discard(h, offset, size, xdata, cred=c))

    async def zerofill(self, handle: int, offset: int, size: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self._data_op("zerofill", Proc.ZEROFILL, handle, cred,
                                   lambda ch, h, c: ch.zerofill(h, offset, size, xdata, cred=c))

    async def fsetattr(self, handle: int, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        fd = self._fd(handle)
        return await self.setattr(fd.gfid, stbuf, valid, xdata, cred)

    async def fsetxattr(self, handle: int, d: Dict, flags: int = 0, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        return await self.setxattr(self._fd(handle).gfid, d, flags, xdata, cred)

    async def fremovexattr(self, handle: int, name: str, xdata: Dict | None = None,
                           cred: Credential | None = None) -> Result:
        return await self.removexattr(self._fd(handle).gfid, name, xdata, cred)

    async def lk(self, handle: int, cmd: int, flock: Flock, xdata: Dict | None = None,
                 cred: Credential | None = None) -> Result:
        """POSIX locks go to every replica; a partial grant is undone so nobody holds half a lock."""
        fd = self._fd(handle)
        idx = [i for i in self.up() if fd.handles[i] is not None]
        if cmd == F.GETLK:
            return await self._fd_read(handle, lambda i, h: self.children[i].lk(h, cmd, flock, xdata, cred=cred),
                                       "getlk")
        self._check_quorum(idx, "lock")

        async def one(i: int) -> Result:
            return await self.children[i].lk(_h(fd, i), cmd, flock, xdata, cred=cred)
        gone = (errno.ENOTCONN, errno.EBADFD)  # a brick that is down or lost the fd: quorum decides

        def refused(r: Result | OSError) -> bool:
            return not isinstance(r, Result) and r.errno not in gone
        if cmd == F.SETLKW and flock.type != F.UNLCK:
            # Waiting locks go replica after replica in one order, as AFR does: two clients each
            # granted a different replica first would wait for each other forever.
            res: list[Result | OSError] = []
            for i in idx:
                res += await each(one, [i])
                if refused(res[-1]):
                    break
        else:
            res = await each(one, idx)
        ok = [i for i, r in zip(idx, res) if isinstance(r, Result)]
        no = [r for r in res if refused(r)]
        # As AFR: a lock any replica refuses (EAGAIN: someone holds it there) is refused, even with a
        # majority granted — else two clients could each hold it on a different majority after restarts.
        if flock.type != F.UNLCK and (no or len(ok) < max(self.quorum, 1)):
            undo = Flock(F.UNLCK, flock.whence, flock.start, flock.len, flock.pid, flock.owner)
            await each(lambda i: self.children[i].lk(_h(fd, i), F.SETLK, undo, cred=cred), ok)
            raise _pick_error(no) if no else _pick_error(res)
        if not ok:
            raise _pick_error(res)
        if fd.locks is None:
            fd.locks = HeldLocks()
        fd.locks.apply(cred.lk_owner if cred is not None else flock.owner, flock.type, flock.start, flock.len,
                       flock.pid)
        return _first_ok(res)

    # ------------------------------------------------------------ internal locks and xattrops of upper layers
    # (DHT's layout-heal lock, a test's changelog): straight to every replica that is up, any failure fails

    async def _everywhere(self, call: Callable[[Brick], Awaitable[Result]]) -> Result:
        up = self.up()
        if not up:
            raise OSError(errno.ENOTCONN, f"{self.name}: no replica is up")
        res = await each(lambda i: call(self.children[i]), up)
        if any(isinstance(r, OSError) for r in res):
            raise _pick_error(res)
        return _first_ok(res)

    async def _fd_everywhere(self, handle: int, call: Callable[[Brick, int], Awaitable[Result]]) -> Result:
        fd = self._fd(handle)
        idx = [i for i in self.up() if fd.handles[i] is not None]
        if not idx:
            raise OSError(errno.ENOTCONN, f"{self.name}: no replica is up")
        res = await each(lambda i: call(self.children[i], _h(fd, i)), idx)
        if any(isinstance(r, OSError) for r in res):
            raise _pick_error(res)
        return _first_ok(res)

    async def inodelk(self, gfid: bytes, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        return await self._everywhere(lambda c: c.inodelk(gfid, domain, cmd, flock, xdata, cred=cred))

    async def entrylk(self, gfid: bytes, domain: str, name: str | None, cmd: int, type_: int = F.ENTRYLK_WRLCK,
                      xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self._everywhere(lambda c: c.entrylk(gfid, domain, name, cmd, type_, xdata, cred=cred))

    async def xattrop(self, gfid: bytes, op: int, d: Dict, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        return await self._everywhere(lambda c: c.xattrop(gfid, op, d, xdata, cred=cred))

    async def finodelk(self, handle: int, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self._fd_everywhere(handle, lambda c, h: c.finodelk(h, domain, cmd, flock, xdata, cred=cred))

    async def fentrylk(self, handle: int, domain: str, name: str | None, cmd: int, type_: int = F.ENTRYLK_WRLCK,
                       xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self._fd_everywhere(handle, lambda c, h: c.fentrylk(h, domain, name, cmd, type_, xdata,
                                                                         cred=cred))

    async def fxattrop(self, handle: int, op: int, d: Dict, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self._fd_everywhere(handle, lambda c, h: c.fxattrop(h, op, d, xdata, cred=cred))
