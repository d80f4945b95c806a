"""v4 fop messages (gfuse.fops), iatt (gfuse.iatt) and handshake codecs, by hand-built bytes and by
records captured from a real GlusterFS 10.3 brick (tests/data/, see scripts/record_brick_bytes.py)."""

from __future__ import annotations

import json
import os
import stat as S
import uuid
from pathlib import Path

import pytest

from gfuse import fops as F
from gfuse import handshake as hs
from gfuse import rpc
from gfuse.dicts import T_PTR, UInt, decode_gfx, encode_gfx, encode_old
from gfuse.fops import DECODERS, Proc
from gfuse.iatt import GF_IATT_SIZE, IATTX_SIZE, NULL_GFID, ROOT_GFID, Iatt, Statfs, gfid_from_str, gfid_str
from gfuse.volfile import parse
from gfuse.xdr import Packer, ProtocolError, Unpacker

DATA = Path(__file__).resolve().parents[1] / "data"
FACTS = json.loads((DATA / "facts.json").read_text())
G1 = bytes(range(1, 17))
G2 = bytes(range(101, 117))


def be32(v: int) -> bytes:
    return (v & 0xFFFFFFFF).to_bytes(4, "big")


def be64(v: int) -> bytes:
    return (v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")


NULLD = be32(0) + be32(-1) + be32(0)


def body(name: str) -> bytes:
    """Program result of a recorded reply record (RPC header checked and stripped)."""
    return rpc.check_reply(rpc.decode_message((DATA / name).read_bytes()), name)


# ------------------------------------------------------------------ iatt


def sample_iatt() -> Iatt:
    return Iatt(G1, *range(1, 22))


def test_iatt_exact_148_bytes() -> None:
    b = sample_iatt().encode()
    assert len(b) == IATTX_SIZE == 148
    want = G1 + b"".join(be64(v) for v in range(1, 9)) + b"".join(be64(v) for v in range(9, 13))
    want += b"".join(be32(v) for v in range(13, 22))
    assert b == want
    ia = sample_iatt()
    got = (ia.flags, ia.ino, ia.attributes_mask, ia.atime, ia.btime, ia.atime_nsec, ia.mode)
    assert got == (1, 2, 8, 9, 12, 13, 21)


def test_iatt_round_trip_extremes() -> None:
    ia = Iatt(gfid=uuid.uuid4().bytes, flags=2**64 - 1, ino=2**64 - 1, size=2**63, atime=-(2**63), mtime=2**63 - 1,
              ctime=-1, btime=0, atime_nsec=999_999_999, nlink=2**32 - 1, uid=65534, gid=65534,
              blksize=4096, mode=S.S_IFLNK | 0o777)
    u = Unpacker(ia.encode())
    assert Iatt.decode(u) == ia
    u.done()
    assert ia.is_lnk and not ia.is_dir and not ia.is_reg


def test_iatt_truncated() -> None:
    b = sample_iatt().encode()
    for n in range(0, 148, 7):
        with pytest.raises(ProtocolError):
            Iatt.decode(Unpacker(b[:n]))


def test_iatt_bad_gfid_length_is_an_encoder_error() -> None:
    with pytest.raises(ValueError):
        Iatt(gfid=b"short").encode()


def test_gf_iatt_100_bytes() -> None:
    wire = (
        G1 + be64(2) + be64(3)  # gfid, ino, dev
        + be32(0o100600) + be32(1) + be32(1000) + be32(1001)  # mode nlink uid gid
        + be64(4) + be64(5)  # rdev size
        + be32(4096) + be64(8)  # blksize blocks
        + be32(10) + be32(11) + be32(12) + be32(13) + be32(14) + be32(15)  # a/m/ctime + nsec
    )
    assert len(wire) == GF_IATT_SIZE == 100
    u = Unpacker(wire)
    ia = Iatt.decode_gf_iatt(u)
    u.done()
    assert ia == Iatt(gfid=G1, ino=2, dev=3, mode=0o100600, nlink=1, uid=1000, gid=1001, rdev=4, size=5,
                      blksize=4096, blocks=8, atime=10, atime_nsec=11, mtime=12, mtime_nsec=13, ctime=14,
                      ctime_nsec=15)
    assert ia.is_reg


def test_gfid_text() -> None:
    assert gfid_str(ROOT_GFID) == "00000000-0000-0000-0000-000000000001"
    assert gfid_from_str(gfid_str(G1)) == G1
    assert gfid_str(G1) == str(uuid.UUID(bytes=G1))


def test_statfs() -> None:
    u = Unpacker(b"".join(be64(v) for v in range(1, 12)))
    assert Statfs.decode(u) == Statfs(*range(1, 12))
    u.done()


# ------------------------------------------------------------------ requests


def test_lookup_root_request_exact() -> None:
    assert F.lookup_req(ROOT_GFID) == ROOT_GFID + NULL_GFID + be32(0) + be32(0) + NULLD
    named = F.lookup_req(NULL_GFID, ROOT_GFID, "abcde", xdata={})
    assert named == NULL_GFID + ROOT_GFID + be32(0) + be32(5) + b"abcde\0\0\0" + b"\0" * 12


def test_create_request_exact() -> None:
    g = uuid.UUID(bytes=G2)
    b = F.create_req(ROOT_GFID, "f", os.O_RDWR | os.O_CREAT, S.S_IFREG | 0o644, 0o022, {"gfid-req": g})
    d = encode_gfx({"gfid-req": g})
    assert b == ROOT_GFID + be32(os.O_RDWR | os.O_CREAT) + be32(0o100644) + be32(0o022) + be32(1) + b"f\0\0\0" + d


@pytest.mark.parametrize("payload", [b"", b"x", b"hello", b"12345678", bytes(range(256)) * 3 + b"odd"])
@pytest.mark.parametrize("xdata", [None, {}, {"k": 1}, {"odd-key": "odd value", "u": UInt(3)}])
def test_write_payload_is_the_unpadded_tail(payload: bytes, xdata: dict | None) -> None:
    b = F.write_req(G1, 7, 2**40, payload, 0, xdata)
    u = Unpacker(b)
    assert u.fixed(16) == G1
    assert (u.i64(), u.u64(), u.u32(), u.u32()) == (7, 2**40, len(payload), 0)
    xdr_size = int.from_bytes(b[40:44], "big")
    assert decode_gfx(u) == xdata
    # what the brick does: fixed part (40) + gfx_dict header (12) + xdr_size bytes of pairs
    offset = 40 + 12 + xdr_size
    assert u.pos == offset
    assert xdr_size % 4 == 0  # the pairs are XDR, so already a multiple of 4
    assert b[offset:] == payload  # raw, no length prefix, no padding
    assert len(b) == offset + len(payload)


def test_write_request_exact_bytes() -> None:
    b = F.write_req(G1, 1, 2, b"abc")
    assert b == G1 + be64(1) + be64(2) + be32(3) + be32(0) + NULLD + b"abc"


def test_read_request_exact() -> None:
    assert F.read_req(G1, -1, 4096, 131072, 0) == G1 + be64(-1) + be64(4096) + be32(131072) + be32(0) + NULLD


def test_inodelk_request_exact() -> None:
    fl = F.Flock(type=F.WRLCK, whence=0, start=0, len=0, pid=9, owner=b"own")
    b = F.inodelk_req(G1, "vol-replicate-0", F.SETLKW, fl)
    want = G1 + be32(2) + be32(1) + be32(1) + be32(0) + be64(0) + be64(0) + be32(9) + be32(3) + b"own\0"
    want += be32(15) + b"vol-replicate-0\0" + NULLD
    assert b == want


def test_entrylk_request_exact() -> None:
    b = F.entrylk_req(G1, "dom", "name", F.ENTRYLK_LOCK_NB, F.ENTRYLK_WRLCK)
    assert b == G1 + be32(2) + be32(1) + be64(1) + be32(4) + b"name" + be32(3) + b"dom\0" + NULLD
    b = F.entrylk_req(G1, "dom", None, F.ENTRYLK_UNLOCK, F.ENTRYLK_WRLCK)
    assert b == G1 + be32(1) + be32(1) + be64(0) + be32(0) + be32(3) + b"dom\0" + NULLD


def test_getxattr_namelen_is_a_flag() -> None:
    assert F.getxattr_req(G1, "user.x") == G1 + be32(1) + be32(6) + b"user.x\0\0" + NULLD
    assert F.getxattr_req(G1) == G1 + be32(0) + be32(0) + NULLD


def test_fxattrop_request_carries_two_dicts() -> None:
    d = {"trusted.afr.dirty": b"\0\0\0\x01" + b"\0" * 8}
    b = F.fxattrop_req(G1, 3, F.XATTROP_ADD_ARRAY, d)
    assert b == G1 + be64(3) + be32(0) + encode_gfx(d) + NULLD


def test_setattr_request() -> None:
    ia = sample_iatt()
    assert F.setattr_req(G1, ia, 0x21) == G1 + ia.encode() + be32(0x21) + NULLD


# ------------------------------------------------------------------ replies, hand-built


def head(ret: int = 0, err: int = 0, xdata: dict | None = None) -> bytes:
    return be32(ret) + be32(err) + encode_gfx(xdata)


def ia(n: int) -> Iatt:
    return Iatt(gfid=bytes([n]) * 16, ino=n, size=n * 10, mode=S.S_IFREG | 0o644)


def test_common_rsp() -> None:
    r = F.common_rsp(head(-1, 13))
    assert (r.ret, r.errno, r.xdata) == (-1, 13, None)
    assert F.common_rsp(head(0, 0, {"a": "b"})).xdata == {"a": "b"}
    with pytest.raises(ProtocolError):
        F.common_rsp(head() + b"\0\0\0\0")  # trailing bytes


def test_lookup_rsp_is_stat_then_postparent() -> None:
    r = F.lookup_rsp(head(0, 0, {"glusterfs.content": b"data"}) + ia(1).encode() + ia(2).encode())
    assert r.stat == ia(1) and r.postparent == ia(2)
    assert r.pre is None and r.post is None
    assert r.xdata == {"glusterfs.content": b"data"}


def test_two_and_entry_rsp() -> None:
    wire = head(5) + ia(1).encode() + ia(2).encode()
    r = F.two_iatt_rsp(wire)
    assert (r.ret, r.pre, r.post) == (5, ia(1), ia(2))
    r = F.entry_rsp(wire)
    assert (r.preparent, r.postparent, r.pre, r.post) == (ia(1), ia(2), None, None)


def test_three_iatt_and_create_rsp() -> None:
    r = F.three_iatt_rsp(head() + ia(1).encode() + ia(2).encode() + ia(3).encode())
    assert (r.stat, r.preparent, r.postparent) == (ia(1), ia(2), ia(3))
    r = F.create_rsp(head() + ia(1).encode() + be64(42) + ia(2).encode() + ia(3).encode())
    assert (r.stat, r.fd, r.preparent, r.postparent) == (ia(1), 42, ia(2), ia(3))


def test_rename_rsp() -> None:
    r = F.rename_rsp(head() + b"".join(ia(i).encode() for i in range(1, 6)))
    assert (r.stat, r.preoldparent, r.postoldparent, r.preparent, r.postparent) == tuple(ia(i) for i in range(1, 6))


def test_readlink_open_statfs_seek_lk() -> None:
    r = F.readlink_rsp(head(6) + ia(1).encode() + be32(6) + b"target\0\0")
    assert (r.stat, r.path) == (ia(1), "target")
    assert F.open_rsp(head() + be64(-1)).fd == -1
    r = F.statfs_rsp(head() + b"".join(be64(v) for v in range(11)))
    assert r.statfs == Statfs(*range(11))
    assert F.seek_rsp(head() + be64(2**40)).offset == 2**40
    fl = F.Flock(F.RDLCK, 0, 10, 20, 7, b"owner")
    p = Packer()
    fl.encode(p)
    assert F.lk_rsp(head() + p.bytes()).flock == fl


def test_dict_rsp() -> None:
    wire = head() + encode_gfx({"trusted.afr.x": b"\0" * 12}) + ia(1).encode() + ia(2).encode()
    r = F.dict_rsp(wire)
    assert r.dict == {"trusted.afr.x": b"\0" * 12}
    assert (r.pre, r.post) == (ia(1), ia(2))


def test_read_rsp_with_payload() -> None:
    wire = be32(5) + be32(0) + ia(1).encode() + be32(5) + NULLD + b"hello"  # stat, size BEFORE xdata
    r = F.read_rsp(wire)
    assert (r.ret, r.stat, r.data, r.xdata) == (5, ia(1), b"hello", None)


def test_read_rsp_empty_and_error() -> None:
    assert F.read_rsp(be32(0) + be32(0) + ia(1).encode() + be32(0) + NULLD).data == b""
    r = F.read_rsp(be32(-1) + be32(9) + Iatt().encode() + be32(0) + NULLD)
    assert (r.ret, r.errno, r.data) == (-1, 9, b"")


def test_read_rsp_payload_length_mismatch() -> None:
    wire = be32(5) + be32(0) + ia(1).encode() + be32(5) + NULLD + b"hell"
    with pytest.raises(ProtocolError):
        F.read_rsp(wire)
    with pytest.raises(ProtocolError):
        F.read_rsp(wire + b"oo")


def dirp_entry(ino: int, off: int, dtype: int, name: str, stat: Iatt, xdata: dict | None) -> bytes:
    nb = name.encode()
    return (be64(ino) + be64(off) + be32(len(nb)) + be32(dtype) + Packer().string(nb).bytes() + stat.encode()
            + encode_gfx(xdata))


def test_readdirp_zero_entries() -> None:
    r = F.readdirp_rsp(head() + be32(0))
    assert r.entries == []


def test_readdirp_one_entry() -> None:
    wire = head(1) + be32(1) + dirp_entry(10, 11, 8, "file", ia(1), {"k": 1}) + be32(0)
    r = F.readdirp_rsp(wire)
    assert r.entries == [F.DirEntry(10, 11, 8, "file", ia(1), {"k": 1})]


def test_readdirp_three_entries() -> None:
    ents = [(1, 100, 4, ".", ia(1), None), (2, 200, 4, "..", ia(2), {}), (3, 2**63 - 1, 8, "naïve", ia(3), None)]
    wire = head(3) + b"".join(be32(1) + dirp_entry(*e) for e in ents) + be32(0)
    r = F.readdirp_rsp(wire)
    assert [(e.ino, e.off, e.type, e.name, e.stat, e.xdata) for e in r.entries] == ents
    # missing list terminator / garbage pointer flag
    with pytest.raises(ProtocolError):
        F.readdirp_rsp(wire[:-4])
    with pytest.raises(ProtocolError):
        F.readdirp_rsp(wire[:-4] + be32(2))


def test_readdir_entries() -> None:
    e = be64(5) + be64(6) + be32(1) + be32(8) + be32(1) + b"a\0\0\0"
    r = F.readdir_rsp(head(2) + be32(1) + e + be32(1) + e + be32(0))
    assert [(x.ino, x.off, x.type, x.name, x.stat) for x in r.entries] == [(5, 6, 8, "a", None)] * 2


# the struct each fop's reply uses in gluster's client-rpc-fops_v2.c (glusterfs4-xdr.x)
_LAYOUTS = {
    "common": lambda: head(),
    "iatt": lambda: head() + ia(1).encode(),
    "2iatt": lambda: head() + ia(1).encode() + ia(2).encode(),
    "3iatt": lambda: head() + ia(1).encode() + ia(2).encode() + ia(3).encode(),
    "open": lambda: head() + be64(3),
    "readlink": lambda: head() + ia(1).encode() + be32(1) + b"t\0\0\0",
    "statfs": lambda: head() + be64(0) * 11,
    "dict": lambda: head() + encode_gfx({}) + ia(1).encode() + ia(2).encode(),
    "create": lambda: head() + ia(1).encode() + be64(0) + ia(2).encode() + ia(3).encode(),
    "lk": lambda: head() + be32(0) * 2 + be64(0) * 2 + be32(0) * 2,
    "readdir": lambda: head() + be32(0),
    "rename": lambda: head() + ia(1).encode() * 5,
    "read": lambda: be32(0) + be32(0) + ia(1).encode() + be32(0) + NULLD,
    "seek": lambda: head() + be64(1),
}
_GLUSTER_RSP = {
    "3iatt": ("SYMLINK", "MKNOD", "MKDIR", "LINK"),
    "open": ("OPEN", "OPENDIR"),
    "iatt": ("STAT", "FSTAT"),
    "readlink": ("READLINK",),
    "2iatt": ("UNLINK", "RMDIR", "TRUNCATE", "WRITE", "FSYNC", "FTRUNCATE", "FALLOCATE", "DISCARD", "ZEROFILL",
              "SETATTR", "FSETATTR", "LOOKUP"),
    "statfs": ("STATFS",),
    "common": ("FLUSH", "SETXATTR", "REMOVEXATTR", "FREMOVEXATTR", "FSYNCDIR", "ACCESS", "INODELK", "FINODELK",
               "ENTRYLK", "FENTRYLK", "FSETXATTR", "IPC", "RELEASE", "RELEASEDIR"),
    "dict": ("GETXATTR", "FGETXATTR", "XATTROP", "FXATTROP"),
    "seek": ("SEEK",),
    "create": ("CREATE",),
    "lk": ("LK",),
    "readdir": ("READDIR", "READDIRP"),
    "rename": ("RENAME",),
    "read": ("READ",),
}


@pytest.mark.parametrize("proc", sorted(DECODERS, key=int), ids=lambda p: p.name)
def test_every_decoder_reads_exactly_its_gluster_struct(proc: Proc) -> None:
    kind = next(k for k, names in _GLUSTER_RSP.items() if proc.name in names)
    r = DECODERS[proc](_LAYOUTS[kind]())  # decoders call done(): the struct is consumed exactly
    assert (r.ret, r.errno) == (0, 0)


def test_decoders_cover_every_fop_the_client_sends() -> None:
    missing = {p.name for p in Proc} - {p.name for p in DECODERS}
    assert missing == {"RCHECKSUM"}


# ------------------------------------------------------------------ callbacks, hand-built


def gf_iatt(n: int) -> bytes:
    return bytes([n]) * 16 + be64(n) + be64(0) + be32(0o100644) + be32(1) + be32(0) * 2 + be64(0) + be64(n) \
        + be32(4096) + be64(0) + be32(0) * 6


def test_cache_invalidation_callback() -> None:
    xd = encode_old({"k": "v"})
    wire = Packer().string(gfid_str(G1)).u32(1).u32(0x18).u32(60).raw(gf_iatt(1) + gf_iatt(2) + gf_iatt(3)) \
        .opaque(xd).bytes()
    c = F.decode_callback(F.Cbk.CACHE_INVALIDATION, wire)
    assert isinstance(c, F.CacheInvalidation)
    assert (c.gfid, c.event_type, c.flags, c.expire) == (G1, 1, 0x18, 60)
    assert (c.stat.size, c.parent.size, c.oldparent.size) == (1, 2, 3)
    assert c.xdata == {"k": b"v\0"}


@pytest.mark.parametrize("text", ["not-a-gfid", "0011", "zz" * 16, gfid_str(G1) + "00"])
def test_cache_invalidation_bad_gfid_text(text: str) -> None:
    wire = Packer().string(text).u32(1).u32(0).u32(0).raw(gf_iatt(1) * 3).opaque(b"").bytes()
    with pytest.raises(ProtocolError):
        F.decode_callback(F.Cbk.CACHE_INVALIDATION, wire)


def test_contention_callbacks() -> None:
    p = Packer().fixed(G1, 16)
    F.Flock(F.WRLCK, 0, 0, 0, 0, b"own").encode(p)
    c = F.decode_callback(F.Cbk.INODELK_CONTENTION, p.u32(77).string("dom").opaque(b"x").bytes())
    assert c == F.InodelkContention(G1, F.Flock(F.WRLCK, 0, 0, 0, 0, b"own"), 77, "dom", b"x")
    wire = Packer().fixed(G1, 16).u32(1).u32(78).string("name").string("dom").opaque(b"").bytes()
    c = F.decode_callback(F.Cbk.ENTRYLK_CONTENTION, wire)
    assert c == F.EntrylkContention(G1, 1, 78, "name", "dom", b"")


def test_unknown_callback_returns_raw_body() -> None:
    assert F.decode_callback(F.Cbk.CHILD_UP, b"\x01\x02") == b"\x01\x02"


# ------------------------------------------------------------------ handshake, hand-built


def test_handshake_requests() -> None:
    assert hs.portbybrick_req("/b") == be32(2) + b"/b\0\0"
    assert hs.dump_req() == be64(0)
    opts = {"remote-subvolume": "/b"}
    assert hs.setvolume_req(opts) == Packer().opaque(encode_old(opts)).bytes()


def test_handshake_replies() -> None:
    assert hs.portbybrick_rsp(be32(0) + be32(0) + be32(1) + be32(49152)) == (0, 0, 1, 49152)
    r = hs.getspec_rsp(be32(3) + be32(0) + be32(3) + b"abc\0" + be32(0))
    assert (r.ret, r.spec, r.xdata) == (3, "abc", {})
    assert hs.dump_rsp(be64(0) + be32(0) + be32(0) + be32(0)) == []
    with pytest.raises(OSError):
        hs.dump_rsp(be64(0) + be32(-1) + be32(13) + be32(0))


# ------------------------------------------------------------------ recorded from a real brick


def test_recorded_files_are_small() -> None:
    assert sum(p.stat().st_size for p in DATA.iterdir()) < 200_000
    assert FACTS["glusterfs"].startswith("glusterfs 10.")
    for name in FACTS["files"]:
        assert (DATA / name).exists(), name


def test_real_getspec() -> None:
    r = hs.getspec_rsp(body("getspec.reply.bin"))
    assert r.errno == 0
    assert r.ret == len(r.spec.encode()) > 0  # op_ret is the spec length, not 0
    assert r.xdata == {}
    g = parse(r.spec)
    assert g.top.name == FACTS["volume"]
    assert g.shape() == FACTS["shape"] == "distribute 1 x 1"
    (client,) = g.clients()
    assert client.name == FACTS["client_name"]
    assert client.options["remote-subvolume"] == FACTS["remote_subvolume"]
    # the trusted volfile carries credentials; the recorder blanked them to zeros, keeping lengths
    assert set(client.options["username"]) <= set("0-") and len(client.options["password"]) == 36


def test_real_portbybrick() -> None:
    ret, err, _status, port = hs.portbybrick_rsp(body("portbybrick.reply.bin"))
    assert (ret, err) == (0, 0)
    assert 1024 < port < 65536


def test_real_dump() -> None:
    progs = hs.dump_rsp(body("dump.reply.bin"))
    assert ("GlusterFS 4.x v1", F.FOP_PROGRAM, F.FOP_VERSION) in progs
    assert ("GlusterFS 3.3", F.FOP_PROGRAM, 330) in progs
    assert ("GF-DUMP", hs.DUMP_PROGRAM, hs.DUMP_VERSION) in progs
    assert ("GlusterFS Handshake", hs.HANDSHAKE_PROGRAM, hs.HANDSHAKE_VERSION) in progs


def test_real_lookup_root() -> None:
    r = F.lookup_rsp(body("lookup_root.reply.bin"))
    assert (r.ret, r.errno) == (0, 0)
    assert r.stat.gfid == ROOT_GFID
    assert r.stat.gfid == b"\0" * 15 + b"\x01"
    assert S.S_ISDIR(r.stat.mode) and r.stat.is_dir
    assert r.stat.ino == 1 and r.stat.nlink >= 2
    assert r.postparent == Iatt()  # the root has no parent: all zeros


def test_real_lookup_enoent() -> None:
    r = F.lookup_rsp(body("lookup_enoent.reply.bin"))
    assert (r.ret, r.errno) == (-1, 2) == (-1, FACTS["lookup_enoent_errno"])


def test_real_create() -> None:
    r = F.create_rsp(body("create.reply.bin"))
    gfid = bytes.fromhex(FACTS["file_gfid"])
    assert (r.ret, r.errno) == (0, 0)
    assert r.stat.gfid == gfid and r.stat.is_reg and r.stat.size == 0
    assert S.S_IMODE(r.stat.mode) == 0o644
    assert r.fd == 0  # fds are per connection, from 0
    assert r.preparent.gfid == r.postparent.gfid == ROOT_GFID
    assert r.xdata["gfid-req"] == uuid.UUID(bytes=gfid)  # the brick echoes the gfid-req back


def test_real_write_request_and_reply() -> None:
    payload = FACTS["payload"].encode()
    assert len(payload) % 4 != 0
    m = rpc.decode_message((DATA / "write.call.bin").read_bytes())
    u = Unpacker(m.body)
    assert u.fixed(16) == bytes.fromhex(FACTS["file_gfid"])
    fd, offset, size, flag = u.i64(), u.u64(), u.u32(), u.u32()
    assert (fd, offset, size, flag) == (0, 0, len(payload), 0)
    xdr_size = int.from_bytes(m.body[40:44], "big")
    decode_gfx(u)
    assert u.pos == 52 + xdr_size
    assert m.body[u.pos :] == payload
    r = F.two_iatt_rsp(body("write.reply.bin"))
    assert r.ret == len(payload)
    assert (r.pre.size, r.post.size) == (0, len(payload))
    assert r.post.gfid == bytes.fromhex(FACTS["file_gfid"])


def test_real_read_payload_equals_what_was_written() -> None:
    r = F.read_rsp(body("read.reply.bin"))
    payload = FACTS["payload"].encode()
    assert r.ret == len(payload)
    assert r.data == payload
    assert r.stat.size == len(payload) and r.stat.gfid == bytes.fromhex(FACTS["file_gfid"])


def test_real_getxattr() -> None:
    b = body("getxattr.reply.bin")
    r = F.dict_rsp(b)
    name, value = FACTS["xattr"]
    assert r.ret == len(value)  # op_ret is the value size
    assert r.dict == {name: value.encode()}
    # the brick sends the value as PTR (type 6), without a NUL
    assert be32(T_PTR) + be32(len(value)) + value.encode() in b


def test_real_statfs() -> None:
    r = F.statfs_rsp(body("statfs.reply.bin"))
    st = r.statfs
    assert r.ret == 0
    assert st.bsize > 0 and st.frsize > 0 and st.namemax == 255
    assert st.blocks >= st.bfree >= st.bavail
    assert st.files >= st.ffree


def test_real_mkdir_and_opendir() -> None:
    r = F.three_iatt_rsp(body("mkdir.reply.bin"))
    assert r.stat.gfid == bytes.fromhex(FACTS["dir_gfid"]) and r.stat.is_dir
    assert r.postparent.nlink == r.preparent.nlink + 1
    r = F.open_rsp(body("opendir.reply.bin"))
    assert r.ret == 0 and r.fd is not None and r.fd >= 0


def test_real_readdirp() -> None:
    r = F.readdirp_rsp(body("readdirp.reply.bin"))
    files = FACTS["dir_files"]
    by_name = {e.name: e for e in r.entries}
    assert set(by_name) == {".", "..", *files}
    assert r.ret == len(r.entries) == 5
    for name, gfid in files.items():
        e = by_name[name]
        assert e.stat.gfid == bytes.fromhex(gfid)
        assert e.type == 8 and e.stat.is_reg and S.S_IMODE(e.stat.mode) == 0o600
        assert e.ino == e.stat.ino
    assert by_name["."].stat.gfid == bytes.fromhex(FACTS["dir_gfid"])
    assert by_name[".."].stat.gfid == ROOT_GFID
    assert by_name["."].type == by_name[".."].type == 4
    assert r.entries[-1].off == 2**63 - 1  # the last entry's offset marks the end


def test_real_cache_invalidation_callback() -> None:
    m = rpc.decode_message((DATA / "cbk_cache_invalidation.call.bin").read_bytes())
    assert len(m.body) == 4 + 36 + 3 * 4 + 3 * 100 + 4  # gfid text, 3 u32, 3 gf_iatt, empty xdata
    c = F.decode_callback(m.proc, m.body)
    assert isinstance(c, F.CacheInvalidation)
    assert c.gfid == bytes.fromhex(FACTS["file_gfid"])
    assert c.stat.gfid == c.gfid and c.stat.is_reg
    assert c.stat.size == len(FACTS["payload"]) + len("more\n")  # the other client appended 5 bytes
    assert c.flags == 0x18  # append -> SIZE|TIMES (PROTOCOL.md)
    assert c.expire > 0


def test_real_inodelk_contention_callback() -> None:
    m = rpc.decode_message((DATA / "cbk_inodelk_contention.call.bin").read_bytes())
    assert len(m.body) == 16 + 40 + 4 + 4 + len(FACTS["inodelk_domain"]) + 4  # gfid flock pid domain xdata
    c = F.decode_callback(m.proc, m.body)
    assert isinstance(c, F.InodelkContention)
    assert c.gfid == bytes.fromhex(FACTS["file_gfid"])
    assert c.domain == FACTS["inodelk_domain"]
    assert c.flock.type == F.WRLCK and c.flock.owner == b"ownerAAA"  # the lock we hold, that blocks
    assert c.pid > 0


def test_real_setvolume_reply() -> None:
    ret, err, _d = hs.setvolume_rsp(body("setvolume.reply.bin"))
    assert ret == 0 and err == 22
