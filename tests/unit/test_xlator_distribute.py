"""cluster/distribute over in-memory bricks: layouts, placement, lookup-optimize, linkto files.

The oracle is what a real brick would hold (as tests/cluster/test_dht_placement.py and
test_mount_graph_switch.py check): the layout xattr on each subvolume's copy of a directory, and
which subvolume holds a file's data rather than a zero-byte linkto file.
"""

from __future__ import annotations

import errno
import os
import stat as st

from typing import Any, Awaitable, Callable

import pytest
import trio

from gfuse.cred import new_gfid
from gfuse.dhthash import LAYOUT_XATTR, LINKTO_XATTR, Range, name_hash, new_layout, pick
from gfuse.dicts import Dict
from gfuse.fops import Result
from gfuse.iatt import ROOT_GFID, SET_MTIME, Iatt
from gfuse.rpc import Credential
from gfuse.xlators.api import Fops, PassThrough
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


# ------------------------------------------------------------------------------------------ hard links, renames
# (issue 14 items 14 and 11: the real-brick counterparts are in tests/cluster/test_distribute_integrity.py)


def entries_of(bricks: list[MemBrick], path: str) -> list[dict[str, tuple[bytes, int, bytes, object]]]:
    """What each subvolume holds in directory ``path``: name → (gfid, mode, data, linkto xattr)."""
    out = []
    for b in bricks:
        d = b.inode(path)
        assert d is not None
        row = {}
        for name, g in d.entries.items():
            ino = b.inodes[g]
            row[name] = (g, ino.mode, bytes(ino.data), ino.xattrs.get(LINKTO_XATTR))
        out.append(row)
    return out


def assert_placed(bricks: list[MemBrick], path: str, model: dict[str, bytes]) -> None:
    """Exactly the names of ``model``, each as data on one subvolume, plus a linkto of the same inode on
    its hashed subvolume when that is another; nothing else."""
    ranges = layout_on(bricks, path)
    rows = entries_of(bricks, path)
    assert set().union(*rows) == set(model), f"names {sorted(set().union(*rows) ^ set(model))}"
    for name, data in model.items():
        where = {k: row[name] for k, row in enumerate(rows) if name in row}
        linked = {k for k, e in where.items() if st.S_IMODE(e[1]) == st.S_ISVTX and e[3] is not None}
        held = set(where) - linked
        assert len(held) == 1, f"{name}: data on {sorted(held)}, linkto on {sorted(linked)}"
        k = held.pop()
        assert where[k][2] == data, f"{name}: wrong bytes on {k}"
        h = pick(list(ranges), name)
        assert linked == (set() if h == k else {h}), f"{name}: data on {k}, hashed {h}, linkto on {linked}"
        if h != k:
            assert where[h][0] == where[k][0], f"{name}: the linkto names another inode"
            assert where[h][3] == bricks[k].name.encode() + b"\0", f"{name}: the linkto points elsewhere"


async def assert_found(bricks: list[MemBrick], dg: bytes, model: dict[str, bytes], gone: set[str] = frozenset()
                       ) -> None:
    """A fresh client (lookup-optimize, as the layouts carry the volume's commit hash) finds every name of
    ``model`` with its bytes and none of ``gone``, and lists exactly the names of ``model``."""
    fresh = Distribute(f"{VOL}-dht", [b.client() for b in bricks])
    for name, data in model.items():
        r = await fresh.lookup(dg, name)
        assert r.stat is not None, name
        o = await fresh.open(r.stat.gfid, os.O_RDONLY)
        assert o.fd is not None
        assert (await fresh.read(o.fd, 0, 1 << 16)).data == data, name
        await fresh.release(o.fd)
    for name in gone - set(model):
        with pytest.raises(OSError) as e:
            await fresh.lookup(dg, name)
        assert e.value.errno == errno.ENOENT, name
    assert await listing(fresh, dg) == sorted(model)


async def a_dir(d: Distribute) -> bytes:
    dg = new_gfid()
    await d.mkdir(ROOT_GFID, "dir", 0o755, dg)
    return dg


