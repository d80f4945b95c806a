"""Every decoder, fed garbage: it either decodes or raises gfuse.xdr.ProtocolError, quickly.

A peer (a buggy or hostile brick, glusterd, or a corrupted stream) must never be able to crash
gfuse with another exception type, exhaust memory with a huge claimed length, or make it hang.
Inputs: random bytes, mutations of valid encodings (hand-built and recorded from a real brick),
every prefix of every valid encoding, and 0xFFFFFFF0 planted at every 4-byte-aligned offset.
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gfuse import fops as F
from gfuse import handshake as hs
from gfuse import rpc
from gfuse.dicts import MData, UInt, decode_gfx, decode_old, encode_gfx, encode_old
from gfuse.iatt import Iatt
from gfuse.volfile import VolfileError, parse
from gfuse.xdr import Packer, ProtocolError, Unpacker

DATA = Path(__file__).resolve().parents[1] / "data"

FUZZ = settings(
    max_examples=250,
    deadline=timedelta(milliseconds=1000),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ------------------------------------------------------------------ valid samples


def be32(v: int) -> bytes:
    return (v & 0xFFFFFFFF).to_bytes(4, "big")


def be64(v: int) -> bytes:
    return (v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")


IA = Iatt(gfid=bytes(range(16)), ino=7, size=300, mode=0o100644, nlink=1, atime=-5, mtime=1 << 40)
XD = {
    "i": -3, "u": UInt(12), "f": 0.5, "s": "str", "p": b"\x00\x01\x02", "g": uuid.UUID(int=1),
    "ia": IA, "m": MData(1, 2, 3, 4, 5, 6),
}


def head(xdata: dict | None = XD, ret: int = 0) -> bytes:
    return be32(ret) + be32(0) + encode_gfx(xdata)


def dirent(name: str, plus: bool) -> bytes:
    p = Packer().u64(1).u64(2).u32(len(name)).u32(8).string(name)
    if plus:
        p.raw(IA.encode()).raw(encode_gfx({"k": "v"}))
    return p.bytes()


FLOCK = Packer().u32(1).u32(0).u64(0).u64(10).u32(5).opaque(b"owner").bytes()

FOP_SAMPLES: dict[Callable[[bytes], Any], list[bytes]] = {
    F.common_rsp: [head(), head(None, -1)],
    F.iatt_rsp: [head() + IA.encode()],
    F.two_iatt_rsp: [head() + IA.encode() * 2],
    F.lookup_rsp: [head() + IA.encode() * 2],
    F.entry_rsp: [head(None) + IA.encode() * 2],
    F.three_iatt_rsp: [head() + IA.encode() * 3],
    F.readlink_rsp: [head() + IA.encode() + Packer().string("target/path").bytes()],
    F.rename_rsp: [head() + IA.encode() * 5],
    F.open_rsp: [head() + be64(3)],
    F.read_rsp: [be32(5) + be32(0) + IA.encode() + be32(5) + encode_gfx(XD) + b"hello"],
    F.statfs_rsp: [head() + be64(9) * 11],
    F.lk_rsp: [head() + FLOCK],
    F.dict_rsp: [head() + encode_gfx({"trusted.afr.x": b"\0" * 12}) + IA.encode() * 2],
    F.create_rsp: [head() + IA.encode() + be64(1) + IA.encode() * 2],
    F.readdir_rsp: [head(None) + b"".join(be32(1) + dirent(n, False) for n in (".", "..", "abc")) + be32(0)],
    F.readdirp_rsp: [head(None) + b"".join(be32(1) + dirent(n, True) for n in (".", "..", "abc")) + be32(0)],
    F.seek_rsp: [head() + be64(4096)],
}
assert set(FOP_SAMPLES) == set(F.DECODERS.values()), "a decoder without samples"


def _gf_iatt() -> bytes:
    return bytes(16) + be64(1) + be64(2) + be32(0o100644) + be32(1) * 3 + be64(0) + be64(5) + be32(4096) \
        + be64(1) + be32(0) * 6


CBK_SAMPLES = {
    F.Cbk.CACHE_INVALIDATION: [
        Packer().string(str(uuid.UUID(int=5))).u32(1).u32(0x18).u32(60).raw(_gf_iatt() * 3)
        .opaque(encode_old({"k": "v"})).bytes()
    ],
    F.Cbk.INODELK_CONTENTION: [Packer().fixed(bytes(16), 16).raw(FLOCK).u32(9).string("dom").opaque(b"x").bytes()],
    F.Cbk.ENTRYLK_CONTENTION: [
        Packer().fixed(bytes(16), 16).u32(1).u32(9).string("n").string("dom").opaque(b"").bytes(),
    ],
}

HS_SAMPLES = {
    hs.getspec_rsp: [be32(3) + be32(0) + Packer().string("abc").opaque(encode_old({"a": "b"})).bytes()],
    hs.setvolume_rsp: [be32(0) + be32(22) + Packer().opaque(encode_old({"ERROR": "Success", "child_up": "1"})).bytes()],
    hs.dump_rsp: [be64(0) + be32(0) + be32(0) + be32(1) + Packer().string("GF-DUMP").u64(1).u64(2).bytes() + be32(0)],
    hs.portbybrick_rsp: [be32(0) * 3 + be32(49152)],
}


def _recorded() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(DATA.glob("*.bin"))}


RECORDED = _recorded()


def _body(name: str) -> bytes:
    return rpc.decode_message(RECORDED[name]).body


# recorded program bodies, by the decoder that reads them
REAL = {
    F.lookup_rsp: ["lookup_root.reply.bin", "lookup_enoent.reply.bin"],
    F.create_rsp: ["create.reply.bin"],
    F.two_iatt_rsp: ["write.reply.bin"],
    F.read_rsp: ["read.reply.bin"],
    F.dict_rsp: ["getxattr.reply.bin"],
    F.statfs_rsp: ["statfs.reply.bin"],
    F.three_iatt_rsp: ["mkdir.reply.bin"],
    F.open_rsp: ["opendir.reply.bin"],
    F.readdirp_rsp: ["readdirp.reply.bin"],
    hs.getspec_rsp: ["getspec.reply.bin"],
    hs.setvolume_rsp: ["setvolume.reply.bin"],
    hs.dump_rsp: ["dump.reply.bin"],
    hs.portbybrick_rsp: ["portbybrick.reply.bin"],
}
for fn, names in REAL.items():
    (FOP_SAMPLES.get(fn) or HS_SAMPLES[fn]).extend(_body(n) for n in names)
CBK_SAMPLES[F.Cbk.CACHE_INVALIDATION].append(_body("cbk_cache_invalidation.call.bin"))
CBK_SAMPLES[F.Cbk.INODELK_CONTENTION].append(_body("cbk_inodelk_contention.call.bin"))


# ------------------------------------------------------------------ targets


def _gfx(b: bytes) -> Any:
    u = Unpacker(b)
    d = decode_gfx(u)
    u.done()
    return d


def _iatt(b: bytes) -> Any:
    return Iatt.decode(Unpacker(b))


def _gf_iatt_dec(b: bytes) -> Any:
    return Iatt.decode_gf_iatt(Unpacker(b))


def _feed(b: bytes) -> Any:
    return rpc.RecordReader(max_record=1 << 20).feed(b)


def _feed_default(b: bytes) -> Any:
    return rpc.RecordReader().feed(b)


def _cbk(proc: int) -> Callable[[bytes], Any]:
    def dec(b: bytes) -> Any:
        return F.decode_callback(proc, b)
    dec.__name__ = f"decode_callback_{F.Cbk(proc).name}"
    return dec


_CRED3 = rpc.Credential(pid=1, uid=2, gid=3, groups=(4, 5), lk_owner=b"owner", flags=3, ctime_sec=6).encode_v3()
_CRED2 = rpc.Credential(pid=1, uid=2, gid=3, groups=(4, 5), lk_owner=b"owner").encode_v2()

TARGETS: list[tuple[str, Callable[[bytes], Any], list[bytes]]] = []
for fn, samples in FOP_SAMPLES.items():
    TARGETS.append((f"fops.{fn.__name__}", fn, samples))
for proc, samples in CBK_SAMPLES.items():
    TARGETS.append((f"fops.decode_callback[{proc.name}]", _cbk(proc), samples))
for fn, samples in HS_SAMPLES.items():
    TARGETS.append((f"handshake.{fn.__name__}", fn, samples))
TARGETS += [
    ("dicts.decode_old", decode_old, [encode_old({"a": "1", "bb": b"\x00\x01", "c": 3})]),
    ("dicts.decode_gfx", _gfx, [encode_gfx(XD), encode_gfx(None), encode_gfx({})]),
    ("rpc.decode_message", rpc.decode_message, list(RECORDED[n] for n in RECORDED if n != "brick_stream.bin")
     + [rpc.encode_reply(1, b"x", rpc.AcceptStat.GARBAGE_ARGS), be32(1) + be32(1) + be32(1) + be32(1) + be32(1),
        be32(1) + be32(1) + be32(0) + be32(0) + be32(0) + be32(2) + be32(1) + be32(2)]),
    ("rpc.RecordReader.feed", _feed, [RECORDED["brick_stream.bin"][:3000]]),
    ("rpc.RecordReader.feed(default limit)", _feed_default, [rpc.frame(b"abc") * 3]),
    ("rpc.Credential.decode_v2", rpc.Credential.decode_v2, [_CRED2]),
    ("rpc.Credential.decode_v3", rpc.Credential.decode_v3, [_CRED3]),
    ("iatt.Iatt.decode", _iatt, [IA.encode()]),
    ("iatt.Iatt.decode_gf_iatt", _gf_iatt_dec, [_gf_iatt()]),
]
IDS = [t[0] for t in TARGETS]


def attempt(name: str, fn: Callable[[bytes], Any], data: bytes) -> None:
    """The contract: decode, or raise ProtocolError (dump_rsp may also raise OSError for op_ret < 0)."""
    try:
        fn(data)
    except ProtocolError:
        pass
    except OSError:
        if fn is not hs.dump_rsp:
            raise


def test_harness_is_not_vacuous() -> None:
    def crashes(_b: bytes) -> None:
        raise IndexError("boom")

    with pytest.raises(IndexError):
        attempt("crashes", crashes, b"")
    with pytest.raises(OSError):
        attempt("oserror", lambda _b: (_ for _ in ()).throw(OSError(5, "x")), b"")
    attempt("dump", hs.dump_rsp, be64(0) + be32(-1) + be32(13) + be32(0))  # OSError allowed for dump_rsp only


def test_valid_samples_decode() -> None:
    for _name, fn, samples in TARGETS:
        for s in samples:
            fn(s)  # no exception at all


# ------------------------------------------------------------------ random bytes


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", TARGETS, ids=IDS)
@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes(target: tuple, data: bytes) -> None:
    attempt(target[0], target[1], data)


WORDS = (0, 1, 2, 3, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0, 0xFFFFFFFF)


def mutate(samples: list[bytes], seed: int) -> bytes:
    """1-6 random edits (byte, aligned word, cut, insert) of one sample; the seed makes it reproducible.

    (Drawing the edits one by one through hypothesis costs ~3 ms an example; a seeded Random is free.)
    """
    rnd = random.Random(seed)
    b = bytearray(rnd.choice(samples))
    for _ in range(rnd.randint(1, 6)):
        if not b:
            break
        i = rnd.randrange(len(b))
        op = rnd.randrange(4)
        if op == 0:
            b[i] = rnd.randrange(256)
        elif op == 1:
            i -= i % 4
            b[i : i + 4] = rnd.choice(WORDS).to_bytes(4, "big")
        elif op == 2:
            del b[i : i + rnd.randint(1, 16)]
        else:
            b[i:i] = rnd.randbytes(rnd.randint(1, 8))
    return bytes(b)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", TARGETS, ids=IDS)
@settings(FUZZ, max_examples=400)
@given(seed=st.integers(0, 2**64 - 1))
def test_mutated_valid_encodings(target: tuple, seed: int) -> None:
    name, fn, samples = target
    attempt(name, fn, mutate(samples, seed))


# ------------------------------------------------------------------ deterministic sweeps


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", TARGETS, ids=IDS)
def test_every_truncation(target: tuple) -> None:
    name, fn, samples = target
    for s in samples:
        for n in range(len(s)):
            attempt(name, fn, s[:n])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", TARGETS, ids=IDS)
def test_huge_length_at_every_word(target: tuple) -> None:
    """0xFFFFFFF0 (and 0x7FFFFFF0) planted at every aligned offset: fast ProtocolError, no MemoryError."""
    name, fn, samples = target
    for s in samples:
        for off in range(0, len(s) - 3, 4):
            for word in (b"\xff\xff\xff\xf0", b"\x7f\xff\xff\xf0"):
                t0 = time.perf_counter()
                attempt(name, fn, s[:off] + word + s[off + 4 :])
                assert time.perf_counter() - t0 < 0.5, (name, off)


HUGE = be32(0xFFFFFFF0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "fn,data",
    [
        (lambda b: Unpacker(b).opaque(), HUGE),
        (lambda b: Unpacker(b).string(), HUGE + b"abc"),
        (decode_old, HUGE),
        (decode_old, be32(1) + HUGE + be32(1) + b"k\0v"),
        (decode_old, be32(1) + be32(1) + HUGE + b"k\0v"),
        (_gfx, be32(0) + be32(1) + HUGE),
        (_gfx, be32(0) + be32(1) + be32(1) + HUGE),
        (_gfx, be32(0) + be32(1) + be32(1) + be32(2) + b"k\0\0\0" + be32(6) + HUGE),
        (_gfx, be32(0) + be32(1) + be32(1) + be32(2) + b"k\0\0\0" + be32(5) + HUGE),
        (hs.getspec_rsp, be32(0) + be32(0) + HUGE),
        (hs.setvolume_rsp, be32(0) + be32(0) + HUGE),
        (hs.dump_rsp, be64(0) + be32(0) + be32(0) + be32(1) + HUGE),
        (rpc.decode_message, be32(1) + be32(0) + be32(2) + be32(1) * 3 + be32(390040) + HUGE),
        (rpc.decode_message, be32(1) + be32(1) + be32(0) + be32(0) + HUGE),
        (rpc.Credential.decode_v2, be32(0) * 3 + HUGE),
        (rpc.Credential.decode_v3, be32(0) * 5 + be64(0) + HUGE),
        (rpc.Credential.decode_v3, be32(0) * 5 + be64(0) + be32(0) + HUGE),
        (F.readlink_rsp, head(None) + IA.encode() + HUGE),
        (F.readdirp_rsp, head(None) + be32(1) + be64(0) * 2 + be32(0) * 2 + HUGE),
        (F.readdir_rsp, head(None) + be32(1) + be64(0) * 2 + be32(0) * 2 + HUGE),
        (F.lk_rsp, head(None) + be32(0) * 2 + be64(0) * 2 + be32(0) + HUGE),
        (_cbk(F.Cbk.CACHE_INVALIDATION), HUGE),
        (_cbk(F.Cbk.INODELK_CONTENTION), bytes(16) + be32(0) * 2 + be64(0) * 2 + be32(0) + HUGE),
        (_cbk(F.Cbk.ENTRYLK_CONTENTION), bytes(16) + be32(0) * 2 + HUGE),
        (_feed_default, HUGE),
        (_feed_default, be32(0x7FFFFFFF) + b"x"),
    ],
)
def test_huge_claimed_length_is_fast_protocol_error(fn: Callable[[bytes], Any], data: bytes) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ProtocolError):
        fn(data)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.timeout(60)
def test_huge_pair_and_entry_counts_are_fast() -> None:
    """Counts are claims too: a few bytes claiming 100 000 pairs / entries must not loop long."""
    for fn, data in (
        (decode_old, be32(100_000) + (be32(0) + be32(0) + b"\0") * 10),
        (_gfx, be32(0) + be32(100_000) + be32(100_000)),
        (hs.dump_rsp, be64(0) + be32(0) + be32(0) + (be32(1) + be32(0) + be64(0) * 2) * 2000 + be32(0)),
    ):
        t0 = time.perf_counter()
        with pytest.raises(ProtocolError):
            fn(data)
        assert time.perf_counter() - t0 < 0.5


# ------------------------------------------------------------------ record reader properties


@pytest.mark.timeout(60)
@FUZZ
@given(cuts=st.lists(st.integers(0, 7863), max_size=40))
def test_real_stream_any_chunking_same_records(cuts: list[int]) -> None:
    wire = RECORDED["brick_stream.bin"]
    want = rpc.RecordReader().feed(wire)
    r = rpc.RecordReader()
    got: list[bytes] = []
    prev = 0
    for c in sorted(set(min(c, len(wire)) for c in cuts)) + [len(wire)]:
        got += r.feed(wire[prev:c])
        prev = c
    assert got == want
    for rec in got:
        rpc.decode_message(rec)


@pytest.mark.timeout(60)
@FUZZ
@given(chunks=st.lists(st.binary(max_size=64), max_size=20))
def test_record_reader_random_chunks(chunks: list[bytes]) -> None:
    r = rpc.RecordReader(max_record=4096)
    for c in chunks:
        try:
            for rec in r.feed(c):
                assert len(rec) <= 4096
        except ProtocolError:
            return


# ------------------------------------------------------------------ volfile text


@pytest.mark.timeout(60)
@FUZZ
@given(tokens=st.lists(st.sampled_from(["volume", "type", "option", "subvolumes", "end-volume", "a", "b", "t/x",
                                        "k", "v v", "\n", "\n", " ", "\t", "#"]), max_size=80))
def test_volfile_garbage_is_volfile_error(tokens: list[str]) -> None:
    try:
        parse(" ".join(tokens))
    except VolfileError:
        pass


# ================================================================== everything else that parses outside input
#
# The same contract for the parsers of what gfuse and its Kubernetes side get from outside: DHT layouts
# and AFR changelogs (xattrs any brick, or any client of it, may have written), volfiles (glusterd),
# the agent's requests (any local root process), its state file (a disk, a crash, an older agent), the
# FlexVolume JSON and the CSI requests (Kubernetes objects). Each either works or refuses with its own
# error type -- never another exception, a hang, or a change of state for a refused request.

import json  # noqa: E402 - this half of the module fuzzes the layers above the codecs
import os  # noqa: E402
import tempfile  # noqa: E402

import msgpack  # noqa: E402
import trio  # noqa: E402
import trio.testing  # noqa: E402

from gfuse.cred import new_gfid  # noqa: E402
from gfuse.dhthash import LAYOUT_XATTR, LINKTO_XATTR, Range, name_hash, pick  # noqa: E402
from gfuse.iatt import ROOT_GFID  # noqa: E402
from gfuse.xlators.distribute import Distribute  # noqa: E402
from gfuse.xlators.replicate import DIRTY, Replicate, parse_changelog  # noqa: E402
from testkit.membrick import replica_set  # noqa: E402

SMALL = settings(FUZZ, max_examples=60)
XATTR_VALUES = st.one_of(st.none(), st.binary(max_size=40), st.sampled_from([
    b"", bytes(12), bytes(16), b"\xff" * 12, b"\x7f\xff\xff\xff" * 3, b"\x80\x00\x00\x00" * 4,
    Range(0, 0, 0xFFFFFFFF, 0).encode(), Range(1, 0, 0, 0xFFFFFFFF).encode(), Range(0, 7, 5, 4).encode(),
]), st.integers(-2**63, 2**63 - 1), st.text(max_size=8))


def run_virtual(fn: Callable[[], Any], limit: float = 120.0) -> Any:
    """``fn()`` under trio in virtual time: a wait that never ends fails at ``limit`` virtual seconds
    (a lock timeout or retry loop of the translators runs in no real time)."""
    async def main() -> Any:
        with trio.fail_after(limit):
            return await fn()
    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@SMALL
@given(value=st.binary(max_size=40), names=st.lists(st.text(max_size=20), max_size=5),
       ranges=st.lists(st.one_of(st.none(), st.tuples(*[st.integers(0, 2**32 - 1)] * 4)), max_size=6))
def test_dht_layout_decoders(value: bytes, names: list[str], ranges: list[Any]) -> None:
    try:
        r = Range.decode(value)
        assert r.encode() == value[:16]
    except ValueError:
        assert len(value) < 16
    layout = [Range(*t) if t else None for t in ranges]
    for name in names + ["", ".a.b", "\udcff"]:
        i = pick(layout, name)
        assert i is None or layout[i] is not None and layout[i].holds(name_hash(name))  # type: ignore[union-attr]


@SMALL
@given(value=XATTR_VALUES)
def test_afr_changelog_decoder(value: Any) -> None:
    d, m, e = parse_changelog(value)
    assert all(-2**31 <= x < 2**31 for x in (d, m, e))


async def _dht_ops(d: Distribute, parent: bytes) -> None:
    for name in ("a", "b", ".a.tmp", "zz"):
        try:
            await d.lookup(parent, name)
        except OSError:
            pass
    try:
        c = await d.create(parent, "new", os.O_RDWR, 0o644, new_gfid())
        if c.fd is not None:
            await d.write(c.fd, 0, b"x")
            await d.release(c.fd)
    except OSError:
        pass
    try:
        o = await d.opendir(parent)
        if o.fd is not None:
            await d.readdirp(o.fd, 0, 4096)
            await d.release(o.fd)
    except OSError:
        pass
    try:
        await d.mkdir(parent, "sub", 0o755, new_gfid())
    except OSError:
        pass


@SMALL
@given(layouts=st.lists(XATTR_VALUES, min_size=3, max_size=3), linkto=XATTR_VALUES,
       lookup_optimize=st.booleans())
def test_distribute_survives_any_layout_and_linkto_xattrs(layouts: list[Any], linkto: Any,
                                                          lookup_optimize: bool) -> None:
    """Directory layouts and linkto values as a broken or hostile brick may hold them: only OSError."""
    async def main() -> None:
        bricks, clients = replica_set("v", 3)
        d = Distribute("v-dht", clients, lookup_optimize=lookup_optimize)
        dg = new_gfid()
        await d.mkdir(ROOT_GFID, "dir", 0o755, dg)
        await _dht_ops(d, dg)  # files, and linkto files where names hash elsewhere
        for b, v in zip(bricks, layouts):
            for path in ("", "dir"):
                ino = b.inode(path)
                assert ino is not None
                if v is None:
                    ino.xattrs.pop(LAYOUT_XATTR, None)
                else:
                    ino.xattrs[LAYOUT_XATTR] = v
            for name in b.names("dir"):
                f = b.inode(f"dir/{name}")
                if f is not None and not f.is_dir:
                    f.xattrs[LINKTO_XATTR] = linkto
        fresh = Distribute("v-dht", [b.client() for b in bricks], lookup_optimize=lookup_optimize)
        for x in (d, fresh):
            await _dht_ops(x, dg)
            await _dht_ops(x, ROOT_GFID)
    run_virtual(main)


@SMALL
@given(values=st.lists(st.tuples(st.sampled_from(["trusted.afr.v-client-0", "trusted.afr.v-client-1",
                                                  "trusted.afr.v-client-2", DIRTY]), XATTR_VALUES),
                       max_size=12),
       on=st.lists(st.integers(0, 2), max_size=12))
def test_replicate_survives_any_changelog_xattrs(values: list[tuple[str, Any]], on: list[int]) -> None:
    async def main() -> None:
        bricks, clients = replica_set("v", 3)
        r = Replicate("v-replicate-0", clients)
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            g = new_gfid()
            c = await r.create(ROOT_GFID, "f", os.O_RDWR, 0o644, g)
            assert c.fd is not None
            await r.write(c.fd, 0, b"hello")
            await r.release(c.fd)
            await trio.sleep(5)  # the delayed post-op
            for (key, v), k in zip(values, on + [0] * len(values)):
                ino = bricks[k].inode("f")
                assert ino is not None
                if v is None:
                    ino.xattrs.pop(key, None)
                else:
                    ino.xattrs[key] = v
            r2 = Replicate("v-replicate-0", [b.client() for b in bricks])
            await nursery.start(r2.run)
            for x in (r, r2):
                try:
                    await x.lookup(ROOT_GFID, "f")
                    o = await x.open(g, os.O_RDWR)
                    assert o.fd is not None
                    await x.read(o.fd, 0, 10)
                    await x.write(o.fd, 0, b"HELLO")
                    await x.fstat(o.fd)
                    await x.release(o.fd)
                except OSError:
                    pass
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
    run_virtual(main)


# ------------------------------------------------------------------ volfiles through the graph builder

_TYPES = ["protocol/client"] * 4 + ["cluster/replicate", "cluster/distribute", "cluster/disperse",
                                    "performance/write-behind", "debug/io-stats", "features/utime",
                                    "features/shard", "features/read-only", "weird/thing", "cluster/nufa"]
_OPTIONS = {
    "remote-host": ["h", "", "127.0.0.1"], "remote-subvolume": ["/b", ""],
    "remote-port": ["49152", "0", "-1", "99999", "abc", "1e3", ""], "ping-timeout": ["42", "x", "nan", "inf", "-5"],
    "quorum-type": ["auto", "fixed", "none", "most", ""], "quorum-count": ["1", "2", "9", "0", "x"],
    "afr-pending-xattr": ["c0,c1", "c0", ""], "lookup-optimize": ["on", "off", "maybe"],
    "read-only": ["on", "off", "bogus"], "transport-type": ["tcp", "rdma", "tcp,rdma"],
    "xattr-name": ["trusted.glusterfs.dht", "x"], "thin-arbiter": ["", "h:/ta"],
    "extra-hash-regex": ["", "^(.+)$"],
}


@st.composite
def volfiles(draw: st.DrawFn) -> str:
    blocks: list[str] = []
    names: list[str] = []
    for i in range(draw(st.integers(1, 8))):
        t = draw(st.sampled_from(_TYPES))
        opts = draw(st.dictionaries(st.sampled_from(sorted(_OPTIONS)), st.just(""), max_size=4))
        if t == "protocol/client" and draw(st.booleans()):
            opts.update({"remote-host": "", "remote-subvolume": ""})
        lines = [f"volume x{i}", f"    type {t}"]
        for k in opts:
            v = draw(st.sampled_from(_OPTIONS.get(k, [""]) if k in _OPTIONS else [""]))
            if t == "protocol/client" and k in ("remote-host", "remote-subvolume") and draw(st.booleans()):
                v = {"remote-host": "h", "remote-subvolume": "/b"}[k]
            lines.append(f"    option {k} {v}".rstrip())
        kids = draw(st.lists(st.sampled_from(names), max_size=3, unique=True)) if names else []
        if kids:
            lines.append("    subvolumes " + " ".join(kids))
        lines.append("end-volume")
        blocks.append("\n".join(lines))
        names.append(f"x{i}")
    return "\n\n".join(blocks) + "\n"


@settings(FUZZ, max_examples=80)
@given(text=volfiles())
def test_graph_builder_on_odd_volfiles_raises_only_volfile_error(text: str) -> None:
    from gfuse.graph import ClientGraph
    from gfuse.mgmt import Server

    try:
        g = parse(text)
        g.shape()
        ClientGraph(g, Server("127.0.0.1"), "v")
    except VolfileError as e:
        assert "\n" not in str(e)


@SMALL
@given(name=st.sampled_from(["dist1", "distrep", "replica3"]), seed=st.integers(0, 2**32 - 1))
def test_graph_builder_on_mutated_real_volfiles(name: str, seed: int) -> None:
    from gfuse.graph import ClientGraph
    from gfuse.mgmt import Server

    rnd = random.Random(seed)
    lines = (DATA / f"volfile_{name}.vol").read_text().splitlines()
    for _ in range(rnd.randint(1, 4)):
        k = rnd.randrange(len(lines))
        op = rnd.randrange(4)
        if op == 0:
            del lines[k]
        elif op == 1:
            lines.insert(k, lines[rnd.randrange(len(lines))])
        elif op == 2 and lines[k].split():
            words = lines[k].split()
            words[-1] = rnd.choice(["", "x", "-1", "99999999999", "nan", "/", "a,b", words[0]])
            lines[k] = " ".join(words)
        else:
            lines[k], lines[-1] = lines[-1], lines[k]
    try:
        ClientGraph(parse("\n".join(lines)), Server("127.0.0.1"), "v")
    except VolfileError:
        pass


# ------------------------------------------------------------------ the node agent's requests

_KUBELET = tempfile.mkdtemp(prefix="gfuse-fuzz-kubelet-")
_ANY = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                              st.text(max_size=30), st.binary(max_size=30)),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=12)
_FIELDS = {
    "op": st.sampled_from(["ping", "mount", "unmount", "list", "stats", "", "MOUNT"]) | _ANY,
    "source": st.sampled_from(["127.0.0.2:/v", "127.0.0.2:/v/a,suid", "h:/v/../x", "nohost", ""]) | _ANY,
    "target": st.sampled_from([f"{_KUBELET}/pods/a", "/etc", f"{_KUBELET}/../x", "rel", f"{_KUBELET}/\0x"]) | _ANY,
    "options": st.lists(st.sampled_from(["allow_other", "log-file=/x", "subdir=..", "ro", "bogus", "ping-timeout=x",
                                         "context=\"a:b:c:s0\""]), max_size=3) | _ANY,
    "readonly": st.booleans() | _ANY, "timeout": st.sampled_from([1, 0.5, -1, 0, 10**30]) | st.floats() | _ANY,
    "context": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2) | _ANY,
}


@st.composite
def agent_requests(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(sorted(_FIELDS)), unique=True, max_size=len(_FIELDS)))
    req = {k: draw(_FIELDS[k]) for k in keys}
    req.update(draw(st.dictionaries(st.text(max_size=6), _ANY, max_size=2)))
    return req


def _agent() -> Any:
    from flexvolume.agent import Agent

    state = tempfile.mkdtemp(prefix="gfuse-fuzz-state-")
    return Agent(os.path.join(state, "a.sock"), os.path.join(state, "s", "state"), kubelet_dir=_KUBELET,
                 gfuse_command=["/bin/false"], mount_timeout=5)


@settings(FUZZ, max_examples=60)
@given(req=agent_requests())
def test_agent_requests_are_answered_and_refusals_change_nothing(req: dict[str, Any]) -> None:
    from flexvolume.protocol import ERROR_CODES, decode, encode

    a = _agent()
    before = sorted(os.listdir(_KUBELET))

    async def main() -> dict[str, Any]:
        with trio.fail_after(30):
            return await a.dispatch(req)
    resp = trio.run(main)
    assert decode(encode(resp)[4:]) == resp  # the answer can always be sent
    assert isinstance(resp.get("ok"), bool)
    if not resp["ok"]:
        assert resp["code"] in ERROR_CODES and isinstance(resp["error"], str) and "\n" not in resp["error"]
        assert resp["code"] != "internal", resp
        assert a.table == {} and not os.path.exists(a.state_path), "a refused request changed the state"
        if resp["code"] == "invalid":
            assert sorted(os.listdir(_KUBELET)) == before, "a refused request made a directory"
    else:
        assert req.get("op") in ("ping", "list", "unmount"), (req, resp)


@SMALL
@given(chunks=st.lists(st.binary(max_size=40) | st.builds(
    lambda m: (len(m).to_bytes(4, "big") + m), st.builds(msgpack.packb, _ANY)), max_size=6))
def test_agent_connection_survives_any_bytes(chunks: list[bytes]) -> None:
    """Whatever a client sends on the socket: answers (or a close), never an exception or a hang."""
    a = _agent()

    async def main() -> None:
        server, client = trio.testing.memory_stream_pair()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a._serve_connection, server)
                try:  # the agent may close first (a bad frame): then the client's sends fail, not the agent
                    for c in chunks:
                        await client.send_all(c)
                    await client.send_eof()
                    while await client.receive_some(65536):
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
    trio.run(main)


# ------------------------------------------------------------------ the agent's state file

_RECORD_FIELDS = {
    "source": st.sampled_from(["h:/v", ""]) | _ANY, "target": st.sampled_from(["/k/a", "/k/b", "rel"]) | _ANY,
    "options": st.lists(st.text(max_size=8), max_size=2) | _ANY, "readonly": _ANY, "pid": _ANY, "since": _ANY,
    "context": _ANY, "repairs": _ANY,
}


@st.composite
def state_records(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(_ANY)
    keys = draw(st.lists(st.sampled_from(sorted(_RECORD_FIELDS)), unique=True))
    return {k: draw(_RECORD_FIELDS[k]) for k in keys}


@settings(FUZZ, max_examples=30)
@given(bad=st.lists(state_records(), max_size=6), where=st.integers(0, 6))
def test_state_file_keeps_every_good_record(bad: list[Any], where: int) -> None:
    from flexvolume.state import MountRecord, load_state

    good = [MountRecord("h:/v", f"/good/{i}", ["allow_other"], pid=7 + i).to_wire() for i in range(2)]
    mounts = bad[:where] + [good[0]] + bad[where:] + [good[1]]
    with tempfile.NamedTemporaryFile() as f:
        f.write(msgpack.packb({"version": 1, "mounts": mounts}))
        f.flush()
        dropped: list[str] = []
        table = load_state(f.name, dropped)
    assert {"/good/0", "/good/1"} <= set(table) and table["/good/1"].pid == 8
    assert len(dropped) <= len(bad), "a good record was dropped"
    for r in table.values():
        assert isinstance(r, MountRecord) and r.target.startswith("/") and all(isinstance(o, str) for o in r.options)
        msgpack.packb(r.to_wire())  # what is kept can be written back


@SMALL
@given(data=st.binary(max_size=200) | st.builds(msgpack.packb, _ANY))
def test_state_file_garbage_is_state_error(data: bytes) -> None:
    from flexvolume.state import StateError, load_state

    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        try:
            load_state(f.name, [])
        except StateError:
            pass


# ------------------------------------------------------------------ FlexVolume JSON

_FLEX_KEYS = ["volume", "backupServers", "readOnly", "mountOptions", "kubernetes.io/fsType",
              "kubernetes.io/readwrite", "kubernetes.io/mounterArgs.FsGroup", "kubernetes.io/secret/k",
              "kubernetes.io/pod.name"]
_FLEX_VALUES = st.sampled_from(["127.0.0.2:/v", "h:/v/a,suid", "h:/v/../x", "true", "maybe", "ro", "rw", "",
                                "log-file=/x", "ping-timeout=5,ro", "a:b", "a;b", "-1", "x==", "glusterfs"]) \
    | st.text(max_size=20) | _ANY


@settings(FUZZ, max_examples=80)
@given(obj=st.dictionaries(st.sampled_from(_FLEX_KEYS) | st.text(max_size=5), _FLEX_VALUES, max_size=6)
       | _ANY, raw=st.booleans(), text=st.text(max_size=40))
def test_flexvolume_json_is_parsed_or_a_failure(obj: Any, raw: bool, text: str) -> None:
    from flexvolume.driver import DriverFailure, parse_mount_options, run

    try:
        doc = text if raw else json.dumps(obj)
    except (TypeError, ValueError):
        doc = text  # bytes and the like are not JSON
    try:
        req = parse_mount_options(doc)
    except DriverFailure as e:
        assert str(e) and "\n" not in " ".join(str(e).split())
    else:
        assert parse_volume_spec_ok(req["source"]) and req["options"][0] == "allow_other"
    out, code = run([text, doc])  # commands kubelet may send, with odd arguments: one answer, no exception
    assert out["status"] in ("Success", "Failure", "Not supported") and code in (0, 1)
    out, code = run(["mount", doc])
    assert out["status"] == "Failure" and code == 1


def parse_volume_spec_ok(source: str) -> bool:
    from gfuse.volspec import parse_volume_spec

    parse_volume_spec(source)
    return True


# ------------------------------------------------------------------ CSI request fields


@settings(FUZZ, max_examples=60)
@given(vid=st.sampled_from(["subdir:127.0.0.2:/p/d", "volume:127.0.0.2:/v", "127.0.0.2:/v/a", "x", "subdir:",
                            "subdir:h:/p/../q", "h,dev:/v", "127.0.0.2:/v/\0"]) | st.text(max_size=30),
       ctx=st.dictionaries(st.sampled_from(["source", "volume", "backupServers", "mountOptions", "readOnly"])
                           | st.text(max_size=5), _FLEX_VALUES.filter(lambda v: isinstance(v, str)), max_size=4),
       flags=st.lists(st.sampled_from(["rw", "ro", "log-file=/x", "subdir=..", "suid", "context=\"a:b:c:s0,c1\"",
                                       "ping-timeout=3"]) | st.text(max_size=12), max_size=4),
       path=st.sampled_from(["/k/plugins/x/globalmount", "/k", "/k/../etc", "rel", "/k/pods/p/v/m", "",
                             "/k/plugins/\0x", "/k/a\nb"])
       | st.text(max_size=20),
       mode=st.integers(-1, 12), kind=st.sampled_from(["mount", "block", None]))
def test_csi_request_fields_are_valid_or_csi_errors(vid: str, ctx: dict[str, str], flags: list[str], path: str,
                                                    mode: int, kind: str | None) -> None:
    from flexvolume.csi import volumes as V
    from flexvolume.csi.node import NodeService
    from flexvolume.csi.stubs import csi_pb2 as pb

    for fn in (lambda: V.volume_from(vid, ctx), lambda: V.check_mount_options(flags, "flags"),
               lambda: V.check_path(path, "/k", "path"), lambda: V.check_source(vid),
               lambda: V.parse_backup_servers(ctx.get("backupServers", "")),
               lambda: V.check_mount_options(ctx.get("mountOptions", ""))):
        try:
            fn()
        except V.CsiError as e:
            assert e.message and "\n" not in e.message
    cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=max(0, mode)))
    if kind == "mount":
        cap.mount.mount_flags.extend(flags)
    elif kind == "block":
        cap.block.SetInParent()

    class Aborted(Exception):
        pass

    class Ctx:
        def abort(self, code: Any, details: str) -> None:
            raise Aborted(code, details)

    class Agent:
        def __init__(self) -> None:
            self.calls: list[Any] = []

        def mount(self, *a: Any, **k: Any) -> dict[str, Any]:
            self.calls.append(a)
            return {"ok": True}

    agent = Agent()

    kubelet = tempfile.mkdtemp(prefix="gfuse-fuzz-csi-")
    node = NodeService("n", kubelet, agent, run_cmd=lambda cmd: None)  # type: ignore[arg-type]
    staging = path.replace("/k", kubelet, 1) if path.startswith("/k") else path
    for call, req in (
        (node.NodeStageVolume, pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                         volume_capability=cap, volume_context=ctx)),
        (node.NodePublishVolume, pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                             target_path=staging + "/t", volume_capability=cap,
                                                             volume_context=ctx)),
        (node.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=staging)),
    ):
        try:
            call(req, Ctx())
        except Aborted as e:
            assert e.args[0] != grpc_internal(), e.args
    for c in agent.calls:
        V.check_source(c[0])  # what reached the agent was checked
        assert c[1].startswith(kubelet + "/")


def grpc_internal() -> Any:
    import grpc

    return grpc.StatusCode.INTERNAL
