"""The FUSE bridge: pyfuse3 Operations over the top of the translator graph.

FUSE inodes map to gfids (inode = low 64 bits of the gfid, as gluster's own FUSE
client numbers them; the mount's root is inode 1). Each handler turns the caller's
uid/gid/groups/pid into the RPC credential, so bricks enforce permissions exactly as
for the native client. pyfuse3 kills the whole mount on any exception other than
``FUSEError``, so every handler maps failures to an errno.
"""

from __future__ import annotations

import contextvars
import errno
import functools
import logging
import os
import stat as st
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Concatenate, Coroutine, ParamSpec, Sequence, TypeVar

import pyfuse3
import trio

from .bounded import BoundedDict
from .fops import GETLK, SETLK, SETLKW, UNLCK, Flock, Proc, Result
from .fuse_lowlevel import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, Caller, Lock
from .iatt import NULL_GFID, ROOT_GFID, SET_ATIME, SET_GID, SET_MODE, SET_MTIME, SET_UID, Iatt
from .rpc import Credential
from .cred import now_cred
from .status import FuseStats
from .takeover import NO_JOURNAL, Journal
from .xlators.api import ZEROFILL_KEEP_SIZE

log = logging.getLogger(__name__)

NAME_MAX = 255
MAX_GROUPS = 90  # keeps the v3 credential under gluster's 400-byte limit
#: xattrs that belong to gluster, never shown to or set by users
HIDDEN_XATTR_PREFIXES = ("trusted.afr.", "trusted.glusterfs.", "trusted.gfid", "trusted.ec.", "glusterfs.",
                         "trusted.pgfid.", "trusted.tier.", "security.selinux.gluster")
ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")

T = TypeVar("T")
P = ParamSpec("P")
Ops = TypeVar("Ops", bound="GlusterOperations")


def fuse_errors(
    fn: Callable[Concatenate[Ops, P], Awaitable[T]],
) -> Callable[Concatenate[Ops, P], Coroutine[Any, Any, T]]:
    """Map every failure to FUSEError: anything else would abort the whole mount. Keeps the signature
    (pyfuse3.Operations declares the handlers; fuse_lowlevel's LockOps the lock and fallocate ones)."""

    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Ops, /, *args: P.args, **kwargs: P.kwargs) -> T:
        self.inflight += 1
        t0 = time.perf_counter()
        cache = self.kcache.cache
        if cache is not None:
            _TICKET.set(cache.ticket())  # answers about inodes changed from now on get no long kernel timeout
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError as e:
            self.stats.failed(op, e.errno)
            raise
        except OSError as e:
            code = e.errno or errno.EIO
            if code not in (errno.ENOENT, errno.EEXIST, errno.ENODATA, errno.ENOTEMPTY, errno.EACCES,
                            errno.EPERM, errno.ENOTSUP):
                log.warning("%s: %s", fn.__name__, e)
            self.stats.failed(op, code)
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("%s failed unexpectedly", fn.__name__)
            self.stats.failed(op, errno.EIO)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.inflight -= 1
            self.stats.done(op, time.perf_counter() - t0)  # counts, time and latency bucket (gfuse.status)

    return wrapper


@dataclass
class _Inode:
    gfid: bytes
    nlookup: int = 0


@dataclass
class _DirIds:
    """The readdir ids (FUSE offsets) of one directory's names, shared by all its handles: the kernel's
    readdir cache holds the ids one handle gave and may continue from one of them on a later handle."""
    by_name: dict[bytes, int] = field(default_factory=dict)
    names: dict[int, bytes] = field(default_factory=dict)
    next_id: int = 1


@dataclass
class _DirHandle:
    fd: int
    gfid: bytes
    #: our readdir ids → the layer's offset to continue from
    cookies: dict[int, int] = field(default_factory=dict)
    next_id: int = 1


def lk_owner(owner: int) -> bytes:
    """A FUSE lock owner as gluster's FUSE client sends it: 8 bytes, least significant first."""
    return owner.to_bytes(8, "little")


def ino_of(gfid: bytes) -> int:
    return int.from_bytes(gfid[8:], "big") or 1


class GlusterOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, top: Any, root_gfid: bytes = ROOT_GFID, *, read_only: bool = False,
                 attr_timeout: float = 1.0, entry_timeout: float = 1.0) -> None:
        super().__init__()
        self.top = top
        self.root_gfid = root_gfid
        self.read_only = read_only
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.inodes: dict[int, _Inode] = {pyfuse3.ROOT_INODE: _Inode(root_gfid, 1)}
        self.dirs: dict[int, _DirHandle] = {}
        self._dir_ids: BoundedDict[bytes, _DirIds] = BoundedDict(1024)
        self._ids_base = int(time.time()) << 24
        self._dir_handles = 1
        self._groups: dict[int, tuple[float, tuple[int, ...]]] = {}
        self._acl_unsupported = True
        self.inflight = 0
        #: requests, errors, latency and bytes by FUSE operation, for the status socket (gfuse.status)
        self.stats = FuseStats()
        #: open file handles per inode, and back: getattr of an unlinked open file needs a handle
        self.open_files: dict[int, set[int]] = {}
        self.fh_inode: dict[int, int] = {}
        #: inodes recently seen without security.capability: the kernel asks before every write
        self._no_caps: BoundedDict[int, float] = BoundedDict(10_000)
        #: set once the kernel's INIT request is answered (see mount.set_read_ahead)
        self.initialized = trio.Event()
        #: what a successor process needs to take the mount over (gfuse.takeover; -o restartable)
        self.journal: Journal = NO_JOURNAL
        #: the kernel's caches of this mount: timeouts handed out and their purging (see KernelCache)
        self.kcache = KernelCache(self)

    def init(self) -> None:
        """The kernel's INIT is being answered (pyfuse3 calls this synchronously, just before the reply)."""
        self.initialized.set()

    # ------------------------------------------------------------ helpers

    def gfid(self, inode: int) -> bytes:
        i = self.inodes.get(inode)
        if i is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return i.gfid

    def ino(self, gfid: bytes) -> int:
        """The FUSE inode of a gfid: the mount's root is 1, others their gfid's low 64 bits."""
        return pyfuse3.ROOT_INODE if gfid == self.root_gfid else ino_of(gfid)

    def _remember(self, stat: Iatt) -> int:
        ino = self.ino(stat.gfid)
        rec = self.inodes.get(ino)
        if rec is None:
            self.inodes[ino] = _Inode(stat.gfid, 1)
        else:
            rec.nlookup += 1
        self.journal.lookup(ino, stat.gfid)
        return ino

    def attrs(self, stat: Iatt, ino: int | None = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino if ino is not None else self.ino(stat.gfid)
        a.generation = 0
        a.entry_timeout, a.attr_timeout = self.kcache.timeouts(stat.gfid)
        a.st_mode = stat.mode
        a.st_nlink = stat.nlink
        a.st_uid = stat.uid
        a.st_gid = stat.gid
        # gluster carries device numbers as major << 32 | minor
        a.st_rdev = os.makedev(stat.rdev >> 32, stat.rdev & 0xFFFFFFFF) if stat.rdev else 0
        a.st_size = stat.size
        a.st_blksize = stat.blksize or 4096
        a.st_blocks = stat.blocks
        a.st_atime_ns = stat.atime * 1_000_000_000 + stat.atime_nsec
        a.st_mtime_ns = stat.mtime * 1_000_000_000 + stat.mtime_nsec
        a.st_ctime_ns = stat.ctime * 1_000_000_000 + stat.ctime_nsec
        return a

    def _entry(self, stat: Iatt, parent_inode: int | None = None, name: bytes = b"") -> pyfuse3.EntryAttributes:
        ino = self._remember(stat)
        if parent_inode is not None:
            self.kcache.dentry(parent_inode, name, ino)
        return self.attrs(stat, ino)

    def _groups_of(self, pid: int) -> tuple[int, ...]:
        now = time.monotonic()
        hit = self._groups.get(pid)
        if hit and now - hit[0] < 1.0:
            return hit[1]
        try:
            groups = tuple(sorted(pyfuse3.get_sup_groups(pid)))[:MAX_GROUPS]
        except (OSError, ValueError):
            groups = ()
        if len(self._groups) > 4096:
            self._groups.clear()
        self._groups[pid] = (now, groups)
        return groups

    def cred(self, ctx: pyfuse3.RequestContext | Caller | None, proc: Proc | None = None, valid: int = 0,
             lk_owner: bytes = b"\0\0\0\0") -> Credential:
        if ctx is None:
            return now_cred(proc, valid=valid, lk_owner=lk_owner)
        return now_cred(proc, valid=valid, uid=ctx.uid, gid=ctx.gid, pid=ctx.pid, lk_owner=lk_owner,
                        groups=self._groups_of(ctx.pid) if ctx.uid else ())

    def _ro(self) -> None:
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)

    @staticmethod
    def _name(name: bytes) -> str:
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        if b"/" in name or name in (b"", b".", b".."):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return name.decode("utf-8", "surrogateescape")

    # ------------------------------------------------------------ inode ops

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        r = await self.top.lookup(self.gfid(parent_inode), name.decode("utf-8", "surrogateescape"),
                                  cred=self.cred(ctx))
        return self._entry(r.need_stat(), parent_inode, name)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            rec = self.inodes.get(ino)
            if rec is None or ino == pyfuse3.ROOT_INODE:
                continue
            self.journal.forget(ino, n)
            rec.nlookup -= n
            if rec.nlookup <= 0:
                del self.inodes[ino]
                self.kcache.forgotten(ino)

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            r = await self.top.stat(self.gfid(inode), cred=self.cred(ctx))
        except OSError as e:
            # unlinked but still open: the kernel's getattr carries no handle, so use one of ours
            fhs = self.open_files.get(inode)
            if e.errno not in (errno.ENOENT, errno.ESTALE) or not fhs:
                raise
            r = await self.top.fstat(next(iter(fhs)), cred=self.cred(ctx))
        return self.attrs(r.need_stat(), inode)

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._ro()
        gfid = self.gfid(inode)
        last: Result | None = None
        if fields.update_size:
            c = self.cred(ctx, Proc.FTRUNCATE if fh is not None else Proc.TRUNCATE)
            if fh is not None and fh not in self.dirs:
                last = await self.top.ftruncate(fh, attr.st_size, cred=c)
            else:
                last = await self.top.truncate(gfid, attr.st_size, cred=c)
        valid = 0
        s = Iatt(gfid=gfid)
        if fields.update_mode:
            valid |= SET_MODE
            s.mode = attr.st_mode
        if fields.update_uid:
            valid |= SET_UID
            s.uid = attr.st_uid
        if fields.update_gid:
            valid |= SET_GID
            s.gid = attr.st_gid
        if fields.update_atime:
            valid |= SET_ATIME
            s.atime, s.atime_nsec = divmod(attr.st_atime_ns, 1_000_000_000)
        if fields.update_mtime:
            valid |= SET_MTIME
            s.mtime, s.mtime_nsec = divmod(attr.st_mtime_ns, 1_000_000_000)
        if valid:
            last = await self.top.setattr(gfid, s, valid, cred=self.cred(ctx, Proc.SETATTR, valid))
        if last is None or last.post is None:
            r = await self.top.stat(gfid, cred=self.cred(ctx))
            return self.attrs(r.need_stat(), inode)
        return self.attrs(last.post, inode)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        r = await self.top.readlink(self.gfid(inode), cred=self.cred(ctx))
        return (r.path or "").encode("utf-8", "surrogateescape")

    async def _create_entry(self, proc: Proc, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext,
                            call: Callable[[bytes, str, bytes, Credential], Awaitable[Result]],
                            flags: int = 0) -> Result:
        self._ro()
        n = self._name(name)
        parent = self.gfid(parent_inode)
        # the journal picks the new gfid, and recognises a re-sent request after a takeover
        return await self.journal.entry(proc, self.top, parent, n, lambda: self.cred(ctx),
                                        lambda gfid: call(parent, n, gfid, self.cred(ctx, proc)), flags)

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        r = await self._create_entry(Proc.MKNOD, parent_inode, name, ctx, lambda p, n, g, c: self.top.mknod(
            p, n, mode, rdev, g, ctx.umask, cred=c))
        return self._entry(r.need_stat(), parent_inode, name)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        r = await self._create_entry(Proc.MKDIR, parent_inode, name, ctx, lambda p, n, g, c: self.top.mkdir(
            p, n, mode | st.S_IFDIR, g, ctx.umask, cred=c))
        return self._entry(r.need_stat(), parent_inode, name)

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        t = target.decode("utf-8", "surrogateescape")
        r = await self._create_entry(Proc.SYMLINK, parent_inode, name, ctx, lambda p, n, g, c: self.top.symlink(
            p, n, t, g, ctx.umask, cred=c))
        return self._entry(r.need_stat(), parent_inode, name)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._ro()
        r = await self.top.link(self.gfid(inode), self.gfid(new_parent_inode), self._name(new_name),
                                cred=self.cred(ctx, Proc.LINK))
        return self._entry(r.need_stat(), new_parent_inode, new_name)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._ro()
        parent, n = self.gfid(parent_inode), self._name(name)
        await self.journal.removal(Proc.UNLINK, parent, n,
                                   lambda: self.top.unlink(parent, n, cred=self.cred(ctx, Proc.UNLINK)))

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._ro()
        parent, n = self.gfid(parent_inode), self._name(name)
        await self.journal.removal(Proc.RMDIR, parent, n,
                                   lambda: self.top.rmdir(parent, n, cred=self.cred(ctx, Proc.RMDIR)))

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._ro()
        old, new = self._name(name_old), self._name(name_new)
        op, np_ = self.gfid(parent_inode_old), self.gfid(parent_inode_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # gluster has no atomic exchange

        async def rename() -> None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                try:
                    await self.top.lookup(np_, new, cred=self.cred(ctx))
                    raise pyfuse3.FUSEError(errno.EEXIST)
                except OSError as e:
                    if e.errno != errno.ENOENT:
                        raise
            await self.top.rename(op, old, np_, new, cred=self.cred(ctx, Proc.RENAME))
        await self.journal.rename(self.top, op, old, np_, new, lambda: self.cred(ctx), rename)

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        try:
            await self.top.access(self.gfid(inode), mode, cred=self.cred(ctx))
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM):
                return False
            raise
        return True

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return await self.statfs_of(pyfuse3.ROOT_INODE)

    @fuse_errors
    async def statfs_of(self, inode: int) -> pyfuse3.StatvfsData:
        """statfs as seen from ``inode`` (fuse_lowlevel's handler: the bricks answer a directory's quota there)."""
        i = self.inodes.get(inode)
        r = await self.top.statfs(i.gfid if i is not None else self.root_gfid)
        s = r.need_statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.bsize
        out.f_frsize = s.frsize
        out.f_blocks = s.blocks
        out.f_bfree = s.bfree
        out.f_bavail = s.bavail
        out.f_files = s.files
        out.f_ffree = s.ffree
        out.f_favail = s.favail
        out.f_namemax = min(s.namemax or NAME_MAX, NAME_MAX)
        return out

    # ------------------------------------------------------------ files

    @staticmethod
    def _open_flags(flags: int) -> int:
        return flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.read_only and flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        r = await self.top.open(self.gfid(inode), self._open_flags(flags), cred=self.cred(ctx))
        fd = r.need_fd()
        if flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
            # libfuse negotiates atomic O_TRUNC: the kernel sends no separate truncate. Truncating
            # through the graph (not with O_TRUNC on each brick) keeps replicas transactional.
            try:
                await self.top.ftruncate(fd, 0, cred=self.cred(ctx, Proc.FTRUNCATE))
            except BaseException:
                await self.top.release(fd)
                raise
        self._opened(inode, fd, flags)
        # close-to-open: the kernel keeps its pages only if no change of the file can have been missed
        return pyfuse3.FileInfo(fh=fd, keep_cache=self.kcache.keep_pages(self.gfid(inode)))

    def _opened(self, inode: int, fh: int, flags: int = 0) -> None:
        self.open_files.setdefault(inode, set()).add(fh)
        self.fh_inode[fh] = inode
        self.journal.opened(fh, inode, self.gfid(inode), flags)

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        r = await self._create_entry(Proc.CREATE, parent_inode, name, ctx, lambda p, n, g, c: self.top.create(
            p, n, (flags & ~os.O_NOCTTY) | os.O_CREAT, (mode & 0o7777) | st.S_IFREG, g, ctx.umask, cred=c), flags)
        entry = self._entry(r.need_stat(), parent_inode, name)
        fd = r.need_fd()
        self._opened(entry.st_ino, fd, flags)
        self._no_caps[entry.st_ino] = time.monotonic()  # a new file has no file capabilities to kill
        return pyfuse3.FileInfo(fh=fd), entry

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        r = await self.top.read(fh, off, size)
        data = r.data or b""
        self.stats.bytes_read += len(data)
        return data

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        r: Result = await self.top.write(fh, off, buf, cred=now_cred(Proc.WRITE))
        self.stats.bytes_written += r.ret
        return r.ret

    @fuse_errors
    async def flush(self, fh: int, lock_owner: int | None = None) -> None:
        """With the lock owner (from fuse_lowlevel), bricks also drop that owner's POSIX locks, as close() must."""
        cred = None if lock_owner is None else now_cred(Proc.FLUSH, lk_owner=lk_owner(lock_owner))
        await self.top.flush(fh, cred=cred)
        if lock_owner is not None:
            self.journal.unlocked_owner(fh, lock_owner)

    # ------------------------------------------------------------ locks and fallocate (see fuse_lowlevel)

    def _lock_cred(self, owner: int, caller: Caller) -> Credential:
        return self.cred(caller, Proc.LK, lk_owner=lk_owner(owner))

    @staticmethod
    def _flock(lock: Lock, owner: int) -> Flock:
        if lock.start < 0 or lock.len < 0:
            raise OSError(errno.EINVAL, "negative lock range")
        return Flock(lock.type, 0, lock.start, lock.len, lock.pid & 0xFFFFFFFF, lk_owner(owner))

    @fuse_errors
    async def getlk(self, fh: int, owner: int, lock: Lock, caller: Caller) -> Lock:
        r = await self.top.lk(fh, GETLK, self._flock(lock, owner), cred=self._lock_cred(owner, caller))
        f = r.flock
        if f is None or f.type == UNLCK:
            return Lock(UNLCK, lock.start, lock.len, lock.pid)
        pid = f.pid - (1 << 32) if f.pid >= 1 << 31 else f.pid
        return Lock(f.type, f.start, f.len, pid)

    @fuse_errors
    async def setlk(self, fh: int, owner: int, lock: Lock, wait: bool, caller: Caller) -> None:
        await self.top.lk(fh, SETLKW if wait else SETLK, self._flock(lock, owner),
                          cred=self._lock_cred(owner, caller))
        self.journal.locked(fh, owner, lock)  # a successor takes it again (gfuse.takeover)

    @fuse_errors
    async def fallocate(self, fh: int, mode: int, offset: int, length: int, caller: Caller) -> None:
        """Modes as gluster's own FUSE client maps them: punch hole → DISCARD, zero range → ZEROFILL."""
        self._ro()
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "bad fallocate range")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise OSError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")
        if mode & FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise OSError(errno.EOPNOTSUPP, "punching a hole needs FALLOC_FL_KEEP_SIZE")
            await self.top.discard(fh, offset, length, cred=self.cred(caller, Proc.DISCARD))
        elif mode & FALLOC_FL_ZERO_RANGE:
            # gluster's ZEROFILL extends the file: with KEEP_SIZE zero only what is below the end (replicate
            # clips again under its data lock, where no other writer can move the end meanwhile)
            xdata = None
            if mode & FALLOC_FL_KEEP_SIZE:
                size = (await self.top.fstat(fh)).need_stat().size
                length = min(offset + length, size) - offset
                if length <= 0:
                    return
                xdata = {ZEROFILL_KEEP_SIZE: "1"}
            await self.top.zerofill(fh, offset, length, xdata, cred=self.cred(caller, Proc.ZEROFILL))
        else:
            await self.top.fallocate(fh, mode, offset, length, cred=self.cred(caller, Proc.FALLOCATE))

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.top.fsync(fh, bool(datasync))

    @fuse_errors
    async def release(self, fh: int) -> None:
        self.journal.released(fh)
        inode = self.fh_inode.pop(fh, None)
        fhs = self.open_files.get(inode) if inode is not None else None
        if inode is not None and fhs is not None:
            fhs.discard(fh)
            if not fhs:
                del self.open_files[inode]
        await self.top.release(fh)

    # ------------------------------------------------------------ directories

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """pyfuse3's OPENDIR (when fuse_lowlevel could not take it over): the kernel caches no listing."""
        return await self._opendir(inode, self.cred(ctx))

    async def _opendir(self, inode: int, cred: Credential) -> int:
        gfid = self.gfid(inode)
        r = await self.top.opendir(gfid, cred=cred)
        self._dir_handles += 1
        h = self._dir_handles
        self.dirs[h] = _DirHandle(r.need_fd(), gfid)
        self.journal.opendir(h, gfid)
        return h

    @fuse_errors
    async def opendir_ll(self, inode: int, caller: Caller) -> tuple[int, bool, bool]:
        """OPENDIR through fuse_lowlevel: (handle, cache_readdir, keep_cache). With a coherent md-cache the
        kernel keeps each listing in the directory's page cache (FOPEN_CACHE_DIR) and answers the next
        ``ls`` from it; it is kept at this open (FOPEN_KEEP_CACHE) only if md-cache vouches that the
        directory did not change since that listing was read (see MdCache.listing_unchanged: no upcall, no
        entry fop of ours, and the bricks' mtime/ctime of the directory, asked now, as they were then).
        Without coherence (gluster's 1 s semantics) nothing is cached: pyfuse3's behaviour."""
        h = await self._opendir(inode, self.cred(caller))
        c = self.kcache.cache
        if c is None or not c.coherent:
            return h, False, False
        d = self.dirs[h]
        keep = await c.listing_unchanged(d.gfid, d.fd)
        return h, True, keep

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self.dirs.get(fh)
        if d is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        ids = self._dir_ids.get(d.gfid)
        if ids is None:
            # ids above any a predecessor process gave (gfuse.takeover restores its handles' cookies)
            ids = self._dir_ids[d.gfid] = _DirIds(next_id=self._ids_base)
        offset = 0 if start_id == 0 else d.cookies.get(start_id)
        skip: bytes | None = None
        if offset is None:
            # an id another handle gave (the kernel's cached listing ends there): from the start, after its name
            skip = ids.names.get(start_id)
            if skip is None:
                raise pyfuse3.FUSEError(errno.EINVAL)
            offset = 0
        while True:
            r = await self.top.readdirp(d.fd, offset, 128 * 1024)
            if not r.entries:
                return
            for e in r.entries:
                offset = e.off
                if e.name in (".", "..") or e.stat is None or e.stat.gfid == NULL_GFID:
                    continue
                if e.stat.gfid == self.root_gfid:
                    continue
                if skip is not None:
                    if e.name.encode("utf-8", "surrogateescape") == skip:
                        skip = None
                    continue
                bname = e.name.encode("utf-8", "surrogateescape")
                nid = ids.by_name.get(bname)
                if nid is None:
                    ids.next_id += 1
                    nid = ids.next_id
                    ids.by_name[bname] = nid
                    ids.names[nid] = bname
                d.cookies[nid] = e.off
                self.journal.cookie(fh, nid, e.off)
                attrs = self.attrs(e.stat)
                if not pyfuse3.readdir_reply(token, bname, attrs, nid):
                    return
                self.kcache.dentry(self.ino(d.gfid), bname, self._remember(e.stat))  # readdirplus: a lookup

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.journal.releasedir(fh)
        d = self.dirs.pop(fh, None)
        if d is not None:
            await self.top.release(d.fd)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """The bricks fsync the directory (its new and removed names): FSYNC on the directory's fd."""
        d = self.dirs.get(fh)
        if d is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        await self.top.fsync(d.fd, bool(datasync))

    # ------------------------------------------------------------ xattrs

    @staticmethod
    def _hidden(name: str) -> bool:
        return name.startswith(HIDDEN_XATTR_PREFIXES)

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._ro()
        n = name.decode("utf-8", "surrogateescape")
        if name in ACL_XATTRS:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        if self._hidden(n):
            raise pyfuse3.FUSEError(errno.EPERM)
        self._no_caps.pop(inode, None)
        await self.top.setxattr(self.gfid(inode), {n: bytes(value)}, cred=self.cred(ctx, Proc.SETXATTR))

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        n = name.decode("utf-8", "surrogateescape")
        if name in ACL_XATTRS:
            raise pyfuse3.FUSEError(errno.ENODATA if not self._acl_unsupported else errno.ENOTSUP)
        if self._hidden(n):
            raise pyfuse3.FUSEError(errno.ENODATA)
        caps = name == b"security.capability"
        if caps and time.monotonic() - self._no_caps.get(inode, -1e9) < self.attr_timeout:
            raise pyfuse3.FUSEError(errno.ENODATA)
        try:
            r = await self.top.getxattr(self.gfid(inode), n, cred=self.cred(ctx))
        except OSError as e:
            if caps and e.errno == errno.ENODATA:
                self._no_caps[inode] = time.monotonic()
            raise
        v = (r.dict or {}).get(n)
        if v is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        if isinstance(v, str):
            return v.encode("utf-8", "surrogateescape")
        if isinstance(v, (bytes, bytearray)):
            return bytes(v)
        return str(v).encode()

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        r = await self.top.getxattr(self.gfid(inode), "", cred=self.cred(ctx))
        return [k.encode("utf-8", "surrogateescape") for k in (r.dict or {}) if not self._hidden(k)]

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._ro()
        n = name.decode("utf-8", "surrogateescape")
        if self._hidden(n):
            raise pyfuse3.FUSEError(errno.EPERM)
        await self.top.removexattr(self.gfid(inode), n, cred=self.cred(ctx, Proc.REMOVEXATTR))



