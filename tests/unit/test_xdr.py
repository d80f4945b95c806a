"""XDR primitives (gfuse.xdr): exact bytes, padding, and errors only as ProtocolError."""

from __future__ import annotations

import math

import pytest

from gfuse.xdr import MAX_ITEM, Packer, ProtocolError, Unpacker, pad4


@pytest.mark.parametrize("n,pad", [(0, 0), (1, 3), (2, 2), (3, 1), (4, 0), (5, 3), (16, 0), (17, 3)])
def test_pad4(n: int, pad: int) -> None:
    assert pad4(n) == pad


def test_integers_big_endian() -> None:
    b = Packer().u32(0x01020304).i32(-2).u64(0x0102030405060708).i64(-1).bytes()
    assert b == (
        b"\x01\x02\x03\x04"
        b"\xff\xff\xff\xfe"
        b"\x01\x02\x03\x04\x05\x06\x07\x08"
        b"\xff\xff\xff\xff\xff\xff\xff\xff"
    )
    u = Unpacker(b)
    assert (u.u32(), u.i32(), u.u64(), u.i64()) == (0x01020304, -2, 0x0102030405060708, -1)
    u.done()


def test_unsigned_wraps_negative_and_signed_reads_it_back() -> None:
    # u32/u64 mask (a caller may pass -1 for "all ones"), i32 reads the same bits as -1
    b = Packer().u32(-1).u64(-1).bytes()
    assert b == b"\xff" * 12
    u = Unpacker(b)
    assert u.i32() == -1
    assert u.u64() == 0xFFFFFFFFFFFFFFFF


def test_signed_out_of_range_is_an_encoder_error() -> None:
    import struct

    with pytest.raises(struct.error):
        Packer().i32(2**31)


def test_extreme_values_round_trip() -> None:
    vals = (0, 2**32 - 1, -(2**31), 2**31 - 1, 2**64 - 1, -(2**63), 2**63 - 1)
    p = Packer().u32(vals[0]).u32(vals[1]).i32(vals[2]).i32(vals[3]).u64(vals[4]).i64(vals[5]).i64(vals[6])
    u = Unpacker(p.bytes())
    assert (u.u32(), u.u32(), u.i32(), u.i32(), u.u64(), u.i64(), u.i64()) == vals
    u.done()


def test_double() -> None:
    b = Packer().f64(1.5).f64(-0.0).bytes()
    assert b == b"\x3f\xf8\x00\x00\x00\x00\x00\x00" + b"\x80" + b"\x00" * 7
    u = Unpacker(b)
    assert u.f64() == 1.5
    z = u.f64()
    assert z == 0.0 and math.copysign(1, z) == -1
    nan = Unpacker(Packer().f64(float("nan")).bytes()).f64()
    assert math.isnan(nan)


@pytest.mark.parametrize(
    "data,wire",
    [
        (b"", b"\0\0\0\0"),
        (b"a", b"\0\0\0\x01a\0\0\0"),
        (b"ab", b"\0\0\0\x02ab\0\0"),
        (b"abc", b"\0\0\0\x03abc\0"),
        (b"abcd", b"\0\0\0\x04abcd"),
        (b"abcde", b"\0\0\0\x05abcde\0\0\0"),
    ],
)
def test_opaque_padding(data: bytes, wire: bytes) -> None:
    assert Packer().opaque(data).bytes() == wire
    assert len(wire) % 4 == 0
    u = Unpacker(wire)
    assert u.opaque() == data
    u.done()


def test_string_utf8_and_bytes() -> None:
    assert Packer().string("é").bytes() == b"\0\0\0\x02\xc3\xa9\0\0"
    assert Packer().string(b"xy").bytes() == b"\0\0\0\x02xy\0\0"
    assert Unpacker(b"\0\0\0\x02\xc3\xa9\0\0").string() == "é"


def test_string_invalid_utf8_is_kept_with_surrogateescape() -> None:
    s = Unpacker(b"\0\0\0\x01\xff\0\0\0").string()
    assert s == "\udcff"
    assert s.encode("utf-8", "surrogateescape") == b"\xff"


