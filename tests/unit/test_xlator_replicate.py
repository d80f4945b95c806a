"""cluster/replicate over in-memory bricks, in virtual time: quorum, blame, eager lock, reads, entries, locks.

The same behaviours as the real-brick tests in tests/cluster/test_mount_faults.py,
test_mount_stale_replica.py and test_mount_locks.py, asserted on the bricks' changelogs the way
gluster's self-heal daemon reads them (``trusted.afr.VOL-client-N`` = data/metadata/entry counts).
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings

from gfuse import fops as F
from gfuse.cred import new_gfid, now_cred
from gfuse.fops import Flock
from gfuse.iatt import ROOT_GFID
from gfuse.xlators.api import ZEROFILL_KEEP_SIZE
from gfuse.xlators.replicate import DIRTY, EAGER_DELAY, Replicate
from testkit.membrick import MemBrick, MemClient, replica_set

VOL = "v"
DOMAIN = f"{VOL}-replicate-0"
KiB = 1024


def blame(k: int) -> str:
    return f"trusted.afr.{VOL}-client-{k}"


def chunk(i: int, size: int = 4 * KiB) -> bytes:
    return bytes([65 + i % 26]) * size


@dataclass
class Afr:
    bricks: list[MemBrick]
    clients: list[MemClient]
    r: Replicate
    nursery: trio.Nursery

    async def mount(self) -> Replicate:
        """Another client (a second mount) of the same bricks, running until the test ends."""
        r2 = Replicate(DOMAIN, [b.client() for b in self.bricks])
        await self.nursery.start(r2.run)
        return r2


@asynccontextmanager
async def afr(n: int = 3) -> AsyncIterator[Afr]:
    bricks, clients = replica_set(VOL, n)
    r = Replicate(DOMAIN, clients)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        yield Afr(bricks, clients, r, nursery)
        nursery.cancel_scope.cancel()


async def settle() -> None:
    """Let background unlocks finish (far less than the eager-lock delay)."""
    await trio.sleep(0.01)


async def new_file(r: Replicate, name: str) -> tuple[bytes, int]:
    g = new_gfid()
    c = await r.create(ROOT_GFID, name, os.O_RDWR, 0o644, g)
    assert c.fd is not None
    await settle()
    return g, c.fd


def assert_clean(b: MemBrick, path: str) -> None:
    assert b.pending(path) == {}, f"{b.name}: {path} has changelogs {b.pending(path)}"


# ------------------------------------------------------------------------------------------ happy path


async def test_a_write_reaches_every_replica_and_leaves_no_changelog(autojump_clock: trio.abc.Clock) -> None:
    async with afr() as a:
        _, fd = await new_file(a.r, "f")
        assert (await a.r.write(fd, 0, chunk(0))).ret == 4 * KiB
        await a.r.release(fd)
        await settle()
        for b in a.bricks:
            assert b.data("f") == chunk(0)
            assert_clean(b, "f")
            assert b.locks_held() == 0, f"{b.name} still holds a lock"


# ------------------------------------------------------------------------------------------ quorum


async def test_two_of_three_down_refuses_every_change_and_loses_nothing(autojump_clock: trio.abc.Clock) -> None:
    """As test_mount_faults' quorum tests: writes, creates and mkdirs fail with ENOTCONN, the refused
    write reaches no brick, what was acknowledged is intact and readable, writes work again after."""
    async with afr() as a:
        g, fd = await new_file(a.r, "q")
        acked = b""
        for i in range(4):
            n = (await a.r.write(fd, len(acked), chunk(i))).ret
            acked += chunk(i)[:n]
        a.bricks[1].crash()
        a.bricks[2].crash()
        for call in (lambda: a.r.write(fd, len(acked), chunk(4)),
                     lambda: a.r.create(ROOT_GFID, "new", os.O_RDWR, 0o644, new_gfid()),
                     lambda: a.r.mkdir(ROOT_GFID, "newdir", 0o755, new_gfid()),
                     lambda: a.r.setxattr(g, {"user.x": b"1"})):
            with pytest.raises(OSError) as e:
                await call()
            assert e.value.errno == errno.ENOTCONN, e.value
        assert a.bricks[0].data("q") == acked, "a write refused for lack of quorum reached the surviving brick"
        assert not a.bricks[0].exists("new") and not a.bricks[0].exists("newdir")
        assert a.bricks[0].xattr("q", "user.x") is None
        assert (await a.r.read(fd, 0, 1 << 20)).data == acked
        for b in a.bricks[1:]:
            assert b.data("q") == acked  # they had everything acknowledged before they died
        await a.r.release(fd)

        a.bricks[1].restart()
        a.bricks[2].restart()
        o = await a.r.open(g, os.O_RDWR)
        assert o.fd is not None
        assert (await a.r.write(o.fd, len(acked), b"after")).ret == 5
        await a.r.release(o.fd)
        await settle()
        for b in a.bricks:
            assert b.data("q") == acked + b"after"


async def test_one_of_three_down_keeps_writing(autojump_clock: trio.abc.Clock) -> None:
    async with afr() as a:
        _, fd = await new_file(a.r, "f")
        a.bricks[2].crash()
        assert (await a.r.write(fd, 0, chunk(0))).ret == 4 * KiB
        assert (await a.r.read(fd, 0, 100)).data == chunk(0)[:100]


# ------------------------------------------------------------------------------------------ blame


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC, errno.EDQUOT])
async def test_a_write_failing_on_one_replica_is_blamed_by_the_others(autojump_clock: trio.abc.Clock,
                                                                      err: int) -> None:
    async with afr() as a:
        g, fd = await new_file(a.r, "f")
        _, clean = await new_file(a.r, "clean")
        await a.r.write(clean, 0, chunk(9))
        await a.r.release(clean)
        await a.r.write(fd, 0, chunk(0))
        a.bricks[1].fail("write", err)
        assert (await a.r.write(fd, 4 * KiB, chunk(1))).ret == 4 * KiB  # two of three took it
        assert (await a.r.write(fd, 8 * KiB, chunk(2))).ret == 4 * KiB
        await a.r.fsync(fd)
        for i in (0, 2):
            b = a.bricks[i]
            assert b.changelog("f", blame(1))[0] > 0, f"{b.name} does not blame client-1: {b.pending('f')}"
            assert b.changelog("f", DIRTY) == (0, 0, 0)
            assert b.changelog("f", blame(0)) == b.changelog("f", blame(2)) == (0, 0, 0)
            assert b.data("f") == chunk(0) + chunk(1) + chunk(2)
            assert b.heal_pending() == {g}, "heal info must list exactly the file that missed a write"
        # it lacks the write it failed (a later transaction may reach it again, as in AFR: it stays blamed)
        assert a.bricks[1].data("f")[:8 * KiB] == chunk(0) + bytes(4 * KiB)


async def test_brick_killed_mid_write_is_blamed_by_the_survivors(autojump_clock: trio.abc.Clock) -> None:
    """test_mount_faults' kill-mid-write: the write goes on, survivors blame client-1 for data only."""
    async with afr() as a:
        g, fd = await new_file(a.r, "big")
        for i in range(8):
            await a.r.write(fd, i * 4 * KiB, chunk(i))
        a.bricks[1].crash_on("write")  # dies as the next write reaches it
        for i in range(8, 16):
            assert (await a.r.write(fd, i * 4 * KiB, chunk(i))).ret == 4 * KiB
        await a.r.release(fd)
        await settle()
        whole = b"".join(chunk(i) for i in range(16))
        for i in (0, 2):
            b = a.bricks[i]
            data, meta, entry = b.changelog("big", blame(1))
            assert data > 0 and meta == 0 and entry == 0, b.pending("big")
            assert b.changelog("big", DIRTY) == (0, 0, 0)
            assert b.data("big") == whole
            assert b.heal_pending() == {g}
        stale = a.bricks[1].data("big")
        assert stale == whole[:len(stale)] and len(stale) == 8 * 4 * KiB


