"""ONC RPC as gluster speaks it (gfuse.rpc): record marking, headers, replies, credentials."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gfuse import rpc
from gfuse.rpc import (
    AUTH_GLUSTERFS_V2,
    AUTH_GLUSTERFS_V3,
    AUTH_NULL,
    AcceptStat,
    Call,
    Credential,
    RecordReader,
    Reply,
    RPCError,
    check_reply,
    decode_message,
    encode_call,
    encode_reply,
    frame,
)
from gfuse.xdr import ProtocolError

DATA = Path(__file__).resolve().parents[1] / "data"


def be32(v: int) -> bytes:
    return (v & 0xFFFFFFFF).to_bytes(4, "big")


# ------------------------------------------------------------------ record marking


def test_frame_sets_last_fragment_bit() -> None:
    assert frame(b"abc") == b"\x80\x00\x00\x03abc"
    assert frame(b"") == b"\x80\x00\x00\x00"
    assert frame(b"x" * 0x1234)[:4] == b"\x80\x00\x12\x34"


def test_one_record_one_chunk() -> None:
    r = RecordReader()
    assert r.feed(frame(b"hello")) == [b"hello"]
    assert r.pending == 0


def test_one_record_split_at_every_point() -> None:
    rec = bytes(range(37))
    wire = frame(rec)
    for cut in range(len(wire) + 1):
        r = RecordReader()
        out = r.feed(wire[:cut])
        assert out == ([] if cut < len(wire) else [rec])
        out += r.feed(wire[cut:])
        assert out == [rec], cut
        assert r.pending == 0


def test_one_record_byte_by_byte() -> None:
    rec = b"0123456789" * 7
    r = RecordReader()
    out: list[bytes] = []
    for i, b in enumerate(frame(rec)):
        got = r.feed(bytes([b]))
        if i < len(rec) + 3:
            assert got == []
        out += got
    assert out == [rec]


def test_one_record_random_chunks() -> None:
    rnd = random.Random(1234)
    recs = [bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 300))) for _ in range(20)]
    wire = b"".join(frame(x) for x in recs)
    for _ in range(50):
        r = RecordReader()
        out: list[bytes] = []
        pos = 0
        while pos < len(wire):
            step = rnd.randrange(1, 64)
            out += r.feed(wire[pos : pos + step])
            pos += step
        assert out == recs
        assert r.pending == 0


def test_several_fragments_make_one_record() -> None:
    wire = b"\x00\x00\x00\x03abc" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x02de" + b"\x80\x00\x00\x01f"
    r = RecordReader()
    assert r.feed(wire[:7]) == []
    assert r.pending == 3  # the first fragment's body is held
    assert r.feed(wire[7:]) == [b"abcdef"]
    assert r.pending == 0
    # and byte by byte
    r = RecordReader()
    out = [x for b in wire for x in r.feed(bytes([b]))]
    assert out == [b"abcdef"]


def test_several_records_in_one_chunk() -> None:
    wire = frame(b"one") + frame(b"") + frame(b"three") + b"\x80\x00\x00\x05par"
    r = RecordReader()
    assert r.feed(wire) == [b"one", b"", b"three"]
    assert r.pending == 7  # an incomplete header+partial body stays buffered
    assert r.feed(b"tz") == [b"partz"]


def test_oversize_record_is_refused_at_the_header() -> None:
    r = RecordReader(max_record=100)
    assert r.feed(frame(b"x" * 100)) == [b"x" * 100]  # exactly the limit is fine
    with pytest.raises(ProtocolError):
        r.feed(b"\x80\x00\x00\x65")  # 101 bytes claimed: refused before the body arrives


def test_oversize_across_fragments() -> None:
    r = RecordReader(max_record=100)
    r.feed(b"\x00\x00\x00\x3c" + b"a" * 60)  # 60 bytes, not last
    with pytest.raises(ProtocolError):
        r.feed(b"\x80\x00\x00\x29")  # +41 = 101


@pytest.mark.timeout(10)
def test_huge_fragment_header_fails_fast() -> None:
    r = RecordReader()
    with pytest.raises(ProtocolError):
        r.feed(b"\xff\xff\xff\xf0")


def test_default_limit_accepts_16MiB_reads() -> None:
    r = RecordReader()
    hdr = (rpc.LAST_FRAGMENT | (16 * 1024 * 1024 + 200)).to_bytes(4, "big")
    assert r.feed(hdr) == []  # waits for the body, no error


def test_real_brick_stream_in_random_chunks() -> None:
    """The bytes a brick connection really received, record marks included."""
    wire = (DATA / "brick_stream.bin").read_bytes()
    whole = RecordReader().feed(wire)
    assert len(whole) > 10
    rnd = random.Random(7)
    for _ in range(20):
        r = RecordReader()
        out: list[bytes] = []
        pos = 0
        while pos < len(wire):
            step = rnd.choice((1, 3, 4, 5, 100, 1000))
            out += r.feed(wire[pos : pos + step])
            pos += step
        assert out == whole
        assert r.pending == 0
    msgs = [decode_message(x) for x in whole]
    assert isinstance(msgs[0], Reply) and msgs[0].xid == 1  # DUMP, our first call
    calls = [m for m in msgs if isinstance(m, Call)]
    assert {c.proc for c in calls} == {5, 10}  # CACHE_INVALIDATION and INODELK_CONTENTION
    assert all(c.prog == 52743234 and c.vers == 1 for c in calls)
    # the brick numbers its callbacks from 1: they collide with our own xids
    reply_xids = {m.xid for m in msgs if isinstance(m, Reply)}
    assert {c.xid for c in calls} <= reply_xids


# ------------------------------------------------------------------ calls

CRED40 = Credential(pid=0x11, uid=0x22, gid=0x33, flags=3, ctime_sec=0x0102030405, ctime_nsec=0x66,
                    lk_owner=b"OWNR").encode_v3()


def test_encode_call_exact_bytes() -> None:
    got = encode_call(0x12345678, 1298437, 400, 27, AUTH_GLUSTERFS_V3, CRED40, b"BODY")
    want = (
        b"\x12\x34\x56\x78"  # xid
        b"\x00\x00\x00\x00"  # CALL
        b"\x00\x00\x00\x02"  # rpcvers
        b"\x00\x13\xd0\x05"  # prog 1298437
        b"\x00\x00\x01\x90"  # vers 400
        b"\x00\x00\x00\x1b"  # proc 27 LOOKUP
        b"\x00\x05\xf3\x98"  # flavor 390040
        b"\x00\x00\x00\x28" + CRED40  # cred opaque, 40 bytes
        + b"\x00\x00\x00\x00\x00\x00\x00\x00"  # verifier AUTH_NULL, empty
        + b"BODY"
    )
    assert got == want


def test_call_round_trip() -> None:
    rec = encode_call(7, 14398633, 2, 2, AUTH_GLUSTERFS_V2, Credential(pid=5).encode_v2(), b"\0\0\0\x01")
    m = decode_message(rec)
    assert m == Call(7, 14398633, 2, 2, AUTH_GLUSTERFS_V2, Credential(pid=5).encode_v2(), b"\0\0\0\x01")
    assert Credential.decode_v2(m.cred_body).pid == 5


def test_call_with_unpadded_cred_round_trips() -> None:
    rec = encode_call(1, 2, 3, 4, 99, b"abcde", b"")
    assert rec[28:40] == b"\0\0\0\x05abcde\0\0\0"
    assert decode_message(rec).cred_body == b"abcde"


def test_call_with_wrong_rpc_version() -> None:
    rec = bytearray(encode_call(1, 2, 3, 4, AUTH_NULL, b""))
    rec[8:12] = be32(3)
    with pytest.raises(ProtocolError):
        decode_message(bytes(rec))


def test_call_cred_over_400_refused_by_decoder() -> None:
    rec = encode_call(1, 2, 3, 4, AUTH_NULL, b"x" * 400)
    assert decode_message(rec).cred_body == b"x" * 400
    with pytest.raises(ProtocolError):
        decode_message(encode_call(1, 2, 3, 4, AUTH_NULL, b"x" * 401))


def test_unknown_message_type() -> None:
    with pytest.raises(ProtocolError):
        decode_message(be32(1) + be32(2))


def test_empty_and_tiny_records() -> None:
    for rec in (b"", b"\0\0\0\x01", b"\0\0\0\x01\0\0\0\x01"):
        with pytest.raises(ProtocolError):
            decode_message(rec)


# ------------------------------------------------------------------ replies


def accepted(xid: int, stat: int, tail: bytes = b"") -> bytes:
    return be32(xid) + be32(1) + be32(0) + be32(0) + be32(0) + be32(stat) + tail


def test_encode_reply_exact_bytes() -> None:
    assert encode_reply(9, b"RES!") == accepted(9, 0, b"RES!")
    assert encode_reply(9, b"", AcceptStat.GARBAGE_ARGS) == accepted(9, 4)


def test_reply_success() -> None:
    m = decode_message(accepted(0xFFFFFFFF, 0, b"\0\0\0\0\0\0\0\x16"))
    assert m == Reply(0xFFFFFFFF, body=b"\0\0\0\0\0\0\0\x16", accept_stat=0)
    assert check_reply(m) == b"\0\0\0\0\0\0\0\x16"


def test_reply_with_nonempty_verifier() -> None:
    rec = be32(3) + be32(1) + be32(0) + be32(1) + be32(3) + b"abc\0" + be32(0) + b"R"
    assert decode_message(rec) == Reply(3, body=b"R")


def test_reply_garbage_args() -> None:
    m = decode_message(accepted(5, 4))
    assert isinstance(m, Reply)
    assert m.accept_stat == AcceptStat.GARBAGE_ARGS and not m.denied
    with pytest.raises(RPCError, match="GARBAGE_ARGS") as ei:
        check_reply(m, "LOOKUP")
    assert ei.value.stat == AcceptStat.GARBAGE_ARGS


@pytest.mark.parametrize("stat", [AcceptStat.PROG_UNAVAIL, AcceptStat.PROC_UNAVAIL, AcceptStat.SYSTEM_ERR])
def test_reply_other_errors(stat: int) -> None:
    m = decode_message(accepted(5, stat))
    assert m.accept_stat == stat
    with pytest.raises(RPCError):
        check_reply(m)


def test_reply_prog_mismatch() -> None:
    m = decode_message(accepted(6, 2, be32(330) + be32(400)))
    assert m == Reply(6, accept_stat=AcceptStat.PROG_MISMATCH, detail=(330, 400))
    with pytest.raises(RPCError, match="PROG_MISMATCH"):
        check_reply(m)
    with pytest.raises(ProtocolError):
        decode_message(accepted(6, 2, be32(330)))


def test_reply_unknown_accept_stat() -> None:
    with pytest.raises(ProtocolError):
        decode_message(accepted(6, 6))


def test_reply_denied_auth_error() -> None:
    rec = be32(8) + be32(1) + be32(1) + be32(1) + be32(2)  # MSG_DENIED, AUTH_ERROR, AUTH_BADCRED
    m = decode_message(rec)
    assert m == Reply(8, denied=True, detail=(1, 2))
    with pytest.raises(RPCError, match="authentication error"):
        check_reply(m)


def test_reply_denied_rpc_mismatch() -> None:
    rec = be32(8) + be32(1) + be32(1) + be32(0) + be32(2) + be32(2)
    m = decode_message(rec)
    assert m == Reply(8, denied=True, detail=(0, 2, 2))
    with pytest.raises(RPCError, match="RPC version mismatch"):
        check_reply(m)


def test_reply_denied_unknown_reject_and_unknown_reply_stat() -> None:
    with pytest.raises(ProtocolError):
        decode_message(be32(8) + be32(1) + be32(1) + be32(2))
    with pytest.raises(ProtocolError):
        decode_message(be32(8) + be32(1) + be32(2))


def test_callback_is_a_call_even_with_the_xid_of_a_pending_call() -> None:
    """The brick's callbacks use their own xid sequence from 1: only msg_type tells them apart."""
    ours = decode_message(encode_reply(1, b"\0" * 8))
    cbk = decode_message(encode_call(1, 52743234, 1, 5, AUTH_NULL, b"", b"CBK"))
    assert isinstance(ours, Reply) and isinstance(cbk, Call)
    assert ours.xid == cbk.xid == 1
    assert (cbk.prog, cbk.vers, cbk.proc, cbk.body) == (52743234, 1, 5, b"CBK")


