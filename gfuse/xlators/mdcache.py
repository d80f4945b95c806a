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
from typing import Any

from ..bounded import BoundedDict
from ..fops import Result
from ..iatt import Iatt

#: fops whose first argument is the parent directory, with its post-change attributes in ``postparent``
PARENT_FIRST = frozenset({"create", "mknod", "mkdir", "symlink", "unlink", "rmdir"})
#: fops that change the attributes of the inode named by their first argument
CHANGES_INODE = frozenset({"setattr", "setxattr", "removexattr"})


class MdCache:
    def __init__(self, child: Any, ttl: float = 1.0) -> None:
        self.child = child
        self.ttl = ttl
        self._attrs: BoundedDict[bytes, tuple[float, Iatt]] = BoundedDict(10_000)

    def _keep(self, gfid: bytes, iatt: Iatt | None) -> None:
        if iatt is not None and iatt.is_dir and iatt.gfid == gfid:
            self._attrs[gfid] = (trio.current_time(), iatt)
        else:
            self._attrs.pop(gfid, None)

    async def stat(self, gfid: bytes, xdata: Any = None, cred: Any = None) -> Result:
        hit = self._attrs.get(gfid)
        if hit is not None and xdata is None and trio.current_time() - hit[0] < self.ttl:
            return Result(0, 0, stat=hit[1])
        return await self.child.stat(gfid, xdata, cred=cred)

    async def link(self, gfid: bytes, newpar: bytes, *args: Any, **kw: Any) -> Result:
        self._attrs.pop(newpar, None)
        r = await self.child.link(gfid, newpar, *args, **kw)
        self._keep(newpar, r.postparent)
        return r

    async def rename(self, oldpar: bytes, oldname: str, newpar: bytes, *args: Any, **kw: Any) -> Result:
        self._attrs.pop(oldpar, None)
        self._attrs.pop(newpar, None)
        r = await self.child.rename(oldpar, oldname, newpar, *args, **kw)
        if oldpar != newpar:
            self._keep(oldpar, r.postoldparent)
        self._keep(newpar, r.postparent)
        return r

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        fn = getattr(self.child, name)
        if name in PARENT_FIRST:
            async def entry_op(pargfid: bytes, *args: Any, **kw: Any) -> Any:
                self._attrs.pop(pargfid, None)
                r = await fn(pargfid, *args, **kw)
                self._keep(pargfid, r.postparent)
                return r
            self.__dict__[name] = entry_op
            return entry_op
        if name in CHANGES_INODE:
            async def changes(gfid: bytes, *args: Any, **kw: Any) -> Any:
                self._attrs.pop(gfid, None)
                return await fn(gfid, *args, **kw)
            self.__dict__[name] = changes
            return changes
        return fn
