"""The md-cache layer over an in-memory brick: the stat after an entry change comes from its reply.

As tests/cluster/test_mount_mdcache.py: the answers are the brick's own attributes after the change
(never older), changes that entry replies do not describe drop them, and they expire after the TTL.
"""

from __future__ import annotations

import errno
import os
import stat as st
from collections.abc import Awaitable, Callable

import pytest
import trio

from gfuse.cred import new_gfid
from gfuse.dicts import UInt
from gfuse.fops import Result
from gfuse.iatt import ROOT_GFID, SET_MODE, Iatt
from gfuse.xlators.mdcache import MdCache
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