def test_string_non_utf8_round_trips() -> None:
    """A name read from a brick (e.g. a READDIRP entry that is not UTF-8) can be sent back as it was."""
    wire = b"\0\0\0\x03a\xffb\0"
    assert Packer().string(Unpacker(wire).string()).bytes() == wire


@pytest.mark.parametrize("size,wire_len", [(16, 16), (5, 8), (1, 4), (0, 0)])
def test_fixed_opaque_padding(size: int, wire_len: int) -> None:
    data = bytes(range(1, size + 1))
    wire = Packer().fixed(data, size).bytes()
    assert len(wire) == wire_len
    assert wire[:size] == data and wire[size:] == b"\0" * (wire_len - size)
    u = Unpacker(wire)
    assert u.fixed(size) == data
    u.done()


def test_fixed_wrong_length_is_an_encoder_error() -> None:
    with pytest.raises(ValueError):
        Packer().fixed(b"\0" * 15, 16)


def test_raw_and_chaining() -> None:
    assert Packer().u32(1).raw(b"\xaa\xbb").u32(2).bytes() == b"\0\0\0\x01\xaa\xbb\0\0\0\x02"


def test_bool() -> None:
    u = Unpacker(b"\0\0\0\0\0\0\0\x01\0\0\0\x02")
    assert u.bool_() is False
    assert u.bool_() is True
    with pytest.raises(ProtocolError):
        u.bool_()


@pytest.mark.parametrize("reader", ["u32", "i32", "u64", "i64", "f64", "bool_"])
def test_truncated_scalars(reader: str) -> None:
    size = 8 if reader in ("u64", "i64", "f64") else 4
    for n in range(size):
        with pytest.raises(ProtocolError):
            getattr(Unpacker(b"\x01" * n), reader)()


def test_truncated_opaque_body_and_padding() -> None:
    with pytest.raises(ProtocolError):
        Unpacker(b"\0\0\0\x05abc").opaque()  # body short
    with pytest.raises(ProtocolError):
        Unpacker(b"\0\0\0\x05abcde\0").opaque()  # padding short
    with pytest.raises(ProtocolError):
        Unpacker(b"\0\0").opaque()  # length short
    with pytest.raises(ProtocolError):
        Unpacker(b"abcdefghijklmnopq").fixed(20)


def test_opaque_limit() -> None:
    wire = Packer().opaque(b"12345").bytes()
    assert Unpacker(wire).opaque(5) == b"12345"
    with pytest.raises(ProtocolError, match="exceeds limit"):
        Unpacker(wire).opaque(4)


@pytest.mark.timeout(10)
def test_huge_claimed_length_fails_fast() -> None:
    for n in (0xFFFFFFF0, 0xFFFFFFFF, MAX_ITEM + 1, MAX_ITEM):
        with pytest.raises(ProtocolError):
            Unpacker(n.to_bytes(4, "big") + b"tiny").opaque()
        with pytest.raises(ProtocolError):
            Unpacker(n.to_bytes(4, "big") + b"tiny").string()


def test_negative_take_is_refused() -> None:
    with pytest.raises(ProtocolError):
        Unpacker(b"abcd")._take(-1)


def test_position_remaining_rest_done() -> None:
    u = Unpacker(b"\0\0\0\x07tail", pos=0)
    assert u.u32() == 7
    assert u.pos == 4 and u.remaining() == 4
    with pytest.raises(ProtocolError, match="trailing"):
        u.done()
    assert u.rest() == b"tail"
    assert u.remaining() == 0
    u.done()
    assert Unpacker(b"xx\0\0\0\x09", pos=2).u32() == 9


def test_unpacker_accepts_memoryview_and_bytearray() -> None:
    data = bytearray(b"\0\0\0\x02hi\0\0")
    assert Unpacker(memoryview(data)).opaque() == b"hi"
    assert Unpacker(data).opaque() == b"hi"
    assert isinstance(Unpacker(data).opaque(), bytes)
