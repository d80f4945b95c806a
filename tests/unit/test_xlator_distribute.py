"""cluster/distribute over in-memory bricks: layouts, placement, lookup-optimize, linkto files.

The oracle is what a real brick would hold (as tests/cluster/test_dht_placement.py and
test_mount_graph_switch.py check): the layout xattr on each subvolume's copy of a directory, and
which subvolume holds a file's data rather than a zero-byte linkto file.
"""

from __future__ import annotations

import errno
import os
import stat as st

import pytest
import trio

from gfuse.cred import new_gfid
from gfuse.dhthash import LAYOUT_XATTR, LINKTO_XATTR, Range, name_hash, new_layout, pick
from gfuse.iatt import ROOT_GFID, SET_MTIME, Iatt
from gfuse.xlators.distribute import LAYOUT_HEAL_DOMAIN, LAYOUT_TTL, Distribute
from gfuse.xlators.replicate import Replicate
from testkit.membrick import MemBrick, MemClient, replica_set

VOL = "v"
FULL = 0xFFFFFFFF


def dht(n: int = 3, *, lookup_optimize: bool = True) -> tuple[list[MemBrick], list[MemClient], Distribute]:
    bricks, clients = replica_set(VOL, n)
    return bricks, clients, Distribute(f"{VOL}-dht", clients, lookup_optimize=lookup_optimize)


def layout_on(bricks: list[MemBrick], path: str) -> list[Range]:
    out = []
    for b in bricks:
        v = b.xattr(path, LAYOUT_XATTR)
        assert isinstance(v, bytes), f"{b.name}: {path or '/'} has no layout"
        out.append(Range.decode(v))
    return out


def assert_covers_hash_space(ranges: list[Range]) -> None:
    spans = sorted((r.start, r.stop) for r in ranges)
    assert spans[0][0] == 0 and spans[-1][1] == FULL, spans
    for (_, e0), (s1, _) in zip(spans, spans[1:]):
        assert s1 == e0 + 1, f"hole or overlap at {e0:#x}/{s1:#x}: {spans}"


def data_on(bricks: list[MemBrick], path: str) -> tuple[set[int], set[int]]:
    """(subvolumes holding ``path``'s data, subvolumes holding a linkto file of it)."""
    data, links = set(), set()
    for k, b in enumerate(bricks):
        ino = b.inode(path)
        if ino is None:
            continue
        linkto = st.S_IMODE(ino.mode) == st.S_ISVTX and not ino.data and LINKTO_XATTR in ino.xattrs
        (links if linkto else data).add(k)
    return data, links


async def make_files(d: Distribute, parent: bytes, names: list[str]) -> dict[str, bytes]:
    gfids = {}
    for name in names:
        g = new_gfid()
        r = await d.create(parent, name, os.O_RDWR, 0o644, g)
        assert r.fd is not None
        await d.write(r.fd, 0, name.encode())
        await d.release(r.fd)
        gfids[name] = g
    return gfids


async def listing(d: Distribute, gfid: bytes) -> list[str]:
    o = await d.opendir(gfid)
    assert o.fd is not None
    names, off = [], 0
    try:
        while True:
            r = await d.readdirp(o.fd, off, 512)
            if not r.entries:
                return sorted(n for n in names if n not in (".", ".."))
            names += [e.name for e in r.entries]
            off = r.entries[-1].off
    finally:
        await d.release(o.fd)


# ------------------------------------------------------------------------------------------ layouts


async def test_a_fresh_volume_root_gets_a_full_layout_once(autojump_clock: trio.abc.Clock) -> None:
    bricks, _, d = dht()
    await make_files(d, ROOT_GFID, ["a"])
    ranges = layout_on(bricks, "")
    assert_covers_hash_space(ranges)
    assert all(b.locks_held(LAYOUT_HEAL_DOMAIN) == 0 for b in bricks), "the layout-heal lock was kept"
    other = Distribute(f"{VOL}-dht", [b.client() for b in bricks])
    await other.lookup(ROOT_GFID, "a")
    assert layout_on(bricks, "") == ranges, "a second client rewrote a layout that was there"


