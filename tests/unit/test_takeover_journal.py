"""The takeover record (gfuse/takeover.py) without FUSE or servers: the journal's records, what a successor
makes of them (restored inode table, handles reopened under the numbers the kernel holds), and the
recognition of re-sent entry operations, over the in-memory brick."""

from __future__ import annotations

import errno
import os
import stat as st
import struct
from pathlib import Path

import pytest
import trio

from gfuse import takeover
from gfuse.cred import new_gfid
from gfuse.fops import Proc
from gfuse.fuse import GlusterOperations
from gfuse.iatt import ROOT_GFID
from gfuse.takeover import (FUSE_HAS_RESEND, FUSE_INIT, FUSE_INIT_EXT, IN_HEADER, Journal, Restart, State,
                            kernel_has_resend, parse)
from gfuse.xlators.switch import GraphSwitch
from testkit.membrick import MemBrick

pytestmark = pytest.mark.unit


def journal(tmp_path: Path, inodes: dict[int, tuple[bytes, int]] | None = None) -> Journal:
    j = Journal(tmp_path / "journal", lambda: ((i, g, n) for i, (g, n) in (inodes or {}).items()))
    j.start()
    return j


def test_records_replay_to_the_state_the_kernel_refers_to(tmp_path: Path) -> None:
    j = journal(tmp_path)
    a, b = new_gfid(), new_gfid()
    j.lookup(10, a)
    j.lookup(10, a)
    j.lookup(11, b)
    j.forget(11, 1)  # 11 is gone
    j.opened(5, 10, a, os.O_WRONLY | os.O_APPEND)
    j.opened(6, 10, a, os.O_RDONLY)
    j.released(6)
    j.opendir(3, b)
    j.cookie(3, 2, 1 << 63 | 7)  # a 64-bit readdir offset survives
    j.opendir(4, a)
    j.releasedir(4)
    s = parse((tmp_path / "journal").read_bytes())
    assert s.inodes == {10: [a, 2]}
    assert s.files == {5: (10, a, os.O_WRONLY | os.O_APPEND)}
    assert set(s.dirs) == {3} and s.dirs[3].gfid == b and s.dirs[3].cookies == {2: 1 << 63 | 7}
    assert (s.max_fh, s.max_dh) == (6, 4)


def test_a_record_cut_by_a_kill_is_not_read(tmp_path: Path) -> None:
    j = journal(tmp_path)
    g = new_gfid()
    j.lookup(10, g)
    j.close()
    raw = bytearray((tmp_path / "journal").read_bytes())
    end = takeover._LOOKUP.size  # one record so far
    assert raw[0] == takeover.R_LOOKUP and raw[end] == 0
    # the body of a second record copied, its type byte (written last) not yet
    rec = struct.pack("<BQ16sQ", takeover.R_LOOKUP, 99, g, 1)
    raw[end + 1:end + len(rec)] = rec[1:]
    s = parse(bytes(raw))
    assert s.inodes == {10: [g, 1]}
    assert parse(bytes(raw[:end + 5])).inodes == {10: [g, 1]}  # a truncated file too


def test_the_journal_is_rewritten_compactly_when_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(takeover, "MIN_CAPACITY", 4096)
    g = new_gfid()
    live = {10: (g, 3)}
    j = journal(tmp_path, live)
    j.opened(7, 10, g, os.O_RDWR)
    for _ in range(1000):  # far more than 4 KiB of lookup/forget pairs
        j.lookup(10, g)
        j.forget(10, 1)
    assert j.compactions > 0
    s = parse((tmp_path / "journal").read_bytes())
    assert s.inodes == {10: [g, 3]} and s.files == {7: (10, g, os.O_RDWR)}


def test_resend_capability_is_read_from_the_recorded_init() -> None:
    def init(flags2: int) -> bytes:
        return IN_HEADER.pack(104, FUSE_INIT, 2, 0, 0, 0, 0, 0, 0) + struct.pack(
            "<IIIII", 7, 45, 131072, FUSE_INIT_EXT, flags2) + bytes(44)
    assert kernel_has_resend(init(FUSE_HAS_RESEND >> 32))
    assert not kernel_has_resend(init(0))
    with pytest.raises(ValueError):
        kernel_has_resend(IN_HEADER.pack(40, 1, 2, 0, 0, 0, 0, 0, 0) + bytes(64))


def test_reopen_flags_never_create_truncate_or_append() -> None:
    f = takeover.reopen_flags(os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND)
    assert f == os.O_WRONLY