async def test_hard_links_leave_a_linkto_on_each_hashed_subvolume_and_unlink_cleanly(
        autojump_clock: trio.abc.Clock) -> None:
    """`touch a; ln a b; … ln a h; rm a … h` (issue 14 item 14): every name has its linkto (the second
    one on a subvolume is a hard link of the first: posix links it to the inode its gfid names there),
    a fresh lookup-optimized client finds each, and removing all leaves nothing behind."""
    bricks, _, d = dht()
    dg = await a_dir(d)
    g = (await make_files(d, dg, ["a"]))["a"]
    names = list("abcdefgh")
    for n in names[1:]:
        r = await d.link(g, dg, n)
        assert r.stat is not None and r.stat.nlink == names.index(n) + 1
    assert_placed(bricks, "dir", {n: b"a" for n in names})
    ranges = layout_on(bricks, "dir")
    assert len({pick(list(ranges), n) for n in names}) == 3, "choose names hashing to every subvolume"
    await assert_found(bricks, dg, {n: b"a" for n in names})
    for n in names:
        await d.unlink(dg, n)
    assert entries_of(bricks, "dir") == [{}, {}, {}]
    await d.rmdir(ROOT_GFID, "dir")


@pytest.mark.parametrize("fail_on", ["mknod", "link"])
async def test_a_link_whose_linkto_or_link_fails_leaves_nothing(autojump_clock: trio.abc.Clock, fail_on: str) -> None:
    bricks, _, d = dht()
    dg = await a_dir(d)
    g = (await make_files(d, dg, ["a"]))["a"]
    ranges = layout_on(bricks, "dir")
    c = pick(list(ranges), "a")
    assert c is not None
    new = _name_not_on(ranges, c, "b")
    h = pick(list(ranges), new)
    assert h is not None
    before = entries_of(bricks, "dir")
    bricks[h if fail_on == "mknod" else c].fail(fail_on, errno.EIO)
    with pytest.raises(OSError) as e:
        await d.link(g, dg, new)
    assert e.value.errno == errno.EIO
    assert entries_of(bricks, "dir") == before, "a failed link left something behind"
    await assert_found(bricks, dg, {"a": b"a"}, {new})


def _pool(ranges: list[Range], tag: str) -> dict[int, list[str]]:
    """Fresh names starting with ``tag``, by the subvolume they hash to."""
    out: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for i in range(300):
        k = pick(list(ranges), f"{tag}{i}")
        assert k is not None
        out[k].append(f"{tag}{i}")
    assert min(len(v) for v in out.values()) > 10
    return out


async def _file_at(d: Distribute, dg: bytes, pool: dict[int, list[str]], data_on_: int, hashed: int
                   ) -> tuple[str, bytes]:
    """A file whose data is on subvolume ``data_on_`` and whose name hashes to ``hashed`` (made on its
    hashed subvolume, then renamed if it must be misplaced): (name, bytes)."""
    first = pool[data_on_].pop(0)
    await make_files(d, dg, [first])
    if data_on_ == hashed:
        return first, first.encode()
    name = pool[hashed].pop(0)
    await d.rename(dg, first, dg, name)
    return name, first.encode()


# every (C, S, H, D) a file rename meets on 3 subvolumes, up to renumbering: the data on C, the old name
# hashed to S, the new one to H, an existing target's data on D (None: no target)
RENAME_CASES = [(0, 0, 0, None), (0, 0, 1, None), (0, 1, 0, None), (0, 1, 1, None), (0, 1, 2, None),
                (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 1, 2), (0, 1, 0, 0),
                (0, 1, 0, 2), (0, 1, 1, 0), (0, 1, 1, 2), (0, 1, 2, 0), (0, 1, 2, 1), (0, 1, 2, 2)]


async def _rename_case(case: tuple[int, int, int, int | None]
                       ) -> tuple[list[MemBrick], Distribute, bytes, str, str, dict[str, bytes]]:
    c, s, h, dk = case
    bricks, _, d = dht()
    dg = await a_dir(d)
    pool = _pool(layout_on(bricks, "dir"), "n")
    src, data = await _file_at(d, dg, pool, c, s)
    model = {src: data}
    if dk is None:
        dst = pool[h].pop(0)
    else:
        dst, ddata = await _file_at(d, dg, pool, dk, h)
        model[dst] = ddata
    assert_placed(bricks, "dir", model)
    return bricks, d, dg, src, dst, model


