"""md-cache: attributes, listed xattrs and names, kept coherent by the bricks' cache-invalidation upcalls.

What it keeps, per gfid (gluster's md-cache and nl-cache in one layer):

- the attributes (iatt) of every inode a LOOKUP, READDIRP, STAT or reply of our own change brought;
- a list of xattrs (security.*, optionally POSIX ACLs, and the ``user.*`` keys applications asked for),
  asked for in the xdata of every LOOKUP and READDIRP so that one round trip fills both; a listed key
  the brick did not return is a cached ENODATA;
- for a directory, the names LOOKUP and READDIRP saw (name → gfid) and the names a LOOKUP found absent
  (negative entries), so that the kernel's revalidating lookups cost no brick call.

Two modes:

*Coherent* (the volume has ``performance.cache-invalidation`` on for clients and every brick's upcall
translator has ``features.cache-invalidation`` on, read from the bricks' volfiles): a brick tells us when
another client changes an inode we touched within its ``cache-invalidation-timeout`` (CACHING.md §1), so
entries live ``md-cache-timeout`` (the metadata-cache group: 600 s), but never longer than the brick keeps
us registered: every entry counts from the last fop *sent* on its inode and dies a margin before the
brick's timeout, so the next access re-registers. The FUSE bridge hands the kernel the same remaining
lifetime as entry/attribute timeout (:meth:`MdCache.kernel_timeout`) and is told to purge the kernel
(:class:`KernelSink`) when an upcall drops something the kernel may hold.

*Not coherent* (either switch off, or the bricks' volfiles could not be read): nothing tells us about
other clients' changes, so attributes and xattrs live at most 1 s (gluster's default ``md-cache-timeout``,
the kernel's default timeouts) and names and negative entries are not cached at all.

Ordering: every invalidation takes a sequence number; a reply is stored only if no invalidation of its
inode (and no flush of everything) happened since its request was sent (:meth:`MdCache.ticket`), and a
reply with an older ctime than the cached attributes is not stored over them. Everything is dropped when a
brick goes down or comes up (its registrations are gone with a restart), and when the mode changes.

Limits seen on a 10.3 brick (CACHING.md says the same of the protocol): a rename or hard link of an inode
this client never touched into a name it has cached as absent is not notified (the upcall goes to the
clients registered on the moved inode only), so negative entries live at most ``negative_timeout``
(nl-cache's ``nl-cache-timeout`` when the volume has nl-cache, else 1 s); a name renamed over is notified
by the FORGET of the inode it named, unless that inode keeps another hard link.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import logging
import stat as st
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Protocol, Sequence

import trio

from .. import fops as F
from ..bounded import BoundedDict
from ..dicts import Dict
from ..fops import Result
from ..iatt import NULL_GFID, Iatt
from ..rpc import Credential
from .api import Brick, BrickEvent, PassThrough, Subvolume

log = logging.getLogger(__name__)

# upcall flags (libglusterfs/src/glusterfs/upcall-utils.h)
UP_NLINK = 0x1
UP_MODE = 0x2
UP_OWN = 0x4
UP_SIZE = 0x8
UP_TIMES = 0x10
UP_ATIME = 0x20
UP_PERM = 0x40
UP_RENAME = 0x80
UP_FORGET = 0x100
UP_PARENT_TIMES = 0x200
UP_XATTR = 0x400
UP_XATTR_RM = 0x800
UP_GONE = UP_NLINK | UP_RENAME | UP_FORGET
UP_IATT = UP_MODE | UP_OWN | UP_SIZE | UP_TIMES | UP_ATIME | UP_PERM

#: IPC op that registers xattr key patterns with a brick's upcall translator (GF_IPC_TARGET_UPCALL)
IPC_UPCALL = 2
SECURITY_XATTRS = ("security.capability", "security.ima", "security.selinux")
ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
#: patterns registered with every brick: an XATTR upcall carries only keys matching one of them
REGISTER_PATTERNS = ("security.*", "system.posix_acl_*", "user.*")
#: without invalidation, nothing outlives gluster's default md-cache-timeout (and the kernel's 1 s)
INCOHERENT_MAX = 1.0
#: how often the bricks' volfiles are read again (an admin may switch cache-invalidation off)
PROBE_INTERVAL = 30.0
NEGATIVE_PER_DIR = 4096
#: a directory whose bricks' ctime is younger than this (by our clock) when a listing begins cannot vouch
#: for it: a later change within the same timestamp tick would leave mtime and ctime as they are
STAMP_SETTLE = 2.0
#: whole listings kept (directories, entries per directory) and entries answered per READDIRP from one
LISTINGS, LISTING_MAX, LISTING_PAGE = 64, 100_000, 256
#: entries of all kept listings together (they keep their attributes alive: memory)
LISTING_TOTAL = 200_000
#: a page read ahead and not asked for within this is read again
AHEAD_MAX_AGE = 1.0


@dataclass
class CacheOptions:
    """What to cache, from the volfile's ``performance/md-cache`` (and ``performance/nl-cache``) options."""

    #: ``md-cache-timeout``: how long an entry lives when the bricks tell us about changes
    timeout: float = 1.0
    #: ``cache-invalidation`` (``performance.cache-invalidation``): the client side of the upcalls
    invalidation: bool = False
    #: xattrs asked for in every LOOKUP/READDIRP and answered from the cache (fnmatch patterns allowed
    #: in the user list: those are only answered once an application asked for a concrete key)
    xattrs: tuple[str, ...] = SECURITY_XATTRS
    #: ``user.*`` keys applications ask for are added to the list, up to this many
    user_xattrs: int = 16
    #: negative entries live at most this long (see the module docstring)
    negative_timeout: float = 1.0
    #: inodes kept (the bricks' network.inode-lru-limit of the metadata-cache group is 200000; ~1 KiB each here)
    limit: int = 100_000

    @classmethod
    def from_xlators(cls, mdc: dict[str, str] | None, nlc: dict[str, str] | None = None) -> CacheOptions:
        """Options as glusterd writes them into the client volfile (absent translator: gluster's defaults)."""
        o = cls()
        m = mdc or {}

        def on(key: str, default: bool) -> bool:
            v = m.get(key)
            return default if v is None else v.strip().lower() in ("on", "yes", "true", "enable", "1")

        try:
            o.timeout = max(0.0, min(float(m.get("md-cache-timeout", "1")), 600.0))
        except ValueError:
            o.timeout = 1.0
        o.invalidation = mdc is not None and on("cache-invalidation", False)
        keys: list[str] = []
        if on("cache-capability-xattrs", True):
            keys.append("security.capability")
        if on("cache-ima-xattrs", True):
            keys.append("security.ima")
        keys.append("security.selinux")  # `ls -l` asks for it on every entry; an absent label costs nothing
        if on("cache-posix-acl", False):
            keys.extend(ACL_XATTRS)
        for k in (m.get("xattr-cache-list") or "").split(","):
            k = k.strip()
            if k and k not in keys:
                keys.append(k)
        o.xattrs = tuple(keys)
        if nlc is not None:
            try:
                o.negative_timeout = max(0.0, float(nlc.get("nl-cache-timeout", "60")))
            except ValueError:
                pass
        return o