async def test_a_successor_reopens_handles_under_the_numbers_the_kernel_holds(tmp_path: Path) -> None:
    brick = MemBrick("b")
    old = GraphSwitch(brick.client())
    r = await old.create(ROOT_GFID, "f", os.O_RDWR, 0o644, new_gfid())
    assert r.fd is not None and r.stat is not None
    await old.write(r.fd, 0, b"hello")
    d = await old.mkdir(ROOT_GFID, "d", 0o755 | st.S_IFDIR, new_gfid())
    assert d.stat is not None
    state = State()
    ino = 4242
    state.inodes = {ino: [r.stat.gfid, 2]}
    state.files = {17: (ino, r.stat.gfid, os.O_RDWR | os.O_APPEND)}
    state.dirs = {9: takeover.DirRecord(d.stat.gfid, {5: 123})}
    state.max_fh, state.max_dh = 20, 9
    new = GraphSwitch(brick.client())
    ops = GlusterOperations(new)
    rs = Restart("/nowhere", "h:/v", "", "/dev/null", takeover=True)
    async with trio.open_nursery() as n:
        await rs._restore(ops, new, state)
        n.cancel_scope.cancel()
    assert ops.inodes[ino].gfid == r.stat.gfid and ops.inodes[ino].nlookup == 2
    assert ops.fh_inode == {17: ino} and rs.restored_files == 1
    assert (await new.read(17, 0, 100)).data == b"hello"
    await new.write(17, 5, b" world")  # no O_APPEND: at the offset the kernel gives
    assert brick.data("f") == b"hello world"
    assert ops.dirs[9].gfid == d.stat.gfid and ops.dirs[9].cookies == {5: 123} and ops._dir_handles >= 9
    again = await new.open(r.stat.gfid, os.O_RDONLY)
    assert again.fd is not None and again.fd > 20  # new handles above every one the old process gave


async def test_resent_entry_operations_are_answered_as_the_first_attempt(tmp_path: Path) -> None:
    brick = MemBrick("b")
    top = brick.client()
    first = journal(tmp_path)
    made: list[bytes] = []

    async def mkdir(gfid: bytes) -> object:
        made.append(gfid)
        return await top.mkdir(ROOT_GFID, "d", 0o755 | st.S_IFDIR, gfid)
    await first.entry(Proc.MKDIR, top, ROOT_GFID, "d", lambda: None, mkdir)
    await top.create(ROOT_GFID, "x", os.O_RDWR, 0o644, new_gfid())
    await first.removal(Proc.UNLINK, ROOT_GFID, "x", lambda: top.unlink(ROOT_GFID, "x"))
    first.close()
    # the process died before the replies reached the kernel: a successor gets the same requests again
    state = parse((tmp_path / "journal").read_bytes())
    second = Journal(tmp_path / "journal2", lambda: ())
    second.start(state)
    second.retried = state.pending()

    async def mkdir_again(gfid: bytes) -> object:
        raise AssertionError("the first attempt's mkdir must not be repeated")
    r = await second.entry(Proc.MKDIR, top, ROOT_GFID, "d", lambda: None, mkdir_again)
    assert r.stat is not None and r.stat.gfid == made[0]
    await second.removal(Proc.UNLINK, ROOT_GFID, "x", lambda: top.unlink(ROOT_GFID, "x"))  # no ENOENT
    # recognised once: a later unlink of a missing name is ENOENT again; another client's name stays EEXIST
    with pytest.raises(OSError) as e:
        await second.removal(Proc.UNLINK, ROOT_GFID, "x", lambda: top.unlink(ROOT_GFID, "x"))
    assert e.value.errno == errno.ENOENT
    await top.mkdir(ROOT_GFID, "other", 0o755 | st.S_IFDIR, new_gfid())
    second.retried[(Proc.MKDIR, ROOT_GFID, "other")] = takeover.Intent(1, Proc.MKDIR, ROOT_GFID, "other", new_gfid())

    async def mkdir_other(gfid: bytes) -> object:
        return await top.mkdir(ROOT_GFID, "other", 0o755 | st.S_IFDIR, gfid)
    with pytest.raises(OSError) as e:
        await second.entry(Proc.MKDIR, top, ROOT_GFID, "other", lambda: None, mkdir_other)
    assert e.value.errno == errno.EEXIST


async def test_a_resent_rename_finding_its_work_done_succeeds(tmp_path: Path) -> None:
    brick = MemBrick("b")
    top = brick.client()
    await top.create(ROOT_GFID, "a", os.O_RDWR, 0o644, new_gfid())
    j = journal(tmp_path)
    await j.rename(top, ROOT_GFID, "a", ROOT_GFID, "b", lambda: None,
                   lambda: top.rename(ROOT_GFID, "a", ROOT_GFID, "b"))
    state = parse((tmp_path / "journal").read_bytes())
    j2 = Journal(tmp_path / "journal2", lambda: ())
    j2.start(state)
    j2.retried = state.pending()
    await j2.rename(top, ROOT_GFID, "a", ROOT_GFID, "b", lambda: None,
                    lambda: top.rename(ROOT_GFID, "a", ROOT_GFID, "b"))
    assert brick.exists("b") and not brick.exists("a")


