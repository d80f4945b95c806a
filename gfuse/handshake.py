"""Messages of the management-side programs (pure codecs): GETSPEC, SETVOLUME, DUMP/PING, portmap.

These are what glusterd and a brick expect before any fop is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .dicts import decode_old, encode_old
from .xdr import Packer, ProtocolError, Unpacker

HANDSHAKE_PROGRAM, HANDSHAKE_VERSION = 14398633, 2
SETVOLUME, GETSPEC = 1, 2
PORTMAP_PROGRAM, PORTMAP_VERSION = 34123456, 1
PORTBYBRICK, BRICKBYPORT = 1, 2
DUMP_PROGRAM, DUMP_VERSION = 123451501, 1
DUMP, PING = 1, 2
GLUSTERD_PORT = 24007

#: The op-version range we tell glusterd we speak (as the native 10.x client does).
GETSPEC_XDATA = {"min-op-version": "1", "max-op-version": "100000"}


@dataclass
class GetspecReply:
    ret: int
    errno: int
    spec: str
    xdata: dict[str, bytes]


def getspec_req(volume: str, flags: int = 1, xdata: Mapping[str, str] | None = None) -> bytes:
    return Packer().u32(flags).string(volume).opaque(encode_old(GETSPEC_XDATA if xdata is None else xdata)).bytes()


def getspec_rsp(body: bytes) -> GetspecReply:
    u = Unpacker(body)
    ret, err = u.i32(), u.i32()
    spec = u.string()
    xdata = decode_old(u.opaque())
    u.done()
    return GetspecReply(ret, err, spec, xdata)


def portbybrick_req(brick: str) -> bytes:
    return Packer().string(brick).bytes()


def portbybrick_rsp(body: bytes) -> tuple[int, int, int, int]:
    """(op_ret, op_errno, status, port)."""
    u = Unpacker(body)
    out = (u.i32(), u.i32(), u.i32(), u.i32())
    u.done()
    return out


def setvolume_req(options: Mapping[str, str | bytes | int]) -> bytes:
    return Packer().opaque(encode_old(options)).bytes()


def setvolume_rsp(body: bytes) -> tuple[int, int, dict[str, bytes]]:
    u = Unpacker(body)
    ret, err = u.i32(), u.i32()
    d = decode_old(u.opaque())
    u.done()
    return ret, err, d


def dump_req(gfs_id: int = 0) -> bytes:
    return Packer().u64(gfs_id).bytes()


def dump_rsp(body: bytes) -> list[tuple[str, int, int]]:
    """The programs a server offers: (name, number, version)."""
    u = Unpacker(body)
    u.u64()
    ret, err = u.i32(), u.i32()
    progs: list[tuple[str, int, int]] = []
    present = u.bool_()
    while present:
        if len(progs) > 1000:
            raise ProtocolError("DUMP lists too many programs")
        progs.append((u.string(1024), u.u64(), u.u64()))
        present = u.bool_()
    u.done()
    if ret < 0:
        raise OSError(err, f"DUMP refused: {err}")
    return progs
