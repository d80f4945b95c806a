"""ONC RPC (RFC 5531) as GlusterFS speaks it: record marking, call/reply headers, credentials.

Sans-IO: :class:`RecordReader` is a state machine fed with received bytes that yields
complete records; everything else is pure encode/decode functions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .xdr import Packer, ProtocolError, Unpacker

LAST_FRAGMENT = 0x80000000
#: Largest record we accept (a 16 MiB READ reply plus headers fits comfortably).
MAX_RECORD = 64 * 1024 * 1024
RPC_VERSION = 2
MAX_AUTH_BYTES = 400

AUTH_NULL = 0
AUTH_GLUSTERFS_V2 = 390039
AUTH_GLUSTERFS_V3 = 390040


class MsgType(enum.IntEnum):
    CALL = 0
    REPLY = 1


class AcceptStat(enum.IntEnum):
    SUCCESS = 0
    PROG_UNAVAIL = 1
    PROG_MISMATCH = 2
    PROC_UNAVAIL = 3
    GARBAGE_ARGS = 4
    SYSTEM_ERR = 5


class RPCError(Exception):
    """The server refused the call at the RPC level (not a fop error): denied or not accepted."""

    def __init__(self, message: str, stat: int | None = None) -> None:
        super().__init__(message)
        self.stat = stat


# ---------------------------------------------------------------- record marking


def frame(record: bytes) -> bytes:
    """Wrap one record in a single last-fragment header."""
    if len(record) >= LAST_FRAGMENT:
        raise ValueError("record too large for one fragment")
    return (LAST_FRAGMENT | len(record)).to_bytes(4, "big") + record


class RecordReader:
    """Reassembles records from a byte stream (any chunking, any number of fragments)."""

    def __init__(self, max_record: int = MAX_RECORD) -> None:
        self._buf = bytearray()
        self._frags: list[bytes] = []
        self._size = 0
        self._max = max_record

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add received bytes; return every record completed by them."""
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= 4:
            hdr = int.from_bytes(self._buf[:4], "big")
            n = hdr & 0x7FFFFFFF
            if self._size + n > self._max:
                raise ProtocolError(f"record of more than {self._max} bytes")
            if len(self._buf) < 4 + n:
                break
            self._frags.append(bytes(self._buf[4 : 4 + n]))
            self._size += n
            del self._buf[: 4 + n]
            if hdr & LAST_FRAGMENT:
                out.append(b"".join(self._frags))
                self._frags = []
                self._size = 0
        return out

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a record."""
        return len(self._buf) + self._size


# ---------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credential:
    """Who makes a call: the caller's identity is what the brick checks permissions and locks with."""

    pid: int = 0
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    lk_owner: bytes = b"\0\0\0\0"
    #: ctime (utime xlator) bits and the operation's start time, v3 only.
    flags: int = 0
    ctime_sec: int = 0
    ctime_nsec: int = 0

    def encode_v2(self) -> bytes:
        return self._finish(Packer().i32(self.pid).u32(self.uid).u32(self.gid))

    def encode_v3(self) -> bytes:
        p = Packer().i32(self.pid).u32(self.uid).u32(self.gid).u32(self.flags)
        return self._finish(p.u32(self.ctime_nsec).u64(self.ctime_sec))

    def _finish(self, p: Packer) -> bytes:
        """The common tail (groups, lock owner) and the size limit every gluster credential has."""
        p.u32(len(self.groups))
        for g in self.groups:
            p.u32(g)
        body = p.opaque(self.lk_owner).bytes()
        if len(body) > MAX_AUTH_BYTES:
            raise ValueError(f"credential of {len(body)} bytes exceeds {MAX_AUTH_BYTES} (too many groups?)")
        return body

    @classmethod
    def decode_v2(cls, body: bytes) -> "Credential":
        u = Unpacker(body)
        pid, uid, gid = u.i32(), u.u32(), u.u32()
        groups = _groups(u)
        owner = u.opaque(1024)
        u.done()
        return cls(pid=pid, uid=uid, gid=gid, groups=groups, lk_owner=owner)

    @classmethod
    def decode_v3(cls, body: bytes) -> "Credential":
        u = Unpacker(body)
        pid, uid, gid, flags = u.i32(), u.u32(), u.u32(), u.u32()
        nsec, sec = u.u32(), u.u64()
        groups = _groups(u)
        owner = u.opaque(1024)
        u.done()
        return cls(pid, uid, gid, groups, owner, flags, sec, nsec)


