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
#: how long a lookup's answer about where a name lives is trusted (the kernel's entry timeout)
RECENT_TTL = 1.0
#: a directory's layout is re-read after this long (another client may have fixed it: rebalance)
LAYOUT_TTL = 1.0
#: the volume's commit hash (root xattr, written when a rebalance completes), re-read after this long
COMMIT_TTL = 10.0
COMMITHASH_XATTR = "trusted.glusterfs.dht.commithash"


def is_linkto(stat: Iatt | None, xdata: Dict | None) -> bool:
    return bool(stat and st.S_ISREG(stat.mode) and (stat.mode & 0o7777) == st.S_ISVTX and stat.size == 0
                and xdata and LINKTO_XATTR in xdata)


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
    #: directory streams: our offset → (subvolume index, that subvolume's offset)
    cookies: dict[int, tuple[int, int]] = field(default_factory=dict)
    next_cookie: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


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
                layout = self._layout_for(dir_gfid, "")
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

    def _layout_for(self, gfid: bytes, path_hint: str) -> list[Range]:
        start = name_hash(path_hint or gfid_str(gfid)) % len(self.children)
        return new_layout(len(self.children), start, self.commit_hash)

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

    async def _on_all_dirs(self, gfid: bytes, call: Callable[[Subvolume], Awaitable[Result]]) -> Result:
        """Directory metadata changes go to every subvolume (the first answer is returned)."""
        i = await self._where_is(gfid)
        if i is not None:
            return await call(self.children[i])
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
            return await self.children[i].stat(gfid, xdata, cred=cred)
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
        return await self._on_inode(gfid, lambda c: c.truncate(gfid, size, xdata, cred=cred))

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
        return self._fds.adopt(r, _DhtFd(gfid, False, handles, h))

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
        # refuse before removing anything if any copy holds real entries
        for c in self.children:
            if await self._has_entries(c, attrs(d).gfid):
                raise OSError(errno.ENOTEMPTY, f"{name}: directory not empty")
        h = await self.hashed(pargfid, name)
        others = [i for i in range(len(self.children)) if i != h]
        res = await each(lambda i: self.children[i].rmdir(pargfid, name, flags, xdata, cred=cred), others)
        bad = [r for r in res if isinstance(r, OSError) and r.errno != errno.ENOENT]
        if bad:
            raise bad[0]
        r = await self.children[h].rmdir(pargfid, name, flags, xdata, cred=cred)
        self._layouts.pop(attrs(d).gfid, None)
        return r

    async def _has_entries(self, child: Subvolume, gfid: bytes) -> bool:
        try:
            o = await child.opendir(gfid)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        fd = o.fd
        assert fd is not None
        try:
            r = await child.readdirp(fd, 0, 4096, self._xdata(None))
            return any(e.name not in (".", "..") and not is_linkto(e.stat, e.xdata) for e in r.entries)
        finally:
            await child.release(fd)

    async def link(self, gfid: bytes, newpar: bytes, newname: str, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        i = await self._where_is(gfid)
        src = 0 if i is None else i
        r = await self.children[src].link(gfid, newpar, newname, xdata, cred=cred)
        await self._make_linkto(newpar, newname, src, cred)
        return r

    async def _make_linkto(self, pargfid: bytes, name: str, data_sub: int, cred: Credential | None) -> None:
        """If ``name`` hashes elsewhere than where its data is, leave a linkto on the hashed subvolume."""
        if len(self.children) == 1:
            return
        h = await self.hashed(pargfid, name)
        if h == data_sub:
            return
        r = await self.children[data_sub].lookup(pargfid, name, cred=cred)
        target = self.children[data_sub].name
        try:
            await self.children[h].mknod(pargfid, name, LINKTO_MODE, 0, attrs(r).gfid, 0,
                                         {LINKTO_XATTR: target.encode() + b"\0"},
                                         cred=None)
        except OSError as e:
            if e.errno != errno.EEXIST:
                log.warning("%s: could not create linkto for %s on %s: %s", self.name, name,
                            self.children[h].name, e)

    async def rename(self, oldpar: bytes, oldname: str, newpar: bytes, newname: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        self._recent.pop((oldpar, oldname), None)
        self._recent.pop((newpar, newname), None)
        src = await self.lookup(oldpar, oldname, cred=cred)
        if attrs(src).is_dir or len(self.children) == 1:
            if len(self.children) == 1:
                return await self.children[0].rename(oldpar, oldname, newpar, newname, xdata, cred=cred)
            h = await self.hashed(newpar, newname)
            r = await self.children[h].rename(oldpar, oldname, newpar, newname, xdata, cred=cred)
            others = [i for i in range(len(self.children)) if i != h]
            await each(lambda i: self.children[i].rename(oldpar, oldname, newpar, newname, xdata, cred=cred),
                       others)
            return r
        data = self._where.get(attrs(src).gfid, 0)
        # an existing destination stored on another subvolume would survive a rename on ours: remove it
        try:
            dst = await self.lookup(newpar, newname, cred=cred)
            if attrs(dst).is_dir:
                raise OSError(errno.EISDIR, newname)
            dsub = self._where.get(attrs(dst).gfid, data)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            dst, dsub = None, data
        r = await self.children[data].rename(oldpar, oldname, newpar, newname, xdata, cred=cred)
        if dst is not None and dsub != data and attrs(dst).gfid != attrs(src).gfid:
            try:
                await self.children[dsub].unlink(newpar, newname, cred=cred)
            except OSError as e:
                log.warning("%s: removing replaced %s on %s failed: %s", self.name, newname,
                            self.children[dsub].name, e)
        await self._unlink_linkto(oldpar, oldname, data, cred)
        try:
            h = await self.hashed(newpar, newname)
            if h != data:
                try:
                    old = await self.children[h].lookup(newpar, newname, self._xdata(None), cred=cred)
                    if is_linkto(old.stat, old.xdata):
                        await self.children[h].unlink(newpar, newname, cred=cred)
                except OSError:
                    pass
                await self._make_linkto(newpar, newname, data, cred)
        except OSError as e:
            log.warning("%s: linkto for renamed %s failed: %s", self.name, newname, e)
        return r

    # ------------------------------------------------------------ fds

    def _fd(self, handle: int) -> _DhtFd:
        return self._fds.get(handle)

    async def open(self, gfid: bytes, flags: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        i = await self._where_is(gfid)
        sub = 0 if i is None else i
        r = await self.children[sub].open(gfid, flags, xdata, cred=cred)
        handles: list[int | None] = [None] * len(self.children)
        handles[sub] = r.fd
        return self._fds.adopt(r, _DhtFd(gfid, False, handles, sub))

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

    async def read(self, handle: int, offset: int, size: int, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        c, h = self._file(handle)
        return await c.read(h, offset, size, xdata, cred=cred)

    async def write(self, handle: int, offset: int, data: bytes, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        c, h = self._file(handle)
        return await c.write(h, offset, data, xdata, cred=cred)

    async def fstat(self, handle: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        fd = self._fd(handle)
        if fd.is_dir:
            return await self.stat(fd.gfid, xdata, cred)
        c, h = self._file(handle)
        return await c.fstat(h, xdata, cred=cred)

    async def flush(self, handle: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        c, h = self._file(handle)
        return await c.flush(h, xdata, cred=cred)

    async def fsync(self, handle: int, datasync: bool = False, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        fd = self._fd(handle)
        if fd.is_dir:
            return Result(0, 0)
        c, h = self._file(handle)
        return await c.fsync(h, datasync, xdata, cred=cred)

    async def ftruncate(self, handle: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        c, h = self._file(handle)
        return await c.ftruncate(h, size, xdata, cred=cred)

    async def fallocate(self, handle: int, mode: int, offset: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        c, h = self._file(handle)
        return await c.fallocate(h, mode, offset, size, xdata, cred=cred)

    async def discard(self, handle: int, offset: int, size: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        c, h = self._file(handle)
        return await c.discard(h, offset, size, xdata, cred=cred)

    async def zerofill(self, handle: int, offset: int, size: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        c, h = self._file(handle)
        return await c.zerofill(h, offset, size, xdata, cred=cred)

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