async def test_files_land_on_the_subvolume_their_name_hashes_to(autojump_clock: trio.abc.Clock) -> None:
    bricks, _, d = dht()
    dg = new_gfid()
    await d.mkdir(ROOT_GFID, "dir", 0o755, dg)
    for b in bricks:
        ino = b.inode("dir")
        assert ino is not None and ino.is_dir and ino.gfid == dg, f"{b.name}: the directory is not everywhere"
    ranges = layout_on(bricks, "dir")
    assert_covers_hash_space(ranges)
    names = [f"f{i:03d}" for i in range(60)]
    await make_files(d, dg, names)
    used = set()
    for name in names:
        k = pick(list(ranges), name)
        assert data_on(bricks, f"dir/{name}") == ({k}, set()), f"{name} (hash {name_hash(name):#x}) not on {k}"
        used.add(k)
    assert used == {0, 1, 2}, "60 names all hashed to the same subvolumes: the layout is not spread"
    assert await listing(d, dg) == names


# ------------------------------------------------------------------------------------------ lookup-optimize


async def test_a_missing_name_costs_one_brick_lookup_while_layouts_are_current(
        autojump_clock: trio.abc.Clock) -> None:
    for optimize, expected in ((True, 1), (False, 1 + 3)):  # off: the hashed one, then everywhere
        bricks, _, d = dht(lookup_optimize=optimize)
        dg = new_gfid()
        await d.mkdir(ROOT_GFID, "dir", 0o755, dg)
        await d.lookup(ROOT_GFID, "dir")
        with pytest.raises(OSError):
            await d.lookup(dg, "warm")  # reads the volume's commit hash once
        for b in bricks:
            b.calls.clear()
        with pytest.raises(OSError) as e:
            await d.lookup(dg, "nope")
        assert e.value.errno == errno.ENOENT
        assert sum(b.calls["lookup"] for b in bricks) == expected, (optimize, [b.calls for b in bricks])


async def test_files_stay_visible_after_fix_layout(autojump_clock: trio.abc.Clock) -> None:
    """test_mount_graph_switch's add-brick + fix-layout: the directory gets a new layout whose commit
    hash is not the volume's, so a name missing where it now hashes is looked for everywhere."""
    bricks, clients, d = dht()
    dg = new_gfid()
    await d.mkdir(ROOT_GFID, "dir", 0o755, dg)
    names = [f"f{i:03d}" for i in range(40)]
    gfids = await make_files(d, dg, names)
    old = layout_on(bricks, "dir")
    new = new_layout(3, (old.index(min(old, key=lambda r: r.start)) + 1) % 3, commit_hash=7)
    for c, r in zip(clients, new):
        await c.setxattr(dg, {LAYOUT_XATTR: r.encode()})
    moved = [n for n in names if pick(list(new), n) != pick(list(old), n)]
    assert moved, "the new layout sends no old name elsewhere: choose another"
    await trio.sleep(LAYOUT_TTL * 1.5)  # the cached layout expires: another client fixed it
    for name in names:
        r = await d.lookup(dg, name)
        assert r.stat is not None and r.stat.gfid == gfids[name], name
    fresh = Distribute(f"{VOL}-dht", [b.client() for b in bricks])
    for name in moved:
        r = await fresh.lookup(dg, name)
        assert r.stat is not None and r.stat.gfid == gfids[name], f"{name} lost after fix-layout"
        o = await fresh.open(gfids[name], os.O_RDONLY)
        assert o.fd is not None
        assert (await fresh.read(o.fd, 0, 100)).data == name.encode()
        await fresh.release(o.fd)
    assert await listing(fresh, dg) == names


# ------------------------------------------------------------------------------------------ linkto files


def _name_not_on(ranges: list[Range], k: int, prefix: str) -> str:
    for i in range(10_000):
        name = f"{prefix}{i}"
        if pick(list(ranges), name) != k:
            return name
    raise AssertionError("no name hashes elsewhere")


