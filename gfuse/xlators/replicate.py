"""cluster/replicate: AFR-compatible replication on the client.

Every modification is a transaction that gluster's self-heal daemon understands: lock in the replicate
translator's domain, pre-op changelog (``trusted.afr.dirty`` +1; its replies tell what every replica
thinks of the others), the fop on every replica *concurrently* with one credential (same gfid, same
ctime), post-op that clears dirty and blames (``trusted.afr.<client>``) the replicas that missed it,
unlock. The rules, as AFR's (afr-transaction.c, afr-inode-write.c):

- the blame of a replica that missed a change is on the others' disks before the change is acknowledged;
- with fewer replicas done than the quorum nobody is blamed (the change stays dirty, for heal to judge),
  and a change that failed alike everywhere (EEXIST, ENOSPC …) blames nobody either;
- a replica whose write was shorter than the best reply missed the rest;
- writes to one inode share its data lock (eager locking, :class:`_Session`): they are owners of it,
  and its delayed post-op and unlock happen only when it is released (idle, fsync/flush/close, another
  client waiting, a failure, or a replica coming or going since it was taken) and no owner remains;
- an fd is opened on a replica that is up where it is not open before it is used there (fix-open);
- every child up/down bumps an event generation: what is known of an inode's replicas is re-learned
  before its next read, so a replica that missed writes is never read;
- with ``arbiter-count`` 1 the last replica holds no data: it is never read, and a data change is refused
  when it would be the only good copy (arbitration), or when no replica taking it has good data;
- POSIX locks lost on a quorum of replicas make the fd bad (EBADFD).

Reads go to one replica that no other replica blames.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import struct
from dataclasses import replace
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
from .api import READDIR_SIZE, ZEROFILL_KEEP_SIZE, Brick, BrickEvent, Fops, attrs
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
    """An open file or directory: one handle per replica (None where it is not open: fix-open opens it)."""

    __slots__ = ("gfid", "flags", "is_dir", "handles", "read_child", "locks", "lock_nodes", "bad", "closed")

    def __init__(self, gfid: bytes, flags: int, is_dir: bool, handles: list[int | None]) -> None:
        self.gfid = gfid
        self.flags = flags
        self.is_dir = is_dir
        self.handles = handles
        self.read_child: int | None = None
        #: POSIX locks granted through this fd, to grant again on a replica that restarted
        self.locks: HeldLocks | None = None
        #: the replicas that hold every lock in :attr:`locks` (None while it holds none)
        self.lock_nodes: set[int] | None = None
        #: its locks were lost on a quorum of replicas: every call but release fails with EBADFD (as AFR)
        self.bad = False
        self.closed = False


def _h(fd: _AfrFd, i: int) -> int:
    """``fd``'s handle on replica ``i`` (callers choose replicas where it is open)."""
    h = fd.handles[i]
    if h is None:
        raise OSError(errno.EBADFD, f"fd not open on child {i}")
    return h


class _Known:
    """What this client knows of one inode's replicas, learned from their changelogs at event generation
    ``gen``: per replica ``j``, the replicas that blame it (any slot that matters for reading it, and the
    data slot — a directory's entries are its data). A replica that does not answer keeps its old blame
    of others: a refresh without it cannot clear what only it knows."""

    __slots__ = ("gen", "answered", "blamers", "data_blamers")

    def __init__(self, gen: int, answered: Iterable[int], n: int) -> None:
        self.gen = gen
        self.answered = set(answered)
        self.blamers: list[set[int]] = [set() for _ in range(n)]
        self.data_blamers: list[set[int]] = [set() for _ in range(n)]

    def readable(self) -> list[int]:
        return sorted(i for i in self.answered if not self.blamers[i])


class _Outcome:
    """What one fop did on the replicas it was sent to: ``done`` (a full success), ``lost`` (failed or
    wrote less than the best reply: they miss this change), ``gone`` (not connected: lost with it), the
    reply to give (None: it failed on every replica) or the error."""

    __slots__ = ("done", "lost", "gone", "result", "error")

    def __init__(self, done: list[int], lost: set[int], gone: set[int], result: Result | None,
                 error: OSError | None) -> None:
        self.done, self.lost, self.gone, self.result, self.error = done, lost, gone, result, error


class _Session:
    """The data lock of one inode held across consecutive writes (AFR's eager lock with delayed post-op).

    Its writes are *owners*: they join while the session is open and not being released, and
    the post-op (clear dirty, blame what the writes missed) and unlock happen only once ``release``
    is set and no owner remains — a write can never run after the post-op that should cover it.
    Writers that come while it is being released wait for it to end and open a new one.
    A replica that misses a write is blamed on the others' disks before that write is acknowledged.
    """

    __slots__ = ("gfid", "fd", "event_gen", "owner", "unlock", "locked", "preop", "generations", "failed",
                 "blamed", "owners", "release", "leave_dirty", "finishing", "acquired", "drained", "finished",
                 "error", "last_use", "blame_lock", "sources")

    def __init__(self, gfid: bytes, fd: _AfrFd, event_gen: int) -> None:
        self.gfid = gfid
        self.fd = fd  # whose brick fds carry the lock and the changelog
        self.event_gen = event_gen
        self.owner = os.urandom(8)
        self.unlock: UnlockFn | None = None
        self.locked: list[int] = []
        #: locked replicas whose pre-op (dirty +1) succeeded: the writes go to those not failed
        self.preop: list[int] = []
        #: each locked brick's connection generation: a brick that reconnected has dropped our lock
        self.generations: dict[int, int] = {}
        #: replicas that miss something written in this session (never locked ones too)
        self.failed: set[int] = set()
        #: failed replicas whose blame is on the disks of the others already
        self.blamed: set[int] = set()
        #: replicas with good data when it was taken (none blamed them), less those that missed a write since
        self.sources: set[int] = set()
        self.owners = 0
        self.release = False
        #: a write failed for lack of quorum: the post-op must leave dirty and blame nobody (afr_handle_quorum)
        self.leave_dirty = False
        self.finishing = False
        self.acquired = trio.Event()
        self.drained = trio.Event()
        self.finished = trio.Event()
        self.error: OSError | None = None
        self.last_use = trio.current_time()
        self.blame_lock = trio.Lock()


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
GONE = (errno.ENOTCONN, errno.EBADFD)