@pytest.mark.parametrize("case", RENAME_CASES, ids=[f"C{c}S{s}H{h}D{dk}" for c, s, h, dk in RENAME_CASES])
async def test_a_file_rename_leaves_the_names_where_gluster_looks(autojump_clock: trio.abc.Clock,
                                                                   case: tuple[int, int, int, int | None]) -> None:
    """After the rename: the new name's data on the subvolume the data was on, a linkto on its hashed
    subvolume if that is another, nothing left of the old name or of a replaced target, no DHT lock
    held; a fresh lookup-optimized client sees exactly that."""
    bricks, d, dg, src, dst, model = await _rename_case(case)
    await d.rename(dg, src, dg, dst)
    model[dst] = model.pop(src)
    assert_placed(bricks, "dir", model)
    await assert_found(bricks, dg, model, {src})
    assert all(b.locks_held() == 0 for b in bricks), [b.locks_held() for b in bricks]


# each step of each kind of rename, failing: (case, brick role, fop)
RENAME_FAULTS = [((0, 0, 1, None), "H", "mknod"), ((0, 0, 1, None), "C", "link"), ((0, 0, 1, None), "H", "rename"),
                 ((0, 1, 1, None), "C", "link"), ((0, 1, 1, None), "H", "rename"),
                 ((0, 1, 2, None), "H", "mknod"), ((0, 1, 2, None), "C", "link"), ((0, 1, 2, None), "H", "rename"),
                 ((0, 0, 1, 0), "H", "mknod"), ((0, 0, 1, 0), "C", "rename"),
                 ((0, 1, 2, 0), "H", "mknod"), ((0, 1, 2, 0), "C", "rename"),
                 ((0, 0, 1, 1), "H", "mknod"), ((0, 0, 1, 1), "C", "link"), ((0, 0, 1, 1), "H", "rename"),
                 ((0, 0, 1, 2), "H", "mknod"), ((0, 0, 1, 2), "C", "link"), ((0, 0, 1, 2), "H", "rename"),
                 ((0, 1, 0, 2), "C", "rename"), ((0, 0, 0, 1), "C", "rename"),
                 ((0, 0, 1, None), "H", "entrylk"), ((0, 0, 1, None), "C", "inodelk")]


@pytest.mark.parametrize("case,role,fop", RENAME_FAULTS,
                         ids=[f"C{c}S{s}H{h}D{dk}-{fop}@{role}" for (c, s, h, dk), role, fop in RENAME_FAULTS])
async def test_a_rename_whose_step_fails_changes_nothing(autojump_clock: trio.abc.Clock,
                                                         case: tuple[int, int, int, int | None], role: str,
                                                         fop: str) -> None:
    """A failure of any step before the new name is in place (the linkto on H, the hard link on C, the
    rename on H or C, a lock) is returned, and every subvolume holds what it held before."""
    bricks, d, dg, src, dst, model = await _rename_case(case)
    c, _, h, _ = case
    before = entries_of(bricks, "dir")
    bricks[h if role == "H" else c].fail(fop, errno.EIO)
    with pytest.raises(OSError) as e:
        await d.rename(dg, src, dg, dst)
    assert e.value.errno == errno.EIO
    assert entries_of(bricks, "dir") == before, "a failed rename left the subvolumes changed"
    assert_placed(bricks, "dir", model)
    await assert_found(bricks, dg, model, set() if dst in model else {dst})
    assert all(b.locks_held() == 0 for b in bricks), "a failed rename kept a lock"