async def test_a_hung_brick_is_dropped_after_ping_timeout_and_blamed(autojump_clock: trio.abc.Clock) -> None:
    """test_mount_faults' SIGSTOP: the write waits one ping-timeout (42 s, virtual), then succeeds on the
    two others; the hung brick is blamed and comes back as a new connection after SIGCONT."""
    async with afr() as a:
        _, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, chunk(0))
        gen = a.clients[1].generation
        a.bricks[1].stop()
        t0 = trio.current_time()
        assert (await a.r.write(fd, 4 * KiB, chunk(1))).ret == 4 * KiB
        waited = trio.current_time() - t0
        assert 41 < waited < 43, f"the write waited {waited:.1f} s"
        assert not a.clients[1].is_up
        await a.r.release(fd)
        for i in (0, 2):
            assert a.bricks[i].changelog("f", blame(1))[0] > 0
        a.bricks[1].cont()
        assert a.clients[1].is_up and a.clients[1].generation == gen + 1
        assert a.bricks[1].data("f") == chunk(0)


async def test_reads_come_from_replicas_nobody_blames(autojump_clock: trio.abc.Clock) -> None:
    """A replica that missed writes and came back is never read (by this or a fresh client)."""
    async with afr() as a:
        g, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, b"old")
        a.bricks[1].crash()
        await a.r.write(fd, 0, b"new-data")
        await a.r.release(fd)
        await settle()
        a.bricks[1].restart()
        assert a.bricks[1].data("f") == b"old"
        r2 = await a.mount()
        await r2.lookup(ROOT_GFID, "f")
        o = await r2.open(g, os.O_RDONLY)
        assert o.fd is not None
        got = {(await r2.read(o.fd, 0, 100)).data for _ in range(12)}
        assert got == {b"new-data"}, f"reads returned {got}"


async def test_the_writer_does_not_read_a_replica_that_missed_its_writes(autojump_clock: trio.abc.Clock) -> None:
    async with afr() as a:
        g, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, b"old")
        a.bricks[1].crash()
        await a.r.write(fd, 0, b"new-data")
        await a.r.release(fd)
        await settle()
        a.bricks[1].restart()
        sizes = {(await a.r.stat(g)).stat.size for _ in range(6)}  # type: ignore[union-attr]
        assert sizes == {8}, f"stat sizes seen: {sizes} (brick 1 still has the 3-byte copy)"


# ------------------------------------------------------------------------------------------ eager lock


async def test_eager_lock_takes_one_lock_and_one_pre_op_for_many_writes(autojump_clock: trio.abc.Clock) -> None:
    async with afr() as a:
        _, fd = await new_file(a.r, "f")
        for b in a.bricks:
            b.calls.clear()
        for i in range(20):
            await a.r.write(fd, i * 4 * KiB, chunk(i))
        for b in a.bricks:
            assert b.calls["finodelk"] == 1 and b.calls["fxattrop"] == 1 and b.calls["write"] == 20, b.calls
            assert b.changelog("f", DIRTY)[0] == 1, "the post-op is delayed while the lock is kept"
            assert b.locks_held(DOMAIN) == 1


async def _release_by(a: Afr, how: str, g: bytes, fd: int) -> None:
    if how == "idle":
        await trio.sleep(EAGER_DELAY * 1.5)
    elif how == "fsync":
        await a.r.fsync(fd)
    elif how == "flush":
        await a.r.flush(fd)
    elif how == "close":
        await a.r.release(fd)
    elif how == "setattr":
        await a.r.setxattr(g, {"user.k": b"v"})  # another modification of the inode
    elif how == "truncate":
        await a.r.ftruncate(fd, 4 * KiB)
    elif how == "contention":
        r2 = await a.mount()
        o = await r2.open(g, os.O_RDWR)
        assert o.fd is not None
        t0 = trio.current_time()
        await r2.write(o.fd, 0, b"second")
        assert trio.current_time() - t0 < EAGER_DELAY, "the other client waited for the idle timer"
        await r2.release(o.fd)
    else:
        raise AssertionError(how)
    await settle()


@pytest.mark.parametrize("how", ["idle", "fsync", "flush", "close", "setattr", "truncate", "contention"])
async def test_delayed_post_op_is_released(autojump_clock: trio.abc.Clock, how: str) -> None:
    async with afr() as a:
        g, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, chunk(0))
        await a.r.write(fd, 4 * KiB, chunk(1))
        assert all(b.locks_held(DOMAIN) == 1 for b in a.bricks)
        await _release_by(a, how, g, fd)
        for b in a.bricks:
            assert b.locks_held(DOMAIN) == 0, f"{how}: {b.name} still holds the eager lock"
            assert b.changelog("f", DIRTY) == (0, 0, 0), f"{how}: dirty left on {b.name}"
            assert_clean(b, "f")
        expected = {"truncate": chunk(0), "contention": b"second" + (chunk(0) + chunk(1))[6:]}
        assert {b.data("f") for b in a.bricks} == {expected.get(how, chunk(0) + chunk(1))}


# ------------------------------------------------------------------------------------------ entries


async def test_entry_ops_with_a_brick_down_are_recorded_for_heal(autojump_clock: trio.abc.Clock) -> None:
    async with afr() as a:
        a.bricks[2].crash()
        d = new_gfid()
        await a.r.mkdir(ROOT_GFID, "d", 0o755, d)
        c = await a.r.create(d, "f", os.O_RDWR, 0o644, new_gfid())
        assert c.fd is not None
        await a.r.release(c.fd)
        await settle()
        for b in a.bricks[:2]:
            assert b.changelog("", blame(2))[2] > 0, b.pending("")
            assert b.changelog("d", blame(2))[2] > 0, b.pending("d")
            assert "d" in b.entry_index[ROOT_GFID] and "f" in b.entry_index[d], b.entry_index
            assert b.changelog("", DIRTY) == (0, 0, 0)
        a.bricks[2].restart()
        r2 = await a.mount()
        found = await r2.lookup(ROOT_GFID, "d")
        assert found.stat is not None and found.stat.gfid == d