async def test_a_rename_to_a_name_hashed_elsewhere_leaves_a_linkto(autojump_clock: trio.abc.Clock) -> None:
    bricks, _, d = dht()
    dg = new_gfid()
    await d.mkdir(ROOT_GFID, "dir", 0o755, dg)
    g = (await make_files(d, dg, ["src"]))["src"]
    ranges = layout_on(bricks, "dir")
    k = pick(list(ranges), "src")
    assert k is not None
    dst = _name_not_on(ranges, k, "dst")
    h = pick(list(ranges), dst)
    assert h is not None
    await d.rename(dg, "src", dg, dst)
    assert data_on(bricks, f"dir/{dst}") == ({k}, {h}), "the data must stay and a linkto point at it"
    assert bricks[h].xattr(f"dir/{dst}", LINKTO_XATTR) == bricks[k].name.encode() + b"\0"
    assert data_on(bricks, "dir/src") == (set(), set())
    fresh = Distribute(f"{VOL}-dht", [b.client() for b in bricks])
    r = await fresh.lookup(dg, dst)
    assert r.stat is not None and r.stat.gfid == g and r.stat.size == 3
    assert await listing(fresh, dg) == [dst], "a linkto file must not be listed"
    await fresh.unlink(dg, dst)
    assert data_on(bricks, f"dir/{dst}") == (set(), set()), "unlink left the data or the linkto behind"


async def test_rmdir_refuses_a_directory_with_a_file_on_any_subvolume(autojump_clock: trio.abc.Clock) -> None:
    bricks, _, d = dht()
    dg = new_gfid()
    await d.mkdir(ROOT_GFID, "dir", 0o755, dg)
    await make_files(d, dg, ["only"])
    with pytest.raises(OSError) as e:
        await d.rmdir(ROOT_GFID, "dir")
    assert e.value.errno == errno.ENOTEMPTY
    assert all(b.exists("dir") for b in bricks), "rmdir removed some copies before refusing"
    await d.unlink(dg, "only")
    await d.rmdir(ROOT_GFID, "dir")
    assert not any(b.exists("dir") for b in bricks)


async def test_directory_times_are_the_latest_of_every_subvolume(autojump_clock: trio.abc.Clock) -> None:
    _, clients, d = dht()
    dg = new_gfid()
    await d.mkdir(ROOT_GFID, "dir", 0o755, dg)
    late = Iatt(mtime=2_000_000_000, mtime_nsec=5)
    await clients[2].setattr(dg, late, SET_MTIME)
    r = await d.stat(dg)
    assert r.stat is not None and (r.stat.mtime, r.stat.mtime_nsec) == (2_000_000_000, 5)


async def test_distributed_replicated_files_are_on_every_brick_of_their_set(autojump_clock: trio.abc.Clock) -> None:
    """2 x 3: each file's data on the three bricks of the set its name hashes to, nothing on the other set."""
    sets = [replica_set(VOL, 3, first=3 * k) for k in range(2)]
    afrs = [Replicate(f"{VOL}-replicate-{k}", clients) for k, (_, clients) in enumerate(sets)]
    d = Distribute(f"{VOL}-dht", afrs)
    async with trio.open_nursery() as nursery:
        for r in afrs:
            await nursery.start(r.run)
        dg = new_gfid()
        await d.mkdir(ROOT_GFID, "dir", 0o755, dg)
        names = [f"f{i:02d}" for i in range(20)]
        await make_files(d, dg, names)
        ranges = [Range.decode(sets[k][0][0].xattr("dir", LAYOUT_XATTR)) for k in range(2)]
        for name in names:
            k = pick(list(ranges), name)
            for j, (bricks, _) in enumerate(sets):
                for b in bricks:
                    assert (b.data(f"dir/{name}") == name.encode()) if j == k else not b.exists(f"dir/{name}"), \
                        f"{name}: {b.name} (set {j}, hashed set {k})"
                    assert j != k or b.pending(f"dir/{name}") == {}
        assert await listing(d, dg) == names
        nursery.cancel_scope.cancel()