def test_real_callbacks_decode_as_calls() -> None:
    for name, proc in (("cbk_cache_invalidation", 5), ("cbk_inodelk_contention", 10)):
        m = decode_message((DATA / f"{name}.call.bin").read_bytes())
        assert isinstance(m, Call)
        assert (m.prog, m.vers, m.proc, m.cred_flavor, m.cred_body) == (52743234, 1, proc, AUTH_NULL, b"")
        assert m.xid in (1, 2)  # the brick's own sequence


# ------------------------------------------------------------------ credentials


def test_credential_v3_is_40_bytes_exact() -> None:
    c = Credential(pid=0x11, uid=0x22, gid=0x33, flags=3, ctime_sec=0x0102030405, ctime_nsec=0x66, lk_owner=b"OWNR")
    b = c.encode_v3()
    assert len(b) == 40
    assert b == (
        b"\x00\x00\x00\x11"  # pid
        b"\x00\x00\x00\x22"  # uid
        b"\x00\x00\x00\x33"  # gid
        b"\x00\x00\x00\x03"  # flags
        b"\x00\x00\x00\x66"  # ctime_nsec
        b"\x00\x00\x00\x01\x02\x03\x04\x05"  # ctime_sec (u64)
        b"\x00\x00\x00\x00"  # groups<> empty
        b"\x00\x00\x00\x04OWNR"  # lk_owner<>
    )
    assert Credential.decode_v3(b) == c


