"""The fop interface every translator implements, declared once (gluster's ``xlator_fops``/``defaults.c``).

A layer of the client graph is called through these coroutines and calls its children through
them: the protocol client at the bottom (one brick), replicate, distribute, the caches, the graph
switch at the top, and the in-memory brick the unit tests use. Declaring them here lets mypy check
that every layer implements all of them with the same signatures, instead of layers guessing at
each other with ``Any``, ``hasattr`` or ``__getattr__``.

Conventions (as the protocol client's, where they come from):

- gfid-addressed: inodes are named by their 16-byte gfid, entries by (parent gfid, name);
- ``fd`` arguments are the handles the layer itself handed out in ``Result.fd`` of
  ``open``/``create``/``opendir`` (each layer numbers its own, see :mod:`.handles`);
- failures raise ``OSError`` with the errno the application should see; ``ENOTCONN`` means the
  brick (or every replica) could not be reached;
- ``cred`` carries the caller's ids, lock owner and the ctime the bricks stamp; ``None`` lets
  the layer below make one.

:class:`PassThrough` forwards every fop to a single child: a layer that changes a few fops
subclasses it and overrides just those, like a gluster translator that leaves the rest to
``default_*_resume``.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import trio

from .. import fops as F
from ..dicts import Dict
from ..fops import Flock, Result
from ..iatt import NULL_GFID, ROOT_GFID, Iatt
from ..rpc import Credential

log = logging.getLogger(__name__)

#: one page of a directory listing by default (what the FUSE bridge asks for)
READDIR_SIZE = 128 * 1024
#: xdata key of ``zerofill``: zero only up to the current size (fallocate ZERO_RANGE|KEEP_SIZE; gluster's
#: ZEROFILL has no keep-size flag). Layers that hold the data lock (replicate) clip the range under it
#: and do not pass the key on.
ZEROFILL_KEEP_SIZE = "gfuse.zerofill-keep-size"


class Fops(Protocol):
    """The async fops of a translator. Subclass it explicitly: mypy then refuses to build a layer
    that lacks one (each signature here is the protocol client's)."""

    # ---------------------------------------------------------------- inode (by gfid / by name)

    async def lookup(self, pargfid: bytes, name: str, xdata: Dict | None = None, *, gfid: bytes = NULL_GFID,
                     cred: Credential | None = None) -> Result:
        """Named lookup (``pargfid`` + ``name``), or nameless (``gfid`` with a NULL parent and no name)."""
        ...

    async def lookup_gfid(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        ...

    async def stat(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        ...

    async def readlink(self, gfid: bytes, size: int = 4096, cred: Credential | None = None) -> Result:
        ...

    async def access(self, gfid: bytes, mask: int, cred: Credential | None = None) -> Result:
        ...

    async def statfs(self, gfid: bytes = ROOT_GFID, xdata: Dict | None = None) -> Result:
        ...

    async def setattr(self, gfid: bytes, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        ...

    async def truncate(self, gfid: bytes, size: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        ...

    async def getxattr(self, gfid: bytes, name: str = "", xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        """``name`` empty: every xattr (listxattr). The values are in ``Result.dict``."""
        ...

    async def setxattr(self, gfid: bytes, d: Dict, flags: int = 0, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        ...

    async def removexattr(self, gfid: bytes, name: str, xdata: Dict | None = None,
                          cred: Credential | None = None) -> Result:
        ...

    async def xattrop(self, gfid: bytes, op: int, d: Dict, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        """Atomic arithmetic on xattrs (AFR's changelog: ``XATTROP_ADD_ARRAY`` of big-endian int32s)."""
        ...

    async def inodelk(self, gfid: bytes, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        """Internal byte-range lock in ``domain`` (not a POSIX lock); the owner is ``cred.lk_owner``."""
        ...

    async def entrylk(self, gfid: bytes, domain: str, name: str | None, cmd: int, type_: int = F.ENTRYLK_WRLCK,
                      xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        """Lock on a name in directory ``gfid`` (``name`` None: the whole directory)."""
        ...

    # ---------------------------------------------------------------- entries

    async def mknod(self, pargfid: bytes, name: str, mode: int, rdev: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        ...

    async def mkdir(self, pargfid: bytes, name: str, mode: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        ...

    async def symlink(self, pargfid: bytes, name: str, target: str, gfid: bytes, umask: int = 0,
                      xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        ...

    async def create(self, pargfid: bytes, name: str, flags: int, mode: int, gfid: bytes, umask: int = 0,
                     xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        """Create and open: ``Result.fd`` is a handle of this layer."""
        ...

    async def link(self, gfid: bytes, newpar: bytes, newname: str, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        ...

    async def unlink(self, pargfid: bytes, name: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        ...

    async def rmdir(self, pargfid: bytes, name: str, flags: int = 0, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        ...

    async def rename(self, oldpar: bytes, oldname: str, newpar: bytes, newname: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        ...

    # ---------------------------------------------------------------- open files and directories

    async def open(self, gfid: bytes, flags: int, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        ...

    async def opendir(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        ...

    async def release(self, fd: int) -> None:
        """Close a handle. Never fails for a lost connection (the brick forgot the fd with it)."""
        ...

    async def releasedir(self, fd: int) -> None:
        ...

    async def read(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        ...

    async def write(self, fd: int, offset: int, data: bytes, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        """``Result.ret`` is the count written (less than ``len(data)``: a short write)."""
        ...

    async def fstat(self, fd: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        ...

    async def flush(self, fd: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        """close(): the bricks drop the POSIX locks of ``cred.lk_owner`` on the file."""
        ...

    async def fsync(self, fd: int, datasync: bool = False, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        ...

    async def ftruncate(self, fd: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        ...

    async def fsetattr(self, fd: int, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        ...

    async def fgetxattr(self, fd: int, name: str = "", xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        ...

    async def fsetxattr(self, fd: int, d: Dict, flags: int = 0, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        ...

    async def fremovexattr(self, fd: int, name: str, xdata: Dict | None = None,
                           cred: Credential | None = None) -> Result:
        ...

    async def fxattrop(self, fd: int, op: int, d: Dict, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        ...

    async def finodelk(self, fd: int, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        ...

    async def fentrylk(self, fd: int, domain: str, name: str | None, cmd: int, type_: int = F.ENTRYLK_WRLCK,
                       xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        ...

    async def lk(self, fd: int, cmd: int, flock: Flock, xdata: Dict | None = None,
                 cred: Credential | None = None) -> Result:
        """POSIX record lock (``GETLK``/``SETLK``/``SETLKW``) of ``cred.lk_owner``."""
        ...

    async def fallocate(self, fd: int, mode: int, offset: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        ...

    async def discard(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        ...

    async def zerofill(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        ...

    async def readdirp(self, fd: int, offset: int = 0, size: int = READDIR_SIZE, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        """One page with attributes; ``entries[-1].off`` is where the next page starts, empty: the end."""
        ...

    async def readdir(self, fd: int, offset: int = 0, size: int = READDIR_SIZE, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        ...


class Subvolume(Fops, Protocol):
    """A child of distribute: a replica set or a single brick."""

    @property
    def name(self) -> str:
        """The volfile's name of the translator (a linkto file names its data's subvolume with it)."""
        ...

    @property
    def is_up(self) -> bool:
        ...


@dataclass(frozen=True)
class BrickEvent:
    """A brick session went up or down (``reason``: why it went down)."""

    client: Brick
    up: bool
    reason: str = ""


class Brick(Subvolume, Protocol):
    """A child of replicate: one brick's session, which AFR watches.

    ``generation`` grows with every (re)connection: locks and fds taken under an older one are
    gone on the brick. Subscribers of :meth:`subscribe` are called synchronously on every up/down
    transition (after the fds are reopened, for an up); :meth:`subscribe_callbacks` delivers the
    brick's callbacks (``fn(proc, decoded)``, e.g. ``INODELK_CONTENTION``).
    """

    @property
    def generation(self) -> int:
        ...

    def subscribe(self, fn: Callable[[BrickEvent], None]) -> None:
        ...

    def subscribe_callbacks(self, fn: Callable[[int, Any], None]) -> None:
        ...


class BrickEvents:
    """Up/down state and subscribers of one brick session, shared by BrickClient and its test double
    (testkit.membrick.MemClient), so replicate learns of a brick coming and going the same way from both."""

    name: str

    def __init__(self) -> None:
        self.is_up = False
        #: set while up; a new (unset) event after each down
        self.up = trio.Event()
        self._subscribers: list[Callable[[BrickEvent], None]] = []
        self._cbk_subscribers: list[Callable[[int, Any], None]] = []

    def subscribe(self, fn: Callable[[BrickEvent], None]) -> None:
        """``fn`` is called (synchronously) on every up/down transition."""
        self._subscribers.append(fn)

    def subscribe_callbacks(self, fn: Callable[[int, Any], None]) -> None:
        """``fn(proc, decoded)`` for every callback the brick sends (upcalls, lock contention)."""
        self._cbk_subscribers.append(fn)

    def _label(self) -> str:
        return self.name

    def _emit(self, up: bool, reason: str) -> None:
        if up == self.is_up:
            return
        self.is_up = up
        if up:
            self.up.set()
        else:
            self.up = trio.Event()
        log.info("%s: brick %s%s", self._label(), "up" if up else "down", f" ({reason})" if reason else "")
        for fn in list(self._subscribers):
            try:
                fn(BrickEvent(self, up, reason))  # type: ignore[arg-type]  # every user is a Brick
            except Exception:
                log.exception("brick event subscriber failed")

    def _deliver(self, proc: int, decoded: Any) -> None:
        for fn in list(self._cbk_subscribers):
            try:
                fn(proc, decoded)
            except Exception:
                log.exception("callback subscriber failed")


class PassThrough(Fops):
    """Every fop goes to ``child`` unchanged: the base of a layer that changes only a few of them."""

    def __init__(self, child: Subvolume) -> None:
        self.child = child

    @property
    def name(self) -> str:
        return self.child.name

    @property
    def is_up(self) -> bool:
        return self.child.is_up

    async def lookup(self, pargfid: bytes, name: str, xdata: Dict | None = None, *, gfid: bytes = NULL_GFID,
                     cred: Credential | None = None) -> Result:
        return await self.child.lookup(pargfid, name, xdata, gfid=gfid, cred=cred)

    async def lookup_gfid(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self.child.lookup_gfid(gfid, xdata, cred)

    async def stat(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self.child.stat(gfid, xdata, cred)

    async def readlink(self, gfid: bytes, size: int = 4096, cred: Credential | None = None) -> Result:
        return await self.child.readlink(gfid, size, cred)

    async def access(self, gfid: bytes, mask: int, cred: Credential | None = None) -> Result:
        return await self.child.access(gfid, mask, cred)

    async def statfs(self, gfid: bytes = ROOT_GFID, xdata: Dict | None = None) -> Result:
        return await self.child.statfs(gfid, xdata)

    async def setattr(self, gfid: bytes, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        return await self.child.setattr(gfid, stbuf, valid, xdata, cred)

    async def truncate(self, gfid: bytes, size: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self.child.truncate(gfid, size, xdata, cred)

    async def getxattr(self, gfid: bytes, name: str = "", xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self.child.getxattr(gfid, name, xdata, cred)

    async def setxattr(self, gfid: bytes, d: Dict, flags: int = 0, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self.child.setxattr(gfid, d, flags, xdata, cred)

    async def removexattr(self, gfid: bytes, name: str, xdata: Dict | None = None,
                          cred: Credential | None = None) -> Result:
        return await self.child.removexattr(gfid, name, xdata, cred)

    async def xattrop(self, gfid: bytes, op: int, d: Dict, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        return await self.child.xattrop(gfid, op, d, xdata, cred)

    async def inodelk(self, gfid: bytes, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        return await self.child.inodelk(gfid, domain, cmd, flock, xdata, cred)

    async def entrylk(self, gfid: bytes, domain: str, name: str | None, cmd: int, type_: int = F.ENTRYLK_WRLCK,
                      xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self.child.entrylk(gfid, domain, name, cmd, type_, xdata, cred)

    async def mknod(self, pargfid: bytes, name: str, mode: int, rdev: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self.child.mknod(pargfid, name, mode, rdev, gfid, umask, xdata, cred)

    async def mkdir(self, pargfid: bytes, name: str, mode: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self.child.mkdir(pargfid, name, mode, gfid, umask, xdata, cred)

    async def symlink(self, pargfid: bytes, name: str, target: str, gfid: bytes, umask: int = 0,
                      xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self.child.symlink(pargfid, name, target, gfid, umask, xdata, cred)

    async def create(self, pargfid: bytes, name: str, flags: int, mode: int, gfid: bytes, umask: int = 0,
                     xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self.child.create(pargfid, name, flags, mode, gfid, umask, xdata, cred)

    async def link(self, gfid: bytes, newpar: bytes, newname: str, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        return await self.child.link(gfid, newpar, newname, xdata, cred)

    async def unlink(self, pargfid: bytes, name: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        return await self.child.unlink(pargfid, name, xdata, cred)

    async def rmdir(self, pargfid: bytes, name: str, flags: int = 0, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        return await self.child.rmdir(pargfid, name, flags, xdata, cred)

    async def rename(self, oldpar: bytes, oldname: str, newpar: bytes, newname: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        return await self.child.rename(oldpar, oldname, newpar, newname, xdata, cred)

    async def open(self, gfid: bytes, flags: int, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        return await self.child.open(gfid, flags, xdata, cred)

    async def opendir(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self.child.opendir(gfid, xdata, cred)

    async def release(self, fd: int) -> None:
        await self.child.release(fd)

    async def releasedir(self, fd: int) -> None:
        await self.child.releasedir(fd)

    async def read(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        return await self.child.read(fd, offset, size, xdata, cred)

    async def write(self, fd: int, offset: int, data: bytes, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        return await self.child.write(fd, offset, data, xdata, cred)

    async def fstat(self, fd: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self.child.fstat(fd, xdata, cred)

    async def flush(self, fd: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self.child.flush(fd, xdata, cred)

    async def fsync(self, fd: int, datasync: bool = False, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        return await self.child.fsync(fd, datasync, xdata, cred)

    async def ftruncate(self, fd: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        return await self.child.ftruncate(fd, size, xdata, cred)

    async def fsetattr(self, fd: int, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self.child.fsetattr(fd, stbuf, valid, xdata, cred)

    async def fgetxattr(self, fd: int, name: str = "", xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        return await self.child.fgetxattr(fd, name, xdata, cred)

    async def fsetxattr(self, fd: int, d: Dict, flags: int = 0, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        return await self.child.fsetxattr(fd, d, flags, xdata, cred)

    async def fremovexattr(self, fd: int, name: str, xdata: Dict | None = None,
                           cred: Credential | None = None) -> Result:
        return await self.child.fremovexattr(fd, name, xdata, cred)

    async def fxattrop(self, fd: int, op: int, d: Dict, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self.child.fxattrop(fd, op, d, xdata, cred)

    async def finodelk(self, fd: int, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self.child.finodelk(fd, domain, cmd, flock, xdata, cred)

    async def fentrylk(self, fd: int, domain: str, name: str | None, cmd: int, type_: int = F.ENTRYLK_WRLCK,
                       xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        return await self.child.fentrylk(fd, domain, name, cmd, type_, xdata, cred)

    async def lk(self, fd: int, cmd: int, flock: Flock, xdata: Dict | None = None,
                 cred: Credential | None = None) -> Result:
        return await self.child.lk(fd, cmd, flock, xdata, cred)

    async def fallocate(self, fd: int, mode: int, offset: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        return await self.child.fallocate(fd, mode, offset, size, xdata, cred)

    async def discard(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        return await self.child.discard(fd, offset, size, xdata, cred)

    async def zerofill(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self.child.zerofill(fd, offset, size, xdata, cred)

    async def readdirp(self, fd: int, offset: int = 0, size: int = READDIR_SIZE, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        return await self.child.readdirp(fd, offset, size, xdata, cred)

    async def readdir(self, fd: int, offset: int = 0, size: int = READDIR_SIZE, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        return await self.child.readdir(fd, offset, size, xdata, cred)


def attrs(r: Result) -> Iatt:
    """The attributes a successful reply must carry (lookup, create, …); EIO if a brick sent none."""
    if r.stat is None:
        raise OSError(errno.EIO, "reply without attributes")
    return r.stat