async def test_a_rename_waits_for_the_migration_lock_of_the_file(autojump_clock: trio.abc.Clock) -> None:
    """Rebalance holds `dht.file.migrate` on a file's data inode while it moves it: a rename waits (and
    holds the names' entry locks in `dht.entry.sync` while it works, as rebalance takes them too)."""
    from gfuse import fops as F
    from gfuse.fops import Flock
    from gfuse.xlators.distribute import ENTRY_SYNC_DOMAIN, FILE_MIGRATE_DOMAIN
    bricks, d, dg, src, dst, model = await _rename_case((0, 0, 1, None))
    g = (await d.lookup(dg, src)).stat
    assert g is not None
    rebal = bricks[0].client("rebalance")
    lock = Flock(type=F.WRLCK, owner=b"rebal")
    await rebal.inodelk(g.gfid, FILE_MIGRATE_DOMAIN, F.SETLK, lock)
    seen: list[int] = []
    bricks[1].fail("rename", when=lambda fop, gfid: bool(seen.append(bricks[1].locks_held(ENTRY_SYNC_DOMAIN))))
    done = trio.Event()

    async def rename() -> None:
        await d.rename(dg, src, dg, dst)
        done.set()
    async with trio.open_nursery() as n:
        n.start_soon(rename)
        await trio.sleep(30)
        assert not done.is_set(), "the rename did not wait for the migration lock"
        assert entries_of(bricks, "dir")[1] == {}, "the rename began without the lock"
        await rebal.inodelk(g.gfid, FILE_MIGRATE_DOMAIN, F.SETLK, Flock(type=F.UNLCK, owner=b"rebal"))
        with trio.fail_after(5):
            await done.wait()
    assert seen == [1], f"entry locks held on the new name's subvolume during its rename: {seen}"
    model[dst] = model.pop(src)
    assert_placed(bricks, "dir", model)


async def test_renames_racing_from_three_clients_keep_each_file_once(autojump_clock: trio.abc.Clock) -> None:
    """Three clients rename the same files back and forth (x→y, y→x) with random brick latencies: the
    DHT locks serialize the renames, so at the end each file has one of its names, once, in place."""
    import random

    async def worker(d: Distribute, dg: bytes, pairs: list[tuple[str, str]], forward: bool) -> None:
        for _ in range(6):
            for x, y in pairs:
                a, b = (x, y) if forward else (y, x)
                try:
                    await d.rename(dg, a, dg, b)
                except OSError as e:
                    assert e.errno == errno.ENOENT, e

    for seed in range(12):
        rng = random.Random(seed)
        bricks, _ = replica_set(VOL, 3, latency=lambda fop, rng=rng: rng.random() * 0.004)
        clients = [Distribute(f"{VOL}-dht", [b.client() for b in bricks]) for _ in range(3)]
        dg = await a_dir(clients[0])
        pool = _pool(layout_on(bricks, "dir"), "p")
        pairs = [(pool[k].pop(0), pool[(k + 1 + j) % 3].pop(0)) for k in range(3) for j in range(2)]
        await make_files(clients[0], dg, [x for x, _ in pairs])
        async with trio.open_nursery() as n:
            for d, fwd in zip(clients, (True, False, True)):
                n.start_soon(worker, d, dg, pairs, fwd)
        rows = entries_of(bricks, "dir")
        model = {}
        for x, y in pairs:
            held = [nm for nm in (x, y) if any(nm in r for r in rows)]
            assert len(held) == 1, f"seed {seed}: {x}/{y}: names {held}"
            model[held[0]] = x.encode()
        assert_placed(bricks, "dir", model)
        assert all(b.locks_held() == 0 for b in bricks)