def test_locks_are_kept_in_order_until_unlocked_flushed_or_released(tmp_path: Path) -> None:
    from gfuse.fuse_lowlevel import F_UNLCK, F_WRLCK, Lock

    j = journal(tmp_path)
    g = new_gfid()
    j.opened(5, 10, g, os.O_RDWR)
    j.opened(6, 10, g, os.O_RDWR)
    j.locked(5, 77, Lock(F_WRLCK, 0, 10, 123))
    j.locked(5, 77, Lock(F_UNLCK, 5, 5, 123))  # a partial unlock is replayed as it came
    j.locked(5, 88, Lock(F_WRLCK, 100, 0, 124))
    j.locked(6, 77, Lock(F_WRLCK, 0, 0, 123))
    j.locked(6, 77, Lock(F_UNLCK, 0, 0, 123))  # the whole file unlocked: nothing left to take again
    assert parse((tmp_path / "journal").read_bytes()).locks == {
        5: [(77, F_WRLCK, 0, 10, 123), (77, F_UNLCK, 5, 5, 123), (88, F_WRLCK, 100, 0, 124)]}
    j.unlocked_owner(5, 77)  # close(): flush drops the owner's POSIX locks
    assert parse((tmp_path / "journal").read_bytes()).locks == {5: [(88, F_WRLCK, 100, 0, 124)]}
    j.released(5)
    s = parse((tmp_path / "journal").read_bytes())
    assert s.locks == {} and set(s.files) == {6}


async def test_a_successor_takes_the_locks_again_or_loses_the_descriptor(tmp_path: Path) -> None:
    from gfuse.fops import GETLK, SETLK, UNLCK, Flock
    from gfuse.fuse import lk_owner
    from gfuse.fuse_lowlevel import F_WRLCK

    brick = MemBrick("b")
    setup = brick.client()
    a = await setup.create(ROOT_GFID, "a", os.O_RDWR, 0o644, new_gfid())
    b = await setup.create(ROOT_GFID, "b", os.O_RDWR, 0o644, new_gfid())
    assert a.stat is not None and b.stat is not None
    other = brick.client()  # another client takes b's lock while no process serves the mount
    ob = await other.open(b.stat.gfid, os.O_RDWR)
    assert ob.fd is not None
    await other.lk(ob.fd, SETLK, Flock(F_WRLCK, 0, 0, 0, 9, lk_owner(9)))
    state = State()
    state.inodes = {20: [a.stat.gfid, 1], 21: [b.stat.gfid, 1]}
    state.files = {3: (20, a.stat.gfid, os.O_RDWR), 4: (21, b.stat.gfid, os.O_RDWR)}
    state.locks = {3: [(77, F_WRLCK, 0, 0, 1)], 4: [(77, F_WRLCK, 0, 0, 1)]}
    state.max_fh = 4
    new = GraphSwitch(brick.client())
    ops = GlusterOperations(new)
    rs = Restart("/nowhere", "h:/v", "", "/dev/null", takeover=True)
    await rs._restore(ops, new, state)
    assert rs.restored_files == 1 and rs.restored_locks == 1 and set(ops.fh_inode) == {3}
    assert set(state.files) == {3}  # the fresh journal no longer lists the lost descriptor
    oa = await other.open(a.stat.gfid, os.O_RDWR)
    assert oa.fd is not None
    r = await other.lk(oa.fd, GETLK, Flock(F_WRLCK, 0, 0, 0, 9, lk_owner(9)))
    assert r.flock is not None and r.flock.type != UNLCK  # a's lock is held again
    with pytest.raises(OSError) as e:
        await new.write(4, 0, b"x")
    assert e.value.errno == errno.EBADF


def test_only_recent_entry_operations_are_recognised(tmp_path: Path) -> None:
    j = journal(tmp_path)
    old = j._begin(Proc.UNLINK, ROOT_GFID, "old")
    old_time = old.when
    j._begin(Proc.MKDIR, ROOT_GFID, "new", new_gfid())
    for n in range(100):  # finished ones: only the last KEEP_DONE are kept
        j._end(j._begin(Proc.UNLINK, ROOT_GFID, f"done{n}"))
    s = parse((tmp_path / "journal").read_bytes())
    keys = {k[2] for k in s.pending(now=old_time + 1)}
    assert {"old", "new"} <= keys and "done99" in keys and "done0" not in keys
    assert len([k for k in keys if k.startswith("done")]) == takeover.KEEP_DONE
    assert not s.pending(now=old_time + takeover.INTENT_TTL + 1)
