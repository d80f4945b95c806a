"""The md-cache layer over an in-memory brick: the stat after an entry change comes from its reply.

As tests/cluster/test_mount_mdcache.py: the answers are the brick's own attributes after the change
(never older), changes that entry replies do not describe drop them, and they expire after the TTL.
"""

from __future__ import annotations

import errno
import os
import stat as st
from collections.abc import Awaitable, Callable

import hypothesis as hyp
import hypothesis.strategies as st_
import pytest
import trio
import trio.testing

from gfuse import fops as F
from gfuse.cred import new_gfid
from gfuse.dicts import UInt
from gfuse.fops import Result
from gfuse.iatt import ROOT_GFID, SET_MODE, Iatt
from gfuse.xlators.mdcache import CacheOptions, MdCache
from testkit.membrick import MemBrick, MemClient


def setup() -> tuple[MemBrick, MemClient, MdCache]:
    brick = MemBrick("v-client-0")
    client = brick.client()
    return brick, client, MdCache(client, ttl=1.0)


def same_attrs(a: Iatt, b: Iatt) -> bool:
    keys = ("gfid", "mode", "nlink", "uid", "gid", "mtime", "mtime_nsec", "ctime", "ctime_nsec")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


async def cached_stat(brick: MemBrick, m: MdCache, gfid: bytes, path: str) -> Iatt:
    """stat through the cache, asserting it cost no brick STAT and matches the brick now."""
    before = brick.calls["stat"]
    r = await m.stat(gfid)
    assert brick.calls["stat"] == before, "the stat went to the brick"
    ino = brick.inode(path)
    assert r.stat is not None and ino is not None
    assert same_attrs(r.stat, ino.iatt()), f"cached {r.stat} differs from the brick's {ino.iatt()}"
    return r.stat


Op = Callable[[MdCache, bytes], Awaitable[Result]]
ENTRY_OPS: dict[str, Op] = {
    "create": lambda m, d: m.create(d, "n", os.O_RDWR, 0o644, new_gfid()),
    "mknod": lambda m, d: m.mknod(d, "n", st.S_IFIFO | 0o644, 0, new_gfid()),
    "mkdir": lambda m, d: m.mkdir(d, "n", 0o755, new_gfid()),
    "symlink": lambda m, d: m.symlink(d, "n", "target", new_gfid()),
    "unlink": lambda m, d: m.unlink(d, "old"),
    "rmdir": lambda m, d: m.rmdir(d, "olddir"),
    "rename": lambda m, d: m.rename(d, "old", d, "renamed"),
}


@pytest.mark.parametrize("op", sorted(ENTRY_OPS))
async def test_the_parent_stat_after_an_entry_op_comes_from_its_reply(autojump_clock: trio.abc.Clock,
                                                                      op: str) -> None:
    brick, _, m = setup()
    dg = new_gfid()
    await m.mkdir(ROOT_GFID, "d", 0o755, dg)
    await m.create(dg, "old", os.O_RDWR, 0o644, new_gfid())
    await m.mkdir(dg, "olddir", 0o755, new_gfid())
    await trio.sleep(1.5)  # nothing cached from the setup
    before = (await m.stat(dg)).stat
    assert before is not None
    await trio.sleep(0.01)
    await ENTRY_OPS[op](m, dg)
    after = await cached_stat(brick, m, dg, "d")
    assert (after.mtime, after.mtime_nsec) > (before.mtime, before.mtime_nsec), "mtime did not move"


async def test_link_and_cross_directory_rename_keep_both_parents(autojump_clock: trio.abc.Clock) -> None:
    brick, _, m = setup()
    a, b = new_gfid(), new_gfid()
    await m.mkdir(ROOT_GFID, "a", 0o755, a)
    await m.mkdir(ROOT_GFID, "b", 0o755, b)
    f = new_gfid()
    await m.create(a, "f", os.O_RDWR, 0o644, f)
    await m.rename(a, "f", b, "g")
    await cached_stat(brick, m, a, "a")
    await cached_stat(brick, m, b, "b")
    await m.link(f, a, "h")
    await cached_stat(brick, m, a, "a")