async def test_random_links_renames_and_unlinks_keep_every_name_in_place(autojump_clock: trio.abc.Clock) -> None:
    """400 random creates, hard links, renames (new names, over existing ones, over other links of the
    same file) and unlinks: after every one the subvolumes hold exactly the names, each where gluster
    looks for it; every 40, a fresh client finds them all."""
    import random
    rng = random.Random(14)
    bricks, _, d = dht()
    dg = await a_dir(d)
    ino: dict[str, int] = {}
    content: dict[int, bytes] = {}
    gfids: dict[int, bytes] = {}
    gone: set[str] = set()
    names = [f"r{i}" for i in range(30)]
    for step in range(400):
        op = rng.choice(["create", "link", "rename", "rename", "unlink"])
        free = [n for n in names if n not in ino]
        if op == "create" and free or not ino:
            n = rng.choice(free)
            k = len(content)
            content[k] = f"#{k}".encode()
            gfids[k] = new_gfid()
            r = await d.create(dg, n, os.O_RDWR, 0o644, gfids[k])
            assert r.fd is not None
            await d.write(r.fd, 0, content[k])
            await d.release(r.fd)
            ino[n] = k
        elif op == "link" and free:
            src = rng.choice(sorted(ino))
            n = rng.choice(free)
            await d.link(gfids[ino[src]], dg, n)
            ino[n] = ino[src]
        elif op == "rename":
            src = rng.choice(sorted(ino))
            n = rng.choice([x for x in names if x != src])
            await d.rename(dg, src, dg, n)
            if not (n in ino and ino[n] == ino[src]):
                ino[n] = ino.pop(src)
                gone.add(src)
        elif op == "unlink":
            n = rng.choice(sorted(ino))
            await d.unlink(dg, n)
            del ino[n]
            gone.add(n)
        gone -= set(ino)
        model = {n: content[k] for n, k in ino.items()}
        assert_placed(bricks, "dir", model)
        if step % 40 == 39:
            await assert_found(bricks, dg, model, gone)
    assert all(b.locks_held() == 0 for b in bricks)


async def test_a_directory_renamed_over_one_with_an_entry_on_any_subvolume_is_refused(
        autojump_clock: trio.abc.Clock) -> None:
    """pjdfstest rename/20.t on 2x3: each brick sees only its own copy of the target, so the rename on the
    new name's hashed subvolume alone succeeded over a directory whose only file was elsewhere (measured:
    rmdir ENOTEMPTY afterwards). DHT checks every copy first and changes nothing when one has an entry."""
    bricks, _, d = dht()
    a, b = new_gfid(), new_gfid()
    await d.mkdir(ROOT_GFID, "a", 0o755, a)
    await d.mkdir(ROOT_GFID, "b", 0o755, b)
    hb = pick(list(layout_on(bricks, "")), "b")
    ranges = layout_on(bricks, "b")
    inner = _name_not_on(ranges, hb if hb is not None else 0, "x")
    await make_files(d, b, [inner])
    before = [b_.names("") for b_ in bricks]
    with pytest.raises(OSError) as e:
        await d.rename(ROOT_GFID, "a", ROOT_GFID, "b")
    assert e.value.errno == errno.ENOTEMPTY
    assert [b_.names("") for b_ in bricks] == before
    assert all(b_.locks_held() == 0 for b_ in bricks)
    await d.unlink(b, inner)
    await d.rename(ROOT_GFID, "a", ROOT_GFID, "b")  # empty now: replaced on every subvolume
    assert all(b_.names("") == ["b"] and b_.inode("b").gfid == a for b_ in bricks)  # type: ignore[union-attr]
    await d.rmdir(ROOT_GFID, "b")
    assert all(b_.names("") == [] for b_ in bricks)


async def test_rmdir_removes_stale_linkto_files_left_in_an_empty_directory(autojump_clock: trio.abc.Clock) -> None:
    bricks, clients, d = dht()
    dg = await a_dir(d)
    ranges = layout_on(bricks, "dir")
    name = _name_not_on(ranges, 0, "s")
    h = pick(list(ranges), name)
    assert h is not None
    await clients[h].mknod(dg, name, st.S_IFREG | st.S_ISVTX, 0, new_gfid(), 0, {LINKTO_XATTR: b"v-client-0\0"})
    assert await listing(d, dg) == []
    await d.rmdir(ROOT_GFID, "dir")
    assert not any(b.exists("dir") for b in bricks)


# ------------------------------------------------------------------------------------------ migration
# (issue 14 item 12: the real-brick counterparts, with gluster's rebalance, are in test_distribute_integrity.py)

AVOID_OVERWRITE_KEY = "glusterfs.avoid.overwrite"
PROTECT_WRITES_KEY = "trusted.glusterfs.protect.writes"