def _groups(u: Unpacker) -> tuple[int, ...]:
    n = u.u32()
    if n > 200:
        raise ProtocolError(f"{n} groups in a credential")
    return tuple(u.u32() for _ in range(n))


# ctime flag bits for AUTH_GLUSTERFS_v3 (the utime translator's MDATA bits)
CTIME = 1
MTIME = 2
ATIME = 4
PAR_CTIME = 8
PAR_MTIME = 16
PAR_ATIME = 32


# ---------------------------------------------------------------- headers


@dataclass(frozen=True)
class Call:
    xid: int
    prog: int
    vers: int
    proc: int
    cred_flavor: int = AUTH_NULL
    cred_body: bytes = b""
    body: bytes = b""


@dataclass(frozen=True)
class Reply:
    xid: int
    #: Program result bytes, present when accepted with SUCCESS.
    body: bytes = b""
    accept_stat: int = AcceptStat.SUCCESS
    #: True when the reply was MSG_DENIED (rpc mismatch or auth error).
    denied: bool = False
    detail: tuple[int, ...] = field(default=())


def encode_call(xid: int, prog: int, vers: int, proc: int, cred_flavor: int, cred_body: bytes,
                body: bytes = b"") -> bytes:
    """A complete CALL record (without the record mark)."""
    p = Packer().u32(xid).u32(MsgType.CALL).u32(RPC_VERSION).u32(prog).u32(vers).u32(proc)
    p.u32(cred_flavor).opaque(cred_body)
    p.u32(AUTH_NULL).opaque(b"")
    return p.bytes() + body


def encode_reply(xid: int, body: bytes = b"", accept_stat: int = AcceptStat.SUCCESS) -> bytes:
    """An accepted REPLY record (used by tests and callback acks)."""
    p = Packer().u32(xid).u32(MsgType.REPLY).u32(0).u32(AUTH_NULL).opaque(b"").u32(accept_stat)
    return p.bytes() + body


def decode_message(record: bytes) -> Call | Reply:
    """Parse one RPC record as a CALL (e.g. a brick callback) or a REPLY."""
    u = Unpacker(record)
    xid = u.u32()
    mtype = u.u32()
    if mtype == MsgType.CALL:
        rpcvers = u.u32()
        if rpcvers != RPC_VERSION:
            raise ProtocolError(f"RPC version {rpcvers} in call")
        prog, vers, proc = u.u32(), u.u32(), u.u32()
        flavor = u.u32()
        cred = u.opaque(MAX_AUTH_BYTES)
        u.u32()
        u.opaque(MAX_AUTH_BYTES)
        return Call(xid, prog, vers, proc, flavor, cred, u.rest())
    if mtype != MsgType.REPLY:
        raise ProtocolError(f"unknown RPC message type {mtype}")
    reply_stat = u.u32()
    if reply_stat == 1:  # MSG_DENIED
        reject = u.u32()
        if reject == 0:  # RPC_MISMATCH
            return Reply(xid, denied=True, detail=(0, u.u32(), u.u32()))
        if reject == 1:  # AUTH_ERROR
            return Reply(xid, denied=True, detail=(1, u.u32()))
        raise ProtocolError(f"unknown reject status {reject}")
    if reply_stat != 0:
        raise ProtocolError(f"unknown reply status {reply_stat}")
    u.u32()  # verifier flavor
    u.opaque(MAX_AUTH_BYTES)
    stat = u.u32()
    if stat == AcceptStat.PROG_MISMATCH:
        return Reply(xid, accept_stat=stat, detail=(u.u32(), u.u32()))
    if stat > AcceptStat.SYSTEM_ERR:
        raise ProtocolError(f"unknown accept status {stat}")
    return Reply(xid, body=u.rest(), accept_stat=stat)


def check_reply(reply: Reply, what: str = "call") -> bytes:
    """Return the result bytes of a successful reply or raise :class:`RPCError`."""
    if reply.denied:
        kind = "RPC version mismatch" if reply.detail[0] == 0 else f"authentication error {reply.detail[1:]}"
        raise RPCError(f"{what} denied: {kind}")
    if reply.accept_stat != AcceptStat.SUCCESS:
        name = AcceptStat(reply.accept_stat).name
        raise RPCError(f"{what} not accepted: {name}", reply.accept_stat)
    return reply.body