async def test_a_name_removed_while_a_replica_was_down_stays_removed(autojump_clock: trio.abc.Clock) -> None:
    """test_mount_stale_replica: the replica that missed the unlink still has the name; nobody sees it."""
    async with afr() as a:
        _, fd = await new_file(a.r, "gone")
        await a.r.release(fd)
        await settle()
        a.bricks[2].crash()
        await a.r.unlink(ROOT_GFID, "gone")
        a.bricks[2].restart()
        assert a.bricks[2].exists("gone")
        r2 = await a.mount()
        with pytest.raises(OSError) as e:
            await r2.lookup(ROOT_GFID, "gone")
        assert e.value.errno == errno.ENOENT


# ------------------------------------------------------------------------------------------ POSIX locks


def _owner(n: int) -> tuple[bytes, Flock]:
    owner = n.to_bytes(8, "little")
    return owner, Flock(F.WRLCK, 0, 0, 0, n, owner)


async def test_a_posix_lock_is_refused_to_another_client_until_closed(autojump_clock: trio.abc.Clock) -> None:
    async with afr() as a:
        g, fd1 = await new_file(a.r, "l")
        r2 = await a.mount()
        fd2 = (await r2.open(g, os.O_RDWR)).fd
        assert fd2 is not None
        o1, l1 = _owner(1)
        o2, l2 = _owner(2)
        await a.r.lk(fd1, F.SETLK, l1, cred=now_cred(lk_owner=o1))
        with pytest.raises(OSError) as e:
            await r2.lk(fd2, F.SETLK, l2, cred=now_cred(lk_owner=o2))
        assert e.value.errno == errno.EAGAIN
        probe = await r2.lk(fd2, F.GETLK, l2, cred=now_cred(lk_owner=o2))
        assert probe.flock is not None and probe.flock.type == F.WRLCK
        await a.r.flush(fd1, cred=now_cred(lk_owner=o1))  # close() drops the owner's locks
        await r2.lk(fd2, F.SETLK, l2, cred=now_cred(lk_owner=o2))


async def test_posix_locks_are_granted_again_on_a_restarted_replica(autojump_clock: trio.abc.Clock) -> None:
    """test_mount_locks' restarts: after bricks 1 and 2 each restart (forgetting every lock) and brick 0
    dies, another client must still be refused the lock."""
    async with afr() as a:
        g, fd1 = await new_file(a.r, "l")
        r2 = await a.mount()
        fd2 = (await r2.open(g, os.O_RDWR)).fd
        assert fd2 is not None
        o1, l1 = _owner(1)
        await a.r.lk(fd1, F.SETLK, l1, cred=now_cred(lk_owner=o1))
        for k in (1, 2):
            a.bricks[k].crash()
            a.bricks[k].restart()
            await settle()
            assert a.bricks[k].posix_locks.get(g), f"the lock was not granted again on brick {k}"
        a.bricks[0].crash()
        o2, l2 = _owner(2)
        with pytest.raises(OSError) as e:
            await r2.lk(fd2, F.SETLK, l2, cred=now_cred(lk_owner=o2))
        assert e.value.errno == errno.EAGAIN


# ------------------------------------------------------------------------------------------ issue 14: the engine
# One test per item of issue 14 that concerns replicate (the real-brick ones are in
# tests/cluster/test_replicate_integrity.py); each failed on the translator before the transaction redesign.


async def test_a_write_racing_an_fsync_is_covered_by_the_post_op(autojump_clock: trio.abc.Clock) -> None:
    """Item 1: a write that waited for the eager lock while an fsync released it must not run after the
    post-op: it is acknowledged only if the replica it missed is blamed. Many interleavings (latencies)."""
    for run in range(60):
        async with afr() as a:
            g, fd = await new_file(a.r, "f")
            await a.r.write(fd, 0, chunk(0))
            await a.r.release(fd)
            await settle()
            for k, b in enumerate(a.bricks):
                b.latency = (lambda fop, k=k, run=run: 0.001 * ((run * 7 + k * 3 + len(fop)) % 5))
            o = await a.r.open(g, os.O_RDWR)
            assert o.fd is not None
            a.bricks[1].fail("write", errno.EIO)
            acked: list[int] = []

            async def write(i: int, fd: int = o.fd, run: int = run, acked: list[int] = acked) -> None:
                await trio.sleep(0.0005 * ((run + i) % 4))
                acked.append((await a.r.write(fd, 4 * KiB * i, chunk(i))).ret)

            async def fsync(fd: int = o.fd, run: int = run) -> None:
                await trio.sleep(0.0005 * (run % 3))
                await a.r.fsync(fd)

            async with trio.open_nursery() as n:
                n.start_soon(write, 1)
                n.start_soon(fsync)
                n.start_soon(write, 2)
            assert acked == [4 * KiB, 4 * KiB]
            for b in a.bricks:
                b.latency = 0.0
            if a.bricks[1].data("f") != a.bricks[0].data("f"):
                for i in (0, 2):
                    assert a.bricks[i].changelog("f", blame(1))[0] > 0, f"run {run}: {a.bricks[i].pending('f')}"
            await a.r.release(o.fd)


async def test_the_blame_is_on_disk_before_the_failed_write_returns(autojump_clock: trio.abc.Clock) -> None:
    """Item 2 (it did not reproduce with real bricks at first; it does here, in virtual time): a writer that
    never pauses (4 KiB every 200 ms) kept the blame of a dead brick in memory only. The survivors' changelog
    must name it as soon as the first write that missed it returns."""
    async with afr() as a:
        _, fd = await new_file(a.r, "busy")
        for i in range(5):
            await a.r.write(fd, i * 4 * KiB, chunk(i))
            await trio.sleep(0.2)
        a.bricks[2].crash()
        await a.r.write(fd, 5 * 4 * KiB, chunk(5))
        for i in (0, 1):
            assert a.bricks[i].changelog("busy", blame(2))[0] > 0, a.bricks[i].pending("busy")
        for i in range(6, 12):
            await trio.sleep(0.2)
            await a.r.write(fd, i * 4 * KiB, chunk(i))
        assert a.bricks[0].changelog("busy", DIRTY)[0] == 1, "the eager lock goes on (no release per write)"
        await a.r.release(fd)


