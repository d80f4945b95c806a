"""Gluster dictionaries on the wire (gfuse.dicts): the old text format and the typed gfx_dict."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest

from gfuse import handshake as hs
from gfuse import rpc
from gfuse.dicts import (
    NULL_GFX_DICT,
    T_GFUUID,
    T_IATT,
    T_MDATA,
    T_PTR,
    T_STR,
    T_STR_OLD,
    MData,
    UInt,
    decode_gfx,
    decode_old,
    encode_gfx,
    encode_old,
    old_str,
)
from gfuse.iatt import Iatt
from gfuse.xdr import Packer, ProtocolError, Unpacker

DATA = Path(__file__).resolve().parents[1] / "data"


def be32(v: int) -> bytes:
    return (v & 0xFFFFFFFF).to_bytes(4, "big")


def be64(v: int) -> bytes:
    return (v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")


def gfx(b: bytes) -> object:
    u = Unpacker(b)
    d = decode_gfx(u)
    u.done()
    return d


# ------------------------------------------------------------------ old format


def test_old_exact_layout() -> None:
    # count, then keylen (no NUL), vallen (with NUL), key, NUL, value; no XDR padding anywhere
    assert encode_old({"ab": "xyz"}) == be32(1) + be32(2) + be32(4) + b"ab\0" + b"xyz\0"


def test_old_two_pairs_numbers_and_bytes() -> None:
    got = encode_old({"fops-version": 1298437, "raw": b"\x01\x02"})
    want = (
        be32(2)
        + be32(12) + be32(8) + b"fops-version\0" + b"1298437\0"
        + be32(3) + be32(2) + b"raw\0" + b"\x01\x02"  # bytes go as they are, no NUL added
    )
    assert got == want
    assert decode_old(got) == {"fops-version": b"1298437\0", "raw": b"\x01\x02"}


def test_old_empty_and_none() -> None:
    assert encode_old({}) == b""
    assert encode_old(None) == b""
    assert decode_old(b"") == {}
    assert decode_old(be32(0)) == {}


def test_old_round_trip_and_old_str() -> None:
    d = {"min-op-version": "1", "max-op-version": "100000", "é": "ü", "empty": ""}
    back = decode_old(encode_old(d))
    assert back["empty"] == b"\0"
    assert {k: old_str(v) for k, v in back.items()} == d


def test_old_non_utf8_key_and_value_round_trip() -> None:
    """decode_old keeps undecodable key bytes as surrogates; encode_old must give the same bytes back."""
    wire = be32(1) + be32(2) + be32(2) + b"k\xff\0" + b"v\0"
    d = decode_old(wire)
    assert d == {"k\udcff": b"v\0"}
    assert encode_old(d) == wire


def test_old_key_without_nul_is_refused() -> None:
    bad = be32(1) + be32(2) + be32(1) + b"abX" + b"v"
    with pytest.raises(ProtocolError):
        decode_old(bad)


def test_old_truncations() -> None:
    wire = encode_old({"key": "value", "k2": "v2"})
    for n in range(1, len(wire)):
        with pytest.raises(ProtocolError):
            decode_old(wire[:n])


@pytest.mark.timeout(10)
def test_old_absurd_counts_and_lengths_fail_fast() -> None:
    with pytest.raises(ProtocolError):
        decode_old(be32(0xFFFFFFFF))
    with pytest.raises(ProtocolError):
        decode_old(be32(99_999) + be32(1))
    with pytest.raises(ProtocolError):
        decode_old(be32(1) + be32(0xFFFFFFFF) + be32(1) + b"k\0v")
    with pytest.raises(ProtocolError):
        decode_old(be32(1) + be32(1) + be32(0xFFFFFFF0) + b"k\0v")


def test_getspec_request_xdata_is_old_format() -> None:
    body = hs.getspec_req("vol")
    xdata = encode_old({"min-op-version": "1", "max-op-version": "100000"})
    assert body == be32(1) + be32(3) + b"vol\0" + be32(len(xdata)) + xdata + b"\0" * ((-len(xdata)) % 4)


def test_real_setvolume_reply_dict() -> None:
    m = rpc.decode_message((DATA / "setvolume.reply.bin").read_bytes())
    ret, err, d = hs.setvolume_rsp(rpc.check_reply(m))
    assert ret == 0 and err == 22  # success comes with op_errno EINVAL (PROTOCOL.md)
    assert all(v.endswith(b"\0") for v in d.values())
    assert old_str(d["ERROR"]) == "Success"
    assert old_str(d["child_up"]) == "1"
    uuid.UUID(old_str(d["volume-id"]))
    assert set(d) >= {"process-uuid", "volume-id", "child_up", "ERROR"}
    # re-encoding the decoded values gives the brick's bytes back (same order)
    raw = rpc.check_reply(m)
    assert raw[12 : 12 + len(encode_old(d))] == encode_old(d)


# ------------------------------------------------------------------ gfx_dict


def test_null_gfx_dict() -> None:
    assert NULL_GFX_DICT == b"\0\0\0\0" + b"\xff\xff\xff\xff" + b"\0\0\0\0"
    assert encode_gfx(None) == NULL_GFX_DICT
    assert gfx(NULL_GFX_DICT) is None


def test_empty_gfx_dict_is_not_null() -> None:
    assert encode_gfx({}) == b"\0" * 12
    assert gfx(b"\0" * 12) == {}


def test_gfx_int_exact() -> None:
    pairs = be32(2) + b"k\0\0\0" + be32(2) + be64(-5)
    assert encode_gfx({"k": -5}) == be32(len(pairs)) + be32(1) + be32(1) + pairs
    assert len(pairs) == 20


def test_gfx_uint_exact() -> None:
    pairs = be32(6) + b"count\0\0\0" + be32(3) + be64(2**64 - 1)
    assert encode_gfx({"count": UInt(2**64 - 1)}) == be32(len(pairs)) + be32(1) + be32(1) + pairs


def test_gfx_double_exact() -> None:
    pairs = be32(2) + b"d\0\0\0" + be32(4) + struct.pack(">d", 0.25)
    assert encode_gfx({"d": 0.25}) == be32(20) + be32(1) + be32(1) + pairs


def test_gfx_str_carries_its_nul() -> None:
    pairs = be32(2) + b"s\0\0\0" + be32(T_STR) + be32(3) + b"ab\0\0"
    assert encode_gfx({"s": "ab"}) == be32(len(pairs)) + be32(1) + be32(1) + pairs
    assert gfx(encode_gfx({"s": "ab"})) == {"s": "ab"}


def test_gfx_bytes_as_ptr() -> None:
    val = b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00"  # an AFR changelog
    pairs = be32(18) + b"trusted.afr.dirty\0" + b"\0\0" + be32(T_PTR) + be32(12) + val
    assert encode_gfx({"trusted.afr.dirty": val}) == be32(len(pairs)) + be32(1) + be32(1) + pairs


def test_gfx_uuid_as_gfuuid() -> None:
    u = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
    pairs = be32(9) + b"gfid-req\0\0\0\0" + be32(T_GFUUID) + u.bytes
    assert encode_gfx({"gfid-req": u}) == be32(len(pairs)) + be32(1) + be32(1) + pairs


def test_gfx_iatt_value() -> None:
    ia = Iatt(gfid=bytes(range(16)), size=5, mode=0o100644)
    wire = encode_gfx({"iatt": ia})
    assert len(wire) == 12 + 12 + 4 + 148
    assert wire[24:28] == be32(T_IATT)
    assert wire[28:] == ia.encode()


def test_gfx_mdata_value() -> None:
    md = MData(1, -2, 3, 4, 5, 6)
    wire = encode_gfx({"m": md})
    assert wire[20:] == be32(T_MDATA) + be64(1) + be64(-2) + be64(3) + be32(4) + be32(5) + be32(6)


def test_gfx_every_type_round_trips_and_keeps_its_type() -> None:
    d = {
        "int": -(2**63),
        "big": 2**63 - 1,
        "uint": UInt(12),
        "float": -1.5e300,
        "str": "naïve text",
        "emptystr": "",
        "bytes": b"\x00\xff\x00",
        "empty": b"",
        "uuid": uuid.uuid4(),
        "iatt": Iatt(gfid=uuid.uuid4().bytes, ino=2**64 - 1, atime=-1, mtime=2**40, mode=0o40755, nlink=2),
        "mdata": MData(1700000000, 1700000001, 1700000002, 1, 2, 999_999_999),
    }
    back = gfx(encode_gfx(d))
    assert back == d
    for k, v in d.items():
        assert type(back[k]) is type(v), k


def test_gfx_bool_goes_as_int() -> None:
    assert gfx(encode_gfx({"b": True})) == {"b": 1}
    assert type(gfx(encode_gfx({"b": True}))["b"]) is int


def test_gfx_xdr_size_is_pairs_length() -> None:
    d = {"a": 1, "bb": "x", "ccc": b"\x01\x02\x03\x04\x05", "u": uuid.uuid4(), "i": Iatt()}
    wire = encode_gfx(d)
    xdr_size, count, npairs = struct.unpack(">IiI", wire[:12])
    assert xdr_size == len(wire) - 12
    assert xdr_size % 4 == 0
    assert count == npairs == len(d)


def test_gfx_non_utf8_key_and_str_round_trip() -> None:
    """decode_gfx keeps undecodable bytes as surrogates (keys and STR values); encode_gfx must restore them."""
    pairs = be32(3) + b"k\xff\0\0" + be32(T_STR) + be32(3) + b"\xfev\0\0"
    wire = be32(len(pairs)) + be32(1) + be32(1) + pairs
    d = gfx(wire)
    assert d == {"k\udcff": "\udcfev"}
    assert encode_gfx(d) == wire


def test_gfx_str_old_decodes_as_bytes() -> None:
    pairs = be32(2) + b"k\0\0\0" + be32(T_STR_OLD) + be32(3) + b"v1\0\0"
    assert gfx(be32(len(pairs)) + be32(1) + be32(1) + pairs) == {"k": b"v1\0"}


def test_gfx_unknown_type_refused() -> None:
    pairs = be32(2) + b"k\0\0\0" + be32(42) + be64(0)
    with pytest.raises(ProtocolError, match="42"):
        gfx(be32(len(pairs)) + be32(1) + be32(1) + pairs)


def test_gfx_unencodable_value() -> None:
    with pytest.raises(TypeError):
        encode_gfx({"k": [1, 2]})


def test_gfx_truncations() -> None:
    wire = encode_gfx({"a": 1, "s": "str", "p": b"xyz", "u": uuid.uuid4(), "m": MData(1, 2, 3, 4, 5, 6)})
    for n in range(len(wire)):
        with pytest.raises(ProtocolError):
            decode_gfx(Unpacker(wire[:n]))


@pytest.mark.timeout(10)
def test_gfx_absurd_counts_and_lengths_fail_fast() -> None:
    with pytest.raises(ProtocolError):
        decode_gfx(Unpacker(be32(0) + be32(0) + be32(0xFFFFFFFF)))
    with pytest.raises(ProtocolError):
        decode_gfx(Unpacker(be32(0) + be32(1) + be32(1) + be32(0xFFFFFFF0)))  # key length
    pairs = be32(2) + b"k\0\0\0" + be32(T_PTR) + be32(0xFFFFFFF0)
    with pytest.raises(ProtocolError):
        decode_gfx(Unpacker(be32(0) + be32(1) + be32(1) + pairs))


def test_gfx_dict_inside_a_stream() -> None:
    """decode_gfx reads exactly its own bytes and leaves the Unpacker after them."""
    wire = Packer().u32(7).raw(encode_gfx({"k": "v"})).u32(9).bytes()
    u = Unpacker(wire)
    assert u.u32() == 7
    assert decode_gfx(u) == {"k": "v"}
    assert u.u32() == 9
    u.done()