class GuardedBrick(PassThrough):
    """A brick session with posix's guard against rebalance overwriting a client's newer bytes
    (``posix_check_internal_writes``): a write carrying protect.writes marks the file, and one carrying
    avoid.overwrite (rebalance's copy) to a marked file fails with EBUSY."""

    def __init__(self, child: MemClient) -> None:
        super().__init__(child)
        self.mem = child

    async def write(self, fd: int, offset: int, data: bytes, xdata: Dict | None = None,
                    cred: Credential | None = None) -> Result:
        gfid, _ = self.mem._rfd(fd)
        ino = self.mem.brick.inodes[gfid]
        if xdata and PROTECT_WRITES_KEY in xdata:
            ino.xattrs[PROTECT_WRITES_KEY] = b"1"
        elif xdata and AVOID_OVERWRITE_KEY in xdata and PROTECT_WRITES_KEY in ino.xattrs:
            raise OSError(errno.EBUSY, f"{self.name}: possible overwrite from internal client")
        return await self.mem.write(fd, offset, data, xdata, cred=cred)


async def migrate(src: Fops, dst: Fops, src_name: str, dst_name: str, dg: bytes, name: str, g: bytes,
                  between: Callable[[str], Awaitable[None]] | None = None, chunk: int = 4096) -> bool:
    """What ``dht_migrate_file`` does to move ``name`` (inode ``g``) from ``src`` to ``dst``, with
    ``between(step)`` awaited between its steps and between copied chunks. False if the copy was refused
    (a client wrote to the destination meanwhile) and the file stays where it was."""
    from gfuse.dicts import UInt
    from gfuse.iatt import SET_MODE

    async def step(what: str) -> None:
        if between is not None:
            await between(what)
    s0 = (await src.lookup(dg, name)).stat
    assert s0 is not None
    try:
        dfd = (await dst.create(dg, name, os.O_RDWR, st.S_ISVTX, g, 0,
                                {LINKTO_XATTR: src_name.encode() + b"\0"})).need_fd()
    except FileExistsError:  # left by an earlier run (a linkto of this inode): opened again
        dfd = (await dst.open(g, os.O_RDWR)).need_fd()
    sfd = (await src.open(g, os.O_RDWR)).need_fd()
    try:
        await src.setxattr(g, {LINKTO_XATTR: dst_name.encode() + b"\0"})
        await src.setattr(g, Iatt(mode=s0.mode | st.S_ISVTX | st.S_ISGID), SET_MODE)  # phase 1
        await step("phase 1")
        for off in range(0, s0.size, chunk):
            data = (await src.read(sfd, off, chunk)).data or b""
            try:
                await dst.write(dfd, off, data, {AVOID_OVERWRITE_KEY: UInt(1)})
            except OSError as e:
                assert e.errno == errno.EBUSY
                await src.setattr(g, Iatt(mode=s0.mode), SET_MODE)
                await src.removexattr(g, LINKTO_XATTR)
                await dst.ftruncate(dfd, 0)
                return False
            await step("copied")
        await dst.fsetattr(dfd, Iatt(mode=s0.mode), SET_MODE)  # phase 2
        await step("destination is the file")
        await src.fsetattr(sfd, Iatt(mode=st.S_ISVTX), SET_MODE)
        await step("source is a linkto")
        await src.ftruncate(sfd, 0)
        await step("source truncated")
        await dst.removexattr(g, LINKTO_XATTR)
        await src.unlink(dg, name)
        await step("source removed")
        return True
    finally:
        await src.release(sfd)
        await dst.release(dfd)


Setup = tuple[list[MemBrick], Distribute, bytes, str, bytes, int, int, bytearray, list[GuardedBrick]]


async def _migration_setup(n_bricks: int = 3, size: int = 64 * 1024) -> Setup:
    """A file through a client over guarded bricks, then a fix-layout that hashes its name elsewhere:
    (bricks, client, dir, name, gfid, old subvolume, new subvolume, its bytes, rebalance's sessions)."""
    bricks, clients = replica_set(VOL, n_bricks)
    d = Distribute(f"{VOL}-dht", [GuardedBrick(c) for c in clients])
    dg = await a_dir(d)
    g = new_gfid()
    r = await d.create(dg, "big", os.O_RDWR, 0o644, g)
    model = bytearray(os.urandom(size))
    await d.write(r.need_fd(), 0, bytes(model))
    await d.release(r.need_fd())
    old = layout_on(bricks, "dir")
    a = pick(list(old), "big")
    assert a is not None
    for shift in (1, 2):
        new = new_layout(3, (old.index(min(old, key=lambda x: x.start)) + shift) % 3, commit_hash=7)
        if pick(list(new), "big") != a:
            break
    b = pick(list(new), "big")
    assert b is not None and b != a
    for c, rng in zip(clients, new):
        await c.setxattr(dg, {LAYOUT_XATTR: rng.encode()})
    rebal = [GuardedBrick(br.client(f"{br.name}")) for br in bricks]
    return bricks, d, dg, "big", g, a, b, model, rebal