async def test_an_fd_opened_while_a_replica_was_down_is_opened_there_first(autojump_clock: trio.abc.Clock) -> None:
    """Item 3: fd2 opened with brick 2 down has no handle there; once it is back, a write through fd2 is
    written there too (AFR's fix-open), not skipped with nobody blaming it."""
    async with afr() as a:
        g, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, bytes(8 * KiB))
        await a.r.release(fd)
        await settle()
        a.bricks[2].crash()
        fd2 = (await a.r.open(g, os.O_RDWR)).fd
        a.bricks[2].restart()
        fd1 = (await a.r.open(g, os.O_RDWR)).fd
        assert fd1 is not None and fd2 is not None
        await a.r.write(fd1, 0, b"a" * 4 * KiB)
        await a.r.write(fd2, 4 * KiB, b"b" * 4 * KiB)
        await a.r.release(fd1)
        await a.r.release(fd2)
        await settle()
        assert {b.data("f") for b in a.bricks} == {b"a" * 4 * KiB + b"b" * 4 * KiB}
        for b in a.bricks:
            assert_clean(b, "f")


async def test_an_fd_that_cannot_be_opened_on_a_replica_gets_it_blamed(autojump_clock: trio.abc.Clock) -> None:
    """Item 3, the other way out: the replica is up but the open there fails: the write is blamed."""
    async with afr() as a:
        g, fd = await new_file(a.r, "f")
        await a.r.release(fd)
        await settle()
        a.bricks[2].crash()
        fd2 = (await a.r.open(g, os.O_RDWR)).fd
        assert fd2 is not None
        a.bricks[2].restart()
        a.bricks[2].fail("open", errno.EIO, times=None)
        await a.r.write(fd2, 0, b"b" * 4 * KiB)
        for i in (0, 1):
            assert a.bricks[i].changelog("f", blame(2))[0] > 0, a.bricks[i].pending("f")
        a.bricks[2].clear_faults()
        await a.r.release(fd2)


async def test_a_lookup_during_the_eager_window_keeps_the_stale_replica_unread(autojump_clock: trio.abc.Clock) -> None:
    """Item 4: re-learning readability from the disks (a lookup) while the writer holds the eager lock must
    not make the replica that missed writes readable again; nor may its restart."""
    async with afr() as a:
        g, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, b"old")
        a.bricks[1].crash()
        await a.r.write(fd, 0, b"new-data")
        a.bricks[1].restart()
        await a.r.lookup(ROOT_GFID, "f")
        for _ in range(6):
            assert (await a.r.read(fd, 0, 100)).data == b"new-data"
            assert (await a.r.stat(g)).stat.size == 8  # type: ignore[union-attr]
        await a.r.release(fd)


async def test_arbiter_is_never_read_and_keeps_no_data(autojump_clock: trio.abc.Clock) -> None:
    """Item 5: on replica 3 arbiter 1 reads, stats and the reply of a write come from data bricks; the
    arbiter gets one byte per write (as AFR sends it) and stores nothing."""
    bricks, clients = replica_set(VOL, 3, arbiter=True)
    r = Replicate(DOMAIN, clients, arbiter=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        g, fd = await new_file(r, "f")
        w = await r.write(fd, 0, chunk(0))
        assert w.ret == 4 * KiB and w.post is not None and w.post.size == 4 * KiB
        for _ in range(9):
            assert (await r.read(fd, 0, 8 * KiB)).data == chunk(0)
            assert (await r.stat(g)).stat.size == 4 * KiB  # type: ignore[union-attr]
            found = await r.lookup(ROOT_GFID, "f")
            assert found.stat is not None and found.stat.size == 4 * KiB
        await r.release(fd)
        await settle()
        assert bricks[0].data("f") == bricks[1].data("f") == chunk(0) and bricks[2].data("f") == b""
        assert bricks[2].calls["read"] == 0
        for b in bricks:
            assert_clean(b, "f")
        nursery.cancel_scope.cancel()


async def test_statfs_is_not_served_from_the_arbiter(autojump_clock: trio.abc.Clock) -> None:
    """df on replica 3 arbiter 1 tells the data bricks' space: an arbiter is usually a small brick (it keeps
    no data) and AFR never asks it for statfs; with only the arbiter up, statfs is ENOTCONN."""
    bricks, clients = replica_set(VOL, 3, arbiter=True, capacity=1 << 30)
    bricks[2].capacity = 1 << 20
    r = Replicate(DOMAIN, clients, arbiter=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        sf = (await r.statfs()).statfs
        assert sf is not None and sf.blocks * sf.frsize == 1 << 30
        bricks[0].crash()
        bricks[1].crash()
        await settle()
        with pytest.raises(OSError) as exc:
            await r.statfs()
        assert exc.value.errno == errno.ENOTCONN
        nursery.cancel_scope.cancel()


async def test_arbiter_refuses_a_write_only_it_and_a_stale_brick_would_take(autojump_clock: trio.abc.Clock) -> None:
    """Item 5, arbitration: brick 1 missed writes (blamed), then brick 0 — the only good data — dies. A write
    to brick 1 and the arbiter would make the arbiter the only witness of good data: refused (ENOTCONN), as
    AFR's afr_txn_arbitrate_fop; nothing reaches the bricks."""
    bricks, clients = replica_set(VOL, 3, arbiter=True)
    r = Replicate(DOMAIN, clients, arbiter=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        g, fd = await new_file(r, "f")
        await r.write(fd, 0, b"one")
        bricks[1].crash()
        await r.write(fd, 0, b"two")
        await r.release(fd)
        await settle()
        bricks[1].restart()
        bricks[0].crash()
        o = await r.open(g, os.O_RDWR)
        assert o.fd is not None
        with pytest.raises(OSError) as e:
            await r.write(o.fd, 0, b"three")
        assert e.value.errno == errno.ENOTCONN, e.value
        assert bricks[1].data("f") == b"one"
        assert bricks[2].changelog("f", blame(1))[0] > 0 and bricks[2].changelog("f", blame(0)) == (0, 0, 0)
        nursery.cancel_scope.cancel()


async def test_a_short_write_is_blamed(autojump_clock: trio.abc.Clock) -> None:
    """Item 6: a replica that wrote less than the best reply missed the rest: blamed, and the caller gets
    the best count."""
    async with afr() as a:
        g, fd = await new_file(a.r, "f")
        a.bricks[1].short_write(100)
        assert (await a.r.write(fd, 0, chunk(0))).ret == 4 * KiB
        for i in (0, 2):
            assert a.bricks[i].changelog("f", blame(1))[0] > 0, a.bricks[i].pending("f")
        await a.r.release(fd)
        await settle()
        assert len(a.bricks[1].data("f")) == 100
        assert a.bricks[0].heal_pending() == a.bricks[2].heal_pending() == {g}


async def test_writes_cut_at_different_lengths_answer_what_a_quorum_wrote(autojump_clock: trio.abc.Clock) -> None:
    """At a quota each brick may cut a write at its own length (its own accounting): seen through the node agent's
    pool test, where gfuse answered EIO ('no replica answered': the longest count was one replica's) instead of
    EDQUOT. The answer is a short write of what a quorum wrote exactly; the replica that wrote more holds another
    state and is blamed, so heal makes it the others' and reads never show its extra bytes."""
    async with afr() as a:
        g, fd = await new_file(a.r, "f")
        a.bricks[1].short_write(512)
        a.bricks[2].short_write(512)
        assert (await a.r.write(fd, 0, chunk(0))).ret == 512
        for i in (1, 2):
            assert a.bricks[i].changelog("f", blame(0))[0] > 0, a.bricks[i].pending("f")
        assert len(a.bricks[0].data("f")) == 4 * KiB and a.bricks[1].data("f") == a.bricks[2].data("f")
        for _ in range(3):  # reads rotate over the readable replicas: never the one that wrote more
            assert (await a.r.read(fd, 0, 8 * KiB)).data == chunk(0)[:512]
        await a.r.release(fd)
        await settle()
        assert a.bricks[1].heal_pending() == a.bricks[2].heal_pending() == {g}


async def test_below_quorum_nobody_is_blamed_and_the_file_stays_dirty(autojump_clock: trio.abc.Clock) -> None:
    """Item 7: two bricks die under a held eager lock; the refused write and the release that follows must
    not let the survivor blame the two that have every acknowledged byte (split-brain when they return)."""
    async with afr() as a:
        _, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, chunk(0))
        a.bricks[1].crash()
        a.bricks[2].crash()
        with pytest.raises(OSError) as e:
            await a.r.write(fd, 4 * KiB, chunk(1))
        assert e.value.errno == errno.ENOTCONN
        await a.r.release(fd)
        await settle()
        b0 = a.bricks[0]
        assert b0.changelog("f", blame(1)) == b0.changelog("f", blame(2)) == (0, 0, 0), b0.pending("f")
        assert b0.changelog("f", DIRTY)[0] == 1, "left dirty for self-heal to judge"


async def test_a_write_that_reaches_only_a_minority_blames_nobody(autojump_clock: trio.abc.Clock) -> None:
    """Item 7 in a one-shot transaction: a truncate done on one replica only fails and accuses nobody."""
    async with afr() as a:
        _, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, chunk(0))
        a.bricks[1].fail("ftruncate", errno.EIO)
        a.bricks[2].fail("ftruncate", errno.EIO)
        with pytest.raises(OSError):
            await a.r.ftruncate(fd, 10)
        assert a.bricks[0].changelog("f", blame(1)) == a.bricks[0].changelog("f", blame(2)) == (0, 0, 0)
        await a.r.release(fd)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
async def test_no_space_on_every_replica_is_the_users_error(autojump_clock: trio.abc.Clock, err: int) -> None:
    """Item 8: ENOSPC/EDQUOT on every replica is what the user gets; the file stays readable (no "split-brain"
    EIO) and the next write does not fail with a bogus ENOTCONN."""
    async with afr() as a:
        _, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, chunk(0))
        for b in a.bricks:
            b.fail("write", err)
        with pytest.raises(OSError) as e:
            await a.r.write(fd, 4 * KiB, chunk(1))
        assert e.value.errno == err
        assert (await a.r.read(fd, 0, 1 << 20)).data == chunk(0)
        assert (await a.r.write(fd, 4 * KiB, chunk(2))).ret == 4 * KiB
        await a.r.release(fd)
        await settle()
        for b in a.bricks:
            assert b.data("f") == chunk(0) + chunk(2)
            assert_clean(b, "f")


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
async def test_no_space_on_the_good_replicas_is_the_users_error(autojump_clock: trio.abc.Clock, err: int) -> None:
    """Each brick enforces its quota (and has its own free space) alone: at the limit brick 2 refuses one write,
    then the two good replicas refuse the next while brick 2 takes it. That write reached no replica with good
    data (AFR's in-flight split-brain: it fails); the user gets the bricks' own errno, as AFR's
    afr_final_errno gives it, not EIO (seen on real bricks: "expected EDQUOT, got EIO" at a PV's quota)."""
    async with afr() as a:
        _, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, chunk(0))
        a.bricks[2].fail("write", err)
        assert (await a.r.write(fd, 4 * KiB, chunk(1))).ret == 4 * KiB  # brick 2 blamed
        a.bricks[0].fail("write", err)
        a.bricks[1].fail("write", err)
        with pytest.raises(OSError) as e:
            await a.r.write(fd, 8 * KiB, chunk(2))
        assert e.value.errno == err, e.value
        assert (await a.r.read(fd, 0, 1 << 20)).data == chunk(0) + chunk(1)
        await a.r.release(fd)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
