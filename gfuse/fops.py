"""GlusterFS v4 (gfx) fop messages: request encoders and reply decoders, pure functions.

Numbers and layouts follow gluster's ``rpc/xdr/src/glusterfs4-xdr.x`` and
``rpc/rpc-lib/src/protocol-common.h``; wire quirks are in ``shared/PROTOCOL.md``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

from .dicts import Dict, decode_gfx, encode_gfx
from .iatt import NULL_GFID, Iatt, Statfs
from .xdr import Packer, ProtocolError, Unpacker

FOP_PROGRAM = 1298437
FOP_VERSION = 400
CBK_PROGRAM = 52743234
CBK_VERSION = 1


class Proc(enum.IntEnum):
    STAT = 1
    READLINK = 2
    MKNOD = 3
    MKDIR = 4
    UNLINK = 5
    RMDIR = 6
    SYMLINK = 7
    RENAME = 8
    LINK = 9
    TRUNCATE = 10
    OPEN = 11
    READ = 12
    WRITE = 13
    STATFS = 14
    FLUSH = 15
    FSYNC = 16
    SETXATTR = 17
    GETXATTR = 18
    REMOVEXATTR = 19
    OPENDIR = 20
    FSYNCDIR = 21
    ACCESS = 22
    CREATE = 23
    FTRUNCATE = 24
    FSTAT = 25
    LK = 26
    LOOKUP = 27
    READDIR = 28
    INODELK = 29
    FINODELK = 30
    ENTRYLK = 31
    FENTRYLK = 32
    XATTROP = 33
    FXATTROP = 34
    FGETXATTR = 35
    FSETXATTR = 36
    RCHECKSUM = 37
    SETATTR = 38
    FSETATTR = 39
    READDIRP = 40
    RELEASE = 41
    RELEASEDIR = 42
    FREMOVEXATTR = 43
    FALLOCATE = 44
    DISCARD = 45
    ZEROFILL = 46
    IPC = 47
    SEEK = 48


class Cbk(enum.IntEnum):
    """Procedures of the callback program (brick → client)."""

    FETCHSPEC = 1
    INO_FLUSH = 2
    EVENT_NOTIFY = 3
    GET_SNAPS = 4
    CACHE_INVALIDATION = 5
    CHILD_UP = 6
    CHILD_DOWN = 7
    RECALL_LEASE = 8
    STATEDUMP = 9
    INODELK_CONTENTION = 10
    ENTRYLK_CONTENTION = 11


# lock commands and types
GETLK, SETLK, SETLKW = 0, 1, 2
RDLCK, WRLCK, UNLCK = 0, 1, 2
ENTRYLK_LOCK, ENTRYLK_UNLOCK, ENTRYLK_LOCK_NB = 0, 1, 2
ENTRYLK_RDLCK, ENTRYLK_WRLCK = 0, 1
# xattrop ops
XATTROP_ADD_ARRAY = 0
XATTROP_ADD_ARRAY64 = 1
XATTROP_OR_ARRAY = 2
XATTROP_AND_ARRAY = 3
XATTROP_GET_AND_SET = 4
XATTROP_ADD_ARRAY_WITH_DEFAULT = 5
XATTROP_ADD_ARRAY64_WITH_DEFAULT = 6


@dataclass
class Flock:
    type: int = WRLCK
    whence: int = 0
    start: int = 0
    len: int = 0
    pid: int = 0
    owner: bytes = b""

    def encode(self, p: Packer) -> None:
        p.u32(self.type).u32(self.whence).u64(self.start).u64(self.len).u32(self.pid).opaque(self.owner)

    @classmethod
    def decode(cls, u: Unpacker) -> "Flock":
        return cls(u.u32(), u.u32(), u.u64(), u.u64(), u.u32(), u.opaque(1024))


@dataclass
class DirEntry:
    ino: int
    off: int
    type: int
    name: str
    stat: Iatt | None = None
    xdata: Dict | None = None


@dataclass
class Result:
    """A decoded fop reply; which fields are set depends on the fop."""

    ret: int
    errno: int
    xdata: Dict | None = None
    stat: Iatt | None = None
    pre: Iatt | None = None
    post: Iatt | None = None
    preparent: Iatt | None = None
    postparent: Iatt | None = None
    preoldparent: Iatt | None = None
    postoldparent: Iatt | None = None
    fd: int | None = None
    data: bytes | None = None
    dict: Dict | None = None
    statfs: Statfs | None = None
    flock: Flock | None = None
    entries: list[DirEntry] = field(default_factory=list)
    path: str | None = None
    offset: int | None = None

    # Typed access to a field that the fop's reply always carries (its decoder sets it): a reply
    # without it is one the protocol does not allow, a ProtocolError rather than a None passed on.
    def need_stat(self) -> Iatt:
        """``stat`` of LOOKUP, STAT/FSTAT, READLINK, READ, RENAME and the entries made (MKNOD … CREATE)."""
        return _need(self.stat, "stat")

    def need_post(self) -> Iatt:
        """``post`` of (F)TRUNCATE, WRITE, FSYNC, (F)SETATTR, FALLOCATE, DISCARD, ZEROFILL."""
        return _need(self.post, "post-op stat")

    def need_fd(self) -> int:
        """``fd`` of OPEN, OPENDIR, CREATE."""
        return _need(self.fd, "fd")

    def need_statfs(self) -> Statfs:
        """``statfs`` of STATFS."""
        return _need(self.statfs, "statfs")


_T = TypeVar("_T")


def _need(value: _T | None, what: str) -> _T:
    if value is None:
        raise ProtocolError(f"the reply carries no {what}")
    return value


# ------------------------------------------------------------------- requests


def _x(p: Packer, xdata: Mapping[str, Any] | None) -> bytes:
    return p.raw(encode_gfx(xdata)).bytes()


def _g(gfid: bytes) -> Packer:
    return Packer().fixed(gfid, 16)


def lookup_req(gfid: bytes, pargfid: bytes = NULL_GFID, name: str = "", flags: int = 0,
               xdata: Dict | None = None) -> bytes:
    return _x(Packer().fixed(gfid, 16).fixed(pargfid, 16).u32(flags).string(name), xdata)


def stat_req(gfid: bytes, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid), xdata)


def fd_req(gfid: bytes, fd: int, xdata: Dict | None = None) -> bytes:
    """FSTAT, FLUSH, RELEASE, RELEASEDIR."""
    return _x(_g(gfid).i64(fd), xdata)


def readlink_req(gfid: bytes, size: int = 4096, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).u32(size), xdata)


def mknod_req(pargfid: bytes, name: str, mode: int, dev: int = 0, umask: int = 0, xdata: Dict | None = None) -> bytes:
    return _x(_g(pargfid).u64(dev).u32(mode).u32(umask).string(name), xdata)


def mkdir_req(pargfid: bytes, name: str, mode: int, umask: int = 0, xdata: Dict | None = None) -> bytes:
    return _x(_g(pargfid).u32(mode).u32(umask).string(name), xdata)


def unlink_req(pargfid: bytes, name: str, xflags: int = 0, xdata: Dict | None = None) -> bytes:
    return _x(_g(pargfid).string(name).u32(xflags), xdata)


def rmdir_req(pargfid: bytes, name: str, xflags: int = 0, xdata: Dict | None = None) -> bytes:
    return _x(_g(pargfid).i32(xflags).string(name), xdata)


def symlink_req(pargfid: bytes, name: str, target: str, umask: int = 0, xdata: Dict | None = None) -> bytes:
    return _x(_g(pargfid).string(name).u32(umask).string(target), xdata)


def rename_req(oldpar: bytes, oldname: str, newpar: bytes, newname: str, xdata: Dict | None = None) -> bytes:
    return _x(_g(oldpar).fixed(newpar, 16).string(oldname).string(newname), xdata)


def link_req(oldgfid: bytes, newpar: bytes, newname: str, xdata: Dict | None = None) -> bytes:
    return _x(_g(oldgfid).fixed(newpar, 16).string(newname), xdata)


def truncate_req(gfid: bytes, offset: int, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).u64(offset), xdata)


def ftruncate_req(gfid: bytes, fd: int, offset: int, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).i64(fd).u64(offset), xdata)


def open_req(gfid: bytes, flags: int, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).u32(flags), xdata)


def read_req(gfid: bytes, fd: int, offset: int, size: int, flag: int = 0, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).i64(fd).u64(offset).u32(size).u32(flag), xdata)


def write_req(gfid: bytes, fd: int, offset: int, data: bytes, flag: int = 0, xdata: Dict | None = None) -> bytes:
    """WRITE: the payload follows the XDR raw, unpadded, without a length."""
    return _x(_g(gfid).i64(fd).u64(offset).u32(len(data)).u32(flag), xdata) + bytes(data)


def fsync_req(gfid: bytes, fd: int, datasync: int = 0, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).i64(fd).u32(datasync), xdata)


def setxattr_req(gfid: bytes, d: Dict, flags: int = 0, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).u32(flags).raw(encode_gfx(d)), xdata)


def fsetxattr_req(gfid: bytes, fd: int, d: Dict, flags: int = 0, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).i64(fd).u32(flags).raw(encode_gfx(d)), xdata)


def getxattr_req(gfid: bytes, name: str = "", xdata: Dict | None = None) -> bytes:
    # namelen is 1 when a name is given (gluster sends a flag, not a length)
    return _x(_g(gfid).u32(1 if name else 0).string(name), xdata)


def fgetxattr_req(gfid: bytes, fd: int, name: str = "", xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).i64(fd).u32(1 if name else 0).string(name), xdata)


def removexattr_req(gfid: bytes, name: str, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).string(name), xdata)


def fremovexattr_req(gfid: bytes, fd: int, name: str, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).i64(fd).string(name), xdata)


def opendir_req(gfid: bytes, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid), xdata)


def access_req(gfid: bytes, mask: int, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).u32(mask), xdata)


def create_req(pargfid: bytes, name: str, flags: int, mode: int, umask: int = 0, xdata: Dict | None = None) -> bytes:
    return _x(_g(pargfid).u32(flags).u32(mode).u32(umask).string(name), xdata)


def lk_req(gfid: bytes, fd: int, cmd: int, flock: Flock, xdata: Dict | None = None) -> bytes:
    p = _g(gfid).i64(fd).u32(cmd).u32(flock.type)
    flock.encode(p)
    return _x(p, xdata)


def readdir_req(gfid: bytes, fd: int, offset: int, size: int, xdata: Dict | None = None) -> bytes:
    """READDIR and READDIRP share this layout."""
    return _x(_g(gfid).i64(fd).u64(offset).u32(size), xdata)


def inodelk_req(gfid: bytes, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None) -> bytes:
    p = _g(gfid).u32(cmd).u32(flock.type)
    flock.encode(p)
    return _x(p.string(domain), xdata)


def finodelk_req(gfid: bytes, fd: int, domain: str, cmd: int, flock: Flock, xdata: Dict | None = None) -> bytes:
    p = _g(gfid).i64(fd).u32(cmd).u32(flock.type)
    flock.encode(p)
    return _x(p.string(domain), xdata)


def entrylk_req(gfid: bytes, domain: str, name: str | None, cmd: int, type_: int, xdata: Dict | None = None) -> bytes:
    p = _g(gfid).u32(cmd).u32(type_).u64(1 if name else 0).string(name or "").string(domain)
    return _x(p, xdata)


def fentrylk_req(gfid: bytes, fd: int, domain: str, name: str | None, cmd: int, type_: int,
                 xdata: Dict | None = None) -> bytes:
    p = _g(gfid).i64(fd).u32(cmd).u32(type_).u64(1 if name else 0).string(name or "").string(domain)
    return _x(p, xdata)


def xattrop_req(gfid: bytes, op: int, d: Dict, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).u32(op).raw(encode_gfx(d)), xdata)


def fxattrop_req(gfid: bytes, fd: int, op: int, d: Dict, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).i64(fd).u32(op).raw(encode_gfx(d)), xdata)


def setattr_req(gfid: bytes, stbuf: Iatt, valid: int, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).raw(stbuf.encode()).i32(valid), xdata)


def fsetattr_req(gfid: bytes, fd: int, stbuf: Iatt, valid: int, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).i64(fd).raw(stbuf.encode()).i32(valid), xdata)


def fallocate_req(gfid: bytes, fd: int, mode: int, offset: int, size: int, xdata: Dict | None = None) -> bytes:
    return _x(_g(gfid).i64(fd).u32(mode).u64(offset).u64(size), xdata)


def discard_req(gfid: bytes, fd: int, offset: int, size: int, xdata: Dict | None = None) -> bytes:
    """DISCARD and ZEROFILL share this layout."""
    return _x(_g(gfid).i64(fd).u64(offset).u64(size), xdata)


# ------------------------------------------------------------------- replies


def _head(u: Unpacker) -> Result:
    ret, err = u.i32(), u.i32()
    return Result(ret, err, decode_gfx(u))


def common_rsp(b: bytes) -> Result:
    u = Unpacker(b)
    r = _head(u)
    u.done()
    return r


def iatt_rsp(b: bytes) -> Result:
    u = Unpacker(b)
    r = _head(u)
    r.stat = Iatt.decode(u)
    u.done()
    return r


def two_iatt_rsp(b: bytes) -> Result:
    """pre/post (WRITE, TRUNCATE, SETATTR, FSYNC, UNLINK/RMDIR as pre/post parent, LOOKUP as stat/postparent)."""
    u = Unpacker(b)
    r = _head(u)
    r.pre = Iatt.decode(u)
    r.post = Iatt.decode(u)
    u.done()
    return r


def lookup_rsp(b: bytes) -> Result:
    r = two_iatt_rsp(b)
    r.stat, r.postparent, r.pre, r.post = r.pre, r.post, None, None
    return r


def entry_rsp(b: bytes) -> Result:
    """UNLINK/RMDIR: pre- and post-parent."""
    r = two_iatt_rsp(b)
    r.preparent, r.postparent, r.pre, r.post = r.pre, r.post, None, None
    return r


def three_iatt_rsp(b: bytes) -> Result:
    u = Unpacker(b)
    r = _head(u)
    r.stat = Iatt.decode(u)
    r.preparent = Iatt.decode(u)
    r.postparent = Iatt.decode(u)
    u.done()
    return r


def readlink_rsp(b: bytes) -> Result:
    u = Unpacker(b)
    r = _head(u)
    r.stat = Iatt.decode(u)
    r.path = u.string(65536)
    u.done()
    return r


def rename_rsp(b: bytes) -> Result:
    u = Unpacker(b)
    r = _head(u)
    r.stat = Iatt.decode(u)
    r.preoldparent = Iatt.decode(u)
    r.postoldparent = Iatt.decode(u)
    r.preparent = Iatt.decode(u)
    r.postparent = Iatt.decode(u)
    u.done()
    return r


def open_rsp(b: bytes) -> Result:
    u = Unpacker(b)
    r = _head(u)
    r.fd = u.i64()
    u.done()
    return r


def read_rsp(b: bytes) -> Result:
    """READ: ret, errno, stat, size, xdata, then the raw payload (``ret`` bytes)."""
    u = Unpacker(b)
    ret, err = u.i32(), u.i32()
    stat = Iatt.decode(u)
    size = u.u32()
    xdata = decode_gfx(u)
    data = u.rest()
    if ret >= 0 and len(data) != ret:
        raise ProtocolError(f"READ said {ret} bytes (size field {size}) but carried {len(data)}")
    return Result(ret, err, xdata, stat=stat, data=data)


def statfs_rsp(b: bytes) -> Result:
    u = Unpacker(b)
    r = _head(u)
    r.statfs = Statfs.decode(u)
    u.done()
    return r


def lk_rsp(b: bytes) -> Result:
    u = Unpacker(b)
    r = _head(u)
    r.flock = Flock.decode(u)
    u.done()
    return r


def dict_rsp(b: bytes) -> Result:
    """GETXATTR/FGETXATTR/XATTROP/FXATTROP."""
    u = Unpacker(b)
    r = _head(u)
    r.dict = decode_gfx(u)
    r.pre = Iatt.decode(u)
    r.post = Iatt.decode(u)
    u.done()
    return r


def create_rsp(b: bytes) -> Result:
    u = Unpacker(b)
    r = _head(u)
    r.stat = Iatt.decode(u)
    r.fd = u.u64()
    r.preparent = Iatt.decode(u)
    r.postparent = Iatt.decode(u)
    u.done()
    return r


MAX_ENTRIES = 1_000_000


def _dirlist(u: Unpacker, plus: bool) -> list[DirEntry]:
    out: list[DirEntry] = []
    present = u.bool_()
    while present:
        if len(out) >= MAX_ENTRIES:
            raise ProtocolError("directory listing too long")
        ino, off = u.u64(), u.u64()
        u.u32()  # d_len
        dtype = u.u32()
        name = u.string(4096)
        e = DirEntry(ino, off, dtype, name)
        if plus:
            e.stat = Iatt.decode(u)
            e.xdata = decode_gfx(u)
        out.append(e)
        present = u.bool_()
    return out


def readdir_rsp(b: bytes) -> Result:
    u = Unpacker(b)
    r = _head(u)
    r.entries = _dirlist(u, False)
    u.done()
    return r


def readdirp_rsp(b: bytes) -> Result:
    u = Unpacker(b)
    r = _head(u)
    r.entries = _dirlist(u, True)
    u.done()
    return r


def seek_rsp(b: bytes) -> Result:
    u = Unpacker(b)
    r = _head(u)
    r.offset = u.u64()
    u.done()
    return r


#: Which decoder reads each fop's reply.
DECODERS = {
    Proc.STAT: iatt_rsp, Proc.FSTAT: iatt_rsp,
    Proc.READLINK: readlink_rsp,
    Proc.MKNOD: three_iatt_rsp, Proc.MKDIR: three_iatt_rsp, Proc.SYMLINK: three_iatt_rsp, Proc.LINK: three_iatt_rsp,
    Proc.UNLINK: entry_rsp, Proc.RMDIR: entry_rsp,
    Proc.RENAME: rename_rsp,
    Proc.TRUNCATE: two_iatt_rsp, Proc.FTRUNCATE: two_iatt_rsp, Proc.WRITE: two_iatt_rsp, Proc.FSYNC: two_iatt_rsp,
    Proc.SETATTR: two_iatt_rsp, Proc.FSETATTR: two_iatt_rsp, Proc.FALLOCATE: two_iatt_rsp,
    Proc.DISCARD: two_iatt_rsp, Proc.ZEROFILL: two_iatt_rsp,
    Proc.OPEN: open_rsp, Proc.OPENDIR: open_rsp,
    Proc.READ: read_rsp,
    Proc.STATFS: statfs_rsp,
    Proc.FLUSH: common_rsp, Proc.SETXATTR: common_rsp, Proc.FSETXATTR: common_rsp, Proc.REMOVEXATTR: common_rsp,
    Proc.FREMOVEXATTR: common_rsp, Proc.FSYNCDIR: common_rsp, Proc.ACCESS: common_rsp, Proc.INODELK: common_rsp,
    Proc.FINODELK: common_rsp, Proc.ENTRYLK: common_rsp, Proc.FENTRYLK: common_rsp, Proc.RELEASE: common_rsp,
    Proc.RELEASEDIR: common_rsp, Proc.IPC: common_rsp,
    Proc.GETXATTR: dict_rsp, Proc.FGETXATTR: dict_rsp, Proc.XATTROP: dict_rsp, Proc.FXATTROP: dict_rsp,
    Proc.LOOKUP: lookup_rsp,
    Proc.CREATE: create_rsp,
    Proc.LK: lk_rsp,
    Proc.READDIR: readdir_rsp,
    Proc.READDIRP: readdirp_rsp,
    Proc.SEEK: seek_rsp,
}


# ------------------------------------------------------------------- callbacks


@dataclass
class CacheInvalidation:
    gfid: bytes
    event_type: int
    flags: int
    expire: int
    stat: Iatt
    parent: Iatt
    oldparent: Iatt
    xdata: dict[str, bytes]


@dataclass
class InodelkContention:
    gfid: bytes
    flock: Flock
    pid: int
    domain: str
    xdata: bytes


@dataclass
class EntrylkContention:
    gfid: bytes
    type: int
    pid: int
    name: str
    domain: str
    xdata: bytes


def decode_callback(proc: int, body: bytes) -> Any:
    """Decode a brick→client callback body; unknown procedures return the raw bytes."""
    from .dicts import decode_old
    from .iatt import gfid_from_str

    u = Unpacker(body)
    if proc == Cbk.CACHE_INVALIDATION:
        text = u.string(64)
        try:
            gfid = gfid_from_str(text)
        except ValueError as e:
            raise ProtocolError(f"bad gfid {text!r} in upcall") from e
        if len(gfid) != 16:
            raise ProtocolError(f"bad gfid {text!r} in upcall")
        ev, flags, exp = u.u32(), u.u32(), u.u32()
        st, par, opar = Iatt.decode_gf_iatt(u), Iatt.decode_gf_iatt(u), Iatt.decode_gf_iatt(u)
        xdata = decode_old(u.opaque())
        return CacheInvalidation(gfid, ev, flags, exp, st, par, opar, xdata)
    if proc == Cbk.INODELK_CONTENTION:
        gfid = u.fixed(16)
        fl = Flock.decode(u)
        return InodelkContention(gfid, fl, u.u32(), u.string(4096), u.opaque())
    if proc == Cbk.ENTRYLK_CONTENTION:
        gfid = u.fixed(16)
        t, pid = u.u32(), u.u32()
        return EntrylkContention(gfid, t, pid, u.string(4096), u.string(4096), u.opaque())
    return body


# ------------------------------------------------------------------- ctime flags

from . import rpc as _rpc  # noqa: E402

_CREATE_FLAGS = _rpc.ATIME | _rpc.CTIME | _rpc.MTIME | _rpc.PAR_CTIME | _rpc.PAR_MTIME
_ENTRY_FLAGS = _rpc.CTIME | _rpc.PAR_CTIME | _rpc.PAR_MTIME
_FLAGS: dict[int, int] = {
    Proc.SETXATTR: _rpc.CTIME, Proc.FSETXATTR: _rpc.CTIME,
    Proc.REMOVEXATTR: _rpc.CTIME, Proc.FREMOVEXATTR: _rpc.CTIME,
    Proc.FALLOCATE: _rpc.MTIME | _rpc.ATIME, Proc.ZEROFILL: _rpc.MTIME | _rpc.ATIME,
    Proc.DISCARD: _rpc.MTIME | _rpc.ATIME,
    Proc.MKNOD: _CREATE_FLAGS, Proc.MKDIR: _CREATE_FLAGS, Proc.SYMLINK: _CREATE_FLAGS, Proc.CREATE: _CREATE_FLAGS,
    Proc.UNLINK: _ENTRY_FLAGS, Proc.RMDIR: _ENTRY_FLAGS, Proc.LINK: _ENTRY_FLAGS, Proc.RENAME: _ENTRY_FLAGS,
    Proc.WRITE: _rpc.MTIME | _rpc.CTIME,
    Proc.TRUNCATE: _rpc.CTIME | _rpc.MTIME, Proc.FTRUNCATE: _rpc.CTIME | _rpc.MTIME,
}


def ctime_flags(proc: int, valid: int = 0) -> int:
    """The utime bits gluster's own client puts in the credential for a fop (atime off, as noatime)."""
    if proc in (Proc.SETATTR, Proc.FSETATTR):
        from .iatt import SET_GID, SET_MODE, SET_UID
        return _rpc.CTIME if (not valid or valid & (SET_UID | SET_GID | SET_MODE)) else 0
    return _FLAGS.get(proc, 0)
