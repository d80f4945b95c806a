"""DHT placement on a 2 x 3 volume: gfuse puts (and looks for) every name where gluster does.

The oracle is the real thing: the layout xattr ``trusted.glusterfs.dht`` on the bricks, and which
replica set's bricks hold a file's data (not a zero-byte linkto file). Replica set ``k`` is
bricks ``3k .. 3k+2``, the volfile's ``VOL-replicate-k``, index ``k`` of a layout.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit import cluster as tc
from gfuse.dhthash import LAYOUT_XATTR, LINKTO_XATTR, Range, name_hash, pick

FULL = 0xFFFFFFFF


class Pair:
    def __init__(self, vol: tc.Volume) -> None:
        self.vol = vol
        self.native = tc.NativeMount(vol)
        self.gfuse = tc.GfuseMount(vol)

    @property
    def sets(self) -> int:
        return len(self.vol.brick_dirs) // self.vol.replica

    def set_bricks(self, k: int) -> list[Path]:
        r = self.vol.replica
        return self.vol.brick_dirs[k * r:(k + 1) * r]


@pytest.fixture(scope="module")
def pair(vol_distrep: tc.Volume, glusterd: tc.GlusterdProcess) -> Iterator[Pair]:
    if tc.native_mount_unavailable_reason():
        pytest.skip(f"native glusterfs mount: {tc.native_mount_unavailable_reason()}")
    p = Pair(vol_distrep)
    p.native.mount()
    try:
        p.gfuse.mount()
        yield p
    finally:
        p.gfuse.unmount()
        p.native.unmount()


@pytest.fixture
def dname(pair: Pair, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh top-level directory name; the tree is removed through the native mount afterwards."""
    name = f"dht-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    yield name
    p = pair.native.path / name
    if os.path.lexists(p):
        shutil.rmtree(p)


def layout(pair: Pair, rel: str) -> list[Range]:
    """The directory's layout, one range per replica set; every brick of a set must agree."""
    out = []
    for k in range(pair.sets):
        values = {os.getxattr(b / rel, LAYOUT_XATTR) for b in pair.set_bricks(k)}
        assert len(values) == 1, f"{rel}: replica set {k} bricks disagree on the layout: {values}"
        out.append(Range.decode(values.pop()))
    return out


def assert_covers_hash_space(ranges: list[Range]) -> None:
    spans = sorted((r.start, r.stop) for r in ranges if not r.empty)
    assert len(spans) == len(ranges), f"a subvolume has no range: {ranges}"
    assert spans[0][0] == 0, f"hole at the start: {spans}"
    assert spans[-1][1] == FULL, f"hole at the end: {spans}"
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s0 <= e0 and s1 <= e1, spans
        assert s1 == e0 + 1, f"{'overlap' if s1 <= e0 else 'hole'} between {hex(e0)} and {hex(s1)}: {spans}"


def _is_linkto(p: Path) -> bool:
    s = os.lstat(p)
    if not (stat.S_ISREG(s.st_mode) and stat.S_IMODE(s.st_mode) == stat.S_ISVTX and s.st_size == 0):
        return False
    try:
        os.getxattr(p, LINKTO_XATTR)
        return True
    except OSError:
        return False


def where(pair: Pair, rel: str) -> tuple[set[int], set[int]]:
    """(replica sets holding the data of ``rel``, replica sets holding a linkto file of it)."""
    data, links = set(), set()
    for k in range(pair.sets):
        for b in pair.set_bricks(k):
            p = b / rel
            if not os.path.lexists(p):
                continue
            (links if _is_linkto(p) else data).add(k)
    return data, links


def names_for_each_set(ranges: list[Range], n: int, prefix: str) -> list[str]:
    """``n`` names, spread over every replica set (each set gets at least a few)."""
    names = [f"{prefix}{i:03d}" for i in range(n)]
    got = {pick(ranges, x) for x in names}
    assert got == set(range(len(ranges))), f"{n} names all hash to {got}: choose others"
    return names


def name_on(ranges: list[Range], k: int, prefix: str) -> str:
    for i in range(10_000):
        name = f"{prefix}{i}"
        if pick(ranges, name) == k:
            return name
    raise AssertionError(f"no name for set {k}")


# ------------------------------------------------------------------------------------------


def test_gfuse_hash_agrees_with_native_placement(pair: Pair, dname: str) -> None:
    """(a) 60 files made by the native client: gfuse.dhthash picks the replica set they are on."""
    d = pair.native.path / dname
    os.mkdir(d)
    names = [f"native-{i:03d}.dat" for i in range(50)] + ["x", "ü-umlaut", "a.b.c", ".hidden", "with space",
                                                          "0123456789abcdef" * 4, "tail\xe9", ".rsync.AbC123",
                                                          "UPPER", "n" * 255]
    for nm in names:
        (d / nm).write_bytes(nm.encode("utf-8", "surrogateescape")[:20])
    ranges = layout(pair, dname)
    assert_covers_hash_space(ranges)
    wrong = []
    for nm in names:
        data, links = where(pair, f"{dname}/{nm}")
        assert len(data) == 1 and not links, f"{nm}: data on {data}, linkto on {links}"
        if pick(ranges, nm) != next(iter(data)):
            wrong.append(f"{nm!r}: hash {name_hash(nm):#010x} -> set {pick(ranges, nm)}, native put it on {data}")
    assert not wrong, "\n".join(wrong)
    assert len({next(iter(where(pair, f'{dname}/{nm}')[0])) for nm in names}) == pair.sets


