"""File attributes as gluster sends them: ``gfx_iattx`` (v4 fops) and ``gf_iatt`` (callbacks), pure codecs."""

from __future__ import annotations

import stat as stat_mod
import struct
from dataclasses import dataclass

from .xdr import Unpacker

#: gfx_iattx: gfid[16], 8 × u64, 4 × i64, 9 × u32 — 148 bytes, no padding
_IATTX = struct.Struct(">16s8Q4q9I")

ROOT_GFID = b"\0" * 15 + b"\x01"
NULL_GFID = b"\0" * 16

IATTX_SIZE = 148
GF_IATT_SIZE = 100


def gfid_str(gfid: bytes) -> str:
    """Canonical 36-char text form (as in .glusterfs paths and callbacks)."""
    h = gfid.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def gfid_from_str(text: str) -> bytes:
    return bytes.fromhex(text.replace("-", ""))


@dataclass
class Iatt:
    """A gluster stat: POSIX fields plus the gfid that names the inode cluster-wide."""

    gfid: bytes = NULL_GFID
    flags: int = 0
    ino: int = 0
    dev: int = 0
    rdev: int = 0
    size: int = 0
    blocks: int = 0
    attributes: int = 0
    attributes_mask: int = 0
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    btime: int = 0
    atime_nsec: int = 0
    mtime_nsec: int = 0
    ctime_nsec: int = 0
    btime_nsec: int = 0
    nlink: int = 0
    uid: int = 0
    gid: int = 0
    blksize: int = 0
    mode: int = 0

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat_mod.S_ISREG(self.mode)

    @property
    def is_lnk(self) -> bool:
        return stat_mod.S_ISLNK(self.mode)

    def encode(self) -> bytes:
        if len(self.gfid) != 16:
            raise ValueError(f"gfid needs 16 bytes, got {len(self.gfid)}")
        m64, m32 = 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFF
        return _IATTX.pack(
            self.gfid,
            *(v & m64 for v in (self.flags, self.ino, self.dev, self.rdev, self.size, self.blocks,
                                self.attributes, self.attributes_mask)),
            self.atime, self.mtime, self.ctime, self.btime,
            *(v & m32 for v in (self.atime_nsec, self.mtime_nsec, self.ctime_nsec, self.btime_nsec,
                                self.nlink, self.uid, self.gid, self.blksize, self.mode)))

    @classmethod
    def decode(cls, u: Unpacker) -> "Iatt":
        return cls(*u.struct(_IATTX))

    @classmethod
    def decode_gf_iatt(cls, u: Unpacker) -> "Iatt":
        """The older 100-byte ``gf_iatt`` carried by upcall callbacks."""
        gfid = u.fixed(16)
        ino, dev = u.u64(), u.u64()
        mode, nlink, uid, gid = u.u32(), u.u32(), u.u32(), u.u32()
        rdev, size = u.u64(), u.u64()
        blksize = u.u32()
        blocks = u.u64()
        at, atn, mt, mtn, ct, ctn = (u.u32() for _ in range(6))
        return cls(gfid=gfid, ino=ino, dev=dev, rdev=rdev, size=size, blocks=blocks,
                   atime=at, mtime=mt, ctime=ct, atime_nsec=atn, mtime_nsec=mtn, ctime_nsec=ctn,
                   nlink=nlink, uid=uid, gid=gid, blksize=blksize, mode=mode)


@dataclass
class Statfs:
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    fsid: int
    flag: int
    namemax: int

    @classmethod
    def decode(cls, u: Unpacker) -> "Statfs":
        return cls(*(u.u64() for _ in range(11)))


# setattr "valid" bits (GF_SET_ATTR_*)
SET_MODE = 0x1
SET_UID = 0x2
SET_GID = 0x4
SET_SIZE = 0x8
SET_ATIME = 0x10
SET_MTIME = 0x20
SET_CTIME = 0x40
SET_ATIME_NOW = 0x80
SET_MTIME_NOW = 0x100