# ---------------------------------------------------------------------------------------------------------------
# the kernel's caches: how long it may keep what we answer, and purging it when another client changed things

#: md-cache's invalidation sequence when the request being served began (see MdCache.ticket)
_TICKET: contextvars.ContextVar[int] = contextvars.ContextVar("gfuse_cache_ticket", default=0)


class KernelCache:
    """The kernel side of md-cache (a ``KernelSink``, gfuse/xlators/mdcache.py).

    Timeouts: without a coherent md-cache the mount's entry/attribute timeouts (1 s, as gluster's FUSE
    bridge); with one, each answer's timeout is what is left of md-cache's entry for that inode (up to
    md-cache-timeout, and never past the bricks' registration), 0 when the inode changed while the request
    was served. What the kernel holds for that long must then be purged by us when a brick says another
    client changed it: attributes with ``invalidate_inode(attr_only)`` at once (it waits for nothing, so the
    reply of a later request on the same brick connection finds them gone), pages and directory entries
    (``invalidate_entry`` waits for requests on the parent) from one worker thread, never the trio thread
    that serves requests (CACHING.md §6). Duplicates (one upcall per replica) are merged in its queue.
    """

    def __init__(self, ops: GlusterOperations) -> None:
        self.ops = ops
        #: the current graph's md-cache (set by the mount; None: the mount's fixed timeouts)
        self.cache: Any = None
        #: inode → the directory entries (parent inode, name) the kernel got from us for it
        self.dentries: dict[int, set[tuple[int, bytes]]] = {}
        #: set while the FUSE session can take notifications (after pyfuse3.init, before close)
        self.live = False
        self._pending: dict[tuple[Any, ...], None] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.sent = {"attr": 0, "pages": 0, "entry": 0, "all": 0, "missed": 0}

    # ------------------------------------------------------------ the bridge's side (trio thread)

    def timeouts(self, gfid: bytes) -> tuple[float, float]:
        """(entry, attribute) timeout for an answer about ``gfid``."""
        c = self.cache
        if c is not None:
            t = c.kernel_timeout(gfid, _TICKET.get())
            if t is not None:
                return t, t
        return self.ops.entry_timeout, self.ops.attr_timeout

    def dentry(self, parent_inode: int, name: bytes, ino: int) -> None:
        names = self.dentries.get(ino)
        if names is None:
            names = self.dentries[ino] = set()
        if len(names) < 64:
            names.add((parent_inode, name))

    def forgotten(self, ino: int) -> None:
        self.dentries.pop(ino, None)

    def keep_pages(self, gfid: bytes) -> bool:
        c = self.cache
        return True if c is None else bool(c.keep_pages(gfid))

    # ------------------------------------------------------------ md-cache's side (KernelSink, trio thread)

    def _known(self, gfid: bytes) -> int | None:
        ino = self.ops.ino(gfid)
        return ino if ino in self.ops.inodes else None

    def inode_changed(self, gfid: bytes, data: bool) -> None:
        ino = self._known(gfid)
        if ino is None or not self.live:
            return
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)  # never waits: safe on the trio thread
            self.sent["attr"] += 1
        except OSError:
            self.sent["missed"] += 1
        if data:
            self._post(("pages", ino))

    def names_gone(self, gfid: bytes) -> None:
        ino = self.ops.ino(gfid)
        names = self.dentries.pop(ino, None)
        if not names or not self.live:
            return
        for parent, name in names:
            self._post(("entry", parent, name))

    def everything(self) -> None:
        if not self.live:
            self.dentries.clear()
            return
        inodes = [i for i in self.ops.inodes if i != pyfuse3.ROOT_INODE]
        entries = [(p, n) for names in self.dentries.values() for p, n in names]
        self.dentries.clear()
        if len(inodes) <= 20_000:  # attributes at once (cheap syscalls); more would stall the trio thread
            for i in [pyfuse3.ROOT_INODE, *inodes]:
                try:
                    pyfuse3.invalidate_inode(i, attr_only=True)
                except OSError:
                    pass
        self._post(("all", (pyfuse3.ROOT_INODE, *inodes), tuple(entries)))

    # ------------------------------------------------------------ the worker thread

    def start(self) -> None:
        """The FUSE session is up: notifications may be written from now on."""
        self.live = True
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._work, name="gfuse-kernel-inval", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Before the session is closed: no notification is written after this returns (or times out)."""
        self.live = False
        with self._cond:
            self._stop = True
            self._pending.clear()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _post(self, item: tuple[Any, ...]) -> None:
        with self._cond:
            if item not in self._pending:
                self._pending[item] = None
                self._cond.notify()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                item = next(iter(self._pending))
                del self._pending[item]
            try:
                self._apply(item)
            except Exception:  # a notification that fails is logged, never fatal
                log.exception("kernel invalidation %s failed", item[0])

    def _apply(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "pages":
            self._inval_inode(item[1], False)
            self.sent["pages"] += 1
        elif kind == "entry":
            self._inval_entry(item[1], item[2])
            self.sent["entry"] += 1
        elif kind == "all":
            for parent, name in item[2]:
                if self._stop:
                    return
                self._inval_entry(parent, name)
            for ino in item[1]:
                if self._stop:
                    return
                self._inval_inode(ino, False)
            self.sent["all"] += 1

    def _inval_inode(self, ino: int, attr_only: bool) -> None:
        if not self.live:
            return
        try:
            pyfuse3.invalidate_inode(ino, attr_only=attr_only)
        except OSError:
            self.sent["missed"] += 1  # the kernel forgot it meanwhile (ENOENT)

    def _inval_entry(self, parent: int, name: bytes) -> None:
        if not self.live:
            return
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError:
            self.sent["missed"] += 1