async def test_a_write_one_replica_took_and_two_refused_is_their_errno(autojump_clock: trio.abc.Clock,
                                                                      err: int) -> None:
    """At a quota one brick may still take a write the two others refuse: below quorum, the user gets their
    errno (EDQUOT/ENOSPC), not ENOTCONN 'succeeded on only 1 replica(s)' (test_storage_backends allowed that
    answer as a known bug)."""
    async with afr() as a:
        _, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, chunk(0))
        a.bricks[1].fail("write", err)
        a.bricks[2].fail("write", err)
        with pytest.raises(OSError) as e:
            await a.r.write(fd, 4 * KiB, chunk(1))
        assert e.value.errno == err, e.value
        assert (await a.r.read(fd, 0, 1 << 20)).data[:4 * KiB] == chunk(0)
        await a.r.release(fd)


async def test_fsync_reaches_the_bricks_before_dirty_is_cleared(autojump_clock: trio.abc.Clock) -> None:
    """Item 9: with writes under the held lock, the bricks fsync while the file is still dirty (a crash in
    between leaves it for heal), and dirty is cleared after."""
    async with afr() as a:
        _, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, chunk(0))
        for b in a.bricks:
            b.latency = lambda fop: 4.0 if fop == "fsync" else 0.0
        async with trio.open_nursery() as n:
            n.start_soon(a.r.fsync, fd)
            await trio.sleep(3.0)  # the fsyncs have reached the bricks, not returned
            for b in a.bricks:
                assert b.calls["fsync"] == 1 and b.changelog("f", DIRTY)[0] == 1, "dirty cleared before the fsync"
        for b in a.bricks:
            assert b.changelog("f", DIRTY) == (0, 0, 0)
        await a.r.release(fd)


@pytest.mark.parametrize("held", [True, False])
async def test_a_failed_fsync_is_a_failed_write(autojump_clock: trio.abc.Clock, held: bool) -> None:
    """Item 9: fsync failing on one replica (its disk lost the data) blames it, whether or not writes are
    still under the eager lock; fsync succeeds with the others."""
    async with afr() as a:
        _, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, chunk(0))
        if not held:
            await trio.sleep(EAGER_DELAY * 2)
        a.bricks[1].fail("fsync", errno.EIO)
        await a.r.fsync(fd)
        for i in (0, 2):
            assert a.bricks[i].changelog("f", blame(1))[0] > 0, a.bricks[i].pending("f")
        await a.r.release(fd)