def test_default_credential_v3_is_40_bytes() -> None:
    assert len(Credential().encode_v3()) == 40
    assert Credential().encode_v3()[-8:] == b"\0\0\0\x04\0\0\0\0"


def test_credential_v3_with_groups_and_long_owner() -> None:
    c = Credential(pid=-1, uid=1000, gid=1000, groups=(4, 24, 27), lk_owner=b"\x01" * 9, flags=31,
                   ctime_sec=2**40, ctime_nsec=999_999_999)
    b = c.encode_v3()
    assert len(b) == 28 + 4 + 12 + 4 + 12
    assert b[:4] == b"\xff\xff\xff\xff"
    assert b[28:44] == be32(3) + be32(4) + be32(24) + be32(27)
    assert Credential.decode_v3(b) == c


def test_credential_v2_layout() -> None:
    c = Credential(pid=7, uid=1, gid=2, groups=(10, 11), lk_owner=b"ab")
    b = c.encode_v2()
    assert b == be32(7) + be32(1) + be32(2) + be32(2) + be32(10) + be32(11) + be32(2) + b"ab\0\0"
    d = Credential.decode_v2(b)
    assert (d.pid, d.uid, d.gid, d.groups, d.lk_owner) == (7, 1, 2, (10, 11), b"ab")
    assert Credential(pid=3).encode_v2() == be32(3) + be32(0) * 3 + be32(4) + b"\0\0\0\0"


