"""Directory attributes from the replies of entry operations, for the stat that follows them.

After every create, unlink, mkdir, rename... in a directory the kernel drops that directory's
attributes and asks for them again (it checks permissions on the directory before the next
operation): one brick round trip per created or removed file, two on a distributed volume. The
reply of the entry operation already carries the directory's attributes after the change
(post-parent), as fresh as any stat could be, so this layer keeps them for a short time and answers
that stat itself — what gluster's md-cache does with the same attributes. Anything that changes a
directory's attributes otherwise (setattr, xattrs) drops its entry; entries expire after ``ttl``
(the kernel's own attribute timeout is the same kind of bound for other clients' changes).
"""

from __future__ import annotations

import trio

from ..bounded import BoundedDict
from ..dicts import Dict
from ..fops import Result
from ..iatt import Iatt
from ..rpc import Credential
from .api import PassThrough, Subvolume


class MdCache(PassThrough):
    """Entry fops keep their parent's post-change attributes; ``stat`` answers from them within ``ttl``."""

    def __init__(self, child: Subvolume, ttl: float = 1.0) -> None:
        super().__init__(child)
        self.ttl = ttl
        self._attrs: BoundedDict[bytes, tuple[float, Iatt]] = BoundedDict(10_000)

    def _keep(self, gfid: bytes, iatt: Iatt | None) -> None:
        if iatt is not None and iatt.is_dir and iatt.gfid == gfid:
            self._attrs[gfid] = (trio.current_time(), iatt)
        else:
            self._attrs.pop(gfid, None)

    def _entry_done(self, pargfid: bytes, r: Result) -> Result:
        self._keep(pargfid, r.postparent)
        return r

    async def stat(self, gfid: bytes, xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        hit = self._attrs.get(gfid)
        if hit is not None and xdata is None and trio.current_time() - hit[0] < self.ttl:
            return Result(0, 0, stat=hit[1])
        return await self.child.stat(gfid, xdata, cred)

    # ------------------------------------------------------------ entry fops: the parent's post-change attributes
    # (dropped first: a stat while the fop is on its way must not be answered from the attributes before it)

    async def create(self, pargfid: bytes, name: str, flags: int, mode: int, gfid: bytes, umask: int = 0,
                     xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        self._attrs.pop(pargfid, None)
        return self._entry_done(pargfid, await self.child.create(pargfid, name, flags, mode, gfid, umask, xdata,
                                                                 cred))

    async def mknod(self, pargfid: bytes, name: str, mode: int, rdev: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        self._attrs.pop(pargfid, None)
        return self._entry_done(pargfid, await self.child.mknod(pargfid, name, mode, rdev, gfid, umask, xdata, cred))

    async def mkdir(self, pargfid: bytes, name: str, mode: int, gfid: bytes, umask: int = 0,
                    xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        self._attrs.pop(pargfid, None)
        return self._entry_done(pargfid, await self.child.mkdir(pargfid, name, mode, gfid, umask, xdata, cred))

    async def symlink(self, pargfid: bytes, name: str, target: str, gfid: bytes, umask: int = 0,
                      xdata: Dict | None = None, cred: Credential | None = None) -> Result:
        self._attrs.pop(pargfid, None)
        return self._entry_done(pargfid, await self.child.symlink(pargfid, name, target, gfid, umask, xdata, cred))

    async def unlink(self, pargfid: bytes, name: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        self._attrs.pop(pargfid, None)
        return self._entry_done(pargfid, await self.child.unlink(pargfid, name, xdata, cred))

    async def rmdir(self, pargfid: bytes, name: str, flags: int = 0, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        self._attrs.pop(pargfid, None)
        return self._entry_done(pargfid, await self.child.rmdir(pargfid, name, flags, xdata, cred))

    async def link(self, gfid: bytes, newpar: bytes, newname: str, xdata: Dict | None = None,
                   cred: Credential | None = None) -> Result:
        self._attrs.pop(newpar, None)
        return self._entry_done(newpar, await self.child.link(gfid, newpar, newname, xdata, cred))

    async def rename(self, oldpar: bytes, oldname: str, newpar: bytes, newname: str, xdata: Dict | None = None,
                     cred: Credential | None = None) -> Result:
        self._attrs.pop(oldpar, None)
        self._attrs.pop(newpar, None)
        r = await self.child.rename(oldpar, oldname, newpar, newname, xdata, cred)
        if oldpar != newpar:
            self._keep(oldpar, r.postoldparent)
        self._keep(newpar, r.postparent)
        return r

    # ------------------------------------------------------------ changes that entry replies do not describe

    async def setattr(self, gfid: bytes, stbuf: Iatt, valid: int, xdata: Dict | None = None,
                      cred: Credential | None = None) -> Result:
        self._attrs.pop(gfid, None)
        return await self.child.setattr(gfid, stbuf, valid, xdata, cred)

    async def setxattr(self, gfid: bytes, d: Dict, flags: int = 0, xdata: Dict | None = None,
                       cred: Credential | None = None) -> Result:
        self._attrs.pop(gfid, None)
        return await self.child.setxattr(gfid, d, flags, xdata, cred)

    async def removexattr(self, gfid: bytes, name: str, xdata: Dict | None = None,
                          cred: Credential | None = None) -> Result:
        self._attrs.pop(gfid, None)
        return await self.child.removexattr(gfid, name, xdata, cred)