CHANGES: dict[str, Op] = {
    "setattr": lambda m, d: m.setattr(d, Iatt(mode=0o700), SET_MODE),
    "setxattr": lambda m, d: m.setxattr(d, {"user.k": b"v"}),
    "removexattr": lambda m, d: m.removexattr(d, "user.old"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
async def test_changes_not_described_by_entry_replies_drop_the_attributes(autojump_clock: trio.abc.Clock,
                                                                          change: str) -> None:
    brick, _, m = setup()
    dg = new_gfid()
    await m.mkdir(ROOT_GFID, "d", 0o755, dg)
    await m.setxattr(dg, {"user.old": b"1"})
    await m.create(dg, "f", os.O_RDWR, 0o644, new_gfid())
    await cached_stat(brick, m, dg, "d")
    await CHANGES[change](m, dg)
    before = brick.calls["stat"]
    r = await m.stat(dg)
    assert brick.calls["stat"] == before + 1, f"a stat after {change} was answered from the cache"
    assert r.stat is not None and st.S_IMODE(r.stat.mode) == (0o700 if change == "setattr" else 0o755)


async def test_cached_attributes_expire_after_the_ttl(autojump_clock: trio.abc.Clock) -> None:
    brick, _, m = setup()
    dg = new_gfid()
    await m.mkdir(ROOT_GFID, "d", 0o755, dg)
    await m.create(dg, "f", os.O_RDWR, 0o644, new_gfid())
    await trio.sleep(0.9)
    await cached_stat(brick, m, dg, "d")
    await trio.sleep(0.2)
    before = brick.calls["stat"]
    await m.stat(dg)
    assert brick.calls["stat"] == before + 1, "attributes older than the TTL were answered"


async def test_a_stat_asking_for_xattrs_or_after_a_failed_entry_op_goes_to_the_brick(
        autojump_clock: trio.abc.Clock) -> None:
    brick, _, m = setup()
    dg = new_gfid()
    await m.mkdir(ROOT_GFID, "d", 0o755, dg)
    await m.create(dg, "f", os.O_RDWR, 0o644, new_gfid())
    before = brick.calls["stat"]
    await m.stat(dg, {"trusted.afr.dirty": UInt(12)})
    assert brick.calls["stat"] == before + 1
    with pytest.raises(OSError) as e:
        await m.create(dg, "f", os.O_RDWR, 0o644, new_gfid())
    assert e.value.errno == errno.EEXIST
    await m.stat(dg)
    assert brick.calls["stat"] == before + 2, "a failed entry op left attributes in the cache"


async def test_everything_else_passes_through(autojump_clock: trio.abc.Clock) -> None:
    brick, client, m = setup()
    assert m.name == client.name and m.is_up
    g = new_gfid()
    c = await m.create(ROOT_GFID, "f", os.O_RDWR, 0o644, g)
    assert c.fd is not None
    assert (await m.write(c.fd, 0, b"hello")).ret == 5
    assert (await m.read(c.fd, 0, 10)).data == b"hello"
    await m.fsetxattr(c.fd, {"user.a": b"1"})
    assert (await m.fgetxattr(c.fd, "user.a")).dict == {"user.a": b"1"}
    await m.release(c.fd)
    r = await m.lookup(ROOT_GFID, "f")
    assert r.stat is not None and r.stat.gfid == g and r.stat.size == 5
    assert brick.data("f") == b"hello"


# ---------------------------------------------------------------------------------------------------------------
# Coherent mode: two clients of one brick whose upcall translator has cache-invalidation on (testkit/membrick.py
# models features/upcall as 10.3 behaves, shared/CACHING.md §1). Client A reads through md-cache, client B
# changes things through its own session; A must never answer from before a change the brick told it about.


class Sink:
    """Records what md-cache tells the FUSE bridge to purge (a KernelSink)."""

    def __init__(self) -> None:
        self.changed: list[tuple[bytes, bool]] = []
        self.gone: list[bytes] = []
        self.flushes = 0

    def inode_changed(self, gfid: bytes, data: bool) -> None:
        self.changed.append((gfid, data))

    def names_gone(self, gfid: bytes) -> None:
        self.gone.append(gfid)

    def everything(self) -> None:
        self.flushes += 1


def coherent(timeout: float = 600.0, *, brick_timeout: float = 600.0, latency: float = 0.0,
             upcall_delay: float = 0.0, bricks_on: bool = True,
             options: CacheOptions | None = None) -> tuple[MemBrick, MdCache, MemClient, Sink]:
    brick = MemBrick("v-client-0", cache_invalidation=True, cache_invalidation_timeout=brick_timeout,
                     latency=latency, upcall_delay=upcall_delay)
    a = brick.client()
    b = brick.client()

    async def probe() -> tuple[bool, float]:
        return bricks_on, brick_timeout

    opts = options or CacheOptions(timeout=timeout, invalidation=True, negative_timeout=60)
    m = MdCache(a, options=opts, bricks=[a], probe=probe)
    k = Sink()
    m.kernel = k
    return brick, m, b, k


async def tree(b: MemClient) -> tuple[bytes, bytes]:
    """d/f (5 bytes, security.capability set) made by B."""
    dg, fg = new_gfid(), new_gfid()
    await b.mkdir(ROOT_GFID, "d", 0o755, dg)
    c = await b.create(dg, "f", os.O_RDWR, 0o644, fg, xdata={"security.capability": b"cap"})
    assert c.fd is not None
    await b.write(c.fd, 0, b"hello")
    await b.release(c.fd)
    return dg, fg


async def open_dir_of_files(b: MemClient, m: MdCache, count: int) -> tuple[bytes, int]:
    """d with n00.. made by B, looked up and opened through md-cache: (d's gfid, the open fd)."""
    dg = new_gfid()
    await b.mkdir(ROOT_GFID, "d", 0o755, dg)
    for i in range(count):
        await b.mknod(dg, f"n{i:02d}", st.S_IFREG | 0o644, 0, new_gfid())
    await m.lookup(ROOT_GFID, "d")
    o = await m.opendir(dg)
    assert o.fd is not None
    return dg, o.fd


def brick_calls(brick: MemBrick) -> int:
    return sum(n for fop, n in brick.calls.items() if fop not in ("release", "ipc"))


async def test_coherent_lookups_stats_and_security_xattrs_cost_no_brick_call(autojump_clock: trio.abc.Clock,
                                                                              nursery: trio.Nursery) -> None:
    brick, m, b, _ = coherent()
    await nursery.start(m.run)
    assert m.coherent and m.lifetime > 500
    dg, fg = await tree(b)
    await m.lookup(ROOT_GFID, "d")
    r = await m.lookup(dg, "f")
    assert r.stat is not None and r.stat.size == 5
    await trio.sleep(300)  # far past the kernel's 1 s: still ours to answer
    before = brick_calls(brick)
    for _ in range(3):
        assert (await m.lookup(dg, "f")).stat == r.stat
        assert (await m.stat(fg)).stat == r.stat
        assert (await m.getxattr(fg, "security.capability")).dict == {"security.capability": b"cap"}
        with pytest.raises(OSError) as e:
            await m.getxattr(fg, "security.selinux")
        assert e.value.errno == errno.ENODATA
    assert brick_calls(brick) == before, f"brick calls: {brick.calls}"
    t = m.kernel_timeout(fg, m.ticket())
    assert t is not None and 250 < t <= m.lifetime - 300 + 1


async def test_ls_l_after_readdirp_costs_no_brick_call(autojump_clock: trio.abc.Clock,
                                                       nursery: trio.Nursery) -> None:
    """The profile of issue 10: `ls -l` asked a brick for security xattrs of every entry."""
    brick, m, b, _ = coherent()
    await nursery.start(m.run)
    dg, fd = await open_dir_of_files(b, m, 50)
    ents = (await m.readdirp(fd)).entries
    await m.releasedir(fd)
    before = brick_calls(brick)
    for e in ents:
        if e.name in (".", ".."):
            continue
        assert e.stat is not None
        assert (await m.lookup(dg, e.name)).stat == e.stat
        assert (await m.stat(e.stat.gfid)).stat == e.stat
        for key in ("security.selinux", "security.capability"):
            with pytest.raises(OSError):
                await m.getxattr(e.stat.gfid, key)
    assert brick_calls(brick) == before, f"brick calls: {brick.calls}"


async def _b_write(b: MemClient, fg: bytes) -> None:
    o = await b.open(fg, os.O_RDWR)
    assert o.fd is not None
    await b.write(o.fd, 0, b"HELLO, world")
    await b.release(o.fd)


B_CHANGES: dict[str, Callable[[MemClient, bytes, bytes], Awaitable[object]]] = {
    "write": lambda b, d, f: _b_write(b, f),
    "truncate": lambda b, d, f: b.truncate(f, 2),
    "chmod": lambda b, d, f: b.setattr(f, Iatt(mode=0o600), SET_MODE),
    "setxattr": lambda b, d, f: b.setxattr(f, {"security.capability": b"new"}),
    "removexattr": lambda b, d, f: b.removexattr(f, "security.capability"),
    "rename": lambda b, d, f: b.rename(d, "f", d, "g"),
    "unlink": lambda b, d, f: b.unlink(d, "f"),
    "create": lambda b, d, f: b.create(d, "new", os.O_RDWR, 0o644, new_gfid()),
}


@pytest.mark.parametrize("change", sorted(B_CHANGES))
async def test_another_clients_change_is_seen_at_the_next_access(autojump_clock: trio.abc.Clock,
                                                                  nursery: trio.Nursery, change: str) -> None:
    brick, m, b, k = coherent()
    await nursery.start(m.run)
    dg, fg = await tree(b)
    await m.lookup(ROOT_GFID, "d")
    await m.lookup(dg, "f")
    await m.getxattr(fg, "security.capability")
    with pytest.raises(OSError):
        await m.lookup(dg, "new")  # cached as absent
    o = await m.opendir(dg)
    assert o.fd is not None
    await m.readdirp(o.fd)
    await trio.sleep(10)
    k.changed.clear()
    await B_CHANGES[change](b, dg, fg)
    # the next access from A says what the brick says now
    fi = brick.inode("d/f")
    if change in ("rename", "unlink"):
        with pytest.raises(OSError) as e:
            await m.lookup(dg, "f")
        assert e.value.errno == errno.ENOENT
        assert fg in k.gone, "the kernel was not told to drop the names of the moved/removed file"
        if change == "rename":
            r = await m.lookup(dg, "g")
            assert r.stat is not None and r.stat.gfid == fg
    else:
        assert fi is not None
        r = await m.lookup(dg, "f")
        assert r.stat is not None and same_attrs(r.stat, fi.iatt()) and r.stat.size == fi.iatt().size
        assert same_attrs((await m.stat(fg)).stat or Iatt(), fi.iatt())
        cap = fi.xattrs.get("security.capability")
        if cap is None:
            with pytest.raises(OSError):
                await m.getxattr(fg, "security.capability")
        else:
            assert (await m.getxattr(fg, "security.capability")).dict == {"security.capability": cap}
        if change in ("write", "truncate"):
            assert (fg, True) in k.changed, "the kernel was not told to drop the file's pages"
        elif change == "chmod":
            assert (fg, False) in k.changed, "a chmod dropped the pages (or nothing was said)"
    if change == "create":
        assert (await m.lookup(dg, "new")).stat is not None, "a stale negative entry"
        assert (dg, True) in k.changed, "the kernel was not told to drop its cached listing of the directory"
    d = brick.inode("d")
    assert d is not None
    assert same_attrs((await m.stat(dg)).stat or Iatt(), d.iatt()), "the directory's attributes are stale"


async def test_negative_entries(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    brick, m, b, _ = coherent(options=CacheOptions(timeout=600, invalidation=True, negative_timeout=60))
    await nursery.start(m.run)
    dg, _ = await tree(b)
    await m.lookup(ROOT_GFID, "d")
    with pytest.raises(OSError) as e:
        await m.lookup(dg, "x")
    n = brick.calls["lookup"]
    with pytest.raises(OSError) as e:
        await m.lookup(dg, "x")
    assert e.value.errno == errno.ENOENT
    assert brick.calls["lookup"] == n, "the second miss went to the brick"
    # our own create replaces the negative entry at once
    await m.create(dg, "x", os.O_RDWR, 0o644, new_gfid())
    assert (await m.lookup(dg, "x")).stat is not None
    # another client's create: TIMES on d, every negative entry of d is dropped
    with pytest.raises(OSError):
        await m.lookup(dg, "untouched")
    await b.mknod(dg, "untouched", st.S_IFREG | 0o644, 0, new_gfid())
    assert (await m.lookup(dg, "untouched")).stat is not None, "a stale negative entry after a create"
    # a rename of an inode A never touched into a name it cached as absent is not notified by the brick
    # (seen on 10.3): the negative entry lasts at most negative_timeout
    with pytest.raises(OSError):
        await m.lookup(dg, "y")
    await b.mknod(dg, "untouched2", st.S_IFREG | 0o644, 0, new_gfid())
    with pytest.raises(OSError):
        await m.lookup(dg, "y")
    await b.rename(dg, "untouched2", dg, "y")
    with pytest.raises(OSError):
        await m.lookup(dg, "y")  # the documented limit
    await b.rename(dg, "untouched", dg, "y")
    await trio.sleep(61)
    assert (await m.lookup(dg, "y")).stat is not None


async def test_kernel_timeout_and_entries_never_outlive_the_bricks_registration(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    """The brick forgets a client that touched nothing for cache-invalidation-timeout: before that, the
    entry dies and the next access is a brick call that registers again."""
    brick, m, b, k = coherent(timeout=600, brick_timeout=60)
    await nursery.start(m.run)
    dg, fg = await tree(b)
    await m.lookup(ROOT_GFID, "d")
    r = await m.lookup(dg, "f")
    assert r.stat is not None
    t = m.kernel_timeout(fg, m.ticket())
    assert t is not None and t <= 60 - 1, f"kernel timeout {t} beyond the brick's 60 s"
    await trio.sleep(58)
    n = brick.calls["lookup"]
    await m.lookup(dg, "f")
    assert brick.calls["lookup"] == n + 1, "an entry older than the brick's registration was answered"
    await trio.sleep(30)  # 88 s after the first lookup: the brick knows us from the second one only
    await _b_write(b, fg)
    assert (await m.stat(fg)).stat == brick.inode("d/f").iatt()  # type: ignore[union-attr]
    assert (fg, True) in k.changed


async def test_attributes_from_a_reply_that_registers_nothing_die_with_the_registration(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    """A lookup brings the parent's attributes (postparent) but registers only the child: they do not make
    the parent's entry live longer than the fop that registered the parent."""
    brick, m, b, _ = coherent(timeout=600, brick_timeout=60)
    await nursery.start(m.run)
    dg, _ = await tree(b)
    await m.lookup(ROOT_GFID, "d")  # registers d at t=0
    await trio.sleep(50)
    await m.lookup(dg, "f")  # brings d's attributes at t=50, registers only f
    await trio.sleep(8)  # 58 s after d's registration, past the 56 s lifetime
    n = brick.calls["stat"]
    await m.stat(dg)
    assert brick.calls["stat"] == n + 1, "d's attributes outlived its registration"


async def test_an_older_reply_does_not_overwrite_newer_attributes(autojump_clock: trio.abc.Clock,
                                                                  nursery: trio.Nursery) -> None:
    slow = {"stat": 1.0}
    brick, m, b, _ = coherent()
    brick.latency = lambda fop: slow.get(fop, 0.1)
    await nursery.start(m.run)
    dg, fg = await tree(b)
    await m.lookup(ROOT_GFID, "d")
    await m.lookup(dg, "f")
    o = await m.open(fg, os.O_RDWR)
    assert o.fd is not None
    m._drop(fg)

    async def stat() -> None:
        await m.stat(fg)  # applied at +0.5 s, answered at +1 s

    nursery.start_soon(stat)
    await trio.sleep(0.6)
    await m.write(o.fd, 0, b"newer")  # applied at +0.65 s, answered at +0.7 s
    await trio.sleep(1)
    cached = m.cached(fg)
    assert cached is not None and same_attrs(cached, brick.inode("d/f").iatt()), \
        "the slow stat's older attributes replaced the write's"  # type: ignore[union-attr]
    await m.release(o.fd)


async def test_a_brick_restart_drops_everything(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    brick, m, b, k = coherent()
    await nursery.start(m.run)
    dg, fg = await tree(b)
    await m.lookup(ROOT_GFID, "d")
    await m.lookup(dg, "f")
    assert m.cached(fg) is not None
    brick.crash()
    assert m.cached(fg) is None and k.flushes >= 1
    brick.restart()
    await trio.sleep(1)
    assert brick.up_patterns, "xattr keys were not registered again after the restart"
    await m.lookup(dg, "f")
    # the restarted brick knows A only from the lookup after the restart, and tells it about B's change
    b.connect()
    await _b_write(b, fg)
    assert (await m.stat(fg)).stat == brick.inode("d/f").iatt()  # type: ignore[union-attr]


async def test_not_coherent_keeps_gluster_1s_semantics(autojump_clock: trio.abc.Clock,
                                                        nursery: trio.Nursery) -> None:
    brick, m, b, _ = coherent(bricks_on=False)
    await nursery.start(m.run)
    assert not m.coherent and m.lifetime == 1.0
    dg, fg = await tree(b)
    await m.lookup(ROOT_GFID, "d")
    await m.lookup(dg, "f")
    assert m.kernel_timeout(fg, m.ticket()) is None
    n = brick.calls["lookup"]
    await m.lookup(dg, "f")
    assert brick.calls["lookup"] == n + 1, "names are cached without invalidation"
    s = brick.calls["stat"]
    await m.stat(fg)
    assert brick.calls["stat"] == s, "attributes younger than 1 s went to the brick"
    await trio.sleep(1.01)
    await m.stat(fg)
    assert brick.calls["stat"] == s + 1, "attributes outlived 1 s without invalidation"


async def test_an_upcall_during_a_lookup_keeps_its_reply_out_of_the_cache(autojump_clock: trio.abc.Clock,
                                                                          nursery: trio.Nursery) -> None:
    """The reply of a lookup the brick answered before B's change arrives after the upcall of that change:
    it is passed on (with kernel timeout 0) but not cached."""
    brick, m, b, _ = coherent(latency=0.2)
    await nursery.start(m.run)
    dg, fg = await tree(b)
    await m.lookup(ROOT_GFID, "d")
    await m.lookup(dg, "f")
    await m.stat(fg)
    m._drop(fg)  # the next stat goes to the brick
    ticket = m.ticket()
    result: list[Result] = []

    async def stat() -> None:
        result.append(await m.stat(fg))

    nursery.start_soon(stat)
    await trio.sleep(0.15)  # the stat was applied (0.1 s) and its reply is on its way back
    await b.truncate(fg, 1)  # the upcall reaches A before the stat's reply
    await trio.sleep(0.5)
    assert result and result[0].stat is not None and result[0].stat.size == 5, "the test lost its race"
    assert m.kernel_timeout(fg, ticket) == 0.0
    assert (await m.stat(fg)).stat == brick.inode("d/f").iatt()  # type: ignore[union-attr]


async def test_asked_for_user_xattrs_are_learned_and_kept_coherent(autojump_clock: trio.abc.Clock,
                                                                   nursery: trio.Nursery) -> None:
    brick, m, b, _ = coherent()
    await nursery.start(m.run)
    dg, fg = await tree(b)
    await b.setxattr(fg, {"user.tag": b"1"})
    await m.lookup(ROOT_GFID, "d")
    await m.lookup(dg, "f")
    assert (await m.getxattr(fg, "user.tag")).dict == {"user.tag": b"1"}  # learned here
    n = brick.calls["getxattr"]
    assert (await m.getxattr(fg, "user.tag")).dict == {"user.tag": b"1"}
    assert brick.calls["getxattr"] == n
    await b.setxattr(fg, {"user.tag": b"2"})
    assert (await m.getxattr(fg, "user.tag")).dict == {"user.tag": b"2"}
    await b.removexattr(fg, "user.tag")
    with pytest.raises(OSError) as e:
        await m.getxattr(fg, "user.tag")
    assert e.value.errno == errno.ENODATA
    # a fresh lookup now asks for the learned key too
    m.drop_all()
    await m.lookup(dg, "f")
    n = brick.calls["getxattr"]
    with pytest.raises(OSError):
        await m.getxattr(fg, "user.tag")
    assert brick.calls["getxattr"] == n


# ---------------------------------------------------------------------------------------------------------------
# The invariant, over random interleavings: after the brick's invalidation of a change reached A, no answer of A
# is older than that change. B changes a file's attributes and an xattr and creates/unlinks names while A reads
# through md-cache; calls take time, upcalls arrive late, the brick may restart. Each answer is checked against
# what A had been told before the read began.

A_READS = ("stat", "lookup_f", "getxattr", "lookup_n", "readdirp")
B_OPS = ("write", "truncate", "chmod", "setxattr", "create", "unlink", "restart")
NAMES = tuple(f"n{i}" for i in range(6))


class History:
    """What happened at the brick and what A was told, in virtual time."""

    def __init__(self, brick: MemBrick, a: MemClient, dg: bytes, fg: bytes) -> None:
        self.brick, self.dg, self.fg = brick, dg, fg
        self.f_floor = 0  # ctime (ns) of the latest change of f that A was told about
        self.x_floor = 0  # index of the latest user.k value A was told about
        self.created: dict[str, float] = {}  # name → when the create was applied
        self.unlinked: dict[str, float] = {}  # name → when the unlink was applied
        self.told_created: dict[str, float] = {}  # name → when A heard of d's change by its create
        self.told_unlinked: dict[str, float] = {}  # name → when A heard of its inode's unlink
        self.gfid_name: dict[bytes, str] = {}
        self._names_at: dict[int, set[str]] = {}  # d's ctime after a create → names it had then
        orig = brick.upcall

        def upcall(origin: int | None, gfid: bytes, flags: int, stat: Iatt | None = None,
                   parent: Iatt | None = None, oldparent: Iatt | None = None,
                   xattrs: dict[str, bytes] | None = None) -> None:
            if gfid == dg and stat is not None:
                d = brick.inodes[dg]
                self._names_at[stat.ctime * 10**9 + stat.ctime_nsec] = set(d.entries)
            orig(origin, gfid, flags, stat, parent, oldparent, xattrs)

        brick.upcall = upcall  # type: ignore[method-assign]
        a.subscribe_callbacks(self._told)

    def _told(self, proc: int, msg: object) -> None:
        if not isinstance(msg, F.CacheInvalidation):
            return
        now = trio.current_time()
        s = msg.stat
        if msg.gfid == self.fg and s.gfid == self.fg:
            self.f_floor = max(self.f_floor, s.ctime * 10**9 + s.ctime_nsec)
            v = msg.xdata.get("user.k")
            if v and v != b"\0":
                self.x_floor = max(self.x_floor, int(v[1:]))
        if msg.gfid == self.dg and s.gfid == self.dg:
            for n in self._names_at.get(s.ctime * 10**9 + s.ctime_nsec, ()):
                self.told_created.setdefault(n, now)
        n = self.gfid_name.get(msg.gfid)
        if n is not None and msg.flags & 0x1:
            self.told_unlinked.setdefault(n, now)


def ctime_ns(i: Iatt) -> int:
    return i.ctime * 10**9 + i.ctime_nsec


async def a_read(m: MdCache, h: History, what: str, name: str, check: list[str]) -> None:
    ts = trio.current_time()
    f_floor, x_floor = h.f_floor, h.x_floor
    told_c, told_u = h.told_created.get(name, 1e18), h.told_unlinked.get(name, 1e18)
    try:
        if what in ("stat", "lookup_f"):
            r = await (m.stat(h.fg) if what == "stat" else m.lookup(h.dg, "f"))
            assert r.stat is not None
            if ctime_ns(r.stat) < f_floor:
                check.append(f"{what} at {ts:.4f}: ctime {ctime_ns(r.stat)} older than the change A was told of "
                             f"({f_floor})")
        elif what == "getxattr":
            try:
                v = (await m.getxattr(h.fg, "user.k")).dict or {}
                idx = int(v["user.k"][1:])
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
                idx = 0
            if idx < x_floor:
                check.append(f"getxattr at {ts:.4f}: value {idx} older than the change A was told of ({x_floor})")
        elif what == "lookup_n":
            try:
                r = await m.lookup(h.dg, name)
                found = True
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
                found = False
            te = trio.current_time()
            if not found and told_c < ts and h.unlinked.get(name, 1e18) > te:
                check.append(f"lookup {name} at {ts:.4f}: ENOENT though A was told of its create at {told_c:.4f}")
            if found and told_u < ts:
                check.append(f"lookup {name} at {ts:.4f}: found though A was told of its unlink at {told_u:.4f}")
        else:
            o = await m.opendir(h.dg)
            assert o.fd is not None
            try:
                await m.readdirp(o.fd)
            finally:
                await m.releasedir(o.fd)
    except OSError as e:
        if e.errno not in (errno.ENOTCONN, errno.EBADFD, errno.EBADF):
            raise


async def b_change(b: MemClient, brick: MemBrick, h: History, what: str, name: str, n: int) -> None:
    try:
        if what == "write":
            o = await b.open(h.fg, os.O_RDWR)
            assert o.fd is not None
            try:
                await b.write(o.fd, n % 7, b"x" * (n % 5 + 1))
            finally:
                await b.release(o.fd)
        elif what == "truncate":
            await b.truncate(h.fg, n % 9)
        elif what == "chmod":
            await b.setattr(h.fg, Iatt(mode=0o600 | (n % 8)), SET_MODE)
        elif what == "setxattr":
            await b.setxattr(h.fg, {"user.k": f"v{n}".encode()})
        elif what == "create":
            if name not in h.created:
                g = new_gfid()
                h.gfid_name[g] = name
                h.created[name] = trio.current_time()  # applied within this call
                await b.mknod(h.dg, name, st.S_IFREG | 0o644, 0, g)
                h.created[name] = trio.current_time()
        elif what == "unlink":
            if name in h.created and name not in h.unlinked:
                h.unlinked[name] = trio.current_time()  # at the latest at the reply: checks use the earlier time
                await b.unlink(h.dg, name)
        elif what == "restart":
            brick.crash()
            await trio.sleep(0.01)
            brick.restart()
    except OSError as e:
        if e.errno not in (errno.ENOTCONN, errno.EBADFD, errno.EBADF, errno.ENOENT):
            raise


def run_interleaving(a_steps: list[tuple[str, str, float]], b_steps: list[tuple[str, str, float]],
                     upcall_delay: float) -> list[str]:
    problems: list[str] = []

    async def main() -> None:
        brick, m, b, _ = coherent(latency=0.01, upcall_delay=upcall_delay)
        async with trio.open_nursery() as nursery:
            await nursery.start(m.run)
            dg, fg = await tree(b)
            await b.setxattr(fg, {"user.k": b"v0"})
            h = History(brick, m.child, dg, fg)  # type: ignore[arg-type]
            await m.lookup(ROOT_GFID, "d")
            await m.lookup(dg, "f")

            async def side_a() -> None:
                for what, name, delay in a_steps:
                    await trio.sleep(delay)
                    await a_read(m, h, what, name, problems)

            async def side_b() -> None:
                for n, (what, name, delay) in enumerate(b_steps, 1):
                    await trio.sleep(delay)
                    if not b.is_up:
                        b.connect()
                    await b_change(b, brick, h, what, name, n)

            async with trio.open_nursery() as inner:
                inner.start_soon(side_a)
                inner.start_soon(side_b)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return problems


delays = st_.sampled_from([0.0, 0.001, 0.004, 0.0099, 0.013, 0.05, 0.2])


@hyp.settings(max_examples=300, deadline=None, suppress_health_check=list(hyp.HealthCheck))
@hyp.given(a_steps=st_.lists(st_.tuples(st_.sampled_from(A_READS), st_.sampled_from(NAMES), delays),
                             min_size=4, max_size=40),
           b_steps=st_.lists(st_.tuples(st_.sampled_from(B_OPS), st_.sampled_from(NAMES), delays),
                             min_size=2, max_size=25),
           upcall_delay=st_.sampled_from([0.0, 0.003, 0.02]))
def test_no_answer_is_older_than_a_change_the_brick_announced(a_steps: list[tuple[str, str, float]],
                                                              b_steps: list[tuple[str, str, float]],
                                                              upcall_delay: float) -> None:
    problems = run_interleaving(a_steps, b_steps, upcall_delay)
    assert not problems, "\n".join(problems)


async def test_a_name_lost_by_a_rename_is_not_answered_after_the_inode_is_cached_again(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    """Found on a live mount: after B's rename f → g, A's `ls` cached the inode again under g, and the old
    name f still led to it."""
    _brick, m, b, _ = coherent()
    await nursery.start(m.run)
    dg, fg = await tree(b)
    await m.lookup(ROOT_GFID, "d")
    await m.lookup(dg, "f")
    await b.rename(dg, "f", dg, "g")
    o = await m.opendir(dg)
    assert o.fd is not None
    await m.readdirp(o.fd)
    await m.releasedir(o.fd)
    assert m.cached(fg) is not None
    with pytest.raises(OSError) as e:
        await m.lookup(dg, "f")
    assert e.value.errno == errno.ENOENT
    assert (await m.lookup(dg, "g")).stat is not None


@pytest.mark.parametrize("invalidation", [False, True])
async def test_our_own_unlink_drops_the_victims_attributes(autojump_clock: trio.abc.Clock, nursery: trio.Nursery,
                                                           invalidation: bool) -> None:
    """Found by test_mount_posix: after unlinking one of three hard links, the others said nlink 3."""
    brick, m, b, _ = coherent(bricks_on=invalidation)
    await nursery.start(m.run)
    dg, fg = await tree(b)
    await m.lookup(ROOT_GFID, "d")
    await m.lookup(dg, "f")
    await m.link(fg, dg, "l1")
    await m.link(fg, dg, "l2")
    r = await m.lookup(dg, "l1")
    assert r.stat is not None and r.stat.nlink == 3
    await m.unlink(dg, "f")
    assert (await m.stat(fg)).stat == brick.inode("d/l1").iatt()  # type: ignore[union-attr]
    await m.rename(dg, "l2", dg, "l1")  # over another name of the same inode: nothing changes
    await m.unlink(dg, "l1")
    with pytest.raises(OSError):
        await m.lookup(dg, "l1")


async def test_over_distribute_creates_in_a_listed_directory_are_seen(autojump_clock: trio.abc.Clock,
                                                                       nursery: trio.Nursery) -> None:
    """A directory's changes come from the subvolume its names hash to (the upcall too): A listed D from its
    parent (subvolume 0) and missed names on both subvolumes; B's creates on either must drop A's negative
    entries and D's attributes. (md-cache also counts a directory as registered only after a fop that reached
    every subvolume: a lookup, stat or opendir of it, never its parent's listing or an entry fop in it.)"""
    from gfuse.xlators.distribute import Distribute

    bricks = [MemBrick(f"v-client-{i}", cache_invalidation=True, cache_invalidation_timeout=600) for i in range(2)]
    a = [x.client() for x in bricks]
    bd = Distribute("v-dht", [x.client() for x in bricks])

    async def probe() -> tuple[bool, float]:
        return True, 600.0

    m = MdCache(Distribute("v-dht", a), options=CacheOptions(timeout=600, invalidation=True, negative_timeout=60),
                bricks=a, probe=probe)
    await nursery.start(m.run)
    dg = new_gfid()
    await bd.mkdir(ROOT_GFID, "D", st.S_IFDIR | 0o755, dg)
    o = await m.opendir(ROOT_GFID)
    assert o.fd is not None
    await m.readdirp(o.fd)  # D's attributes from subvolume 0's listing
    await m.releasedir(o.fd)
    names = [f"x{i}" for i in range(12)]
    for n in names:
        with pytest.raises(OSError):
            await m.lookup(dg, n)  # misses, on the subvolume each name hashes to
    await trio.sleep(1)
    for n in names:
        await bd.mknod(dg, n, st.S_IFREG | 0o644, 0, new_gfid())
    for n in names:
        assert (await m.lookup(dg, n)).stat is not None, f"stale negative entry {n}"
    want = (await bd.stat(dg)).stat
    got = (await m.stat(dg)).stat
    assert want is not None and got is not None
    assert (got.mtime, got.mtime_nsec) == (want.mtime, want.mtime_nsec), "D's times are from before B's creates"


async def test_the_rest_of_a_listing_page_is_answered_from_it_until_something_changes(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    """The FUSE bridge asks for a page, the kernel takes part of it and asks again from inside it: the rest
    comes from the page (no brick call, no second fill), unless an invalidation came in between."""
    brick, m, b, _ = coherent()
    await nursery.start(m.run)
    dg, fd = await open_dir_of_files(b, m, 20)
    first = (await m.readdirp(fd)).entries
    n = brick.calls["readdirp"]
    rest = (await m.readdirp(fd, first[5].off)).entries
    assert brick.calls["readdirp"] == n and [e.name for e in rest] == [e.name for e in first[6:]]
    await b.unlink(dg, "n10")  # A listed n10: the brick tells it (NLINK on n10, with its parent)
    rest = (await m.readdirp(fd, first[5].off)).entries
    assert brick.calls["readdirp"] > n, "a page older than an invalidation was answered"
    assert "n10" not in [e.name for e in rest]
    await m.releasedir(fd)


# ---------------------------------------------------------------------------------------------------------------
# The kernel's readdir cache (FOPEN_CACHE_DIR): at each opendir md-cache says whether the listing the kernel
# cached may be kept (listing_unchanged). In-memory brick, virtual time; m.wall is the virtual clock too (the
# brick's times come from it).

LAST_LISTING: list[F.DirEntry] = []


async def _listed(m: MdCache, dg: bytes) -> bool:
    """An opendir + full listing as the FUSE bridge does it; what listing_unchanged said at the open (the
    entries are left in LAST_LISTING)."""
    o = await m.opendir(dg)
    assert o.fd is not None
    keep = await m.listing_unchanged(dg, o.fd)
    off = 0
    LAST_LISTING.clear()
    while True:
        ents = (await m.readdirp(o.fd, off)).entries
        if not ents:
            break
        LAST_LISTING.extend(ents)
        off = ents[-1].off
    await m.releasedir(o.fd)
    return keep


def _names() -> list[str]:
    return sorted(e.name for e in LAST_LISTING if e.name not in (".", ".."))


async def _listing_tree(b: MemClient) -> tuple[bytes, bytes, bytes]:
    """d with f0..f4 and e (never touched by A) with x, y; made by B."""
    dg, eg, xg = new_gfid(), new_gfid(), new_gfid()
    await b.mkdir(ROOT_GFID, "d", 0o755, dg)
    await b.mkdir(ROOT_GFID, "e", 0o755, eg)
    for i in range(5):
        await b.mknod(dg, f"f{i}", st.S_IFREG | 0o644, 0, new_gfid())
    await b.mknod(eg, "x", st.S_IFREG | 0o644, 0, xg)
    return dg, eg, xg


LISTING_CHANGES: dict[str, Callable[[MemClient, bytes, bytes, bytes], Awaitable[object]]] = {
    "create": lambda b, d, e, x: b.create(d, "new", os.O_RDWR, 0o644, new_gfid()),
    "mkdir": lambda b, d, e, x: b.mkdir(d, "sub", 0o755, new_gfid()),
    "unlink": lambda b, d, e, x: b.unlink(d, "f1"),
    "rename-within": lambda b, d, e, x: b.rename(d, "f1", d, "g1"),
    "rename-out": lambda b, d, e, x: b.rename(d, "f1", e, "f1"),
    # the bricks tell nobody of these but clients registered on x, and A never touched x (CACHING.md §1)
    "rename-in-untouched": lambda b, d, e, x: b.rename(e, "x", d, "x"),
    "link-in-untouched": lambda b, d, e, x: b.link(x, d, "x"),
}


@pytest.mark.parametrize("change", sorted(LISTING_CHANGES))
async def test_a_cached_listing_is_kept_until_another_client_changes_the_directory(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery, change: str) -> None:
    _, m, b, k = coherent()
    m.wall = trio.current_time
    await nursery.start(m.run)
    dg, eg, xg = await _listing_tree(b)
    await m.lookup(ROOT_GFID, "d")
    await trio.sleep(10)
    assert not await _listed(m, dg), "no listing was cached yet"
    for _ in range(3):
        await trio.sleep(5)
        assert await _listed(m, dg), "an unchanged directory's listing was not kept"
    k.changed.clear()
    before = _names()
    await LISTING_CHANGES[change](b, dg, eg, xg)
    await trio.sleep(0.01)
    assert not await _listed(m, dg), f"after B's {change} the kernel kept its old listing of d"
    want = sorted(e.name for e in (await b.readdirp((await b.opendir(dg)).need_fd())).entries
                  if e.name not in (".", ".."))
    assert _names() == want != before, f"after B's {change} md-cache listed {_names()}"
    if not change.endswith("untouched"):
        assert (dg, True) in k.changed, "the upcall did not drop the kernel's cached listing of d"
    await trio.sleep(5)
    assert not await _listed(m, dg), "a stamp taken right after a change vouched for the next listing"
    assert await _listed(m, dg), "the listing was not kept again once the directory had settled"


async def test_our_own_entry_ops_and_a_brick_restart_drop_the_vouching(autojump_clock: trio.abc.Clock,
                                                                        nursery: trio.Nursery) -> None:
    _, m, b, _ = coherent()
    m.wall = trio.current_time
    await nursery.start(m.run)
    dg, _, _ = await _listing_tree(b)
    await m.lookup(ROOT_GFID, "d")
    await trio.sleep(10)
    await _listed(m, dg)
    assert await _listed(m, dg)
    await m.mknod(dg, "ours", st.S_IFREG | 0o644, 0, new_gfid())
    assert not await _listed(m, dg), "our own mknod in d kept the listing"
    await trio.sleep(10)
    await _listed(m, dg)
    assert await _listed(m, dg)
    m.drop_all("a brick restarted")
    assert not await _listed(m, dg), "a listing outlived a brick restart"


async def test_no_listing_is_vouched_for_without_coherence(autojump_clock: trio.abc.Clock,
                                                           nursery: trio.Nursery) -> None:
    _, m, b, _ = coherent(bricks_on=False)
    m.wall = trio.current_time
    await nursery.start(m.run)
    assert not m.coherent
    dg, _, _ = await _listing_tree(b)
    await trio.sleep(10)
    for _ in range(3):
        assert not await _listed(m, dg)
        await trio.sleep(5)


async def test_a_vouched_listing_is_answered_from_md_cache_with_current_attributes(
        autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    """After drop_caches the kernel asks again though md-cache vouched for the listing: md-cache answers it
    (no brick READDIRP), each entry with the attributes it holds now; a changed entry sends it to the bricks."""
    brick, m, b, _ = coherent()
    m.wall = trio.current_time
    await nursery.start(m.run)
    dg, _, _ = await _listing_tree(b)
    await m.lookup(ROOT_GFID, "d")
    await trio.sleep(10)
    await _listed(m, dg)
    first = list(LAST_LISTING)
    n = brick.calls["readdirp"]
    assert await _listed(m, dg)
    assert brick.calls["readdirp"] == n, "a vouched listing was read from the bricks again"
    assert [(e.name, e.stat) for e in LAST_LISTING] == [(e.name, e.stat) for e in first]
    f2 = brick.inode("d/f2")
    assert f2 is not None
    await b.setattr(f2.gfid, Iatt(mode=0o600), SET_MODE)  # B's chmod: an upcall drops A's attributes of f2
    stats = brick.calls["stat"]
    assert await _listed(m, dg), "a chmod of an entry is no change of the directory"
    assert brick.calls["readdirp"] == n and brick.calls["stat"] > stats, \
        "the entry whose attributes changed was not asked for again"
    got = {e.name: e.stat for e in LAST_LISTING}
    assert got["f2"] is not None and got["f2"].mode & 0o777 == 0o600, "stale attributes in a kept listing"
    assert _names() == [f"f{i}" for i in range(5)]


async def test_the_next_page_is_read_ahead_and_dropped_by_an_invalidation(autojump_clock: trio.abc.Clock,
                                                                           nursery: trio.Nursery) -> None:
    brick, m, b, _ = coherent(latency=0.01)
    await nursery.start(m.run)
    dg, fd = await open_dir_of_files(b, m, 30)
    first = (await m.readdirp(fd, 0, 600)).entries
    await trio.sleep(0.1)  # the kernel takes its time with the page: the next one arrives meanwhile
    n = brick.calls["readdirp"]
    t0 = trio.current_time()
    second = (await m.readdirp(fd, first[-1].off, 600)).entries
    assert trio.current_time() == t0 and brick.calls["readdirp"] == n, "the next page was not read ahead"
    assert second and second[0].name not in [e.name for e in first]
    await trio.sleep(0.1)
    victim = second[-1].name  # the page after it was read ahead before B removes a name in the directory
    await b.unlink(dg, "n00" if victim != "n00" else "n01")
    third = (await m.readdirp(fd, second[-1].off, 600)).entries
    assert trio.current_time() > t0, "a page read ahead before the directory changed was answered"
    want = [e.name for e in (await b.readdirp((await b.opendir(dg)).need_fd(), second[-1].off, 600)).entries]
    assert [e.name for e in third] == want
    await m.releasedir(fd)


async def test_kept_listings_are_bounded_in_entries(autojump_clock: trio.abc.Clock, nursery: trio.Nursery,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import gfuse.xlators.mdcache as mdc
    monkeypatch.setattr(mdc, "LISTING_TOTAL", 12)
    _, m, b, _ = coherent()
    m.wall = trio.current_time
    await nursery.start(m.run)
    dirs = []
    for d in ("a", "b"):
        dg = new_gfid()
        await b.mkdir(ROOT_GFID, d, 0o755, dg)
        for i in range(6):
            await b.mknod(dg, f"n{i}", st.S_IFREG | 0o644, 0, new_gfid())
        dirs.append(dg)
    await trio.sleep(10)
    for dg in dirs:
        await _listed(m, dg)
    assert list(m._listings) == [dirs[1]], "more entries kept than LISTING_TOTAL"