def test_gfuse_places_files_where_gluster_hashes(pair: Pair, dname: str) -> None:
    """(b) A directory and 60 files made by gfuse: a full layout, every file on its hashed set, and the
    native client finds each of them (once) and agrees with the layout."""
    g = pair.gfuse.path / dname
    os.mkdir(g)
    ranges = layout(pair, dname)
    assert_covers_hash_space(ranges)
    names = names_for_each_set(ranges, 60, "g-")
    for nm in names:
        (g / nm).write_bytes(nm.encode())
    misplaced = []
    for nm in names:
        data, links = where(pair, f"{dname}/{nm}")
        if data != {pick(ranges, nm)} or links:
            misplaced.append(f"{nm}: hashed set {pick(ranges, nm)}, data on {sorted(data)}, linkto on {sorted(links)}")
    assert not misplaced, "\n".join(misplaced)
    # the native client finds every one, by name and by listing, each once
    n = pair.native.path / dname
    for nm in names:
        assert (n / nm).read_bytes() == nm.encode()
    p = subprocess.run(["find", str(n), "-type", "f", "-printf", "%P\\n"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    listed = p.stdout.split()
    assert sorted(listed) == sorted(names), sorted(set(listed) ^ set(names))
    # and takes gfuse's layout as it is: its own new files go where the layout says, layout untouched
    native_names = names_for_each_set(ranges, 10, "n-")
    for nm in native_names:
        (n / nm).write_bytes(b"native")
    for nm in native_names:
        assert where(pair, f"{dname}/{nm}") == ({pick(ranges, nm)}, set()), nm
    assert layout(pair, dname) == ranges, "the native client rewrote gfuse's layout"
    assert sorted(os.listdir(g)) == sorted(names + native_names)


def test_gfuse_uses_native_directory_layout(pair: Pair, dname: str) -> None:
    """(c) In a directory the native client made, gfuse's files land where the native layout says."""
    os.mkdir(pair.native.path / dname)
    ranges = layout(pair, dname)
    time.sleep(1.1)  # let gfuse's negative entry for the name (if any) expire; it never saw it
    g = pair.gfuse.path / dname
    names = names_for_each_set(ranges, 40, "c-")
    for nm in names:
        (g / nm).write_bytes(b"from gfuse")
    for nm in names:
        assert where(pair, f"{dname}/{nm}") == ({pick(ranges, nm)}, set()), nm
    assert layout(pair, dname) == ranges, "gfuse rewrote the native layout"
    assert sorted(os.listdir(pair.native.path / dname)) == sorted(names)
    # a sub-directory made by gfuse inside it gets a full layout of its own
    os.mkdir(g / "sub")
    assert_covers_hash_space(layout(pair, f"{dname}/sub"))


def test_rename_to_a_name_on_the_other_set(pair: Pair, dname: str) -> None:
    """(d) Renamed through gfuse to a name hashing to the other replica set: both clients see only the
    new name, with the content; the data may stay where it was, reached through a linkto file."""
    g, n = pair.gfuse.path / dname, pair.native.path / dname
    os.mkdir(g)
    ranges = layout(pair, dname)
    old = name_on(ranges, 0, "old-")
    new = name_on(ranges, 1, "new-")
    payload = os.urandom(100_000)
    (g / old).write_bytes(payload)
    assert where(pair, f"{dname}/{old}") == ({0}, set())
    os.rename(g / old, g / new)
    for base, who in ((g, "gfuse"), (n, "native")):
        assert os.listdir(base) == [new], who
        assert not os.path.lexists(base / old), who
        assert (base / new).read_bytes() == payload, who
    data, links = where(pair, f"{dname}/{new}")
    assert len(data) == 1 and links <= {1} - data, (data, links)
    assert where(pair, f"{dname}/{old}") == (set(), set()), "the old name is still on a brick"
    # rename over an existing file on the other set, through gfuse: the replaced file is gone everywhere
    victim = name_on(ranges, 0, "victim-")
    (g / victim).write_bytes(b"victim")
    os.rename(g / new, g / victim)
    for base, who in ((g, "gfuse"), (n, "native")):
        assert os.listdir(base) == [victim], who
        assert (base / victim).read_bytes() == payload, who
    data, links = where(pair, f"{dname}/{victim}")
    assert len(data) == 1 and not (links & data), (data, links)
    assert where(pair, f"{dname}/{new}") == (set(), set())
    # the native client renames it back to the first set; gfuse follows
    back = name_on(ranges, 1, "back-")
    os.rename(n / victim, n / back)
    time.sleep(1.1)  # gfuse's kernel entry cache for the old name
    assert os.listdir(g) == [back]
    assert (g / back).read_bytes() == payload
    # deleting through gfuse leaves nothing (no stale linkto) and the directory can go
    os.unlink(g / back)
    for nm in (old, new, victim, back):
        assert where(pair, f"{dname}/{nm}") == (set(), set()), nm
    os.rmdir(g)
    assert not os.path.lexists(n)


def test_directory_times_merge_subvolumes(pair: Pair, dname: str) -> None:
    g, n = pair.gfuse.path / dname, pair.native.path / dname
    os.mkdir(g)
    ranges = layout(pair, dname)
    os.utime(g, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    assert os.stat(g).st_mtime_ns == 1_000_000_000_000_000_000
    # a new name on the set that is not subvolume 0 changes the directory there only
    (g / name_on(ranges, 1, "late-")).write_bytes(b"x")
    set1 = os.stat(pair.set_bricks(1)[0] / dname).st_mtime_ns
    assert set1 > 1_000_000_000_000_000_000
    assert os.stat(n).st_mtime_ns > 1_000_000_000_000_000_000  # what the native client says
    assert os.stat(g).st_mtime_ns > 1_000_000_000_000_000_000