class Replicate(Fops):
    """The fop interface over N replicas (children implement the same interface).

    ``arbiter`` is the volfile's ``arbiter-count`` (0 or 1): the last child of each replica set then
    holds names, attributes and changelogs but no data — it is never read, and writes go on only
    while a replica that holds good data takes them too (AFR's arbitration).
    """

    def __init__(self, name: str, children: Sequence[Brick], pending: Sequence[str] | None = None,
                 quorum: str | int = "auto", arbiter: int = 0) -> None:
        self.name = name
        self.children = list(children)
        n = len(self.children)
        names = list(pending) if pending else [c.name for c in self.children]
        if len(names) != n:
            raise ValueError(f"{name}: afr-pending-xattr names {len(names)} entries for {n} children")
        if arbiter not in (0, 1) or (arbiter and n != 3):
            raise ValueError(f"{name}: arbiter-count {arbiter} with {n} children (only replica 3 arbiter 1)")
        self.pending_keys = [f"trusted.afr.{x}" for x in names]
        #: index of the arbiter child, if any (gluster makes the last brick of each set the arbiter)
        self.arbiter: int | None = n - 1 if arbiter else None
        if quorum == "auto":
            self.quorum = n // 2 + 1 if n % 2 else n // 2  # even counts: half, with the first child up
            self._first_breaks_tie = n % 2 == 0
        elif quorum in ("none", 0, "0"):
            self.quorum, self._first_breaks_tie = 1, False
        else:
            self.quorum, self._first_breaks_tie = int(quorum), False
        self._fds: Handles[_AfrFd] = Handles(name)
        self._rr = itertools.count()
        #: AFR's event generation: bumped on every child up/down; knowledge older than it is re-learned
        self._event_gen = 0
        #: gfid → what its replicas' changelogs say (who may be read)
        self._known: BoundedDict[bytes, _Known] = BoundedDict()
        #: gfid → the held data lock (eager locking) of the inode
        self._sessions: dict[bytes, _Session] = {}
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

    def _has_quorum(self, idx: Iterable[int]) -> bool:
        s = set(idx)
        return len(s) >= self.quorum and (not self._first_breaks_tie or len(s) > len(self.children) // 2
                                          or 0 in s)

    def _check_quorum(self, idx: Sequence[int], what: str) -> None:
        if not self._has_quorum(idx):
            raise OSError(errno.ENOTCONN, f"{self.name}: {what} refused, client quorum not met "
                                          f"({len(idx)} of {len(self.children)} replicas up, need {self.quorum})")

    def _kick(self) -> None:
        self._eager_kick.set()

    # ------------------------------------------------------------ who may be read

    def _readable_children(self, gfid: bytes) -> list[int]:
        """Replicas of ``gfid`` that are up, hold data and are blamed by nobody we know of."""
        up = self.up()
        k = self._known.get(gfid)
        cands = k.readable() if k is not None else up
        return [i for i in cands if i in up and i != self.arbiter]

    def _learn_changelogs(self, gfid: bytes, replies: dict[int, Dict | None], is_dir: bool, gen: int) -> _Known:
        """Blame as the replicas in ``replies`` state it now (their changelog xattrs); replicas that did not
        answer keep the blame we knew of them."""
        n = len(self.children)
        k = _Known(gen, replies, n)
        for i, x in replies.items():
            for j, key in enumerate(self.pending_keys):
                if j == i:
                    continue
                d, m, e = parse_changelog((x or {}).get(key))
                main = e if is_dir else d
                if main or m:
                    k.blamers[j].add(i)
                if main:
                    k.data_blamers[j].add(i)
        old = self._known.get(gfid)
        if old is not None:
            kept = _Known(gen, replies, n)
            for j in range(n):
                kept.blamers[j] = k.blamers[j] | {i for i in old.blamers[j] if i not in replies}
                kept.data_blamers[j] = k.data_blamers[j] | {i for i in old.data_blamers[j] if i not in replies}
            # what a replica that is down now said can only choose among the others, never rule them all out:
            # self-heal may have cleared it since (we cannot ask), and a false "no good copy" fails the call
            # with a quorum up — then the replicas that answered decide, as in AFR's refresh
            if any(i != self.arbiter for i in kept.readable()) or not any(i != self.arbiter for i in k.readable()):
                k = kept
        self._known[gfid] = k
        return k

    def _learn(self, gfid: bytes, results: Sequence[Result | OSError | None], gen: int) -> None:
        """Who may be read, from the changelogs the replicas returned on lookup."""
        ok = {i: r for i, r in enumerate(results) if isinstance(r, Result) and r.stat is not None}
        is_dir = any(attrs(r).is_dir for r in ok.values())  # a directory's "data" is its entries, as in AFR
        self._learn_changelogs(gfid, {i: r.xdata for i, r in ok.items()}, is_dir, gen)

    def _mark_stale(self, gfid: bytes, missed: Iterable[int], by: Iterable[int]) -> None:
        """In memory at once: ``missed`` lack a change that ``by`` have (the disks say so before we answer)."""
        k = self._known.get(gfid)
        if k is None:
            k = self._known[gfid] = _Known(self._event_gen, range(len(self.children)), len(self.children))
        blamers = set(by)
        for j in missed:
            k.blamers[j] |= blamers
            k.data_blamers[j] |= blamers

    def _lookup_xdata(self, xdata: Dict | None) -> Dict:
        out: Dict = dict(xdata or {})
        for k in (*self.pending_keys, DIRTY):
            out[k] = UInt(12)
        return out

    # ------------------------------------------------------------ reads

    async def _refresh(self, gfid: bytes) -> None:
        """Re-learn readability before a read if a child came or went since it was learned (AFR's inode
        refresh on an event-generation change): a restarted replica that missed writes is not read."""
        k = self._known.get(gfid)
        if (k is None or k.gen != self._event_gen) and self.up():
            try:
                await self.lookup_gfid(gfid)
            except OSError:
                pass

    async def _read_one(self, gfid: bytes, call: Callable[[int], Awaitable[Result]], what: str) -> Result:
        """Try readable replicas in turn (spread by round robin); split-brain → EIO."""
        await self._refresh(gfid)
        good = self._readable_children(gfid)
        if not good:
            data = [i for i in self.up() if i != self.arbiter]
            if gfid in self._known and data:
                raise OSError(errno.EIO, f"{self.name}: {what}: no readable replica (split-brain?)")
            good = data
        if not good:
            raise OSError(errno.ENOTCONN, f"{self.name}: {what}: no replica with data is up")
        k = next(self._rr) % len(good)
        order = good[k:] + good[:k]
        last: OSError | None = None
        for i in order:
            try:
                return await call(i)
            except OSError as e:
                if e.errno not in GONE:
                    raise
                last = e
        assert last is not None
        raise last

    async def lookup(self, pargfid: bytes, name: str, xdata: Dict | None = None, *, gfid: bytes = NULL_GFID,
                     cred: Credential | None = None) -> Result:
        up = self.up()
        if not up:
            raise OSError(errno.ENOTCONN, f"{self.name}: no replica is up")
        gen = self._event_gen
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
        self._learn(g, results, gen)
        good = [i for i in self._known[g].readable() if isinstance(results[i], Result)]
        if not good and len(ok) > 1 and not attrs(ok[0]).is_dir:
            log.warning("%s: %s is in split-brain", self.name, name or g.hex())
        # the attributes of a replica that holds the data (an arbiter's files are empty)
        order = [i for i in good if i != self.arbiter] + \
                [i for i, r in enumerate(results) if isinstance(r, Result) and i != self.arbiter] + \
                [i for i, r in enumerate(results) if isinstance(r, Result)]
        found = results[order[0]]
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
        k = self._known.get(pargfid)
        trusted = k.readable() if k is not None else []
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
        # never from the arbiter (AFR's afr_statfs skips it: it is often a small brick with no data)
        up = [i for i in self.up() if i != self.arbiter]
        if not up:
            raise OSError(errno.ENOTCONN, f"{self.name}: statfs: no data brick up")
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
            # by gfid: the locks translator matches the owner, not the fd — and the unlock may run in the
            # background after the fd it was taken through is closed
            try:
                return await self.children[i].inodelk(gfid, dom, F.SETLK, fl(F.UNLCK), cred=cred)
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

    # ------------------------------------------------------------ transactions: the parts

    async def _changelog(self, idx: Sequence[int], gfid: bytes, fd: _AfrFd | None, d: Dict,
                         xdata: Dict | None = None) -> list[Result | OSError]:
        async def one(i: int) -> Result:
            c = self.children[i]
            h = fd.handles[i] if fd is not None else None
            if h is not None:
                return await c.fxattrop(h, F.XATTROP_ADD_ARRAY, d, xdata)
            return await c.xattrop(gfid, F.XATTROP_ADD_ARRAY, d, xdata)

        return await each(one, idx)

    def _preop_dict(self, slot: int, blame: Iterable[int], delta: int = 1) -> Dict:
        """dirty +delta, +delta for each replica in ``blame``, and 0 for the other replicas' keys (adding 0
        returns their value: the pre-op tells what every replica thinks of the others now, as AFR's does)."""
        blamed = set(blame)
        d: Dict = {DIRTY: changelog(slot, delta)}
        for j, key in enumerate(self.pending_keys):
            d[key] = changelog(slot, delta) if j in blamed else ZERO
        return d

    async def _preop(self, what: str, slot: int, gfid: bytes, fd: _AfrFd | None, idx: list[int],
                     blame: Iterable[int] = (), xdata: Dict | None = None) -> tuple[list[int], set[int]]:
        """Pre-op on the locked replicas ``idx`` (``blame``: replicas that will miss the change, blamed now):
        the replicas where it succeeded, and those of them that hold good data (the sources: for data, from
        the replies; else all). For data, AFR's arbitration on the replies: refused (ENOTCONN) if the
        arbiter is the only good copy, EIO if no replica taking the change holds good data."""
        blame = list(blame)
        res = await self._changelog(idx, gfid, fd, self._preop_dict(slot, blame), xdata)
        ok = [i for i, r in zip(idx, res) if isinstance(r, Result)]
        if not ok and res and _pick_error(res).errno != errno.ENOTCONN:
            raise _pick_error(res)  # e.g. the inode is gone everywhere: say so, not "quorum"
        sources = set(ok)
        try:
            self._check_quorum(ok, what)
            if slot == DATA:
                replies = {i: r.dict for i, r in zip(idx, res) if isinstance(r, Result)}
                k = self._learn_changelogs(gfid, replies, False, self._event_gen)
                sources = {i for i in ok if not k.data_blamers[i]}
                if self.arbiter is not None and len(sources) < 2 and self.arbiter in sources:
                    raise OSError(errno.ENOTCONN, f"{self.name}: {what} refused: the arbiter is the only "
                                                  f"replica with good data")
                if not any(i != self.arbiter for i in sources):
                    raise OSError(errno.EIO, f"{self.name}: {what} refused: no replica taking it holds good data "
                                             f"(split-brain?)")
        except OSError:
            with trio.CancelScope(shield=True):
                await self._changelog(ok, gfid, fd, self._preop_dict(slot, blame, -1))
            raise
        return ok, sources

    def _in_flight_split_brain(self, what: str, done: Iterable[int], sources: set[int], idx: Sequence[int],
                               res: Sequence[object]) -> OSError | None:
        """The change reached no replica that held good data before it (the good ones failed it): acknowledged,
        no replica would have all the data — AFR fails it (in-flight split-brain) and blames nobody. The
        error is the one the good replicas gave (``res``, replies of ``idx``): at a quota or a full disk the
        user must read EDQUOT/ENOSPC, as AFR's afr_final_errno gives, not EIO."""
        good = {i for i in sources if i != self.arbiter}
        if not good.intersection(done):
            log.warning("%s: %s reached only replicas that miss earlier changes; failed, left for heal", self.name,
                        what)
            theirs = [r for i, r in zip(idx, res) if i in good and isinstance(r, OSError)]
            if theirs:
                e = _pick_error(theirs)
                if e.errno and e.errno not in (errno.ENOTCONN, errno.EBADFD):
                    return OSError(e.errno, f"{self.name}: {what} failed on every replica holding good data: "
                                            f"{os.strerror(e.errno)}")
            return OSError(errno.EIO, f"{self.name}: {what} failed on every replica holding good data")
        return None

    def _judge(self, idx: Sequence[int], res: Sequence[Result | OSError], want: int | None = None,
               prefer: Iterable[int] = ()) -> _Outcome:
        """Sort the replies of one fop. ``want``: a write of that many bytes — a replica that wrote less
        than the best reply missed the rest (AFR blames short writes); the arbiter's count is not compared.
        When no quorum wrote the longest count (each brick cut the write at its quota), the longest count a
        quorum wrote is the answer and every other replica is blamed.
        The answer (its attributes: the size the kernel and md-cache keep) is a reply of a replica in
        ``prefer`` (those with good data) if one is done: a replica that missed earlier writes tells an
        older size even when it took this one."""
        ok = {i: r for i, r in zip(idx, res) if isinstance(r, Result)}
        errs = {i: r for i, r in zip(idx, res) if isinstance(r, OSError)}
        gone = {i for i, e in errs.items() if e.errno in GONE}
        if not ok:
            return _Outcome([], set(errs), gone, None, _pick_error(res))
        short: set[int] = set()
        if want is not None:
            rets = [r.ret for i, r in ok.items() if i != self.arbiter]
            best = max(rets) if rets else want
            # The longest count a quorum wrote exactly is the answer: at a quota or a full brick each brick may
            # cut the write at another length (a short write: the caller writes the rest, and gets EDQUOT or
            # ENOSPC then); replicas that wrote more or less than it hold another state and are blamed, as a
            # short one is. No such count: the longest (the write then fails for quorum).
            for c in sorted(set(rets), reverse=True):
                if self._has_quorum([i for i, r in ok.items() if i == self.arbiter or r.ret == c]):
                    best = c
                    break
            for i, r in ok.items():
                if i == self.arbiter:
                    r.ret = best  # the arbiter was sent one byte and stores none
                elif r.ret != best:
                    short.add(i)
        done = [i for i in idx if i in ok and i not in short]
        if short:
            log.warning("%s: short write on %s; marked for self-heal", self.name,
                        [self.children[i].name for i in sorted(short)])
        good = set(prefer)
        pick = [i for i in done if i in good and i != self.arbiter] or [i for i in done if i != self.arbiter] or done
        return _Outcome(done, set(errs) | short, gone, ok[pick[0]], None)

    def _drop_lost_handles(self, fd: _AfrFd | None, idx: Sequence[int], res: Sequence[object]) -> None:
        """A brick that answered EBADFD lost our fd (its reopen after a reconnect failed): open it again
        there before the next call (fix-open) instead of skipping that replica for good."""
        if fd is None:
            return
        for i, r in zip(idx, res):
            if isinstance(r, OSError) and r.errno == errno.EBADFD and self.children[i].is_up:
                h, fd.handles[i] = fd.handles[i], None
                if h is not None:
                    self._spawn(self.children[i].release, h)

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        async def quiet() -> None:
            with trio.CancelScope(shield=True):
                try:
                    await fn(*args)
                except OSError as e:
                    log.debug("%s: background call failed: %s", self.name, e)
        if self._bg is not None:
            self._bg.start_soon(quiet)

    async def _fix_open(self, fd: _AfrFd) -> None:
        """Open ``fd`` on replicas that are up where it is not open (it was opened while they were down, or
        lost there): AFR's fix-open. Else writes would skip them without blaming them."""
        missing = [i for i in self.up() if fd.handles[i] is None]
        if not missing or fd.closed:
            return
        flags = fd.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)

        async def one(i: int) -> Result:
            c = self.children[i]
            r = await (c.opendir(fd.gfid) if fd.is_dir else c.open(fd.gfid, flags))
            if r.fd is not None:
                if fd.handles[i] is None and not fd.closed:
                    fd.handles[i] = r.fd
                else:
                    await c.release(r.fd)
            return r

        res = await each(one, missing)
        opened = [self.children[i].name for i, r in zip(missing, res) if isinstance(r, Result)]
        if opened:
            log.info("%s: fd of %s opened on %s, which was down when it was opened", self.name, fd.gfid.hex(),
                     opened)

    # ------------------------------------------------------------ transactions: one-shot

    async def _transaction(self, what: str, slot: int, gfid: bytes, fd: _AfrFd | None, locks: Locks,
                           op: Callable[[int], Awaitable[Result]], *, always_changelog: bool = True,
                           preop_xdata: Dict | None = None,
                           targets: list[tuple[bytes, Dict | None]] | None = None,
                           before_op: Callable[[list[int]], Awaitable[Result | None]] | None = None) -> Result:
        """lock → pre-op → op on every replica → post-op → unlock (in the background).

        The post-op (which blames the replicas that missed the change) is on disk before the caller gets
        its answer. With too few replicas done for quorum, nobody is blamed: the change is left dirty
        (afr_handle_quorum), so a minority never accuses a majority. ``targets`` are the inodes whose
        changelog records the operation (by default ``gfid``; a rename records both parents, each with
        its own name in the xdata that tells the brick's index which names granular entry heal must look
        at). ``before_op`` runs under the locks with the replicas taking part; a Result it returns is the
        answer, and the fop is not sent.
        """
        tgts = targets or [(gfid, preop_xdata)]
        if fd is not None:
            await self._fix_open(fd)
        up = self.up()
        if fd is not None:
            up = [i for i in up if fd.handles[i] is not None]
        self._check_quorum(up, what)
        locked_sets: list[tuple[UnlockFn, list[int]]] = []
        sources: set[int] = set()

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
                if len(tgts) == 1:
                    idx, sources = await self._preop(what, slot, tgts[0][0], fd if tgts[0][0] == gfid else None,
                                                     idx, xdata=tgts[0][1])
                    preop_done = idx
                else:
                    res = await log_all(idx, {DIRTY: changelog(slot, 1)}, True)
                    idx = preop_done = [i for i, r in zip(idx, res) if isinstance(r, Result)]
                    if not idx and res and _pick_error(res).errno != errno.ENOTCONN:
                        raise _pick_error(res)
                    self._check_quorum(idx, what)

            async def undo() -> None:
                if preop_done:
                    with trio.CancelScope(shield=True):
                        await log_all(preop_done, {DIRTY: changelog(slot, -1)}, False)

            if before_op is not None:
                answer = await before_op(idx)
                if answer is not None:
                    await undo()
                    return answer
            res = await each(op, idx)
            out = self._judge(idx, res, prefer=sources if changelog_on and slot == DATA
                              else self._readable_children(gfid))
            self._drop_lost_handles(fd, idx, res)
            if out.result is None:
                # failed everywhere alike (EEXIST, EACCES, ENOSPC …): consistent, nobody to blame
                await undo()
                assert out.error is not None
                raise out.error
            done = out.done
            failed = [i for i in range(len(self.children)) if i not in done]
            sb = (self._in_flight_split_brain(what, done, sources, idx, res) if slot == DATA and changelog_on
                  else None)
            if sb is not None or not self._has_quorum(done):
                # as AFR: too few took it to accuse the others; leave (or mark) it dirty for heal to judge
                if not changelog_on:
                    with trio.CancelScope(shield=True):
                        await log_all(done, {DIRTY: changelog(slot, 1)}, True)
                raise sb or _quorum_error(self.name, what, len(done), self.quorum, res)
            if changelog_on or failed:
                post: Dict = {DIRTY: changelog(slot, -1 if changelog_on else 0)}
                for j in failed:
                    post[self.pending_keys[j]] = changelog(slot, 1)
                with trio.CancelScope(shield=True):
                    pres = await log_all(done, post, bool(failed))
                posted = [i for i, r in zip(done, pres) if isinstance(r, Result)]
                if failed:
                    log.warning("%s: %s missed on replica(s) %s; marked for self-heal", self.name, what,
                                [self.children[j].name for j in failed])
                    for g, _ in tgts:
                        self._mark_stale(g, failed, posted)
                if not self._has_quorum(posted):
                    raise _quorum_error(self.name, f"{what} (post-op)", len(posted), self.quorum, pres)
            return out.result
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
        gen = self._event_gen

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
        self._known[gfid] = _Known(gen, [i for i, h in enumerate(handles) if h is not None], len(self.children))
        return r

    # ------------------------------------------------------------ metadata fops

    async def _meta(self, what: str, gfid: bytes, op: Callable[[int], Awaitable[Result]]) -> Result:
        await self._end_session(gfid)
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
        await self._end_session(gfid)
        return await self._transaction("truncate", DATA, gfid, None, self._data_locks(gfid, None),
                                       lambda i: self.children[i].truncate(gfid, size, xdata, cred=c))

    # ------------------------------------------------------------ eager locking: the data lock held across writes

    def _alive(self, s: _Session, i: int) -> bool:
        """Replica ``i`` still holds the session's lock: up, and not reconnected since it was taken."""
        c = self.children[i]
        return c.is_up and c.generation == s.generations.get(i, -1)

    async def _join(self, fd: _AfrFd, what: str) -> _Session:
        """Become an owner of the inode's data lock; take it (lock + pre-op) if nobody holds it."""
        gfid = fd.gfid
        while True:
            s = self._sessions.get(gfid)
            if s is not None and not s.release and s.event_gen != self._event_gen:
                s.release = True  # a replica came or went since it was taken: the next one must include it
                self._kick()
            if s is not None and s.release:
                await self._finish(s)
                continue
            if s is None:
                s = _Session(gfid, fd, self._event_gen)
                self._sessions[gfid] = s
                s.owners = 1
                try:
                    await self._open_session(s, fd, what)
                except BaseException as e:
                    s.owners = 0
                    s.error = e if isinstance(e, OSError) else OSError(errno.EIO, f"{self.name}: {what}: aborted")
                    s.release = s.finishing = True
                    if self._sessions.get(gfid) is s:
                        del self._sessions[gfid]
                    s.acquired.set()
                    s.drained.set()
                    s.finished.set()
                    raise
                s.acquired.set()
                return s
            if s.drained.is_set():
                s.drained = trio.Event()
            s.owners += 1
            try:
                await s.acquired.wait()
            except BaseException:
                self._leave(s)
                raise
            if s.error is not None:
                self._leave(s)
                raise OSError(s.error.errno, str(s.error))
            return s

    def _leave(self, s: _Session) -> None:
        s.owners -= 1
        s.last_use = trio.current_time()
        if s.owners == 0:
            s.drained.set()
            if s.release:
                self._kick()

    async def _open_session(self, s: _Session, fd: _AfrFd, what: str) -> None:
        await self._fix_open(fd)
        up = [i for i in self.up() if fd.handles[i] is not None]
        self._check_quorum(up, what)
        lock, unlock = self._inodelk_fns(s.gfid, fd, 0, 0, s.owner)
        got = await self._lock(up, lock, unlock, F.SETLK, F.SETLKW)
        s.unlock = unlock
        s.locked = got
        s.generations = {i: self.children[i].generation for i in got}
        try:
            self._check_quorum(got, what)
            never = [j for j in range(len(self.children)) if j not in got]
            # a replica that is down (or not open) now misses every write of the session: blamed at once
            s.preop, s.sources = await self._preop(what, DATA, s.gfid, fd, got, blame=never)
            s.blamed = set(never)
            s.failed = {j for j in range(len(self.children)) if j not in s.preop}
            if never:
                self._mark_stale(s.gfid, never, s.preop)
        except BaseException:
            with trio.CancelScope(shield=True):
                await each(unlock, got)
            raise

    async def _blame_now(self, s: _Session, what: str) -> None:
        """Put the blame of replicas that missed a write of the session on the good replicas' disks: before
        that write is acknowledged (AFR does the post-op before unwinding a write that failed anywhere)."""
        async with s.blame_lock:
            new = s.failed - s.blamed
            if not new:
                return
            good = [i for i in s.preop if i not in s.failed and self._alive(s, i)]
            d: Dict = {self.pending_keys[j]: changelog(DATA, 1) for j in sorted(new)}
            with trio.CancelScope(shield=True):
                res = await self._changelog(good, s.gfid, s.fd, d)
            posted = [i for i, r in zip(good, res) if isinstance(r, Result)]
            log.warning("%s: writes to %s missed replica(s) %s; marked for self-heal", self.name, s.gfid.hex(),
                        [self.children[j].name for j in sorted(new)])
            self._mark_stale(s.gfid, new, posted)
            if not self._has_quorum(posted):
                s.leave_dirty = s.release = True
                raise _quorum_error(self.name, f"{what} (blame)", len(posted), self.quorum, res)
            s.blamed |= new

    async def _in_session(self, fd: _AfrFd, what: str, op: Callable[[int], Awaitable[Result]],
                          want: int | None = None, *, fsync: bool = False) -> Result:
        """``op`` on the replicas of the held data lock, as one of its owners."""
        s = await self._join(fd, what)
        try:
            for i in s.preop:
                if i not in s.failed and not self._alive(s, i):
                    s.failed.add(i)  # down now, or back without our lock: it must not get this write
            targets = [i for i in s.preop if i not in s.failed]
            if any(fd.handles[i] is None for i in targets):
                await self._fix_open(fd)
                for i in targets:
                    if fd.handles[i] is None:
                        s.failed.add(i)  # could not be opened there: it misses the write, and is blamed
                targets = [i for i in targets if fd.handles[i] is not None]
            # quorum is judged before anything is written, as AFR does: a refused write reaches no brick
            if not self._has_quorum(targets):
                s.release = True
                self._check_quorum(targets, what)
            before = set(s.sources)  # the replicas with good data as this write starts
            res = await each(op, targets)
            out = self._judge(targets, res, want, prefer=before)
            self._drop_lost_handles(fd, targets, res)
            if fsync:
                out.lost -= out.gone  # an fsync that did not reach a brick that went away missed nothing
            if out.result is None:
                if out.gone:  # a brick that went away may have taken it: heal judges, from the others
                    s.failed |= out.gone
                    s.release = True
                assert out.error is not None
                raise out.error  # failed everywhere alike (ENOSPC, EDQUOT …): nothing to blame
            if out.lost:
                s.failed |= out.lost
                s.sources -= out.lost
                s.release = True  # as AFR: a failure ends the delayed post-op
            sb = self._in_flight_split_brain(what, out.done, before, targets, res)
            if sb is not None or not self._has_quorum(out.done):
                s.leave_dirty = True
                s.release = True
                raise sb or _quorum_error(self.name, what, len(out.done), self.quorum, res)
            if out.lost:
                self._mark_stale(s.gfid, out.lost, out.done)
            await self._blame_now(s, what)
            return out.result
        finally:
            self._leave(s)

    async def _finish(self, s: _Session) -> None:
        """Release the session once no owner remains: post-op (dirty −1, blame what was missed), unlock.
        Waits for it to be over if someone else is releasing it."""
        s.release = True
        if s.finishing:
            await s.finished.wait()
            return
        while s.owners:
            await s.drained.wait()
        if s.finishing:
            await s.finished.wait()
            return
        s.finishing = True
        with trio.CancelScope(shield=True):
            try:
                if s.error is None and s.unlock is not None:
                    good = [i for i in s.preop if i not in s.failed and self._alive(s, i)]
                    if s.leave_dirty or not self._has_quorum(good):
                        log.warning("%s: %s left dirty for self-heal (%d replica(s) good, quorum %d)", self.name,
                                    s.gfid.hex(), len(good), self.quorum)
                    else:
                        post: Dict = {DIRTY: changelog(DATA, -1)}
                        for j in sorted(s.failed - s.blamed):
                            post[self.pending_keys[j]] = changelog(DATA, 1)
                        await self._changelog(good, s.gfid, s.fd, post)
                    await each(s.unlock, [i for i in s.locked if self._alive(s, i)])
            finally:
                if self._sessions.get(s.gfid) is s:
                    del self._sessions[s.gfid]
                s.finished.set()

    async def _end_session(self, gfid: bytes) -> None:
        s = self._sessions.get(gfid)
        if s is not None:
            await self._finish(s)

    def _on_callback(self, proc: int, msg: object) -> None:
        if proc == F.Cbk.INODELK_CONTENTION and isinstance(msg, F.InodelkContention) and msg.domain == self.name:
            s = self._sessions.get(msg.gfid)
            if s is not None:
                log.debug("%s: another client waits for %s: releasing our eager lock", self.name, msg.gfid.hex())
                s.release = True
                self._kick()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Owner of delayed post-ops: releases eager locks that went idle, are wanted elsewhere, or predate
        a replica's coming or going."""
        try:
            async with trio.open_nursery() as bg:
                self._bg = bg
                task_status.started()
                while True:
                    with trio.move_on_after(EAGER_DELAY / 4):
                        await self._eager_kick.wait()
                    self._eager_kick = trio.Event()
                    now = trio.current_time()
                    for s in list(self._sessions.values()):
                        if s.acquired.is_set() and s.owners == 0 and not s.finishing and (
                                s.release or now - s.last_use >= EAGER_DELAY or s.event_gen != self._event_gen):
                            bg.start_soon(self._finish, s)
        finally:
            self._bg = None
            with trio.CancelScope(shield=True):
                await self.release_all()

    async def release_all(self) -> None:
        for s in list(self._sessions.values()):
            await self._finish(s)

    # ------------------------------------------------------------ children coming and going

    def _child_event(self, i: int, ev: BrickEvent) -> None:
        self._event_gen += 1  # what we know of every inode is re-learned before its next read
        if not ev.up:
            for fd in self._fds.values():
                if fd.locks and fd.lock_nodes is not None and not fd.bad:
                    fd.lock_nodes.discard(i)
                    if not self._has_quorum(fd.lock_nodes):
                        # another client may take the lock on a quorum now: the application must not go on
                        # believing it holds it (AFR marks the fd bad and never heals those locks)
                        fd.bad = True
                        log.warning("%s: POSIX locks of %s are held on too few replicas (%s) after %s went "
                                    "down: the fd is bad (EBADFD) from now on", self.name, fd.gfid.hex(),
                                    sorted(fd.lock_nodes), self.children[i].name)
        elif self._bg is not None and any(fd.locks and not fd.bad for fd in self._fds.values()):
            self._bg.start_soon(self._heal_locks, i)
        self._kick()

    async def _heal_locks(self, i: int) -> None:
        """A replica came back without our POSIX locks (a restarted brick forgets them): grant them again."""
        done = failed = 0
        gen = self.children[i].generation
        for fd in list(self._fds.values()):
            h = fd.handles[i] if fd.locks and not fd.bad else None
            if h is None or fd.locks is None:
                continue
            ok = True
            for owner, seg in fd.locks.items():
                try:
                    await self.children[i].lk(h, F.SETLK, Flock(seg.type, 0, seg.start, seg.len, seg.pid, owner),
                                              cred=now_cred(lk_owner=owner))
                    done += 1
                except OSError as e:
                    failed += 1
                    ok = False
                    log.warning("%s: could not grant a lock of %s again on %s: %s", self.name, fd.gfid.hex(),
                                self.children[i].name, e)
            if ok and fd.lock_nodes is not None and self.children[i].generation == gen:
                fd.lock_nodes.add(i)
        if done or failed:
            log.info("%s: re-granted %d POSIX lock(s) on %s after it came back (%d failed)", self.name, done,
                     self.children[i].name, failed)

    # ------------------------------------------------------------ fds

    def _fd(self, handle: int) -> _AfrFd:
        fd = self._fds.get(handle)
        if fd.bad:
            raise OSError(errno.EBADFD, f"{self.name}: the POSIX locks of this fd were lost on a quorum of replicas")
        return fd

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
        s = self._sessions.get(afd.gfid)
        if s is not None and s.fd is afd:
            await self._finish(s)  # the lock lives on this fd's brick fds
        afd.closed = True
        self._fds.pop(fd)
        await self._release_handles(afd.handles)

    releasedir = release

    async def _fd_read(self, handle: int, call: Callable[[int, int], Awaitable[Result]], what: str) -> Result:
        fd = self._fd(handle)
        await self._fix_open(fd)

        async def one(i: int) -> Result:
            h = fd.handles[i]
            if h is None:
                raise OSError(errno.EBADFD, f"{self.name}: fd not open on child {i}")
            return await call(i, h)

        if fd.is_dir:
            # a directory stream must stay on one replica: offsets are per brick
            if fd.read_child is None or not self.children[fd.read_child].is_up:
                await self._refresh(fd.gfid)
                cands = [i for i in self._readable_children(fd.gfid) if fd.handles[i] is not None] or \
                        [i for i in self.up() if fd.handles[i] is not None and i != self.arbiter]
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
        await self._end_session(fd.gfid)
        if cred is not None and fd.locks:
            # bricks drop the POSIX locks of the flushing lock owner on this file (close() semantics)
            for other in self._fds.values():
                if other.gfid == fd.gfid and other.locks:
                    other.locks.drop_owner(cred.lk_owner)
                    if not other.locks:
                        other.lock_nodes = None
        return await self._fd_all(handle, lambda i, h: self.children[i].flush(h, xdata, cred=cred))

    async def fsync(self, handle: int, datasync: bool = False, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        """On every replica, and a replica whose fsync failed missed the write (it is blamed). With writes
        under the held data lock, the bricks fsync before the post-op clears dirty (as AFR)."""
        fd = self._fd(handle)

        def op(i: int) -> Awaitable[Result]:
            return self.children[i].fsync(_h(fd, i), datasync, xdata, cred=cred)

        s = self._sessions.get(fd.gfid)
        if not fd.is_dir and s is not None and not s.release and s.event_gen == self._event_gen:
            try:
                return await self._in_session(fd, "fsync", op, fsync=True)
            finally:
                await self._end_session(fd.gfid)
        await self._end_session(fd.gfid)
        await self._fix_open(fd)
        idx = [i for i in self.up() if fd.handles[i] is not None]
        self._check_quorum(idx, "fsync")
        res = await each(op, idx)
        out = self._judge(idx, res, prefer=self._readable_children(fd.gfid))
        self._drop_lost_handles(fd, idx, res)
        if out.result is None:
            assert out.error is not None
            raise out.error
        failed = sorted(out.lost - out.gone)
        if not self._has_quorum(out.done):
            raise _quorum_error(self.name, "fsync", len(out.done), self.quorum, res)
        if failed and not fd.is_dir:
            # the data it had acknowledged may not be on those disks: a failed fsync is a failed write
            await self._transaction("fsync", DATA, fd.gfid, fd, self._data_locks(fd.gfid, fd),
                                    lambda i: _fail_on(i, failed, out.result))
        return out.result

    async def write(self, handle: int, offset: int, data: bytes, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        fd = self._fd(handle)
        c = self._cred(Proc.WRITE, cred)

        def op(i: int) -> Awaitable[Result]:
            # as AFR: the arbiter stores no data, it is sent one byte (its reply counts as the whole write)
            payload = data[:1] if i == self.arbiter else data
            return self.children[i].write(_h(fd, i), offset, payload, xdata, cred=c)

        return await self._in_session(fd, "write", op, len(data))

    async def _data_op(self, what: str, proc: Proc, handle: int, cred: Credential | None,
                       call: Callable[[Brick, int, Credential], Awaitable[Result]],
                       before_op: Callable[[_AfrFd, list[int]], Awaitable[Result | None]] | None = None) -> Result:
        """A data transaction on an open file, after the eager lock on it (if any) is given back."""
        fd = self._fd(handle)
        c = self._cred(proc, cred)
        await self._end_session(fd.gfid)
        bo = None if before_op is None else functools.partial(before_op, fd)
        return await self._transaction(what, DATA, fd.gfid, fd, self._data_locks(fd.gfid, fd),
                                       lambda i: call(self.children[i], _h(fd, i), c), before_op=bo)

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
        """ZEROFILL extends the file; with ``ZEROFILL_KEEP_SIZE`` in xdata (fallocate ZERO_RANGE|KEEP_SIZE)
        the range is clipped to the size under the data lock, so no writer moves the end meanwhile."""
        keep = bool(xdata and xdata.get(ZEROFILL_KEEP_SIZE))
        x = {k: v for k, v in xdata.items() if k != ZEROFILL_KEEP_SIZE} if xdata else None
        span = [offset, size]

        async def clip(fd: _AfrFd, idx: list[int]) -> Result | None:
            if not keep:
                return None
            cands = [i for i in self._readable_children(fd.gfid) if i in idx] or \
                    [i for i in idx if i != self.arbiter]
            if not cands:
                raise OSError(errno.EIO, f"{self.name}: zerofill: no replica with data takes part")
            # as a read: a replica that goes away meanwhile (it then misses the zerofill too) gives way to the next
            st: Result | None = None
            for i in cands:
                try:
                    st = await self.children[i].fstat(_h(fd, i))
                    break
                except OSError as e:
                    if e.errno not in GONE or i == cands[-1]:
                        raise
            assert st is not None
            cur = attrs(st).size
            span[1] = max(0, min(offset + size, cur) - offset)
            return st if span[1] == 0 else None

        return await self._data_op("zerofill", Proc.ZEROFILL, handle, cred,
                                   lambda ch, h, c: ch.zerofill(h, span[0], span[1], x or None, cred=c), clip)

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
        if cmd == F.GETLK:
            return await self._fd_read(handle, lambda i, h: self.children[i].lk(h, cmd, flock, xdata, cred=cred),
                                       "getlk")
        await self._fix_open(fd)
        idx = [i for i in self.up() if fd.handles[i] is not None]
        self._check_quorum(idx, "lock")

        async def one(i: int) -> Result:
            return await self.children[i].lk(_h(fd, i), cmd, flock, xdata, cred=cred)

        def refused(r: Result | OSError) -> bool:
            return not isinstance(r, Result) and r.errno not in GONE
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
        if flock.type != F.UNLCK and (no or not self._has_quorum(ok)):
            undo = Flock(F.UNLCK, flock.whence, flock.start, flock.len, flock.pid, flock.owner)
            await each(lambda i: self.children[i].lk(_h(fd, i), F.SETLK, undo, cred=cred), ok)
            raise _pick_error(no) if no else _pick_error(res)
        if not ok:
            raise _pick_error(res)
        if fd.locks is None:
            fd.locks = HeldLocks()
        had = bool(fd.locks)
        fd.locks.apply(cred.lk_owner if cred is not None else flock.owner, flock.type, flock.start, flock.len,
                       flock.pid)
        if not fd.locks:
            fd.lock_nodes = None
        elif flock.type != F.UNLCK:
            fd.lock_nodes = set(ok) if not had or fd.lock_nodes is None else fd.lock_nodes & set(ok)
        return _first_ok(res)

    # ------------------------------------------------------------ internal locks and xattrops of upper layers
    # (DHT's layout-heal lock, a test's changelog): on every replica that is up; a replica that went away
    # meanwhile does not fail the call while a quorum took it, any other failure does (and a lock granted
    # on some replicas only is given back)

    async def _everywhere(self, call: Callable[[int], Awaitable[Result]], idx: list[int] | None = None,
                          undo: Callable[[int], Awaitable[Result]] | None = None) -> Result:
        up = self.up() if idx is None else idx
        if not up:
            raise OSError(errno.ENOTCONN, f"{self.name}: no replica is up")
        res = await each(call, up)
        ok = [i for i, r in zip(up, res) if isinstance(r, Result)]
        refused = [r for r in res if isinstance(r, OSError) and r.errno not in GONE]
        if refused or (len(ok) < len(up) and not self._has_quorum(ok)):
            if undo is not None and ok:
                with trio.CancelScope(shield=True):
                    await each(undo, ok)
            raise _pick_error(res)
        return _first_ok(res)

    async def inodelk(self, gfid: bytes, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        unl = replace(flock, type=F.UNLCK)
        return await self._everywhere(
            lambda i: self.children[i].inodelk(gfid, domain, cmd, flock, xdata, cred=cred),
            undo=None if flock.type == F.UNLCK else
            (lambda i: self.children[i].inodelk(gfid, domain, F.SETLK, unl, xdata, cred=cred)))

    async def entrylk(self, gfid: bytes, domain: str, name: str | None, cmd: int, type_: int = F.ENTRYLK_WRLCK,
                      xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self._everywhere(
            lambda i: self.children[i].entrylk(gfid, domain, name, cmd, type_, xdata, cred=cred),
            undo=None if cmd == F.ENTRYLK_UNLOCK else
            (lambda i: self.children[i].entrylk(gfid, domain, name, F.ENTRYLK_UNLOCK, type_, xdata, cred=cred)))

    async def xattrop(self, gfid: bytes, op: int, d: Dict, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        return await self._everywhere(lambda i: self.children[i].xattrop(gfid, op, d, xdata, cred=cred))

    async def finodelk(self, handle: int, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        fd = self._fd(handle)
        unl = replace(flock, type=F.UNLCK)
        return await self._everywhere(
            lambda i: self.children[i].finodelk(_h(fd, i), domain, cmd, flock, xdata, cred=cred),
            [i for i in self.up() if fd.handles[i] is not None],
            undo=None if flock.type == F.UNLCK else
            (lambda i: self.children[i].finodelk(_h(fd, i), domain, F.SETLK, unl, xdata, cred=cred)))

    async def fentrylk(self, handle: int, domain: str, name: str | None, cmd: int, type_: int = F.ENTRYLK_WRLCK,
                       xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        fd = self._fd(handle)
        return await self._everywhere(
            lambda i: self.children[i].fentrylk(_h(fd, i), domain, name, cmd, type_, xdata, cred=cred),
            [i for i in self.up() if fd.handles[i] is not None],
            undo=None if cmd == F.ENTRYLK_UNLOCK else
            (lambda i: self.children[i].fentrylk(_h(fd, i), domain, name, F.ENTRYLK_UNLOCK, type_, xdata,
                                                 cred=cred)))

    async def fxattrop(self, handle: int, op: int, d: Dict, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        fd = self._fd(handle)
        return await self._everywhere(lambda i: self.children[i].fxattrop(_h(fd, i), op, d, xdata, cred=cred),
                                      [i for i in self.up() if fd.handles[i] is not None])


async def _fail_on(i: int, failed: Sequence[int], answer: Result | None) -> Result:
    """The "fop" of the transaction that blames replicas whose fsync failed: fails exactly there."""
    await trio.lowlevel.checkpoint()
    if i in failed or answer is None:
        raise OSError(errno.EIO, "fsync failed on this replica")
    return answer