class KernelSink(Protocol):
    """Where the cache sends what the kernel must forget (the FUSE bridge). Called on the trio thread;
    implementations must not block on the kernel there (CACHING.md §6)."""

    def inode_changed(self, gfid: bytes, data: bool) -> None:
        """Attributes (and with ``data`` the cached pages) of ``gfid`` are stale."""

    def names_gone(self, gfid: bytes) -> None:
        """Every directory entry naming ``gfid`` may be stale (unlinked, renamed, forgotten)."""

    def everything(self) -> None:
        """Nothing the kernel holds can be vouched for any more."""


#: reads the bricks' upcall settings: (cache-invalidation on at every brick, smallest cache-invalidation-timeout)
Probe = Callable[[], Awaitable[tuple[bool, float]]]


class _Ino:
    __slots__ = ("gfid", "iatt", "t", "reg", "xattrs", "xt", "names", "neg")

    def __init__(self, gfid: bytes) -> None:
        self.gfid = gfid
        self.iatt: Iatt | None = None
        #: when the request that brought ``iatt`` was sent
        self.t = 0.0
        #: when the last fop on this inode was sent that the bricks answered (they registered us then)
        self.reg = -1e18
        #: listed xattrs: value, or None for "the inode has none"; ``xt`` as ``t``
        self.xattrs: dict[str, Any] | None = None
        self.xt = 0.0
        #: directories: names seen (name → the entry of the inode it named then: an inode dropped by an
        #: upcall and cached again is a new entry, so a name it lost is not answered) and names found absent
        self.names: dict[str, _Ino] | None = None
        self.neg: dict[str, float] | None = None


@dataclass
class _Stats:
    hits: int = 0
    misses: int = 0
    upcalls: int = 0
    flushes: int = 0
    by_fop: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class _Ahead:
    """A READDIRP page asked for before the kernel wants it (after the page ending at ``offset``)."""
    offset: int
    size: int
    t0: float
    ticket: int
    asked: list[str]
    result: Result | None = None
    done: trio.Event = field(default_factory=trio.Event)