async def test_fsyncdir_reaches_every_brick(autojump_clock: trio.abc.Clock) -> None:
    async with afr() as a:
        d = new_gfid()
        await a.r.mkdir(ROOT_GFID, "d", 0o755, d)
        o = await a.r.opendir(d)
        assert o.fd is not None
        await a.r.fsync(o.fd)
        assert [b.calls["fsync"] for b in a.bricks] == [1, 1, 1]
        await a.r.release(o.fd)


async def test_a_posix_lock_lost_on_a_quorum_makes_the_fd_bad(autojump_clock: trio.abc.Clock) -> None:
    """Item 10: bricks 1 and 2 restart: the lock is held on brick 0 only, another client may take it on the
    others — the fd is bad (EBADFD on every call but release), and its locks are not granted again."""
    async with afr() as a:
        g, fd = await new_file(a.r, "l")
        o1, l1 = _owner(1)
        await a.r.lk(fd, F.SETLK, l1, cred=now_cred(lk_owner=o1))
        a.bricks[1].crash()
        a.bricks[2].crash()
        a.bricks[1].restart()
        a.bricks[2].restart()
        await settle()
        assert not a.bricks[1].posix_locks.get(g) and not a.bricks[2].posix_locks.get(g)
        for call in (lambda: a.r.write(fd, 0, b"x"), lambda: a.r.read(fd, 0, 1), lambda: a.r.fsync(fd),
                     lambda: a.r.lk(fd, F.SETLK, l1, cred=now_cred(lk_owner=o1))):
            with pytest.raises(OSError) as e:
                await call()
            assert e.value.errno == errno.EBADFD
        await a.r.release(fd)


async def test_a_posix_lock_kept_on_a_quorum_keeps_the_fd_good(autojump_clock: trio.abc.Clock) -> None:
    async with afr() as a:
        g, fd = await new_file(a.r, "l")
        o1, l1 = _owner(1)
        await a.r.lk(fd, F.SETLK, l1, cred=now_cred(lk_owner=o1))
        for k in (1, 2, 0):
            a.bricks[k].crash()
            a.bricks[k].restart()
            await settle()
        assert (await a.r.write(fd, 0, b"x")).ret == 1
        assert all(b.posix_locks.get(g) for b in a.bricks)
        await a.r.release(fd)


async def test_zero_range_keep_size_is_clipped_under_the_lock(autojump_clock: trio.abc.Clock) -> None:
    """Item 13: ZEROFILL has no keep-size flag: with ZEROFILL_KEEP_SIZE the range is clipped to the size."""
    async with afr() as a:
        _, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, b"a" * 4096)
        await a.r.zerofill(fd, 2048, 8192, {ZEROFILL_KEEP_SIZE: "1"})
        await a.r.zerofill(fd, 8192, 100, {ZEROFILL_KEEP_SIZE: "1"})  # wholly past the end: nothing
        await a.r.release(fd)
        await settle()
        for b in a.bricks:
            assert b.data("f") == b"a" * 2048 + bytes(2048)
            assert_clean(b, "f")


async def test_zero_range_keep_size_survives_the_replica_it_reads_the_size_from_going_away(
        autojump_clock: trio.abc.Clock) -> None:
    """The clip of a ZERO_RANGE|KEEP_SIZE reads the size from one replica under the data lock; when that replica
    goes away right then (the fault soak: a brick SIGSTOPped after the lock and pre-op, dropped at the
    ping-timeout) the size comes from another one, and the zerofill goes on to the two replicas left, blaming
    the gone one, as any change with quorum met. It failed with the gone replica's ENOTCONN."""
    async with afr() as a:
        _, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, b"a" * 4096)
        await a.r.release(fd)  # no eager lock left: the zerofill is a transaction of its own
        await settle()
        fd = (await a.r.open(a.bricks[0].inode("f").gfid, os.O_RDWR)).need_fd()
        a.bricks[0].crash_on("fstat")
        await a.r.zerofill(fd, 2048, 8192, {ZEROFILL_KEEP_SIZE: "1"})
        await a.r.release(fd)
        await settle()
        for b in a.bricks[1:]:
            assert b.data("f") == b"a" * 2048 + bytes(2048)
            assert b.changelog("f", blame(0))[0] > 0, f"{b.name} does not blame client-0: {b.pending('f')}"
        assert a.bricks[0].data("f") == b"a" * 4096


async def test_no_write_fails_with_quorum_met_as_bricks_come_and_go(autojump_clock: trio.abc.Clock) -> None:
    """Item 15: a writer that never pauses holds its eager lock while brick 0 dies and returns, then brick 1
    dies: with two bricks up all along, no write may fail (the lock taken before brick 0 came back must be
    given up for one that includes it, as AFR does on an event-generation change)."""
    async with afr() as a:
        g, fd = await new_file(a.r, "busy")
        k = 0

        async def writes(n: int) -> None:
            nonlocal k
            for _ in range(n):
                assert (await a.r.write(fd, k * 4 * KiB, chunk(k))).ret == 4 * KiB
                k += 1
                await trio.sleep(0.1)

        await writes(5)
        a.bricks[0].crash()
        await writes(5)
        a.bricks[0].restart()
        await writes(5)
        a.bricks[1].crash()
        await writes(5)
        a.bricks[1].restart()
        await writes(5)
        await a.r.release(fd)
        whole = b"".join(chunk(i) for i in range(k))
        assert a.bricks[2].data("busy") == whole
        r2 = await a.mount()  # a fresh client reads it right
        await r2.lookup(ROOT_GFID, "busy")
        o = await r2.open(g, os.O_RDONLY)
        assert o.fd is not None and (await r2.read(o.fd, 0, 1 << 20)).data == whole


# ------------------------------------------------------------------------------------------ random schedules
# Programs of writes, reads, fsyncs, truncates, zero-ranges and closes through two fds, mixed with one fault
# at a time (SIGKILL, SIGSTOP past the ping-timeout, a brick dying as a write arrives or after applying it,
# a failing or short write, ENOSPC), restarts, heals (glustershd, emulated below) and crashes of the client
# (gfuse SIGKILLed between two calls: no post-op, no unlock). On replica 3 and on replica 3 arbiter 1.
# The oracle, checked as the program runs and at its end:
# - a call fails only when no replica with good data is up (the others missed writes that are not healed:
#   AFR refuses those writes with EIO rather than make a split-brain), never for a replica coming or going;
# - a read returns exactly what the acknowledged writes say;
# - at the end every data replica holds every acknowledged byte, or a quorum of the others blames it;
#   some replica is a heal source (blamed by nobody) and every source holds every acknowledged byte.

SCHEDULES = int(os.environ.get("GFUSE_SCHEDULES", "300"))


@dataclass(frozen=True)
class Step:
    kind: str
    a: int = 0
    b: int = 0
    c: int = 0


