"""Gluster dictionaries on the wire: the old text format and the typed ``gfx_dict`` of v4 fops.

Python values map to gfx types so that a decode/encode round trip keeps the type:
``int`` ↔ INT, :class:`UInt` ↔ UINT, ``float`` ↔ DOUBLE, ``str`` ↔ STR,
``bytes`` ↔ PTR (binary values such as AFR changelogs), :class:`uuid.UUID` ↔ GFUUID,
:class:`~gfuse.iatt.Iatt` ↔ IATT, :class:`MData` ↔ MDATA.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from .iatt import Iatt
from .xdr import Packer, ProtocolError, Unpacker

T_STR_OLD = 1
T_INT = 2
T_UINT = 3
T_DOUBLE = 4
T_STR = 5
T_PTR = 6
T_GFUUID = 7
T_IATT = 8
T_MDATA = 9

MAX_PAIRS = 100_000


class UInt(int):
    """An unsigned 64-bit dict value (gluster uses it for 'return this xattr' requests)."""


@dataclass(frozen=True)
class MData:
    """``gfx_mdata_iatt``: the times the utime translator keeps."""

    atime: int
    mtime: int
    ctime: int
    atime_nsec: int
    mtime_nsec: int
    ctime_nsec: int


Dict = dict[str, Any]


# ------------------------------------------------------------------- old format


def encode_old(d: Mapping[str, str | bytes | int] | None) -> bytes:
    """Old serialized dict (SETVOLUME, GETSPEC, callbacks): text values carry their NUL."""
    if not d:
        return b""
    parts = [len(d).to_bytes(4, "big")]
    for k, v in d.items():
        kb = k.encode("utf-8", "surrogateescape")
        if isinstance(v, int):
            v = str(v)
        vb = v.encode("utf-8", "surrogateescape") + b"\0" if isinstance(v, str) else bytes(v)
        parts.append(len(kb).to_bytes(4, "big") + len(vb).to_bytes(4, "big") + kb + b"\0" + vb)
    return b"".join(parts)


def decode_old(data: bytes) -> dict[str, bytes]:
    """Decode the old format; values are raw bytes (use :func:`old_str` for text)."""
    if not data:
        return {}
    u = Unpacker(data)
    n = u.u32()
    if n > MAX_PAIRS:
        raise ProtocolError(f"dict claims {n} pairs")
    out: dict[str, bytes] = {}
    for _ in range(n):
        klen, vlen = u.u32(), u.u32()
        key = u._take(klen + 1)  # raw, unpadded layout
        if key[klen] != 0:
            raise ProtocolError("dict key not NUL-terminated")
        out[bytes(key[:klen]).decode("utf-8", "surrogateescape")] = bytes(u._take(vlen))
    return out


def old_str(v: bytes) -> str:
    """A text value of an old-format dict, without its trailing NUL."""
    return v.rstrip(b"\0").decode("utf-8", "surrogateescape")


# ------------------------------------------------------------------- gfx_dict

NULL_GFX_DICT = (0).to_bytes(4, "big") + (-1).to_bytes(4, "big", signed=True) + (0).to_bytes(4, "big")


def _encode_value(p: Packer, v: Any) -> None:
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, UInt):
        p.i32(T_UINT).u64(v)
    elif isinstance(v, int):
        p.i32(T_INT).i64(v)
    elif isinstance(v, float):
        p.i32(T_DOUBLE).f64(v)
    elif isinstance(v, str):
        p.i32(T_STR).opaque(v.encode("utf-8", "surrogateescape") + b"\0")
    elif isinstance(v, (bytes, bytearray, memoryview)):
        p.i32(T_PTR).opaque(bytes(v))
    elif isinstance(v, uuid.UUID):
        p.i32(T_GFUUID).fixed(v.bytes, 16)
    elif isinstance(v, Iatt):
        p.i32(T_IATT).raw(v.encode())
    elif isinstance(v, MData):
        p.i32(T_MDATA).i64(v.atime).i64(v.mtime).i64(v.ctime)
        p.u32(v.atime_nsec).u32(v.mtime_nsec).u32(v.ctime_nsec)
    else:
        raise TypeError(f"cannot put {type(v).__name__} in a gluster dict")


def encode_gfx(d: Mapping[str, Any] | None) -> bytes:
    """``gfx_dict``; ``None`` is the NULL dict (count -1), ``{}`` an empty one."""
    if d is None:
        return NULL_GFX_DICT
    p = Packer()
    for k, v in d.items():
        p.opaque(k.encode("utf-8", "surrogateescape") + b"\0")
        _encode_value(p, v)
    pairs = p.bytes()
    return Packer().u32(len(pairs)).i32(len(d)).u32(len(d)).raw(pairs).bytes()


def decode_gfx(u: Unpacker) -> Dict | None:
    """Read a ``gfx_dict``; returns ``None`` for the NULL dict."""
    u.u32()  # xdr_size: only a hint for the transport
    count = u.i32()
    n = u.u32()
    if n > MAX_PAIRS:
        raise ProtocolError(f"dict claims {n} pairs")
    out: Dict = {}
    for _ in range(n):
        kb = u.opaque(4096)
        key = kb.rstrip(b"\0").decode("utf-8", "surrogateescape")
        t = u.i32()
        if t == T_INT:
            out[key] = u.i64()
        elif t == T_UINT:
            out[key] = UInt(u.u64())
        elif t == T_DOUBLE:
            out[key] = u.f64()
        elif t == T_STR:
            out[key] = u.opaque().rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif t in (T_PTR, T_STR_OLD):
            out[key] = u.opaque()
        elif t == T_GFUUID:
            out[key] = uuid.UUID(bytes=u.fixed(16))
        elif t == T_IATT:
            out[key] = Iatt.decode(u)
        elif t == T_MDATA:
            at, mt, ct = u.i64(), u.i64(), u.i64()
            out[key] = MData(at, mt, ct, u.u32(), u.u32(), u.u32())
        else:
            raise ProtocolError(f"unknown gfx_dict value type {t} for key {key!r}")
    if count == -1 and n == 0:
        return None
    return out