class MdCache(PassThrough):
    """Answers lookup, stat and getxattr of listed keys from what earlier replies brought."""

    def __init__(self, child: Subvolume, ttl: float = 1.0, *, options: CacheOptions | None = None,
                 bricks: Sequence[Brick] = (), probe: Probe | None = None) -> None:
        super().__init__(child)
        self.opts = options or CacheOptions(timeout=ttl)
        self.bricks = list(bricks)
        self._probe = probe
        self.kernel: KernelSink | None = None
        self._inodes: BoundedDict[bytes, _Ino] = BoundedDict(self.opts.limit)
        self._keys: list[str] = [k for k in self.opts.xattrs if not _is_pattern(k)]
        self._keyset = set(self._keys)
        self._learned = 0
        #: invalidation sequence: gfid → seq of its last invalidation; replies asked before are not stored
        self._seq = 0
        self._changed: dict[bytes, int] = {}
        self._remote: dict[bytes, int] = {}
        self._floor = 0
        #: what the bricks said (None: not known yet)
        self._bricks_ci: bool | None = None
        self.brick_timeout = 60.0
        #: brick index → generation whose session has our xattr patterns registered
        self._registered: dict[int, int] = {}
        self._fd_gfid: dict[int, bytes] = {}
        self._refreshing: set[bytes] = set()
        self._bg: trio.Nursery | None = None
        #: open directory → (invalidation sequence when read, the last page read, entry offset → index): the
        #: kernel asks again from inside a page it could not take whole; answered from it if nothing changed
        self._pages: dict[int, tuple[int, list[F.DirEntry], dict[int, int]]] = {}
        #: directory → (the bricks' (mtime, mtime_nsec, ctime, ctime_nsec) of it when its last listing began,
        #: the invalidation sequence then, too young to vouch for): see listing_unchanged
        self._stamps: BoundedDict[bytes, tuple[tuple[int, int, int, int], int, bool]] = BoundedDict(10_000)
        #: open directory → the stamp's sequence it was opened under (listing_unchanged); while one is read
        #: from offset 0 on: (the offset the next brick page starts after, its entries so far); directory →
        #: (the stamp's sequence, its whole listing as the bricks gave it, offset → index of the next entry)
        self._fd_stamp: dict[int, int] = {}
        self._reading: dict[int, tuple[int, list[F.DirEntry]]] = {}
        self._serving: dict[int, tuple[int, list[F.DirEntry], dict[int, int]]] = {}
        #: open directory → the next brick page, asked for while the kernel takes the one before
        self._ahead: dict[int, _Ahead] = {}
        self._listings: BoundedDict[bytes, tuple[int, list[F.DirEntry], dict[int, int]]] = BoundedDict(LISTINGS)
        #: the clock the bricks' times are compared with (the unit tests' bricks run on the virtual clock)
        self.wall: Callable[[], float] = time.time
        self.stats = _Stats()
        self._remode()
        for i, b in enumerate(self.bricks):
            b.subscribe(functools.partial(self._brick_event, i))
            b.subscribe_callbacks(self._on_callback)

    # ------------------------------------------------------------ mode and lifetimes

    def _remode(self) -> None:
        """The mode and lifetimes, computed once per change (they are read for every entry of a listing)."""
        self._coh = self.opts.invalidation and bool(self._bricks_ci)
        self._reg_life = max(0.0, self.brick_timeout * 0.95 - 1.0)
        self._life = min(self.opts.timeout, self._reg_life) if self._coh else min(self.opts.timeout, INCOHERENT_MAX)
        self._xreg = all(self._registered.get(i) == b.generation for i, b in enumerate(self.bricks) if b.is_up)

    @property
    def coherent(self) -> bool:
        return self._coh

    @property
    def reg_lifetime(self) -> float:
        """How long after a fop the bricks surely still tell us about changes (a margin before their timeout)."""
        return self._reg_life

    @property
    def lifetime(self) -> float:
        return self._life

    def describe(self) -> str:
        if self.coherent:
            return (f"coherent: bricks send cache-invalidation upcalls (timeout {self.brick_timeout:g} s); "
                    f"attributes, xattrs and names kept {self.lifetime:g} s, kernel timeouts as long")
        why = ("the volume's performance.cache-invalidation is off" if not self.opts.invalidation else
               "features.cache-invalidation is off on a brick" if self._bricks_ci is False else
               "the bricks' settings are not known yet")
        return f"not coherent ({why}): attributes and xattrs kept {self.lifetime:g} s, names not cached"

    def ticket(self) -> int:
        """Take before a call; :meth:`kernel_timeout` with it tells whether its answer may be kept long."""
        return self._seq

    def _trusted(self, gfid: bytes, ticket: int) -> bool:
        return ticket >= self._floor and self._changed.get(gfid, -1) <= ticket

    def _fresh(self, e: _Ino, t: float, now: float) -> bool:
        if now - t >= self._life:
            return False
        return not self._coh or now - e.reg < self._reg_life

    def _fresh_x(self, e: _Ino, now: float) -> bool:
        if e.xattrs is None:
            return False
        if self._coh and not self._xreg:
            return now - e.xt < min(self.opts.timeout, INCOHERENT_MAX)
        return self._fresh(e, e.xt, now)

    def kernel_timeout(self, gfid: bytes, ticket: int) -> float | None:
        """Entry/attribute timeout for the kernel for an answer about ``gfid`` asked at ``ticket``: 0 if the
        inode changed meanwhile, the entry's remaining lifetime in coherent mode, None for the default."""
        if ticket < self._floor or self._remote.get(gfid, -1) > ticket:
            return 0.0
        if not self._coh or self._changed.get(gfid, -1) > ticket:
            return None
        e = self._inodes.get(gfid)
        if e is None or e.iatt is None:
            return None
        now = trio.current_time()
        left = min(self._life - (now - e.t), self._reg_life - (now - e.reg))
        return left if left > 0 else None

    def keep_pages(self, gfid: bytes) -> bool:
        """May the kernel keep the pages it cached of ``gfid`` at an open? Only if no change of it can have
        been missed: coherent mode and an entry that no upcall dropped."""
        if not self.coherent:
            return True  # the kernel's own auto-invalidation on new attributes, as gluster's FUSE bridge
        e = self._inodes.get(gfid)
        return e is not None and e.iatt is not None and self._fresh(e, e.t, trio.current_time())

    # ------------------------------------------------------------ background: probe, registration, refresh

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Owner of the background work: reading the bricks' settings, registering xattr keys."""
        try:
            async with trio.open_nursery() as bg:
                self._bg = bg
                for i, b in enumerate(self.bricks):
                    if b.is_up:
                        bg.start_soon(self._register, i)
                if self._probe is not None:
                    await self._reprobe()
                task_status.started()
                while self._probe is not None:
                    await trio.sleep(PROBE_INTERVAL)
                    await self._reprobe()
                await trio.sleep_forever()
        finally:
            self._bg = None

    async def _reprobe(self) -> None:
        assert self._probe is not None
        try:
            with trio.fail_after(15):
                ci, timeout = await self._probe()
        except Exception as e:  # noqa: BLE001 - glusterd away or a bad volfile: keep what we knew
            log.info("%s: reading the bricks' cache-invalidation settings failed: %s", self.name, e)
            return
        before = (self.coherent, self.brick_timeout)
        self._bricks_ci, self.brick_timeout = ci, timeout
        self._remode()
        if (self.coherent, self.brick_timeout) != before:
            log.info("%s: md-cache %s", self.name, self.describe())
            self.drop_all("cache mode changed")

    async def _register(self, i: int) -> None:
        """Tell brick ``i`` which xattr keys we cache: its XATTR upcalls then carry them (per session)."""
        b = self.bricks[i]
        gen = b.generation
        ipc = getattr(b, "ipc", None)
        if ipc is None:
            return
        try:
            await ipc(IPC_UPCALL, {p: 0 for p in REGISTER_PATTERNS})
        except OSError as e:
            log.info("%s: registering xattr keys with %s failed: %s (xattrs kept 1 s)", self.name, b.name, e)
            return
        if b.generation == gen and b.is_up:
            self._registered[i] = gen
        self._remode()

    async def _refresh(self, gfid: bytes) -> None:
        """Touch a directory whose registration ran out, so its names can be answered again (a stat: it
        reaches every copy of a directory, where distribute's nameless lookup reaches one)."""
        try:
            await self.stat(gfid)
        except OSError:
            pass
        finally:
            self._refreshing.discard(gfid)

    def _brick_event(self, i: int, ev: BrickEvent) -> None:
        self._registered.pop(i, None)
        self._remode()
        self.drop_all(f"brick {ev.client.name} {'up' if ev.up else 'down'}")
        if ev.up and self._bg is not None:
            self._bg.start_soon(self._register, i)

    # ------------------------------------------------------------ invalidation

    def _invalidate(self, gfid: bytes, remote: bool = True) -> None:
        """Answers about ``gfid`` asked before now are not stored; ``remote`` (another client's change): not
        given to the kernel for long either (our own change's reply describes the state after it)."""
        self._seq += 1
        if len(self._changed) > 65_536:
            self._changed.clear()
            self._remote.clear()
            self._floor = self._seq
        self._changed[gfid] = self._seq
        if remote:
            self._remote[gfid] = self._seq

    def drop_all(self, why: str = "") -> None:
        """Drop everything (a brick went down or up, the mode changed); the kernel too."""
        self._seq += 1
        self._floor = self._seq
        self._changed.clear()
        self._remote.clear()
        had = len(self._inodes)
        self._inodes.clear()
        self._stamps.clear()
        self._listings.clear()
        self._reading.clear()
        self.stats.flushes += 1
        if why:
            log.debug("%s: md-cache dropped %d inodes: %s", self.name, had, why)
        if self.kernel is not None:
            self.kernel.everything()

    def _on_callback(self, proc: int, msg: object) -> None:
        if proc == F.Cbk.CACHE_INVALIDATION and isinstance(msg, F.CacheInvalidation):
            self.upcall(msg)
        elif proc in (F.Cbk.CHILD_DOWN, F.Cbk.CHILD_UP):
            self.drop_all("a brick's child went up or down")

    def upcall(self, msg: F.CacheInvalidation) -> None:
        """A brick says another client changed ``msg.gfid`` (and maybe its parents)."""
        self.stats.upcalls += 1
        g, f = msg.gfid, msg.flags
        self._invalidate(g)
        e = self._inodes.get(g)
        old = e.iatt if e is not None else None
        kernel = self.kernel
        if f & UP_GONE:
            self._inodes.pop(g, None)
            if kernel is not None:
                kernel.names_gone(g)
                kernel.inode_changed(g, True)
        elif e is not None or kernel is not None:
            data = bool(f & UP_SIZE)
            if data and old is not None and msg.stat.gfid == g and old.size == msg.stat.size and \
                    (old.mtime, old.mtime_nsec) == (msg.stat.mtime, msg.stat.mtime_nsec):
                data = False  # a chmod or chown: the pages are still right
            if (old is not None and old.is_dir) or st.S_ISDIR(msg.stat.mode):
                # a directory's "pages" are the listing the kernel caches (FOPEN_CACHE_DIR, coherent mode only)
                data = self._coh and bool(f & (UP_TIMES | UP_PARENT_TIMES))
                self._stamps.pop(g, None)
                self._listings.pop(g, None)
            if e is not None:
                if f & UP_IATT:
                    e.iatt = None
                if f & UP_TIMES:
                    e.neg = None  # a name was added in this directory
                if f & (UP_XATTR | UP_XATTR_RM):
                    self._merge_xattrs(e, msg.xdata, removed=bool(f & UP_XATTR_RM))
            if kernel is not None and f & UP_IATT:
                kernel.inode_changed(g, data)
        for p in (msg.parent.gfid, msg.oldparent.gfid):
            if p != NULL_GFID:
                self._invalidate(p)
                pe = self._inodes.get(p)
                if pe is not None:
                    pe.iatt = None
                    pe.neg = None
                self._stamps.pop(p, None)
                self._listings.pop(p, None)
                if kernel is not None:
                    kernel.inode_changed(p, self._coh)  # its names changed: the kernel's cached listing too

    def _merge_xattrs(self, e: _Ino, xdata: dict[str, bytes], removed: bool) -> None:
        if e.xattrs is None:
            return
        if not xdata:
            e.xattrs = None  # which key changed is not said (e.g. a chmod that touched an ACL)
            return
        for k, v in xdata.items():
            if k in self._keyset:
                e.xattrs[k] = None if removed else v
            elif any(fnmatch.fnmatchcase(k, p) for p in self.opts.xattrs):
                e.xattrs.pop(k, None)

    # ------------------------------------------------------------ filling

    def _ino(self, gfid: bytes) -> _Ino:
        e = self._inodes.get(gfid)
        if e is None:
            e = self._inodes[gfid] = _Ino(gfid)
        return e

    def _store(self, gfid: bytes, iatt: Iatt | None, ticket: int, t0: float, *, register: bool = True) -> _Ino | None:
        """Keep ``iatt`` as the attributes of ``gfid`` (the request was sent at ``t0``)."""
        if iatt is None or iatt.gfid != gfid or gfid == NULL_GFID or not self._trusted(gfid, ticket) or \
                _linkto_like(iatt):
            return None
        e = self._ino(gfid)
        if register:
            e.reg = max(e.reg, t0)
        cur = e.iatt
        if cur is not None and (iatt.ctime, iatt.ctime_nsec) < (cur.ctime, cur.ctime_nsec) and \
                self._fresh(e, e.t, t0):
            return e  # an answer older than what we hold (replies overtook each other)
        e.iatt, e.t = iatt, t0
        return e

    def _store_xattrs(self, e: _Ino, xdata: Dict | None, asked: Sequence[str], t0: float) -> None:
        x = xdata or {}
        if e.xattrs is None or not self._fresh_x(e, t0):
            e.xattrs, e.xt = {k: x.get(k) for k in asked}, t0
        else:
            for k in asked:
                e.xattrs[k] = x.get(k)

    def _fill(self, iatt: Iatt | None, xdata: Dict | None, asked: Sequence[str], ticket: int, t0: float,
              register: bool = True) -> None:
        if iatt is None:
            return
        e = self._store(iatt.gfid, iatt, ticket, t0, register=register)
        if e is not None and asked:
            self._store_xattrs(e, xdata, asked, t0)

    def _name(self, pargfid: bytes, name: str, gfid: bytes | None, ticket: int) -> None:
        """Directory ``pargfid`` has ``name`` → ``gfid`` (None: absent) as of ``ticket``. Names are kept in both
        modes (our own unlink or rename must find its victim's attributes to drop them), answered only when
        coherent; negative entries are kept only then."""
        if not self._trusted(pargfid, ticket) or pargfid == NULL_GFID:
            return
        p = self._ino(pargfid)
        if gfid is None:
            if not self.coherent:
                if p.names is not None:
                    p.names.pop(name, None)
                return
            if p.names is not None:
                p.names.pop(name, None)
            if p.neg is None:
                p.neg = {}
            if len(p.neg) >= NEGATIVE_PER_DIR:
                p.neg.clear()
            p.neg[name] = trio.current_time()
        else:
            c = self._inodes.get(gfid)
            if c is None:
                return
            if p.names is None:
                p.names = {}
            p.names[name] = c
            if p.neg is not None:
                p.neg.pop(name, None)

    def _forget_name(self, pargfid: bytes, name: str) -> bytes | None:
        p = self._inodes.get(pargfid)
        if p is None or p.names is None:
            return None
        c = p.names.pop(name, None)
        return c.gfid if c is not None else None

    def _drop(self, gfid: bytes) -> None:
        e = self._inodes.get(gfid)
        if e is not None:
            e.iatt = None

    def _req(self, xdata: Dict | None) -> Dict:
        out: Dict = {k: 0 for k in self._keys}
        if xdata:
            out.update(xdata)
        return out

    def _learn(self, name: str) -> None:
        """An application asked for ``name``: ask for it in every LOOKUP/READDIRP from now on (user keys,
        up to ``user_xattrs`` of them, or a key matching a pattern of the configured list)."""
        listed = any(fnmatch.fnmatchcase(name, p) for p in self.opts.xattrs if _is_pattern(p))
        if name in self._keyset or self._learned >= max(self.opts.user_xattrs, 0) or \
                not (listed or name.startswith("user.")):
            return
        self._learned += 1
        self._keys.append(name)
        self._keyset.add(name)

    def _hit(self, fop: str) -> None:
        self.stats.hits += 1
        self.stats.by_fop[fop] = self.stats.by_fop.get(fop, 0) + 1

    # ------------------------------------------------------------ answered from the cache

    def cached(self, gfid: bytes) -> Iatt | None:
        """The attributes of ``gfid`` if they are fresh (for tests and the bridge)."""
        e = self._inodes.get(gfid)
        if e is None or e.iatt is None or not self._fresh(e, e.t, trio.current_time()):
            return None
        return e.iatt

    async def lookup(self, pargfid: bytes, name: str, xdata: Dict | None = None, *, gfid: bytes = NULL_GFID,
                     cred: Credential | None = None) -> Result:
        if not name:
            return await self.lookup_gfid(gfid, xdata, cred)
        now = trio.current_time()
        if xdata is None and self.coherent:
            p = self._inodes.get(pargfid)
            if p is not None and now - p.reg < self.reg_lifetime:
                if p.neg is not None:
                    t = p.neg.get(name)
                    if t is not None and now - t < min(self.opts.negative_timeout, self.lifetime):
                        self._hit("lookup-negative")
                        raise OSError(errno.ENOENT, f"{name!r}: no such file or directory (cached)")
                c = p.names.get(name) if p.names is not None else None
                if c is not None and self._inodes.get(c.gfid) is c:
                    hit = self.cached(c.gfid)
                    if hit is not None:
                        self._hit("lookup")
                        return Result(0, 0, stat=hit, postparent=self.cached(pargfid))
            elif pargfid not in self._refreshing and self._bg is not None:
                self._refreshing.add(pargfid)
                self._bg.start_soon(self._refresh, pargfid)
        self.stats.misses += 1
        ticket, asked = self._seq, list(self._keys)
        try:
            r = await self.child.lookup(pargfid, name, self._req(xdata), gfid=gfid, cred=cred)
        except OSError as e:
            if e.errno == errno.ENOENT:
                self._name(pargfid, name, None, ticket)
            raise
        self._fill(r.stat, r.xdata, asked, ticket, now)
        self._store(pargfid, r.postparent, ticket, now, register=False)
        if r.stat is not None:
            self._name(pargfid, name, r.stat.gfid, ticket)
        return r

    async def lookup_gfid(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        now = trio.current_time()
        if xdata is None:
            hit = self.cached(gfid)
            if hit is not None:
                self._hit("lookup")
                return Result(0, 0, stat=hit)
        ticket, asked = self._seq, list(self._keys)
        r = await self.child.lookup_gfid(gfid, self._req(xdata), cred)
        # distribute sends a directory's nameless lookup to one subvolume: the others did not register us
        self._fill(r.stat, r.xdata, asked, ticket, now, register=r.stat is not None and not r.stat.is_dir)
        return r

    async def stat(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        now = trio.current_time()
        if xdata is None:
            hit = self.cached(gfid)
            if hit is not None:
                self._hit("stat")
                return Result(0, 0, stat=hit)
        self.stats.misses += 1
        ticket = self._seq
        r = await self.child.stat(gfid, xdata, cred)
        self._store(gfid, r.stat, ticket, now)
        return r

    async def getxattr(self, gfid: bytes, name: str = "", xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        if not name or xdata is not None:
            return await self.child.getxattr(gfid, name, xdata, cred)
        now = trio.current_time()
        if name in self._keyset:
            e = self._inodes.get(gfid)
            if e is not None and e.xattrs is not None and name in e.xattrs and self._fresh_x(e, now):
                self._hit("getxattr")
                v = e.xattrs[name]
                if v is None:
                    raise OSError(errno.ENODATA, f"no xattr {name} (cached)")
                return Result(0, 0, dict={name: v})
        else:
            self._learn(name)
        self.stats.misses += 1
        ticket = self._seq
        try:
            r = await self.child.getxattr(gfid, name, xdata, cred)
        except OSError as ex:
            if ex.errno == errno.ENODATA:
                self._keep_xattr(gfid, name, None, ticket, now)
            raise
        self._keep_xattr(gfid, name, (r.dict or {}).get(name), ticket, now)
        return r

    def _keep_xattr(self, gfid: bytes, name: str, value: Any, ticket: int, t0: float) -> None:
        if name not in self._keyset or not self._trusted(gfid, ticket):
            return
        e = self._ino(gfid)
        e.reg = max(e.reg, t0)
        if e.xattrs is None or not self._fresh_x(e, t0):
            e.xattrs, e.xt = {}, t0
        e.xattrs[name] = bytes(value) if isinstance(value, (bytes, bytearray)) else value

    async def readdirp(self, fd: int, offset: int = 0, size: int = 128 * 1024, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        seq = self._fd_stamp.get(fd) if xdata is None else None
        if seq is not None:
            dg0 = self._fd_gfid.get(fd)
            if dg0 is not None:
                kept = await self._from_listing(fd, dg0, seq, offset)
                if kept is not None:
                    self._hit("readdirp")
                    return Result(0, 0, entries=kept)
        if xdata is None and offset:
            page = self._pages.get(fd)
            if page is not None and page[0] == self._seq:
                i = page[2].get(offset)
                if i is not None and i + 1 < len(page[1]):
                    self._hit("readdirp")
                    return Result(0, 0, entries=page[1][i + 1:])
        ahead = self._ahead.pop(fd, None) if xdata is None else None
        r = None
        if ahead is not None and ahead.offset == offset and ahead.size == size:
            await ahead.done.wait()
            dga = self._fd_gfid.get(fd)
            if ahead.result is not None and trio.current_time() - ahead.t0 < AHEAD_MAX_AGE and \
                    dga is not None and self._trusted(dga, ahead.ticket):  # else the directory changed since
                now, ticket, asked, r = ahead.t0, ahead.ticket, ahead.asked, ahead.result
        if r is None:
            now, ticket, asked = trio.current_time(), self._seq, list(self._keys)
            r = await self.child.readdirp(fd, offset, size, self._req(xdata), cred)
        if xdata is None and r.entries and self._bg is not None and fd in self._fd_gfid:
            # readdir-ahead: the next page is on its way while the kernel takes this one
            nxt = _Ahead(r.entries[-1].off, size, trio.current_time(), self._seq, list(self._keys))
            self._ahead[fd] = nxt
            self._bg.start_soon(self._read_ahead, fd, nxt, cred)
        if xdata is None and r.entries:
            self._pages[fd] = (ticket, r.entries, {e.off: i for i, e in enumerate(r.entries)})
        else:
            self._pages.pop(fd, None)
        dg = self._fd_gfid.get(fd)
        if dg is not None:
            self._registered_at(dg, ticket, now)
        if seq is not None and dg is not None:
            self._record(fd, dg, seq, offset, r.entries)
        for ent in r.entries:
            if ent.stat is None or ent.name in (".", "..") or ent.stat.gfid == NULL_GFID:
                continue
            # a directory is listed from one subvolume of distribute: only that one registered us on it
            self._fill(ent.stat, ent.xdata, asked, ticket, now, register=not ent.stat.is_dir)
            if dg is not None:
                self._name(dg, ent.name, ent.stat.gfid, ticket)
        return r

    async def _read_ahead(self, fd: int, a: _Ahead, cred: Credential | None) -> None:
        try:
            a.result = await self.child.readdirp(fd, a.offset, a.size, self._req(None), cred)
        except Exception as e:  # noqa: BLE001 - the directory was closed meanwhile, a brick went away: asked again
            log.debug("%s: reading ahead in a directory failed: %s", self.name, e)
        finally:
            a.done.set()

    async def listing_unchanged(self, gfid: bytes, fd: int | None = None) -> bool:
        """At an opendir of directory ``gfid``: may the kernel keep the listing it cached at an earlier open?

        Yes only in coherent mode, when no upcall and no entry fop of ours touched the directory since that
        listing began, and the bricks' mtime and ctime of it, asked now (distribute: the latest of every
        copy), are what they were then. The bricks tell a client of a rename or hard link into a directory
        only if it touched the inode moved, so the upcalls alone would miss those; the times do not. A stamp
        taken within STAMP_SETTLE of the directory's last change vouches for nothing (two changes in one
        timestamp tick look alike). Every answer but yes starts a new stamp: the listing read next.

        ``fd`` (the directory just opened): when the answer is yes, READDIRPs on it are answered from the
        whole listing kept under the same stamp, if there is one and every entry's attributes are fresh here
        (the kernel's own copy is gone after drop_caches or memory pressure); else its listing, read whole
        from the bricks, is kept under the new stamp."""
        if not self.coherent:
            self._stamps.pop(gfid, None)
            self._listings.pop(gfid, None)
            return False
        now, ticket = trio.current_time(), self._seq
        try:
            r = await self.child.stat(gfid)
        except OSError:
            self._stamps.pop(gfid, None)
            return False
        s = r.stat
        if s is None or s.gfid != gfid or not s.is_dir:
            self._stamps.pop(gfid, None)
            return False
        self._store(gfid, s, ticket, now)
        stamp = (s.mtime, s.mtime_nsec, s.ctime, s.ctime_nsec)
        prev = self._stamps.get(gfid)
        if prev is not None and prev[0] == stamp and not prev[2] and prev[1] >= self._floor and \
                self._changed.get(gfid, -1) <= prev[1] and self.coherent:
            self._hit("listing")
            if fd is not None:
                self._fd_stamp[fd] = prev[1]
            return True
        changed = max((s.mtime, s.mtime_nsec), (s.ctime, s.ctime_nsec))
        young = self.wall() - (changed[0] + changed[1] / 1e9) < STAMP_SETTLE
        self._stamps[gfid] = (stamp, ticket, young)
        self._listings.pop(gfid, None)
        if fd is not None:
            self._fd_stamp[fd] = ticket
        return False

    def _stamp_holds(self, dg: bytes, seq: int) -> bool:
        """Is the stamp taken at ``seq`` still the directory's, with nothing invalidated since?"""
        cur = self._stamps.get(dg)
        return self._coh and cur is not None and cur[1] == seq and seq >= self._floor and \
            self._changed.get(dg, -1) <= seq

    async def _from_listing(self, fd: int, dg: bytes, seq: int, offset: int) -> list[F.DirEntry] | None:
        """The entries after ``offset`` from the kept listing of ``dg`` (None: not answerable from it). An fd
        answered from a listing at offset 0 is answered from it to its end: its offsets are those of the fd
        that read it (distribute's cookies are per fd), and a change during a listing may or may not be in
        it (POSIX). Each entry comes with what md-cache holds of it now; one not fresh is asked for (stat),
        one gone meanwhile is left out."""
        lst = self._serving.get(fd)
        if lst is None:
            cand = self._listings.get(dg)
            if offset or cand is None or cand[0] != seq or not self._stamp_holds(dg, seq):
                return None
            lst = self._serving[fd] = cand
        i = lst[2].get(offset) if offset else 0
        if i is None:
            return None
        ents = lst[1][i:i + LISTING_PAGE]
        now, inodes, out = trio.current_time(), self._inodes, []
        for ent in ents:
            s = ent.stat
            if s is None or s.gfid == NULL_GFID or ent.name in (".", ".."):
                out.append(ent)
                continue
            e = inodes.get(s.gfid)
            cur = e.iatt if e is not None and e.iatt is not None and self._fresh(e, e.t, now) else None
            if cur is None:
                try:
                    cur = (await self.stat(s.gfid)).stat
                except OSError:
                    continue
                if cur is None:
                    continue
            out.append(ent if cur is s else F.DirEntry(ent.ino, ent.off, ent.type, ent.name, cur))
        return out

    def _record(self, fd: int, dg: bytes, seq: int, offset: int, entries: list[F.DirEntry]) -> None:
        """A brick page of ``fd``'s listing: kept as the directory's once read whole under one stamp."""
        rd = self._reading.get(fd)
        if offset == 0:
            rd = (0, [])
        elif rd is None or rd[0] != offset:
            self._reading.pop(fd, None)
            return
        if entries:
            if len(rd[1]) + len(entries) > LISTING_MAX:
                self._reading.pop(fd, None)
                return
            rd[1].extend(entries)
            self._reading[fd] = (entries[-1].off, rd[1])
            return
        self._reading.pop(fd, None)
        if self._stamp_holds(dg, seq):
            whole = rd[1]
            self._listings.pop(dg, None)
            total = sum(len(v[1]) for v in self._listings.values())
            while self._listings and total + len(whole) > LISTING_TOTAL:
                total -= len(self._listings.pop(next(iter(self._listings)))[1])
            self._listings[dg] = (seq, whole, {e.off: i + 1 for i, e in enumerate(whole)})

    # ------------------------------------------------------------ handles (to know the gfid of an fd)

    async def open(self, gfid: bytes, flags: int, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        now, ticket = trio.current_time(), self._seq
        r = await self.child.open(gfid, flags, xdata, cred)
        if r.fd is not None:
            self._fd_gfid[r.fd] = gfid
        self._registered_at(gfid, ticket, now)
        return r

    async def opendir(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        now, ticket = trio.current_time(), self._seq
        r = await self.child.opendir(gfid, xdata, cred)
        if r.fd is not None:
            self._fd_gfid[r.fd] = gfid
        self._registered_at(gfid, ticket, now)
        return r

    def _registered_at(self, gfid: bytes, ticket: int, t0: float) -> None:
        """A fop on ``gfid`` sent at ``t0`` succeeded: the bricks (re)registered us on it then."""
        if self._trusted(gfid, ticket):
            e = self._inodes.get(gfid)
            if e is not None:
                e.reg = max(e.reg, t0)

    async def release(self, fd: int) -> None:
        self._fd_gfid.pop(fd, None)
        self._pages.pop(fd, None)
        await self.child.release(fd)

    async def releasedir(self, fd: int) -> None:
        self._fd_gfid.pop(fd, None)
        self._pages.pop(fd, None)
        self._fd_stamp.pop(fd, None)
        self._reading.pop(fd, None)
        self._serving.pop(fd, None)
        self._ahead.pop(fd, None)
        await self.child.releasedir(fd)

    # ------------------------------------------------------------ our own data changes: post-op attributes

    def _post(self, fd: int, r: Result, ticket: int, t0: float) -> Result:
        g = self._fd_gfid.get(fd)
        if g is not None:
            if r.post is not None and r.post.gfid == g:
                self._store(g, r.post, ticket, t0)
            else:
                self._drop(g)
        return r

    def _dropping(self, fd: int) -> tuple[int, float]:
        """Before a change through ``fd``: its cached attributes are not answered while it is on its way."""
        g = self._fd_gfid.get(fd)
        if g is not None:
            self._drop(g)
        return self._seq, trio.current_time()

    async def write(self, fd: int, offset: int, data: bytes, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        ticket, t0 = self._dropping(fd)
        return self._post(fd, await self.child.write(fd, offset, data, xdata, cred), ticket, t0)

    async def ftruncate(self, fd: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        ticket, t0 = self._dropping(fd)
        return self._post(fd, await self.child.ftruncate(fd, size, xdata, cred), ticket, t0)

    async def fallocate(self, fd: int, mode: int, offset: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        ticket, t0 = self._dropping(fd)
        return self._post(fd, await self.child.fallocate(fd, mode, offset, size, xdata, cred), ticket, t0)

    async def discard(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        ticket, t0 = self._dropping(fd)
        return self._post(fd, await self.child.discard(fd, offset, size, xdata, cred), ticket, t0)

    async def zerofill(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        ticket, t0 = self._dropping(fd)
        return self._post(fd, await self.child.zerofill(fd, offset, size, xdata, cred), ticket, t0)

    async def fsync(self, fd: int, datasync: bool = False, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        ticket, t0 = self._seq, trio.current_time()
        return self._post(fd, await self.child.fsync(fd, datasync, xdata, cred), ticket, t0)

    async def truncate(self, gfid: bytes, size: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        self._drop(gfid)
        ticket, t0 = self._seq, trio.current_time()
        r = await self.child.truncate(gfid, size, xdata, cred)
        if r.post is not None and r.post.gfid == gfid:
            self._store(gfid, r.post, ticket, t0)
        return r

    async def fsetattr(self, fd: int, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        g = self._fd_gfid.get(fd)
        if g is not None:
            self._drop_meta(g)
        return await self.child.fsetattr(fd, stbuf, valid, xdata, cred)

    async def fsetxattr(self, fd: int, d: Dict, flags: int = 0, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        g = self._fd_gfid.get(fd)
        if g is not None:
            self._drop_meta(g, d)
        return await self.child.fsetxattr(fd, d, flags, xdata, cred)

    async def fremovexattr(self, fd: int, name: str, xdata: Dict | None = None,
                           cred: Credential | None = None) -> Result:
        g = self._fd_gfid.get(fd)
        if g is not None:
            self._drop_meta(g, {name: b""})
        return await self.child.fremovexattr(fd, name, xdata, cred)

    def _drop_meta(self, gfid: bytes, keys: Iterable[str] | None = None) -> None:
        """A metadata change of our own is on its way: its attributes (and the xattrs named) are not answered
        until a brick says them again (the replies of setattr/setxattr are not stored: gluster's own rule)."""
        self._invalidate(gfid, remote=False)
        e = self._inodes.get(gfid)
        if e is None:
            return
        e.iatt = None
        if e.xattrs is not None:
            if keys is None:
                e.xattrs = None
            else:
                for k in keys:
                    e.xattrs.pop(k, None)

    # ------------------------------------------------------------ entry fops: the parent's post-change attributes
    # (dropped first: a stat while the fop is on its way must not be answered from the attributes before it)

    def _before_entry(self, *dirs: bytes) -> tuple[int, float]:
        for d in dirs:
            self._drop(d)
            self._stamps.pop(d, None)
            self._listings.pop(d, None)
        return self._seq, trio.current_time()

    def _keep_parent(self, pargfid: bytes, iatt: Iatt | None, ticket: int, t0: float) -> None:
        if iatt is not None and iatt.is_dir and iatt.gfid == pargfid:
            # an entry fop reaches the name's subvolume only: it registers us there, not on every copy
            self._store(pargfid, iatt, ticket, t0, register=False)
        else:
            self._drop(pargfid)

    def _made(self, pargfid: bytes, name: str, r: Result, ticket: int, t0: float) -> Result:
        self._keep_parent(pargfid, r.postparent, ticket, t0)
        if r.stat is not None:
            self._store(r.stat.gfid, r.stat, ticket, t0)
            self._name(pargfid, name, r.stat.gfid, ticket)
        return r

    async def create(self, pargfid: bytes, name: str, flags: int, mode: int, gfid: bytes, umask: int = 0,
                     xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        ticket, t0 = self._before_entry(pargfid)
        r = await self.child.create(pargfid, name, flags, mode, gfid, umask, xdata, cred)
        if r.fd is not None and r.stat is not None:
            self._fd_gfid[r.fd] = r.stat.gfid
        return self._made(pargfid, name, r, ticket, t0)

    async def mknod(self, pargfid: bytes, name: str, mode: int, rdev: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        ticket, t0 = self._before_entry(pargfid)
        return self._made(pargfid, name, await self.child.mknod(pargfid, name, mode, rdev, gfid, umask, xdata,
                                                                 cred), ticket, t0)

    async def mkdir(self, pargfid: bytes, name: str, mode: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        ticket, t0 = self._before_entry(pargfid)
        return self._made(pargfid, name, await self.child.mkdir(pargfid, name, mode, gfid, umask, xdata, cred),
                          ticket, t0)

    async def symlink(self, pargfid: bytes, name: str, target: str, gfid: bytes, umask: int = 0,
                      xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        ticket, t0 = self._before_entry(pargfid)
        return self._made(pargfid, name, await self.child.symlink(pargfid, name, target, gfid, umask, xdata,
                                                                   cred), ticket, t0)

    async def link(self, gfid: bytes, newpar: bytes, newname: str, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        ticket, t0 = self._before_entry(newpar, gfid)
        return self._made(newpar, newname, await self.child.link(gfid, newpar, newname, xdata, cred), ticket, t0)

    async def unlink(self, pargfid: bytes, name: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        victim = self._forget_name(pargfid, name)
        ticket, t0 = self._before_entry(pargfid, *(victim,) if victim else ())
        r = await self.child.unlink(pargfid, name, xdata, cred)
        self._keep_parent(pargfid, r.postparent, ticket, t0)
        self._name(pargfid, name, None, ticket)
        return r

    async def rmdir(self, pargfid: bytes, name: str, flags: int = 0, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        victim = self._forget_name(pargfid, name)
        if victim is not None:
            self._inodes.pop(victim, None)
        ticket, t0 = self._before_entry(pargfid)
        r = await self.child.rmdir(pargfid, name, flags, xdata, cred)
        self._keep_parent(pargfid, r.postparent, ticket, t0)
        self._name(pargfid, name, None, ticket)
        return r

    async def rename(self, oldpar: bytes, oldname: str, newpar: bytes, newname: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        moved = self._forget_name(oldpar, oldname)
        over = self._forget_name(newpar, newname)
        ticket, t0 = self._before_entry(oldpar, newpar, *(g for g in (moved, over) if g))
        r = await self.child.rename(oldpar, oldname, newpar, newname, xdata, cred)
        if oldpar != newpar:
            self._keep_parent(oldpar, r.postoldparent, ticket, t0)
        self._keep_parent(newpar, r.postparent, ticket, t0)
        self._name(oldpar, oldname, None, ticket)
        if r.stat is not None:
            # the reply's attributes are not kept: over distribute they can be those of a linkto (same gfid)
            self._drop(r.stat.gfid)
            self._name(newpar, newname, r.stat.gfid, ticket)
        return r

    # ------------------------------------------------------------ metadata changes of our own

    async def setattr(self, gfid: bytes, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        self._drop_meta(gfid)
        return await self.child.setattr(gfid, stbuf, valid, xdata, cred)

    async def setxattr(self, gfid: bytes, d: Dict, flags: int = 0, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        self._drop_meta(gfid, d)
        return await self.child.setxattr(gfid, d, flags, xdata, cred)

    async def removexattr(self, gfid: bytes, name: str, xdata: Dict | None = None,
                          cred: Credential | None = None) -> Result:
        self._drop_meta(gfid, (name,))
        return await self.child.removexattr(gfid, name, xdata, cred)


def _linkto_like(iatt: Iatt) -> bool:
    """DHT's linkto files (mode ---------T, empty) carry the gfid of the file they point to: never its attributes."""
    return st.S_ISREG(iatt.mode) and iatt.mode & 0o7777 == st.S_ISVTX and iatt.size == 0


def _is_pattern(key: str) -> bool:
    return any(c in key for c in "*?[")
