"""The top of the stack across volfile changes: new work goes to the newest graph.

When glusterd hands out a new volfile (add-brick, remove-brick, a changed option), the mount
builds a second graph beside the first; this layer then sends every new lookup, open and
gfid-based call to it. Open files and directories stay on the graph they were opened on until
they are released (their locks and eager-lock state live there), and an old graph is stopped when
its last handle is gone and no call is left on it. Handles are numbered here, so two graphs'
numbers never mix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Callable

from ..dicts import Dict
from ..fops import ENTRYLK_WRLCK, Flock, Result
from ..iatt import NULL_GFID, ROOT_GFID, Iatt
from ..rpc import Credential
from .api import READDIR_SIZE, Fops, Subvolume
from .handles import Handles

log = logging.getLogger(__name__)


@dataclass
class _Generation:
    top: Subvolume
    on_idle: Callable[[], None] | None
    #: open handles made on this graph (reserved when the opening call starts)
    handles: int = 0
    #: calls in progress on this graph (a lookup that started before a switch must finish on it)
    busy: int = 0


class _Call:
    """One call in progress on a graph: counted, so the graph is not retired under it."""

    __slots__ = ("switch", "gen")

    def __init__(self, switch: GraphSwitch, gen: _Generation) -> None:
        self.switch = switch
        self.gen = gen

    def __enter__(self) -> Subvolume:
        self.gen.busy += 1
        return self.gen.top

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.gen.busy -= 1
        self.switch._maybe_retire(self.gen)


class GraphSwitch(Fops):
    """Delegates to the current graph's top; handle-based fops to the graph that made the handle."""

    def __init__(self, top: Subvolume) -> None:
        self._current = _Generation(top, None)
        self._handles: Handles[tuple[_Generation, int]] = Handles("graph switch", "handle")
        self.generation = 1

    @property
    def current(self) -> Subvolume:
        return self._current.top

    @property
    def name(self) -> str:
        return self._current.top.name

    @property
    def is_up(self) -> bool:
        return self._current.top.is_up

    def switch(self, top: Subvolume, retire: Callable[[], None]) -> None:
        """Send new work to ``top``; ``retire()`` is called once the old graph has no open handle."""
        old = self._current
        self._current = _Generation(top, None)
        self.generation += 1
        old.on_idle = retire
        self._maybe_retire(old)

    def _maybe_retire(self, gen: _Generation) -> None:
        if gen is not self._current and gen.handles == 0 and gen.busy == 0 and gen.on_idle is not None:
            retire, gen.on_idle = gen.on_idle, None
            retire()

    # ------------------------------------------------------------ the three kinds of call

    def _new_work(self) -> _Call:
        """A call that names no handle: the current graph."""
        return _Call(self, self._current)

    def _by_handle(self, handle: int) -> tuple[_Call, int]:
        """A call on an open handle: the graph that opened it, and that graph's own handle."""
        gen, inner = self._handles.get(handle)
        return _Call(self, gen), inner

    def _reserve(self) -> _Generation:
        """An opening call: the handle it will make is counted from the start, so its graph stays."""
        gen = self._current
        gen.handles += 1
        return gen

    def _unreserve(self, gen: _Generation) -> None:
        gen.handles -= 1
        self._maybe_retire(gen)

    def _adopt(self, gen: _Generation, r: Result) -> Result:
        assert r.fd is not None
        return self._handles.adopt(r, (gen, r.fd))

    # ------------------------------------------------------------ fops that open handles

    async def create(self, pargfid: bytes, name: str, flags: int, mode: int, gfid: bytes, umask: int = 0,
                     xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        gen = self._reserve()
        try:
            with _Call(self, gen) as top:
                r = await top.create(pargfid, name, flags, mode, gfid, umask, xdata, cred)
        except BaseException:
            self._unreserve(gen)
            raise
        return self._adopt(gen, r)

    async def open(self, gfid: bytes, flags: int, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        gen = self._reserve()
        try:
            with _Call(self, gen) as top:
                r = await top.open(gfid, flags, xdata, cred)
        except BaseException:
            self._unreserve(gen)
            raise
        return self._adopt(gen, r)

    async def opendir(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        gen = self._reserve()
        try:
            with _Call(self, gen) as top:
                r = await top.opendir(gfid, xdata, cred)
        except BaseException:
            self._unreserve(gen)
            raise
        return self._adopt(gen, r)

    async def reopen_as(self, handle: int, gfid: bytes, flags: int, cred: Credential | None = None) -> None:
        """Open ``gfid`` on the current graph as ``handle`` (gfuse.takeover: the number the kernel holds)."""
        gen = self._reserve()
        try:
            with _Call(self, gen) as top:
                r = await top.open(gfid, flags, None, cred)
        except BaseException:
            self._unreserve(gen)
            raise
        assert r.fd is not None
        self._handles.put(handle, (gen, r.fd))

    def reserve_handles(self, upto: int) -> None:
        """Number new handles above ``upto`` (handles a previous process gave the kernel)."""
        self._handles.skip_to(upto)

    async def release(self, fd: int) -> None:
        entry = self._handles.pop(fd)
        if entry is None:
            return
        gen, inner = entry
        try:
            with _Call(self, gen) as top:
                await top.release(inner)
        finally:
            self._unreserve(gen)

    releasedir = release

    # ------------------------------------------------------------ fops on an open handle

    async def read(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.read(inner, offset, size, xdata, cred)

    async def write(self, fd: int, offset: int, data: bytes, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.write(inner, offset, data, xdata, cred)

    async def fstat(self, fd: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.fstat(inner, xdata, cred)

    async def flush(self, fd: int, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.flush(inner, xdata, cred)

    async def fsync(self, fd: int, datasync: bool = False, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.fsync(inner, datasync, xdata, cred)

    async def ftruncate(self, fd: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.ftruncate(inner, size, xdata, cred)

    async def fsetattr(self, fd: int, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.fsetattr(inner, stbuf, valid, xdata, cred)

    async def fgetxattr(self, fd: int, name: str = "", xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.fgetxattr(inner, name, xdata, cred)

    async def fsetxattr(self, fd: int, d: Dict, flags: int = 0, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.fsetxattr(inner, d, flags, xdata, cred)

    async def fremovexattr(self, fd: int, name: str, xdata: Dict | None = None,
                           cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.fremovexattr(inner, name, xdata, cred)

    async def fxattrop(self, fd: int, op: int, d: Dict, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.fxattrop(inner, op, d, xdata, cred)

    async def finodelk(self, fd: int, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.finodelk(inner, domain, cmd, flock, xdata, cred)

    async def fentrylk(self, fd: int, domain: str, name: str | None, cmd: int, type_: int = ENTRYLK_WRLCK,
                       xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.fentrylk(inner, domain, name, cmd, type_, xdata, cred)

    async def lk(self, fd: int, cmd: int, flock: Flock, xdata: Dict | None = None,
                 cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.lk(inner, cmd, flock, xdata, cred)

    async def fallocate(self, fd: int, mode: int, offset: int, size: int, xdata: Dict | None = None,
                        cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.fallocate(inner, mode, offset, size, xdata, cred)

    async def discard(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.discard(inner, offset, size, xdata, cred)

    async def zerofill(self, fd: int, offset: int, size: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.zerofill(inner, offset, size, xdata, cred)

    async def readdirp(self, fd: int, offset: int = 0, size: int = READDIR_SIZE, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.readdirp(inner, offset, size, xdata, cred)

    async def readdir(self, fd: int, offset: int = 0, size: int = READDIR_SIZE, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        call, inner = self._by_handle(fd)
        with call as top:
            return await top.readdir(inner, offset, size, xdata, cred)

    # ------------------------------------------------------------ new work: the current graph

    async def lookup(self, pargfid: bytes, name: str, xdata: Dict | None = None, *, gfid: bytes = NULL_GFID,
                     cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.lookup(pargfid, name, xdata, gfid=gfid, cred=cred)

    async def lookup_gfid(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.lookup_gfid(gfid, xdata, cred)

    async def stat(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.stat(gfid, xdata, cred)

    async def readlink(self, gfid: bytes, size: int = 4096, cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.readlink(gfid, size, cred)

    async def access(self, gfid: bytes, mask: int, cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.access(gfid, mask, cred)

    async def statfs(self, gfid: bytes = ROOT_GFID, xdata: Dict | None = None) -> Result:
        with self._new_work() as top:
            return await top.statfs(gfid, xdata)

    async def setattr(self, gfid: bytes, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.setattr(gfid, stbuf, valid, xdata, cred)

    async def truncate(self, gfid: bytes, size: int, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.truncate(gfid, size, xdata, cred)

    async def getxattr(self, gfid: bytes, name: str = "", xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.getxattr(gfid, name, xdata, cred)

    async def setxattr(self, gfid: bytes, d: Dict, flags: int = 0, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.setxattr(gfid, d, flags, xdata, cred)

    async def removexattr(self, gfid: bytes, name: str, xdata: Dict | None = None,
                          cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.removexattr(gfid, name, xdata, cred)

    async def xattrop(self, gfid: bytes, op: int, d: Dict, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.xattrop(gfid, op, d, xdata, cred)

    async def inodelk(self, gfid: bytes, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.inodelk(gfid, domain, cmd, flock, xdata, cred)

    async def entrylk(self, gfid: bytes, domain: str, name: str | None, cmd: int, type_: int = ENTRYLK_WRLCK,
                      xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.entrylk(gfid, domain, name, cmd, type_, xdata, cred)

    async def mknod(self, pargfid: bytes, name: str, mode: int, rdev: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.mknod(pargfid, name, mode, rdev, gfid, umask, xdata, cred)

    async def mkdir(self, pargfid: bytes, name: str, mode: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.mkdir(pargfid, name, mode, gfid, umask, xdata, cred)

    async def symlink(self, pargfid: bytes, name: str, target: str, gfid: bytes, umask: int = 0,
                      xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.symlink(pargfid, name, target, gfid, umask, xdata, cred)

    async def link(self, gfid: bytes, newpar: bytes, newname: str, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.link(gfid, newpar, newname, xdata, cred)

    async def unlink(self, pargfid: bytes, name: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.unlink(pargfid, name, xdata, cred)

    async def rmdir(self, pargfid: bytes, name: str, flags: int = 0, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.rmdir(pargfid, name, flags, xdata, cred)

    async def rename(self, oldpar: bytes, oldname: str, newpar: bytes, newname: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        with self._new_work() as top:
            return await top.rename(oldpar, oldname, newpar, newname, xdata, cred)