def steps() -> st.SearchStrategy[Step]:
    brick = st.integers(0, 2)
    io = st.integers(0, 3 * 4096)
    return st.one_of(
        st.builds(Step, st.just("write"), st.integers(0, 1), io, st.integers(1, 4096)),
        st.builds(Step, st.just("write"), st.integers(0, 1), io, st.integers(1, 4096)),
        st.builds(Step, st.just("read"), st.integers(0, 1)),
        st.builds(Step, st.just("fsync"), st.integers(0, 1)),
        st.builds(Step, st.just("truncate"), st.integers(0, 1), st.integers(0, 4 * 4096)),
        st.builds(Step, st.just("zero"), st.integers(0, 1), io, st.integers(1, 8192)),
        st.builds(Step, st.just("close"), st.integers(0, 1)),
        st.builds(Step, st.just("sleep"), st.sampled_from([1, 5, 15])),
        st.builds(Step, st.just("kill"), brick),
        st.builds(Step, st.just("stop"), brick),
        st.builds(Step, st.just("crash_on_write"), brick, st.integers(0, 1)),
        st.builds(Step, st.just("fail_write"), brick, st.sampled_from([errno.EIO, errno.ENOSPC, errno.EDQUOT])),
        st.builds(Step, st.just("short_write"), brick, st.integers(0, 4095)),
        st.builds(Step, st.just("restart")),
        st.builds(Step, st.just("heal")),
        st.builds(Step, st.just("client_crash")),
    )


def _blamed(bricks: list[MemBrick], path: str, j: int) -> list[int]:
    return [i for i, b in enumerate(bricks) if i != j and b.changelog(path, blame(j))[0] > 0]


async def shd_heal(bricks: list[MemBrick], shd: list[MemClient], gfid: bytes, path: str, arbiter: int | None) -> None:
    """glustershd's data heal of one file, as AFR's self-heal does it: under a blocking data lock in the
    replicate domain (a client holding its eager lock is told and lets go), sources are the replicas nobody
    blames (if only dirty is set: the largest copy); sinks get the source's bytes; the pending counts go."""
    owner = b"shd-heal"
    fl = Flock(F.WRLCK, 0, 0, 0, 0, owner)
    cred = now_cred(lk_owner=owner)
    for c in shd:
        await c.inodelk(gfid, DOMAIN, F.SETLKW, fl, cred=cred)
    try:
        data = [k for k in range(3) if k != arbiter]
        sources = [k for k in data if not _blamed(bricks, path, k)]
        if not sources:
            return  # split-brain: the oracle says so
        src = max(sources, key=lambda k: len(bricks[k].data(path)))
        for k in data:
            ino = bricks[k].inode(path)
            if ino is not None and k != src:
                ino.data[:] = bricks[src].data(path)
        for b in bricks:
            ino = b.inode(path)
            if ino is not None:
                for key in [x for x in ino.xattrs if x.startswith("trusted.afr.")]:
                    ino.xattrs[key] = bytes(12)
    finally:
        for c in shd:
            await c.inodelk(gfid, DOMAIN, F.SETLK, replace(fl, type=F.UNLCK), cred=cred)


async def schedule(program: list[Step], arbiter: bool) -> None:
    bricks, _ = replica_set(VOL, 3, arbiter=arbiter)
    arb = 2 if arbiter else None
    data_bricks = [k for k in range(3) if k != arb]
    shd = [b.client(f"shd-{k}") for k, b in enumerate(bricks)]
    #: what the file may hold: the acknowledged changes, each with or without every change that failed
    states: list[bytearray] = [bytearray()]
    short: list[int | None] = [None]  # the length a planned short write keeps
    async with trio.open_nursery() as nursery:
        async def client() -> tuple[Replicate, trio.CancelScope]:
            r = Replicate(DOMAIN, [b.client() for b in bricks], arbiter=1 if arbiter else 0)
            scope = trio.CancelScope()

            async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                with scope:
                    await r.run(task_status=task_status)
            await nursery.start(serve)
            return r, scope

        r, scope = await client()
        g = new_gfid()
        c = await r.create(ROOT_GFID, "f", os.O_RDWR, 0o644, g)
        assert c.fd is not None
        fds: list[int | None] = [c.fd, None]

        async def fd_of(slot: int) -> int:
            fd = fds[slot]
            if fd is None:
                o = await r.open(g, os.O_RDWR)
                assert o.fd is not None
                fd = fds[slot] = o.fd
            return fd

        def fault_pending() -> bool:
            return any(not b.running or b.stopped or b.faults for b in bricks)

        def good_copies_up() -> int:
            return sum(bricks[k].running and not bricks[k].stopped and not _blamed(bricks, "f", k)
                       for k in data_bricks)

        for seq, s in enumerate(program):
            could = good_copies_up() >= 2  # one fault cannot take the last good copy: no call may fail
            change: Callable[[bytearray], None] | None = None
            partial: Callable[[bytearray], None] | None = None
            if not any(f.action == "short" for b in bricks for f in b.faults):
                short[0] = None
            try:
                if s.kind == "write":
                    data = bytes((seq * 7 + i) % 251 + 1 for i in range(s.c))
                    change = functools.partial(_put, s.b, data)
                    partial = functools.partial(_put, s.b, data[:short[0]]) if short[0] is not None else None
                    n = (await r.write(await fd_of(s.a), s.b, data)).ret
                    assert n == len(data), f"step {seq}: short answer {n}"
                elif s.kind == "read":
                    got = (await r.read(await fd_of(s.a), 0, 1 << 20)).data or b""
                    assert got in states, f"step {seq}: read {len(got)} bytes, expected one of {len(states)} states"
                    states[:] = [x for x in states if x == got]  # what was read is what the file holds now
                elif s.kind == "fsync":
                    await r.fsync(await fd_of(s.a))
                elif s.kind == "truncate":
                    change = functools.partial(_truncate, s.b)
                    await r.ftruncate(await fd_of(s.a), s.b)
                elif s.kind == "zero":
                    change = functools.partial(_zero_keep, s.b, s.c)
                    await r.zerofill(await fd_of(s.a), s.b, s.c, {ZEROFILL_KEEP_SIZE: "1"})
                elif s.kind == "close":
                    fd = fds[s.a]
                    if fd is not None:
                        fds[s.a] = None
                        await r.release(fd)
                elif s.kind == "sleep":
                    await trio.sleep(s.a / 10)
                elif s.kind == "kill" and not fault_pending():
                    bricks[s.a].crash()
                elif s.kind == "stop" and not fault_pending():
                    bricks[s.a].stop()
                    nursery.start_soon(_cont_later, bricks[s.a])
                elif s.kind == "crash_on_write" and not fault_pending():
                    bricks[s.a].crash_on("write", after=bool(s.b))
                elif s.kind == "fail_write" and not fault_pending():
                    bricks[s.a].fail("write", s.b)
                elif s.kind == "short_write" and not fault_pending() and s.a != arb:
                    bricks[s.a].short_write(s.b)
                    short[0] = s.b
                elif s.kind in ("restart", "heal"):
                    for b in bricks:
                        b.clear_faults()
                        b.cont()
                        if not b.running:
                            b.restart()
                    if s.kind == "heal":
                        await shd_heal(bricks, shd, g, "f", arb)
                elif s.kind == "client_crash":
                    for k in (0, 1):
                        fds[k] = None
                    scope.cancel()  # no post-op, no unlock: the bricks drop its locks with its sessions
                    for cl in r.children:
                        assert isinstance(cl, MemClient)
                        cl.disconnect("client killed")
                    await trio.sleep(0.01)
                    r, scope = await client()
            except OSError as e:
                if could:
                    raise AssertionError(f"step {seq} {s} failed with two good replicas up and quorum met: {e!r}") \
                        from e
                if change is not None:  # a failed change may or may not be on the replicas it reached
                    for x in list(states):
                        for f in (change, partial):  # (a short write: only its start)
                            if f is not None:
                                y = bytearray(x)
                                f(y)
                                if y not in states:
                                    states.append(y)
                    del states[16:]
                continue
            if change is not None:
                for x in states:
                    change(x)

        for b in bricks:
            b.clear_faults()
            b.cont()
            if not b.running:
                b.restart()
        for fd in fds:
            if fd is not None:
                await r.release(fd)
        await r.release_all()
        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

    lacking = [k for k in data_bricks if bricks[k].data("f") not in states]
    for k in lacking:
        assert len(_blamed(bricks, "f", k)) >= 2, \
            f"replica {k} lacks acknowledged data but only {_blamed(bricks, 'f', k)} blame it: " \
            f"{[b.pending('f') for b in bricks]}"
    sources = [k for k in range(3) if not _blamed(bricks, "f", k)]
    assert sources, f"split-brain: {[b.pending('f') for b in bricks]}"
    assert not [k for k in sources if k in lacking], f"heal sources {sources} lack acknowledged data"
    if arbiter:
        assert bricks[2].data("f") == b"", "the arbiter stores no data"