def test_credential_v3_over_400_bytes_refused() -> None:
    ok = Credential(groups=tuple(range(90)))  # 40 + 360 = 400
    assert len(ok.encode_v3()) == 400
    with pytest.raises(ValueError):
        Credential(groups=tuple(range(91))).encode_v3()
    with pytest.raises(ValueError):
        Credential(lk_owner=b"x" * 400).encode_v3()


def test_credential_v2_over_400_bytes_refused() -> None:
    """AUTH_GLUSTERFS_v2 has the same 400-byte ceiling as v3 (RFC 5531 opaque_auth<400>)."""
    assert len(Credential(groups=tuple(range(94))).encode_v2()) == 400
    with pytest.raises(ValueError):
        Credential(groups=tuple(range(95))).encode_v2()


def test_credential_decode_rejects_trailing_and_truncated() -> None:
    b = Credential().encode_v3()
    with pytest.raises(ProtocolError):
        Credential.decode_v3(b + b"\0\0\0\0")
    for n in range(len(b)):
        with pytest.raises(ProtocolError):
            Credential.decode_v3(b[:n])
    b2 = Credential().encode_v2()
    for n in range(len(b2)):
        with pytest.raises(ProtocolError):
            Credential.decode_v2(b2[:n])


def test_credential_decode_absurd_group_count() -> None:
    body = be32(0) * 3 + be32(0xFFFFFFFF)
    with pytest.raises(ProtocolError):
        Credential.decode_v2(body)
    with pytest.raises(ProtocolError):
        Credential.decode_v3(be32(0) * 4 + be32(0) + b"\0" * 8 + be32(0xFFFFFFFF))


def test_real_write_call_credential() -> None:
    """The WRITE call our client sent and the brick accepted carries a 40-byte v3 credential."""
    m = decode_message((DATA / "write.call.bin").read_bytes())
    assert isinstance(m, Call)
    assert (m.prog, m.vers, m.proc, m.cred_flavor) == (1298437, 400, 13, AUTH_GLUSTERFS_V3)
    assert len(m.cred_body) == 40
    c = Credential.decode_v3(m.cred_body)
    assert c.flags == rpc.MTIME | rpc.CTIME  # what the native client sends on writes
    assert c.groups == () and c.lk_owner == b"\0\0\0\0"
    assert c.ctime_sec > 1_600_000_000


def test_ctime_bits() -> None:
    assert [rpc.CTIME, rpc.MTIME, rpc.ATIME, rpc.PAR_CTIME, rpc.PAR_MTIME, rpc.PAR_ATIME] == [1, 2, 4, 8, 16, 32]


def test_xid_wraps_in_header() -> None:
    for xid in (0, 1, 2**31, 2**32 - 1):
        assert decode_message(encode_call(xid, 1, 1, 1, AUTH_NULL, b"")).xid == xid
