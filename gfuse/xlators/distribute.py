"""cluster/distribute: DHT-compatible placement of names over subvolumes.

A file lives on the subvolume whose range, in its parent directory's layout
(``trusted.glusterfs.dht`` on each subvolume's copy of the directory), holds the
name's hash. Directories exist on every subvolume. A file found elsewhere than its
hashed subvolume is reached through a zero-byte *linkto* file on the hashed one, as
gluster leaves them after renames and rebalances.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import random
import stat as st
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import trio

from .. import fops as F
from ..bounded import BoundedDict
from ..dhthash import LAYOUT_XATTR, LINKTO_XATTR, Range, new_layout, name_hash
from ..dicts import Dict, UInt
from ..fops import DirEntry, Flock, Result
from ..iatt import NULL_GFID, ROOT_GFID, Iatt, gfid_str
from ..cred import now_cred
from ..rpc import Credential
from .api import READDIR_SIZE, Fops, Subvolume, attrs
from .handles import Handles
from .replicate import _first_ok, _pick_error, each

log = logging.getLogger(__name__)

LINKTO_MODE = st.S_IFREG | st.S_ISVTX
LAYOUT_HEAL_DOMAIN = "dht.layout.heal"
#: gluster DHT's lock domains: a file's data inode while it is renamed or migrated (rebalance takes it
#: for the whole migration), and a name in its parent on the name's hashed subvolume
FILE_MIGRATE_DOMAIN = "dht.file.migrate"
ENTRY_SYNC_DOMAIN = "dht.entry.sync"
#: xdata of a translator's own entry fop: posix then links a linkto of a hard-linked file to the inode
#: its gfid already names on that brick (the linkto files of one inode's names are hard links there)
INTERNAL_FOP_KEY = "glusterfs-internal-fop"
#: a write a client copies onto the destination of a file under migration carries this; the brick sets
#: it on the file and rebalance, whose own writes say ``AVOID_OVERWRITE``, then gives up on the file
PROTECT_WRITES_KEY = "trusted.glusterfs.protect.writes"
#: how long a rename waits for its locks (a rebalance holds a file's for the whole migration)
RENAME_LOCK_TIMEOUT = 600.0
#: how long a lookup's answer about where a name lives is trusted (the kernel's entry timeout)
RECENT_TTL = 1.0
#: a directory's layout is re-read after this long (another client may have fixed it: rebalance)
LAYOUT_TTL = 1.0
#: the volume's commit hash (root xattr, written when a rebalance completes), re-read after this long
COMMIT_TTL = 10.0
COMMITHASH_XATTR = "trusted.glusterfs.dht.commithash"
#: the commit hash of a self-healed layout (gluster's DHT_LAYOUT_HASH_INVALID): never a volume's
LAYOUT_HASH_INVALID = 1


def is_linkto(stat: Iatt | None, xdata: Dict | None) -> bool:
    """A DHT linkto file: mode ``---------T`` and the linkto xattr (gluster's ``check_is_linkfile``).

    Its size is not looked at: a migration's destination is one while rebalance fills it with data,
    and so is its source once the data is copied (phase 2), until rebalance truncates it.
    """
    return bool(stat and st.S_ISREG(stat.mode) and (stat.mode & 0o7777) == st.S_ISVTX
                and xdata and LINKTO_XATTR in xdata)


def migration_phase(stat: Iatt | None) -> int:
    """Where rebalance is with the data file a reply describes: 0 not migrating (as far as the mode
    says), 1 data being copied (rebalance set the sticky and setgid bits), 2 copied (the source has
    become a linkto file: mode ``---------T``); gluster's ``IS_DHT_MIGRATION_PHASE1/2``."""
    if stat is None or not st.S_ISREG(stat.mode):
        return 0
    if stat.mode & 0o7777 == st.S_ISVTX:
        return 2
    if stat.mode & st.S_ISVTX and stat.mode & st.S_ISGID:
        return 1
    return 0


def strip_phase1(*stats: Iatt | None) -> None:
    """Hide rebalance's phase-1 mode bits from the application (``DHT_STRIP_PHASE1_FLAGS``)."""
    for s in stats:
        if migration_phase(s) == 1:
            assert s is not None
            s.mode &= ~(st.S_ISVTX | st.S_ISGID)


def merge_dir_times(base: Iatt, others: Sequence[Iatt]) -> None:
    """Give ``base`` the latest a/m/ctime of all copies of a directory."""
    for o in others:
        for f in ("atime", "mtime", "ctime"):
            if (getattr(o, f), getattr(o, f + "_nsec")) > (getattr(base, f), getattr(base, f + "_nsec")):
                setattr(base, f, getattr(o, f))
                setattr(base, f + "_nsec", getattr(o, f + "_nsec"))


@dataclass
class _DhtFd:
    gfid: bytes
    is_dir: bool
    #: file: (subvolume, its handle); dir: one handle per subvolume
    handles: list[int | None]
    sub: int = 0
    #: the open flags (a file rebalance moves is opened again where its data goes)
    flags: int = 0
    #: held while the fd is opened on a migration's destination
    lock: trio.Lock = field(default_factory=trio.Lock)
    #: (source, destination) of a migration in phase 1 seen by a write
    mig: tuple[int, int] | None = None
    #: directory streams: our offset → (subvolume index, that subvolume's offset)
    cookies: dict[int, tuple[int, int]] = field(default_factory=dict)
    next_cookie: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


@dataclass(frozen=True)
class _Lk:
    """One of DHT's internal locks: an inodelk (``name`` None) or an entrylk, on subvolume ``sub``."""

    sub: int
    gfid: bytes
    domain: str
    name: str | None = None
    type: int = F.WRLCK
    #: skipped if its inode is gone (an existing rename destination may be removed meanwhile)
    optional: bool = False


class Distribute(Fops):
    """The fop interface over subvolumes that each hold a part of every directory's names."""

    def __init__(self, name: str, children: Sequence[Subvolume], *, lookup_optimize: bool = True) -> None:
        self.name = name
        self.children = list(children)
        self._names = {c.name: i for i, c in enumerate(self.children)}
        self._layouts: BoundedDict[bytes, list[Range | None]] = BoundedDict(20_000)
        self._layout_read: BoundedDict[bytes, float] = BoundedDict(20_000)
        #: as gluster's lookup-optimize (on by default): a name missing on its hashed subvolume is missing,
        #: when the parent's layout carries the volume's commit hash (no rebalance since it was written)
        self.lookup_optimize = lookup_optimize
        self._vol_commit: tuple[int | None, float] = (None, -1e9)
        #: gfid → subvolume holding the data (files); directories are everywhere
        self._where: BoundedDict[bytes, int] = BoundedDict()
        #: (parent, name) → (subvolume, when) of recent file lookups, to skip a second lookup on unlink
        self._recent: BoundedDict[tuple[bytes, str], tuple[int, float]] = BoundedDict(10_000)
        #: gfids known to be directories (they live on every subvolume)
        self._dirs: set[bytes] = {ROOT_GFID}
        self._fds: Handles[_DhtFd] = Handles(name)
        self.commit_hash = 0

    def __repr__(self) -> str:
        return f"<Distribute {self.name} {len(self.children)} subvolumes>"

    @property
    def is_up(self) -> bool:
        return any(c.is_up for c in self.children)

    # ------------------------------------------------------------ layout

    async def layout(self, dir_gfid: bytes, refresh: bool = False) -> list[Range | None]:
        if len(self.children) == 1:
            return [Range(0, 0, 0, 0xFFFFFFFF)]
        now = trio.current_time()
        if not refresh and dir_gfid in self._layouts and now - self._layout_read.get(dir_gfid, -1e9) < LAYOUT_TTL:
            return self._layouts[dir_gfid]
        ranges, res = await self._read_layout(dir_gfid)
        self._layout_read[dir_gfid] = now
        if all(x is None for x in ranges):
            errs = [r for r in res if isinstance(r, OSError)]
            if errs and all(e.errno == errno.ENOENT for e in errs) and len(errs) == len(res):
                raise errs[0]
            if all(isinstance(r, Result) or r.errno == errno.ENODATA for r in res):
                ranges = await self._heal_layout(dir_gfid)
            else:
                log.warning("%s: directory %s has no layout", self.name, gfid_str(dir_gfid))
        self._layouts[dir_gfid] = ranges
        return ranges

    async def _read_layout(self, dir_gfid: bytes) -> tuple[list[Range | None], list[Result | OSError]]:
        res = await each(lambda c: c.getxattr(dir_gfid, LAYOUT_XATTR), self.children)
        ranges: list[Range | None] = []
        for r in res:
            v = r.dict.get(LAYOUT_XATTR) if isinstance(r, Result) and r.dict else None
            try:
                ranges.append(Range.decode(v) if isinstance(v, bytes) else None)
            except ValueError:
                ranges.append(None)
        return ranges, res

    async def _heal_layout(self, dir_gfid: bytes, timeout: float = 15.0) -> list[Range | None]:
        """Give a directory that has no layout anywhere (e.g. a fresh volume's root) a full one.

        Under an inode lock in DHT's layout-heal domain on every subvolume, as gluster does, so
        two clients healing at once cannot write overlapping layouts.
        """
        owner = os.urandom(8)
        cred = now_cred(lk_owner=owner)
        lock = Flock(type=F.WRLCK, start=0, len=0, owner=owner)
        unlock = Flock(type=F.UNLCK, start=0, len=0, owner=owner)
        locked: list[int] = []
        try:
            with trio.fail_after(timeout):
                while True:
                    res = await each(lambda c: c.inodelk(dir_gfid, LAYOUT_HEAL_DOMAIN, F.SETLK, lock, cred=cred),
                                     self.children)
                    locked = [i for i, r in enumerate(res) if isinstance(r, Result)]
                    if len(locked) == len(self.children):
                        break
                    await each(lambda i: self.children[i].inodelk(dir_gfid, LAYOUT_HEAL_DOMAIN, F.SETLK, unlock,
                                                                  cred=cred), locked)
                    locked = []
                    if not all(isinstance(r, Result) or r.errno == errno.EAGAIN for r in res):
                        raise _pick_error(res)
                    await trio.sleep(0.1 + random.random() * 0.2)
            ranges, res = await self._read_layout(dir_gfid)
            if all(x is None for x in ranges):
                # a directory that existed without a layout (a volume's root, a directory made while the volume
                # had one brick) may hold names anywhere: as gluster's self-heal, the layout gets a commit hash
                # that matches no volume's, so lookup-optimize never trusts a miss in it
                layout = self._layout_for(dir_gfid, "", LAYOUT_HASH_INVALID)
                out = await each(lambda i: self._set_layout(i, dir_gfid, layout[i]), range(len(self.children)))
                ranges = [layout[i] if isinstance(r, Result) else None for i, r in enumerate(out)]
                log.info("%s: wrote a layout for directory %s", self.name, gfid_str(dir_gfid))
            return ranges
        except trio.TooSlowError:
            raise OSError(errno.EIO, f"{self.name}: could not lock {gfid_str(dir_gfid)} to heal its layout") from None
        finally:
            with trio.CancelScope(shield=True):
                await each(lambda i: self.children[i].inodelk(dir_gfid, LAYOUT_HEAL_DOMAIN, F.SETLK, unlock,
                                                              cred=cred), locked)

    async def hashed(self, pargfid: bytes, name: str) -> int:
        ranges = await self.layout(pargfid)
        h = name_hash(name)
        for i, r in enumerate(ranges):
            if r is not None and r.holds(h):
                return i
        ranges = await self.layout(pargfid, refresh=True)
        for i, r in enumerate(ranges):
            if r is not None and r.holds(h):
                return i
        raise OSError(errno.EIO, f"{self.name}: no subvolume holds hash {h:#x} of {name!r} "
                                 f"(layout of {gfid_str(pargfid)} has a hole)")

    async def volume_commit_hash(self) -> int | None:
        """The commit hash of the volume (0 before any rebalance); None if it cannot be read."""
        value, when = self._vol_commit
        if trio.current_time() - when < COMMIT_TTL:
            return value
        try:
            r = await self.children[0].getxattr(ROOT_GFID, COMMITHASH_XATTR)
            v = (r.dict or {}).get(COMMITHASH_XATTR)
            value = int.from_bytes(v[:4], "big") if isinstance(v, bytes) and len(v) >= 4 else 0
        except OSError as e:
            value = 0 if e.errno in (errno.ENODATA, errno.ENOTSUP) else None  # never rebalanced: 0
        self._vol_commit = (value, trio.current_time())
        if value is not None:
            self.commit_hash = value
        return value

    async def _miss_is_final(self, pargfid: bytes) -> bool:
        """lookup-optimize: the hashed subvolume's ENOENT settles it if the parent's layout is current."""
        if not self.lookup_optimize:
            return False
        vch = await self.volume_commit_hash()
        ranges = await self.layout(pargfid)
        return vch is not None and all(r is not None and r.commit_hash == vch for r in ranges)

    def _layout_for(self, gfid: bytes, path_hint: str, commit_hash: int | None = None) -> list[Range]:
        start = name_hash(path_hint or gfid_str(gfid)) % len(self.children)
        return new_layout(len(self.children), start, self.commit_hash if commit_hash is None else commit_hash)

    # ------------------------------------------------------------ lookup

    def _xdata(self, xdata: Dict | None) -> Dict:
        out: Dict = dict(xdata or {})
        out[LINKTO_XATTR] = UInt(256)
        return out

    async def _where_is(self, gfid: bytes) -> int | None:
        """Subvolume of a file (None for a directory); a nameless lookup everywhere when unknown."""
        if len(self.children) == 1:
            return 0
        if gfid in self._dirs:
            return None
        if gfid in self._where:
            return self._where[gfid]
        res = await each(lambda c: c.lookup_gfid(gfid, self._xdata(None)), self.children)
        found = [(i, r) for i, r in enumerate(res) if isinstance(r, Result) and r.stat is not None
                 and not is_linkto(r.stat, r.xdata)]
        if not found:
            raise _pick_error(res)
        if attrs(found[0][1]).is_dir:
            self._remember_dir(gfid)
            return None
        self._where[gfid] = found[0][0]
        return found[0][0]

    async def lookup(self, pargfid: bytes, name: str, xdata: Dict | None = None, *, gfid: bytes = NULL_GFID,
                     cred: Credential | None = None) -> Result:
        r = await self._lookup(pargfid, name, xdata, gfid=gfid, cred=cred)
        strip_phase1(r.stat)
        return r

    async def _lookup(self, pargfid: bytes, name: str, xdata: Dict | None = None, *, gfid: bytes = NULL_GFID,
                      cred: Credential | None = None) -> Result:
        if not name:
            return await self.lookup_gfid(gfid, xdata, cred)
        x = self._xdata(xdata)
        if len(self.children) == 1:
            r = await self.children[0].lookup(pargfid, name, x, cred=cred)
            return r
        h = await self.hashed(pargfid, name)
        try:
            r = await self.children[h].lookup(pargfid, name, x, cred=cred)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            if await self._miss_is_final(pargfid):
                raise
            return await self._lookup_everywhere(pargfid, name, x, cred)
        st_ = attrs(r)
        if st_.is_dir:
            self._where.pop(st_.gfid, None)
            self._remember_dir(st_.gfid)
            others = [i for i in range(len(self.children)) if i != h]
            res = await each(lambda i: self.children[i].lookup(pargfid, name, x, cred=cred), others)
            merge_dir_times(st_, [y.stat for y in res if isinstance(y, Result) and y.stat is not None])
            return r
        if is_linkto(r.stat, r.xdata):
            target = self._linkto_target(r.xdata)
            if target is None:
                return await self._lookup_everywhere(pargfid, name, x, cred)
            try:
                t = await self.children[target].lookup(pargfid, name, x, cred=cred)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
                return await self._lookup_everywhere(pargfid, name, x, cred)
            self._where[attrs(t).gfid] = target
            self._recent[(pargfid, name)] = (target, trio.current_time())
            return t
        self._where[st_.gfid] = h
        self._recent[(pargfid, name)] = (h, trio.current_time())
        return r

    def _remember_dir(self, gfid: bytes) -> None:
        if len(self._dirs) > 100_000:
            self._dirs = {ROOT_GFID}
        self._dirs.add(gfid)

    def _linkto_target(self, xdata: Dict | None) -> int | None:
        v = (xdata or {}).get(LINKTO_XATTR)
        if isinstance(v, bytes):
            v = v.rstrip(b"\0").decode(errors="replace")
        return self._names.get(v) if isinstance(v, str) else None

    async def _lookup_everywhere(self, pargfid: bytes, name: str, x: Dict, cred: Credential | None) -> Result:
        res = await each(lambda c: c.lookup(pargfid, name, x, cred=cred), self.children)
        for i, r in enumerate(res):
            if isinstance(r, Result) and r.stat is not None and not is_linkto(r.stat, r.xdata):
                if r.stat.is_dir:
                    self._remember_dir(r.stat.gfid)
                else:
                    self._where[r.stat.gfid] = i
                return r
        errs = [r for r in res if isinstance(r, OSError)]
        if errs and all(e.errno == errno.ENOENT for e in errs):
            raise errs[0]
        if any(isinstance(r, Result) for r in res):
            raise OSError(errno.ENOENT, f"{name}: only a stale linkto file exists")
        raise _pick_error(res)

    async def lookup_gfid(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        i = await self._where_is(gfid)
        return await self.children[0 if i is None else i].lookup_gfid(gfid, self._xdata(xdata), cred=cred)

    # ------------------------------------------------------------ inode ops

    async def _on_inode(self, gfid: bytes, call: Callable[[Subvolume], Awaitable[Result]]) -> Result:
        i = await self._where_is(gfid)
        return await call(self.children[0 if i is None else i])

    async def _on_file(self, gfid: bytes, i: int, call: Callable[[Subvolume], Awaitable[Result]],
                       stat_of: Callable[[Result], Iatt | None]) -> Result:
        """A fop on file ``gfid`` thought to be on subvolume ``i``: if rebalance moved it meanwhile (the
        inode is gone there, or is a migration's source in phase 2), once more where it is now."""
        try:
            r = await call(self.children[i])
            moved = migration_phase(stat_of(r)) == 2 and await self._linkto_of_gfid(i, gfid) not in (None, i)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ESTALE):
                raise
            moved, r = True, None
        if moved:
            self._where.pop(gfid, None)
            j = await self._where_is(gfid)
            if j is not None and j != i:
                r = await call(self.children[j])
            elif r is None:
                raise OSError(errno.ENOENT, f"{self.name}: {gfid_str(gfid)} is gone")
        assert r is not None
        strip_phase1(r.stat, r.pre, r.post)
        return r

    async def _on_all_dirs(self, gfid: bytes, call: Callable[[Subvolume], Awaitable[Result]]) -> Result:
        """Directory metadata changes go to every subvolume (the first answer is returned)."""
        i = await self._where_is(gfid)
        if i is not None:
            return await self._on_file(gfid, i, call, lambda r: r.post)
        res = await each(call, self.children)
        ok = [r for r in res if isinstance(r, Result)]
        if not ok:
            raise _pick_error(res)
        if len(ok) < len(res):
            log.warning("%s: directory change reached %d of %d subvolumes", self.name, len(ok), len(res))
        return ok[0]

    async def stat(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        i = await self._where_is(gfid)
        if i is not None:
            return await self._on_file(gfid, i, lambda c: c.stat(gfid, xdata, cred=cred), lambda r: r.stat)
        # a directory: every subvolume has a copy; its times are the latest of them, as gluster shows
        res = await each(lambda c: c.stat(gfid, xdata, cred=cred), self.children)
        ok = [r for r in res if isinstance(r, Result) and r.stat is not None]
        if not ok:
            raise _pick_error(res)
        merge_dir_times(attrs(ok[0]), [attrs(r) for r in ok[1:]])
        return ok[0]

    async def readlink(self, gfid: bytes, size: int = 4096, cred: Credential | None = None) -> Result:
        return await self._on_inode(gfid, lambda c: c.readlink(gfid, size, cred=cred))

    async def access(self, gfid: bytes, mask: int, cred: Credential | None = None) -> Result:
        return await self._on_inode(gfid, lambda c: c.access(gfid, mask, cred=cred))

    async def getxattr(self, gfid: bytes, name: str = "", xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self._on_inode(gfid, lambda c: c.getxattr(gfid, name, xdata, cred=cred))

    async def setattr(self, gfid: bytes, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        return await self._on_all_dirs(gfid, lambda c: c.setattr(gfid, stbuf, valid, xdata, cred=cred))

    async def setxattr(self, gfid: bytes, d: Dict, flags: int = 0, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self._on_all_dirs(gfid, lambda c: c.setxattr(gfid, d, flags, xdata, cred=cred))

    async def removexattr(self, gfid: bytes, name: str, xdata: Dict | None = None,
                          cred: Credential | None = None) -> Result:
        return await self._on_all_dirs(gfid, lambda c: c.removexattr(gfid, name, xdata, cred=cred))

    async def truncate(self, gfid: bytes, size: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        i = await self._where_is(gfid)
        if i is None:
            return await self.children[0].truncate(gfid, size, xdata, cred=cred)
        return await self._on_file(gfid, i, lambda c: c.truncate(gfid, size, xdata, cred=cred), lambda r: r.post)

    async def statfs(self, gfid: bytes = ROOT_GFID, xdata: Dict | None = None) -> Result:
        res = await each(lambda c: c.statfs(gfid, xdata), self.children)
        ok = [r for r in res if isinstance(r, Result)]
        if not ok:
            raise _pick_error(res)
        first = ok[0]
        if len(ok) > 1 and first.statfs is not None:
            s = first.statfs
            for r in ok[1:]:
                o = r.statfs
                if o is None:
                    continue
                # sum in units of the first subvolume's fragment size
                ratio = o.frsize / s.frsize if s.frsize else 1
                s.blocks += int(o.blocks * ratio)
                s.bfree += int(o.bfree * ratio)
                s.bavail += int(o.bavail * ratio)
                s.files += o.files
                s.ffree += o.ffree
                s.favail += o.favail
        return first

    # ------------------------------------------------------------ entry ops

    async def _create_on_hashed(self, pargfid: bytes, name: str,
                                call: Callable[[Subvolume], Awaitable[Result]]) -> tuple[int, Result]:
        h = await self.hashed(pargfid, name)
        r = await call(self.children[h])
        if r.stat is not None:
            self._where[r.stat.gfid] = h
        return h, r

    async def mknod(self, pargfid: bytes, name: str, mode: int, rdev: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return (await self._create_on_hashed(pargfid, name, lambda c: c.mknod(
            pargfid, name, mode, rdev, gfid, umask, xdata, cred=cred)))[1]

    async def symlink(self, pargfid: bytes, name: str, target: str, gfid: bytes, umask: int = 0,
                      xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return (await self._create_on_hashed(pargfid, name, lambda c: c.symlink(
            pargfid, name, target, gfid, umask, xdata, cred=cred)))[1]

    async def create(self, pargfid: bytes, name: str, flags: int, mode: int, gfid: bytes, umask: int = 0,
                     xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        h, r = await self._create_on_hashed(pargfid, name, lambda c: c.create(
            pargfid, name, flags, mode, gfid, umask, xdata, cred=cred))
        handles: list[int | None] = [None] * len(self.children)
        handles[h] = r.fd
        return self._fds.adopt(r, _DhtFd(gfid, False, handles, h, flags=flags))

    async def mkdir(self, pargfid: bytes, name: str, mode: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        """On the hashed subvolume first (it decides EEXIST), then everywhere else, then the layout."""
        if len(self.children) == 1:
            r = await self.children[0].mkdir(pargfid, name, mode, gfid, umask, xdata, cred=cred)
            await self._set_layout(0, gfid, Range(self.commit_hash, 0, 0, 0xFFFFFFFF))
            return r
        h = await self.hashed(pargfid, name)
        r = await self.children[h].mkdir(pargfid, name, mode, gfid, umask, xdata, cred=cred)
        others = [i for i in range(len(self.children)) if i != h]
        res = await each(lambda i: self.children[i].mkdir(pargfid, name, mode, gfid, umask, xdata, cred=cred),
                         others)
        for i, x in zip(others, res):
            if isinstance(x, OSError) and x.errno != errno.EEXIST:
                log.warning("%s: mkdir %s on %s failed: %s", self.name, name, self.children[i].name, x)
        self._remember_dir(gfid)
        layout = self._layout_for(gfid, name)
        await each(lambda i: self._set_layout(i, gfid, layout[i]), range(len(self.children)))
        self._layouts[gfid] = list(layout)
        return r

    async def _set_layout(self, i: int, gfid: bytes, r: Range) -> Result:
        return await self.children[i].setxattr(gfid, {LAYOUT_XATTR: r.encode()})

    async def _unlink_linkto(self, pargfid: bytes, name: str, keep: int, cred: Credential | None) -> None:
        """Remove a stale linkto of ``name`` on its hashed subvolume if that is not where the data is."""
        if len(self.children) == 1:
            return
        try:
            h = await self.hashed(pargfid, name)
        except OSError:
            return
        if h == keep:
            return
        try:
            r = await self.children[h].lookup(pargfid, name, self._xdata(None), cred=cred)
            if is_linkto(r.stat, r.xdata):
                await self.children[h].unlink(pargfid, name, cred=cred)
        except OSError:
            pass

    async def unlink(self, pargfid: bytes, name: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        if len(self.children) == 1:
            return await self.children[0].unlink(pargfid, name, xdata, cred=cred)
        hit = self._recent.pop((pargfid, name), None)
        r: Result | None = None
        if hit is not None and trio.current_time() - hit[1] < RECENT_TTL:
            i = hit[0]  # the kernel looked this name up just before unlinking it
            try:
                r = await self.children[i].unlink(pargfid, name, xdata, cred=cred)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise  # moved meanwhile: find it again below
        if r is None:
            r0 = await self.lookup(pargfid, name, cred=cred)
            i = self._where.get(attrs(r0).gfid, 0)
            self._recent.pop((pargfid, name), None)
            r = await self.children[i].unlink(pargfid, name, xdata, cred=cred)
        await self._unlink_linkto(pargfid, name, i, cred)
        return r

    async def rmdir(self, pargfid: bytes, name: str, flags: int = 0, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        if len(self.children) == 1:
            return await self.children[0].rmdir(pargfid, name, flags, xdata, cred=cred)
        d = await self.lookup(pargfid, name, cred=cred)
        if not attrs(d).is_dir:
            raise OSError(errno.ENOTDIR, name)
        # refuse before removing anything if any copy holds real entries; linkto files left in it are
        # stale then (their data would be an entry somewhere) and go first, as gluster's dht_rmdir does
        dg = attrs(d).gfid
        listed = [await self._dir_entries(c, dg) for c in self.children]
        if any(real for real, _ in listed):
            raise OSError(errno.ENOTEMPTY, f"{name}: directory not empty")
        for i, (_, links) in enumerate(listed):
            for ln in links:
                await self._drop(i, dg, ln, None, "stale linkto")
        h = await self.hashed(pargfid, name)
        others = [i for i in range(len(self.children)) if i != h]
        res = await each(lambda i: self.children[i].rmdir(pargfid, name, flags, xdata, cred=cred), others)
        bad = [r for r in res if isinstance(r, OSError) and r.errno != errno.ENOENT]
        if bad:
            raise bad[0]
        r = await self.children[h].rmdir(pargfid, name, flags, xdata, cred=cred)
        self._layouts.pop(attrs(d).gfid, None)
        return r

    async def _dir_entries(self, child: Subvolume, gfid: bytes) -> tuple[list[str], list[str]]:
        """(names of real entries, names of linkto files) in ``child``'s copy of directory ``gfid``."""
        try:
            o = await child.opendir(gfid)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return [], []
            raise
        fd = o.need_fd()
        real: list[str] = []
        links: list[str] = []
        try:
            off = 0
            while True:
                r = await child.readdirp(fd, off, READDIR_SIZE, self._xdata(None))
                if not r.entries:
                    return real, links
                for ent in r.entries:
                    if ent.name in (".", ".."):
                        continue
                    (links if is_linkto(ent.stat, ent.xdata) else real).append(ent.name)
                off = r.entries[-1].off
        finally:
            await child.release(fd)

    async def _has_entries(self, child: Subvolume, gfid: bytes) -> bool:
        return bool((await self._dir_entries(child, gfid))[0])

    async def link(self, gfid: bytes, newpar: bytes, newname: str, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        """As gluster's ``dht_link``: the new name is a hard link on the subvolume holding the data; if the
        name hashes elsewhere, a linkto file there is made first (none made: nothing done), removed
        again if the link fails. Linkto files of one inode's names are hard links on their brick."""
        if len(self.children) == 1:
            return await self.children[0].link(gfid, newpar, newname, xdata, cred=cred)
        i = await self._where_is(gfid)
        if i is None:
            raise OSError(errno.EPERM, f"{newname}: hard link to a directory")
        h = await self.hashed(newpar, newname)
        made = False
        if h != i:
            made = await self._create_linkto(h, newpar, newname, gfid, i, force=False)
        try:
            r = await self.children[i].link(gfid, newpar, newname, xdata, cred=cred)
        except OSError:
            if made:
                await self._drop(h, newpar, newname, gfid, "linkto")
            raise
        if migration_phase(r.stat):
            # rebalance is moving the file: the name must exist where the data will be, too
            t = await self._linkto_of_gfid(i, gfid)
            if t is not None and t != i:
                try:
                    await self.children[t].link(gfid, newpar, newname, xdata, cred=None)
                except OSError as e:
                    if e.errno != errno.EEXIST:
                        log.warning("%s: link %s on the migration target %s: %s", self.name, newname,
                                    self.children[t].name, e)
        strip_phase1(r.stat)
        self._recent[(newpar, newname)] = (i, trio.current_time())
        return r

    # ------------------------------------------------------------ linkto files, DHT's locks

    def _linkto_value(self, target: int) -> bytes:
        return self.children[target].name.encode() + b"\0"

    async def _create_linkto(self, on: int, pargfid: bytes, name: str, gfid: bytes, target: int, *,
                             force: bool) -> bool:
        """Make ``name`` on subvolume ``on`` a linkto of ``gfid`` whose data is on ``target``.

        True if this call made it, False if a linkto of that inode was there already (pointed at
        ``target`` if it pointed elsewhere). A linkto of another inode there is replaced if ``force``
        (the name does not hash to ``on`` for the caller, or the caller holds its lock and knows
        better) or if it is stale (its target holds no such name of its inode); anything else is
        EEXIST. Every failure is raised: the callers abort before the name appears anywhere else.
        """
        c = self.children[on]
        for attempt in range(2):
            try:
                await c.mknod(pargfid, name, LINKTO_MODE, 0, gfid, 0,
                              {LINKTO_XATTR: self._linkto_value(target), INTERNAL_FOP_KEY: "yes"}, cred=None)
                return True
            except OSError as e:
                if e.errno != errno.EEXIST or attempt:
                    raise
            r = await c.lookup(pargfid, name, self._xdata(None))
            cur = attrs(r)
            if not is_linkto(cur, r.xdata):
                raise OSError(errno.EEXIST, f"{self.name}: {name!r} exists on {c.name}")
            if cur.gfid == gfid:
                if self._linkto_target(r.xdata) != target:
                    await c.setxattr(gfid, {LINKTO_XATTR: self._linkto_value(target)})
                return False
            if not force and not await self._linkto_is_stale(pargfid, name, cur.gfid, r.xdata):
                raise OSError(errno.EEXIST, f"{self.name}: {name!r} exists (a linkto on {c.name})")
            log.info("%s: replacing a stale linkto %r on %s", self.name, name, c.name)
            await c.unlink(pargfid, name, cred=None)
        raise AssertionError("not reached")

    async def _linkto_is_stale(self, pargfid: bytes, name: str, gfid: bytes, xdata: Dict | None) -> bool:
        """A linkto file whose target has no data file of that name and inode (a subvolume this graph does
        not know is never called stale)."""
        t = self._linkto_target(xdata)
        if t is None:
            return False
        try:
            r = await self.children[t].lookup(pargfid, name, self._xdata(None))
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ESTALE):
                return True
            raise
        return is_linkto(r.stat, r.xdata) or attrs(r).gfid != gfid

    async def _linkto_of_gfid(self, sub: int, gfid: bytes) -> int | None:
        """The subvolume the linkto xattr of ``gfid``'s inode on ``sub`` names (rebalance's target)."""
        try:
            r = await self.children[sub].getxattr(gfid, LINKTO_XATTR)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOENT, errno.ESTALE, errno.EOPNOTSUPP):
                return None
            raise
        return self._linkto_target(r.dict)

    async def _drop(self, on: int, pargfid: bytes, name: str, gfid: bytes | None, what: str) -> bool:
        """Remove ``name`` on subvolume ``on`` if it still names ``gfid``: undoing a step of a failed rename
        or link, or a leftover of one done. Never raises (logged): a stale linkto only costs lookups
        (rebalance removes it), a stale data name is reported."""
        c = self.children[on]
        with trio.CancelScope(shield=True):
            try:
                if gfid is not None:
                    r = await c.lookup(pargfid, name, self._xdata(None))
                    if attrs(r).gfid != gfid:
                        return False
                await c.unlink(pargfid, name, cred=None)
                return True
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ESTALE):
                    log.warning("%s: could not remove the %s %r on %s: %s", self.name, what, name, c.name, e)
                return False
        return False  # not reached: a shielded scope without a deadline is never cancelled

    async def _lock_one(self, lk: _Lk, cred: Credential, take: bool) -> None:
        c = self.children[lk.sub]
        if lk.name is None:
            fl = Flock(type=lk.type if take else F.UNLCK, start=0, len=0, owner=cred.lk_owner)
            await c.inodelk(lk.gfid, lk.domain, F.SETLK, fl, cred=cred)
        else:
            await c.entrylk(lk.gfid, lk.domain, lk.name, F.ENTRYLK_LOCK_NB if take else F.ENTRYLK_UNLOCK,
                            lk.type, cred=cred)

    async def _release(self, held: Sequence[_Lk], cred: Credential) -> None:
        with trio.CancelScope(shield=True):
            for lk in reversed(held):
                try:
                    await self._lock_one(lk, cred, False)
                except OSError as e:
                    log.debug("%s: unlock %s on %s: %s", self.name, lk, self.children[lk.sub].name, e)

    async def _take(self, locks: Sequence[_Lk], cred: Credential, timeout: float) -> list[_Lk]:
        """Every lock of ``locks``, in order, none of them blocking: on contention all held ones are
        released and, after a random pause, taken again from the first (so no order of other clients',
        native ones included, can deadlock with ours). An optional lock whose inode is gone is skipped."""
        delay = 0.02
        deadline = trio.current_time() + timeout
        while True:
            held: list[_Lk] = []
            failed: OSError | None = None
            for lk in locks:
                try:
                    await self._lock_one(lk, cred, True)
                except OSError as e:
                    if lk.optional and e.errno in (errno.ENOENT, errno.ESTALE):
                        continue
                    await self._release([lk], cred)  # a replicate child may hold it on some replicas
                    failed = e
                    break
                held.append(lk)
            if failed is None:
                return held
            await self._release(held, cred)
            if failed.errno != errno.EAGAIN:
                raise failed
            if trio.current_time() + delay > deadline:
                raise OSError(errno.EBUSY, f"{self.name}: locks held by another client for {timeout:g} s")
            await trio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)

    # ------------------------------------------------------------ rename

    async def rename(self, oldpar: bytes, oldname: str, newpar: bytes, newname: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        if len(self.children) == 1:
            return await self.children[0].rename(oldpar, oldname, newpar, newname, xdata, cred=cred)
        self._recent.pop((oldpar, oldname), None)
        self._recent.pop((newpar, newname), None)
        src = await self.lookup(oldpar, oldname, cred=cred)
        if attrs(src).is_dir:
            return await self._rename_dir(attrs(src).gfid, oldpar, oldname, newpar, newname, xdata, cred)
        for _ in range(3):
            done = await self._rename_file(attrs(src).gfid, oldpar, oldname, newpar, newname, xdata, cred)
            if done is not None:
                return done
            # moved between the lookup and the locks (rebalance, another client): look again
            self._where.pop(attrs(src).gfid, None)
            src = await self.lookup(oldpar, oldname, cred=cred)
            if attrs(src).is_dir:
                raise OSError(errno.ENOENT, f"{oldname}: replaced by a directory during the rename")
        raise OSError(errno.ENOENT, f"{oldname}: keeps moving between subvolumes")

    def _namespace_locks(self, names: Sequence[tuple[int, bytes, str]]) -> list[_Lk]:
        """DHT's ``dht_protect_namespace`` for each (hashed subvolume, parent, name): a read lock on the
        parent in ``dht.layout.heal`` and an entry lock on the name in ``dht.entry.sync``, in gluster's
        order (subvolume name, then parent gfid and name)."""
        locks: list[_Lk] = []
        for _, _, sub, par, nm in sorted((self.children[sub].name, gfid_str(par) + nm, sub, par, nm)
                                         for sub, par, nm in names):
            lk = _Lk(sub, par, LAYOUT_HEAL_DOMAIN, type=F.RDLCK)
            if lk not in locks:
                locks.append(lk)
            locks.append(_Lk(sub, par, ENTRY_SYNC_DOMAIN, nm, F.ENTRYLK_WRLCK))
        return locks

    async def _rename_dir(self, sg: bytes, oldpar: bytes, oldname: str, newpar: bytes, newname: str,
                          xdata: Dict | None, cred: Credential | None) -> Result:
        """As ``dht_rename_dir``: under the namespace locks of both names, refused if an existing target
        has an entry on any subvolume (each brick sees only its own copy of it), then on the new name's
        hashed subvolume, then on every other one; a failure there is undone where it succeeded."""
        S = await self.hashed(oldpar, oldname)
        H = await self.hashed(newpar, newname)
        lcred = now_cred(lk_owner=os.urandom(8))
        held = await self._take(self._namespace_locks([(S, oldpar, oldname), (H, newpar, newname)]), lcred,
                                RENAME_LOCK_TIMEOUT)
        try:
            dst = await self._lookup_or_none(newpar, newname, cred)
            if dst is not None:
                dg = attrs(dst).gfid
                if not attrs(dst).is_dir:
                    raise OSError(errno.ENOTDIR, f"{newname}: not a directory")
                if dg == sg:
                    return Result(0, 0, stat=dst.stat)
                for c in self.children:
                    if await self._has_entries(c, dg):
                        raise OSError(errno.ENOTEMPTY, f"{newname}: directory not empty")
            with trio.CancelScope(shield=True):
                r = await self.children[H].rename(oldpar, oldname, newpar, newname, xdata, cred=cred)
                others = [i for i in range(len(self.children)) if i != H]
                res = await each(lambda i: self.children[i].rename(oldpar, oldname, newpar, newname, xdata,
                                                                   cred=cred), others)
                bad = [(i, x) for i, x in zip(others, res) if isinstance(x, OSError) and x.errno != errno.ENOENT]
                if bad:
                    done = [H] + [i for i, x in zip(others, res) if isinstance(x, Result)]
                    log.warning("%s: rename of directory %r failed on %s (%s): undone on %s", self.name, oldname,
                                self.children[bad[0][0]].name, bad[0][1], [self.children[i].name for i in done])
                    await each(lambda i: self.children[i].rename(newpar, newname, oldpar, oldname, cred=cred), done)
                    raise bad[0][1]
                for i, x in zip(others, res):
                    if isinstance(x, OSError):
                        log.info("%s: directory %r is not on %s: not renamed there", self.name, oldname,
                                 self.children[i].name)
            return r
        finally:
            await self._release(held, lcred)

    async def _lookup_or_none(self, pargfid: bytes, name: str, cred: Credential | None) -> Result | None:
        try:
            return await self.lookup(pargfid, name, cred=cred)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise

    async def _rename_file(self, sg: bytes, oldpar: bytes, oldname: str, newpar: bytes, newname: str,
                           xdata: Dict | None, cred: Credential | None) -> Result | None:
        """One attempt of a file rename under gluster DHT's locks; None if the file moved meanwhile.

        The locks (``dht_rename_lock``): the data inode of the source and of an existing destination in
        ``dht.file.migrate`` (rebalance takes it to migrate a file), and for each of the two names a read
        lock on its parent in ``dht.layout.heal`` and an entry lock in ``dht.entry.sync``, on the
        name's hashed subvolume.
        """
        c_ = await self._where_is(sg)
        if c_ is None:
            return None
        C = c_
        S = await self.hashed(oldpar, oldname)
        H = await self.hashed(newpar, newname)
        dst = await self._lookup_or_none(newpar, newname, cred)
        if dst is not None and attrs(dst).is_dir:
            raise OSError(errno.EISDIR, f"{newname}: is a directory")
        dg = attrs(dst).gfid if dst is not None else None
        D = self._where.get(dg) if dg is not None else None
        owner = os.urandom(8)
        lcred = now_cred(lk_owner=owner)
        locks = [_Lk(C, sg, FILE_MIGRATE_DOMAIN)]
        if dg is not None and D is not None and dg != sg:
            locks.append(_Lk(D, dg, FILE_MIGRATE_DOMAIN, optional=True))
        locks += self._namespace_locks([(S, oldpar, oldname), (H, newpar, newname)])
        held = await self._take(locks, lcred, RENAME_LOCK_TIMEOUT)
        try:
            # under the locks: the data is still on C by that name (else rebalance or a rename moved it)
            try:
                chk = await self.children[C].lookup(oldpar, oldname, self._xdata(None))
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ESTALE):
                    return None
                raise
            if is_linkto(chk.stat, chk.xdata) or attrs(chk).gfid != sg:
                return None
            self._recent.pop((newpar, newname), None)
            dst = await self._lookup_or_none(newpar, newname, cred)
            if dst is not None and attrs(dst).is_dir:
                raise OSError(errno.EISDIR, f"{newname}: is a directory")
            dg = attrs(dst).gfid if dst is not None else None
            D = self._where.get(dg) if dg is not None else None
            if dg == sg:
                # two names of one file: POSIX says rename does nothing. Decided under the locks: outside
                # them, another client's rename between the two names shows both for a moment
                strip_phase1(chk.stat)
                return Result(0, 0, stat=chk.stat)
            with trio.CancelScope(shield=True):  # no half-done rename when the caller gives up
                r = await self._rename_steps(sg, S, C, H, D, dg, oldpar, oldname, newpar, newname, xdata, cred)
            if r.stat is not None and r.stat.gfid != sg:
                r.stat = chk.stat  # the reply of a linkto's rename describes the linkto
            strip_phase1(r.stat)
            self._recent.pop((oldpar, oldname), None)
            self._recent.pop((newpar, newname), None)
            return r
        finally:
            await self._release(held, lcred)

    async def _rename_steps(self, sg: bytes, S: int, C: int, H: int, D: int | None, dg: bytes | None,
                            oldpar: bytes, oldname: str, newpar: bytes, newname: str, xdata: Dict | None,
                            cred: Credential | None) -> Result:
        """The rename of a file whose old name hashes to S, new name to H, data on C (an existing
        destination's on D), in an order where every failure before the new name is visible undoes
        what was done and is returned, and every moment after it finds the new name (lookup-optimize
        included: it looks only on H):

        - the name ``oldname`` on H is made a linkto to C first (it is one already if S is H);
        - if the destination's data is elsewhere than C (or there is none): ``newname`` becomes a hard
          link on C, then the rename on H turns the linkto (or the data, if C is H) into ``newname``,
          atomically replacing what H had by that name: from then on the new name is found;
        - if it is on C as well: the rename on C replaces its data, then the rename on H replaces its
          linkto (until then that linkto leads to C, where the name now is the renamed file);
        - then the leftovers go: the old name on C, the old linkto on S, the replaced data on D.
        """
        kid = self.children
        made = False
        if H != C:
            made = await self._create_linkto(H, oldpar, oldname, sg, C, force=True)
        if D is not None and D == C:
            try:
                r = await kid[C].rename(oldpar, oldname, newpar, newname, xdata, cred=cred)
            except OSError:
                if made:
                    await self._drop(H, oldpar, oldname, sg, "new linkto")
                raise
            if H != C:
                try:
                    await kid[H].rename(oldpar, oldname, newpar, newname, cred=None)
                except OSError as e:
                    log.warning("%s: rename of the linkto %r on %s: %s (the old one still leads to %s)",
                                self.name, newname, kid[H].name, e, kid[C].name)
                    await self._drop(H, oldpar, oldname, sg, "linkto")
        else:
            added = False
            if H != C:
                try:
                    added = await self._link_on(C, sg, newpar, newname, cred)
                except OSError:
                    if made:
                        await self._drop(H, oldpar, oldname, sg, "new linkto")
                    raise
            try:
                r = await kid[H].rename(oldpar, oldname, newpar, newname, xdata,
                                        cred=cred if H == C else None)
            except OSError:
                if added:
                    await self._drop(C, newpar, newname, sg, "new link")
                if made:
                    await self._drop(H, oldpar, oldname, sg, "new linkto")
                raise
            if H != C:
                await self._drop(C, oldpar, oldname, sg, "old name")
            if D is not None and D != H:
                await self._drop(D, newpar, newname, dg, "replaced file")
        if S != H and S != C:
            await self._drop(S, oldpar, oldname, sg, "old linkto")
        return r

    async def _link_on(self, sub: int, gfid: bytes, newpar: bytes, newname: str, cred: Credential | None) -> bool:
        """A hard link ``newname`` of ``gfid`` on subvolume ``sub`` (a stale linkto by that name there is
        replaced: the name does not hash to ``sub``). True if made, False if it was a name of it already."""
        c = self.children[sub]
        for attempt in range(2):
            try:
                await c.link(gfid, newpar, newname, cred=cred)
                return True
            except OSError as e:
                if e.errno != errno.EEXIST or attempt:
                    raise
            r = await c.lookup(newpar, newname, self._xdata(None))
            linkto = is_linkto(r.stat, r.xdata)
            if not linkto and attrs(r).gfid == gfid:
                return False
            if not linkto:
                raise OSError(errno.EEXIST, f"{self.name}: {newname!r} exists on {c.name}")
            await c.unlink(newpar, newname, cred=None)
        raise AssertionError("not reached")

    # ------------------------------------------------------------ fds

    def _fd(self, handle: int) -> _DhtFd:
        return self._fds.get(handle)

    async def open(self, gfid: bytes, flags: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        i = await self._where_is(gfid)
        sub = 0 if i is None else i
        r = await self.children[sub].open(gfid, flags, xdata, cred=cred)
        handles: list[int | None] = [None] * len(self.children)
        handles[sub] = r.fd
        return self._fds.adopt(r, _DhtFd(gfid, False, handles, sub, flags=flags))

    async def opendir(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        res = await each(lambda c: c.opendir(gfid, xdata, cred=cred), self.children)
        handles = [r.fd if isinstance(r, Result) else None for r in res]
        return self._fds.adopt(_first_ok(res), _DhtFd(gfid, True, handles))

    async def release(self, fd: int) -> None:
        dfd = self._fds.get(fd)
        self._fds.pop(fd)

        async def one(ih: tuple[int, int]) -> None:
            await self.children[ih[0]].release(ih[1])
        await each(one, [(i, h) for i, h in enumerate(dfd.handles) if h is not None])

    releasedir = release

    def _file(self, handle: int) -> tuple[Subvolume, int]:
        fd = self._fd(handle)
        h = fd.handles[fd.sub]
        if h is None:
            raise OSError(errno.EBADFD, f"{self.name}: fd {handle} not open")
        return self.children[fd.sub], h

    # A file rebalance (or remove-brick) migrates stays open here: as gluster's DHT, every data fop reads
    # the migration phase from the mode bits of its reply (dht-inode-write.c, dht-helper.c). Phase 1
    # (data being copied): a change made on the source is made on the destination too, marked so that
    # rebalance gives up on the file rather than overwrite it with older bytes. Phase 2 (copied; the
    # source is a linkto now, soon truncated and removed), or the source gone: the fd is opened where
    # the data is and the fop done again there.

    async def _fd_op(self, handle: int, call: Callable[[Subvolume, int, Dict | None], Awaitable[Result]],
                     xdata: Dict | None, *, changes: bool) -> Result:
        fd = self._fd(handle)
        if len(self.children) == 1 or fd.is_dir:
            c, h = self._file(handle)
            return await call(c, h, xdata)
        for _ in range(4):
            was = fd.sub
            c, h = self._file(handle)
            try:
                r = await call(c, h, xdata)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ESTALE) or not await self._follow(fd, was, gone=True):
                    raise
                continue
            phase = migration_phase(r.post if changes else r.stat)
            if phase == 2 and await self._follow(fd, was, gone=False):
                continue
            if phase == 1 and changes:
                dst = await self._migration_dst(fd, was)
                if dst is not None:
                    x: Dict = dict(xdata or {})
                    x[PROTECT_WRITES_KEY] = UInt(1)
                    await call(self.children[dst[0]], dst[1], x)
            strip_phase1(r.stat, r.pre, r.post)
            return r
        raise OSError(errno.EIO, f"{self.name}: {gfid_str(fd.gfid)} keeps moving between subvolumes")

    async def _linkto_on_fd(self, fd: _DhtFd, sub: int) -> int | None:
        h = fd.handles[sub]
        if h is None:
            return None
        try:
            r = await self.children[sub].fgetxattr(h, LINKTO_XATTR)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOENT, errno.ESTALE, errno.EOPNOTSUPP):
                return None
            raise
        t = self._linkto_target(r.dict)
        if t is None and (r.dict or {}).get(LINKTO_XATTR) is not None:
            # moving to a subvolume this graph has no client for (a brick added after the fd was opened:
            # open files stay on the graph they were opened on). A write acknowledged here would be lost
            # with the old copy: the application is told instead
            raise OSError(errno.EIO, f"{self.name}: {gfid_str(fd.gfid)} is migrating to a subvolume added after "
                                     f"it was opened ({(r.dict or {}).get(LINKTO_XATTR)!r}): reopen the file")
        return t

    async def _open_on(self, fd: _DhtFd, sub: int) -> int:
        h = fd.handles[sub]
        if h is None:
            # as root and without the flags that would create or truncate (gluster does the same)
            r = await self.children[sub].open(fd.gfid, fd.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
            h = fd.handles[sub] = r.need_fd()
        return h

    async def _follow(self, fd: _DhtFd, was: int, *, gone: bool) -> bool:
        """The data of ``fd``'s file left subvolume ``was``: open the fd where it is now. False if it did
        not move (a mode that only looks like phase 2, no linkto xattr) or cannot be found."""
        async with fd.lock:
            if fd.sub != was:
                return True  # another call got there first
            target = await self._linkto_on_fd(fd, was)
            if target is None and gone:
                self._where.pop(fd.gfid, None)
                try:
                    target = await self._where_is(fd.gfid)
                except OSError:
                    return False
            if target is None or target == was:
                return False
            await self._open_on(fd, target)
            log.info("%s: %s moved from %s to %s (rebalance): its fd follows", self.name, gfid_str(fd.gfid),
                     self.children[was].name, self.children[target].name)
            fd.sub = target
            fd.mig = None
            self._where[fd.gfid] = target
            return True

    async def _migration_dst(self, fd: _DhtFd, src: int) -> tuple[int, int] | None:
        """(subvolume, handle) of the destination of the phase-1 migration of ``fd``'s file from ``src``."""
        async with fd.lock:
            if fd.mig is not None and fd.mig[0] == src:
                dst = fd.mig[1]
            else:
                t = await self._linkto_on_fd(fd, src)
                if t is None or t == src:
                    return None  # the sticky and setgid bits are the user's own
                dst = t
            h = await self._open_on(fd, dst)
            if fd.mig != (src, dst):
                log.info("%s: %s is being migrated from %s to %s (rebalance): its changes go to both",
                         self.name, gfid_str(fd.gfid), self.children[src].name, self.children[dst].name)
            fd.mig = (src, dst)
            return dst, h

    async def read(self, handle: int, offset: int, size: int, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        return await self._fd_op(handle, lambda c, h, x: c.read(h, offset, size, x, cred=cred), xdata,
                                 changes=False)

    async def write(self, handle: int, offset: int, data: bytes, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        return await self._fd_op(handle, lambda c, h, x: c.write(h, offset, data, x, cred=cred), xdata,
                                 changes=True)

    async def fstat(self, handle: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        fd = self._fd(handle)
        if fd.is_dir:
            return await self.stat(fd.gfid, xdata, cred)
        return await self._fd_op(handle, lambda c, h, x: c.fstat(h, x, cred=cred), xdata, changes=False)

    async def _every_handle(self, handle: int, call: Callable[[Subvolume, int], Awaitable[Result]]) -> Result:
        """Flush/fsync: the current subvolume's answer; a migration destination written in phase 1 too."""
        fd = self._fd(handle)
        c, h = self._file(handle)
        others = [(i, x) for i, x in enumerate(fd.handles) if x is not None and i != fd.sub]
        if others:
            res = await each(lambda ih: call(self.children[ih[0]], ih[1]), others)
            for (i, _), x in zip(others, res):
                if isinstance(x, OSError) and fd.mig is not None and i == fd.mig[1]:
                    raise x
        return await call(c, h)

    async def flush(self, handle: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self._every_handle(handle, lambda c, h: c.flush(h, xdata, cred=cred))

    async def fsync(self, handle: int, datasync: bool = False, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        fd = self._fd(handle)
        if fd.is_dir:  # fsyncdir: every subvolume has the directory
            return _first_ok(await each(lambda ih: self.children[ih[0]].fsync(ih[1], datasync, xdata, cred=cred),
                                        [(i, h) for i, h in enumerate(fd.handles) if h is not None]))
        r = await self._every_handle(handle, lambda c, h: c.fsync(h, datasync, xdata, cred=cred))
        strip_phase1(r.pre, r.post)
        return r

    async def ftruncate(self, handle: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        return await self._fd_op(handle, lambda c, h, x: c.ftruncate(h, size, x, cred=cred), xdata,
                                 changes=True)

    async def fallocate(self, handle: int, mode: int, offset: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        return await self._fd_op(handle, lambda c, h, x: c.fallocate(h, mode, offset, size, x, cred=cred),
                                 xdata, changes=True)

    async def discard(self, handle: int, offset: int, size: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        return await self._fd_op(handle, lambda c, h, x: c.discard(h, offset, size, x, cred=cred), xdata,
                                 changes=True)

    async def zerofill(self, handle: int, offset: int, size: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self._fd_op(handle, lambda c, h, x: c.zerofill(h, offset, size, x, cred=cred), xdata,
                                 changes=True)

    async def fsetattr(self, handle: int, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self.setattr(self._fd(handle).gfid, stbuf, valid, xdata, cred)

    async def fgetxattr(self, handle: int, name: str = "", xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        return await self.getxattr(self._fd(handle).gfid, name, xdata, cred)

    async def fsetxattr(self, handle: int, d: Dict, flags: int = 0, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        return await self.setxattr(self._fd(handle).gfid, d, flags, xdata, cred)

    async def fremovexattr(self, handle: int, name: str, xdata: Dict | None = None,
                           cred: Credential | None = None) -> Result:
        return await self.removexattr(self._fd(handle).gfid, name, xdata, cred)

    # internal locks and xattrops of upper layers: on the subvolume of the inode (a directory's first),
    # an entry lock on the subvolume its name hashes to, as gluster's DHT does

    async def inodelk(self, gfid: bytes, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        return await self._on_inode(gfid, lambda c: c.inodelk(gfid, domain, cmd, flock, xdata, cred=cred))

    async def entrylk(self, gfid: bytes, domain: str, name: str | None, cmd: int, type_: int = F.ENTRYLK_WRLCK,
                      xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        if name and len(self.children) > 1:
            c = self.children[await self.hashed(gfid, name)]
            return await c.entrylk(gfid, domain, name, cmd, type_, xdata, cred=cred)
        return await self._on_inode(gfid, lambda c: c.entrylk(gfid, domain, name, cmd, type_, xdata, cred=cred))

    async def xattrop(self, gfid: bytes, op: int, d: Dict, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        return await self._on_inode(gfid, lambda c: c.xattrop(gfid, op, d, xdata, cred=cred))

    async def finodelk(self, handle: int, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        c, h = self._file(handle)
        return await c.finodelk(h, domain, cmd, flock, xdata, cred=cred)

    async def fentrylk(self, handle: int, domain: str, name: str | None, cmd: int, type_: int = F.ENTRYLK_WRLCK,
                       xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        fd = self._fd(handle)
        if name and fd.is_dir and len(self.children) > 1:
            return await self.entrylk(fd.gfid, domain, name, cmd, type_, xdata, cred)
        c, h = self._file(handle)
        return await c.fentrylk(h, domain, name, cmd, type_, xdata, cred=cred)

    async def fxattrop(self, handle: int, op: int, d: Dict, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        c, h = self._file(handle)
        return await c.fxattrop(h, op, d, xdata, cred=cred)

    async def lk(self, handle: int, cmd: int, flock: Flock, xdata: Dict | None = None,
                 cred: Credential | None = None) -> Result:
        c, h = self._file(handle)
        return await c.lk(h, cmd, flock, xdata, cred=cred)

    async def readdir(self, handle: int, offset: int = 0, size: int = READDIR_SIZE, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        """As readdirp (linkto files are told apart by their attributes, so gluster's DHT lists with them too)."""
        return await self.readdirp(handle, offset, size, xdata, cred)

    async def readdirp(self, handle: int, offset: int = 0, size: int = READDIR_SIZE, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        """Subvolume after subvolume; directories only from the first, linkto files hidden.

        Offsets handed out are cookies of this fd mapping to (subvolume, its offset).
        """
        fd = self._fd(handle)
        if offset == 0:
            sub, off = 0, 0
        else:
            if offset not in fd.cookies:
                raise OSError(errno.EINVAL, f"{self.name}: unknown directory offset {offset}")
            sub, off = fd.cookies[offset]
        x = self._xdata(xdata)
        while sub < len(self.children):
            h = fd.handles[sub]
            if h is None:
                sub, off = sub + 1, 0
                continue
            r = await self.children[sub].readdirp(h, off, size, x, cred=cred)
            if not r.entries:
                sub, off = sub + 1, 0
                continue
            out: list[DirEntry] = []
            for e in r.entries:
                keep = True
                if sub > 0 and (e.type == 4 or (e.stat is not None and e.stat.is_dir) or e.name in (".", "..")):
                    keep = False
                elif is_linkto(e.stat, e.xdata):
                    keep = False
                cookie = next(fd.next_cookie)
                fd.cookies[cookie] = (sub, e.off)
                if keep:
                    e.off = cookie
                    strip_phase1(e.stat)
                    out.append(e)
                elif out:
                    out[-1].off = cookie  # resume after the hidden entry
                last_cookie = cookie
            if out:
                out[-1].off = last_cookie
                r.entries = out
                return r
            # every entry of this page was hidden: continue from where the page ended
            sub, off = fd.cookies[last_cookie]
        return Result(0, 0, entries=[])