def _put(off: int, data: bytes, b: bytearray) -> None:
    if off > len(b):
        b.extend(bytes(off - len(b)))
    b[off:off + len(data)] = data


def _truncate(size: int, b: bytearray) -> None:
    del b[size:]
    b.extend(bytes(size - len(b)))


def _zero_keep(off: int, size: int, b: bytearray) -> None:
    end = min(off + size, len(b))
    if end > off:
        b[off:end] = bytes(end - off)


async def _cont_later(b: MemBrick) -> None:
    await trio.sleep(45)  # past the 42 s ping-timeout: the clients dropped it meanwhile
    b.cont()


@pytest.mark.parametrize("arbiter", [False, True])
def test_random_schedules_keep_every_acknowledged_write(arbiter: bool) -> None:
    @settings(max_examples=SCHEDULES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(steps(), max_size=30), st.integers(0, 2**32))
    def explore(program: list[Step], seed: int) -> None:
        rng = getattr(trio._core._run, "_r", None)  # trio's task order: seeded, so a schedule replays
        if rng is not None:
            rng.seed(seed)
        trio.run(schedule, program, arbiter, clock=trio.testing.MockClock(autojump_threshold=0))

    explore()


async def test_blame_known_only_from_a_dead_replica_does_not_rule_out_healed_ones(
        autojump_clock: trio.abc.Clock) -> None:
    """Item 15 ("EIO reading a file right after heal finished"): bricks 0 and 1 each missed writes (blamed by
    brick 2 among others), glustershd healed both, then brick 2 dies before this client re-read the file:
    what only brick 2 said cannot make both healed replicas unreadable."""
    async with afr() as a:
        g, fd = await new_file(a.r, "f")
        for k in (0, 1):
            a.bricks[k].crash()
            await a.r.write(fd, 0, chunk(k))
            await a.r.fsync(fd)
            a.bricks[k].restart()
            await a.r.lookup(ROOT_GFID, "f")
        await a.r.fsync(fd)
        shd = [b.client(f"shd-{k}") for k, b in enumerate(a.bricks)]
        await shd_heal(a.bricks, shd, g, "f", None)
        a.bricks[2].crash()
        assert (await a.r.read(fd, 0, 1 << 20)).data == chunk(1)
        assert (await a.r.write(fd, 0, chunk(5))).ret == 4 * KiB
        await a.r.release(fd)


async def test_a_write_that_reaches_only_stale_replicas_fails(autojump_clock: trio.abc.Clock) -> None:
    """Found by the random schedules: brick 2 misses a write, then brick 0 another (each blamed), then the
    only complete replica (1) dies as the next write reaches it. Acknowledging that write (done on 0 and 2,
    each missing something) would leave no replica with every acknowledged byte and each blaming the
    others: it fails (AFR's in-flight split-brain), nobody is blamed for it, and the next write — with
    brick 1 back — goes on."""
    async with afr() as a:
        _, fd = await new_file(a.r, "f")
        a.bricks[2].fail("write", errno.EIO)
        await a.r.write(fd, 0, b"1")
        a.bricks[0].fail("write", errno.EIO)
        await a.r.write(fd, 1, b"2")
        a.bricks[1].crash_on("write")
        with pytest.raises(OSError) as e:
            await a.r.write(fd, 2, b"3")
        assert e.value.errno == errno.EIO
        for i in (0, 2):
            assert a.bricks[i].changelog("f", blame(1)) == (0, 0, 0), a.bricks[i].pending("f")
        a.bricks[1].restart()
        assert (await a.r.write(fd, 3, b"4")).ret == 1
        await a.r.release(fd)
        await settle()
        assert a.bricks[1].data("f") == b"12\x004"  # the failed write is not owed; the next one is there
        assert not _blamed(a.bricks, "f", 1), [b.pending("f") for b in a.bricks]


async def test_the_answer_of_a_change_comes_from_a_replica_with_good_data(autojump_clock: trio.abc.Clock) -> None:
    """Found by the soak (a short read after a SIGSTOPped brick came back): brick 0 missed the write that
    made the file 8 KiB; back, it takes the next writes too, but their answer — whose size the kernel and
    md-cache keep — must not be brick 0's 4 KiB."""
    async with afr() as a:
        _, fd = await new_file(a.r, "f")
        await a.r.write(fd, 0, chunk(0))
        a.bricks[0].crash()
        await a.r.write(fd, 4 * KiB, chunk(1))
        a.bricks[0].restart()
        for call in (lambda: a.r.write(fd, 0, b"x"), lambda: a.r.fsync(fd), lambda: a.r.ftruncate(fd, 8 * KiB),
                     lambda: a.r.write(fd, 0, b"y")):
            r = await call()
            assert r.post is not None and r.post.size == 8 * KiB, r.post
        await a.r.release(fd)