async def _write(d: Distribute, fd: int, model: bytearray, rng: Any) -> None:
    off = rng.randrange(len(model) // 512) * 512
    data = os.urandom(512)
    r = await d.write(fd, off, data)
    assert r.ret == len(data)
    model[off:off + len(data)] = data


async def test_writes_through_an_open_fd_follow_a_file_rebalance_moves(autojump_clock: trio.abc.Clock) -> None:
    """An fd opened before the migration keeps every write: between every two steps of it (phase 1,
    each copied chunk, phase 2 and after the source is gone) a write through the fd; in phase 1 it is
    repeated on the destination, so rebalance gives up the file (the next run moves it, writes
    continuing only after it); in phase 2 and after, the fd moves to the destination."""
    import random
    bricks, d, dg, name, g, a, b, model, rebal = await _migration_setup()
    rng = random.Random(1)
    fd = (await d.open(g, os.O_RDWR)).need_fd()

    async def write_between(step: str) -> None:
        await _write(d, fd, model, rng)
    assert not await migrate(rebal[a], rebal[b], bricks[a].name, bricks[b].name, dg, name, g, write_between)
    assert bricks[a].data(f"dir/{name}") == model, "the copy refused: the file stays whole where it was"
    assert bricks[a].inode(f"dir/{name}").mode & 0o7777 == 0o644  # type: ignore[union-attr]

    phase2 = ("destination is the file", "source is a linkto", "source truncated", "source removed")

    async def write_in_phase2(step: str) -> None:
        if step in phase2:
            await _write(d, fd, model, rng)
    bricks[b].inodes[g].xattrs.pop(PROTECT_WRITES_KEY, None)  # rebalance's next run clears it (clean.writexattr)
    assert await migrate(rebal[a], rebal[b], bricks[a].name, bricks[b].name, dg, name, g, write_in_phase2)
    for _ in range(20):
        await _write(d, fd, model, rng)
    assert (await d.read(fd, 0, len(model))).data == model
    await d.fsync(fd)
    await d.release(fd)
    assert not bricks[a].exists(f"dir/{name}")
    assert bricks[b].data(f"dir/{name}") == model, "acknowledged writes lost"
    fresh = Distribute(f"{VOL}-dht", [br.client() for br in bricks])
    r = await fresh.lookup(dg, name)
    assert r.stat is not None and r.stat.mode & 0o7777 == 0o644 and r.stat.size == len(model)


async def test_writes_to_a_file_moving_to_a_subvolume_the_graph_lacks_fail(autojump_clock: trio.abc.Clock) -> None:
    """A file opened on a graph without the brick rebalance moves it to (opened before add-brick): its
    writes cannot reach the new copy, so they fail instead of being acknowledged and lost."""
    bricks, _, dg, name, g, a, b, _, rebal = await _migration_setup()
    old_graph = Distribute(f"{VOL}-dht", [GuardedBrick(br.client()) for k, br in enumerate(bricks) if k != b])
    fd = (await old_graph.open(g, os.O_RDWR)).need_fd()
    seen: list[int] = []

    async def write(step: str) -> None:
        if step in ("phase 1", "source is a linkto"):
            with pytest.raises(OSError) as e:
                await old_graph.write(fd, 0, b"x" * 512)
            seen.append(e.value.errno)
    await migrate(rebal[a], rebal[b], bricks[a].name, bricks[b].name, dg, name, g, write)
    assert seen == [errno.EIO, errno.EIO], seen
    await old_graph.release(fd)
