"""Acknowledged data is never lost or hidden (issue 14): one real-brick test per defect found.

Each test states what a user relies on. Where gfuse is still wrong, the test is a strict xfail naming
the issue item: it fails the suite the moment the fix lands (so the marker is removed with it), and it
documents the defect in the meantime. The native client is the reference where it is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gfuse.status import query_status
from testkit import cluster as tc

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def changelog(path: Path, key: str) -> tuple[int, int, int]:
    """A ``trusted.afr.*`` value on a brick file as (data, metadata, entry); absent = zeros."""
    try:
        v = os.getxattr(path, key, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return (0, 0, 0)
        raise
    return tuple(int.from_bytes(v[k:k + 4], "big", signed=True) for k in (0, 4, 8))  # type: ignore[return-value]


def test_zero_range_keep_size_does_not_extend(vol_replica3: tc.Volume, gfuse_mount, native_mount) -> None:
    """fallocate(ZERO_RANGE|KEEP_SIZE) past EOF zeroes nothing visible and keeps the size, on gfuse and
    on every brick (a data-integrity exerciser checks the size right after such a call)."""
    g = gfuse_mount(vol_replica3)
    name = f"zr-keep-{os.getpid()}-{time.monotonic_ns()}"
    fd = os.open(g.path / name, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"a" * 4096, 0)
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 2048, 8192)
        assert os.fstat(fd).st_size == 4096
        assert os.pread(fd, 8192, 0) == b"a" * 2048 + b"\0" * 2048
    finally:
        os.close(fd)
    n = native_mount(vol_replica3)
    assert (n.path / name).stat().st_size == 4096
    for i in range(3):
        assert (vol_replica3.brick_dir(i) / name).stat().st_size == 4096, f"brick {i}"


def test_hard_links_on_distributed_volume_unlink_cleanly(vol_distrep: tc.Volume, gfuse_mount, native_mount) -> None:
    """`touch a; ln a b; … ln a h; rm -f a … h` leaves an empty directory that rmdir removes, and the
    native client agrees (measured: f g h remained, nlink 3, rmdir ENOTEMPTY)."""
    g = gfuse_mount(vol_distrep)
    d = g.path / f"links-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir()
    names = "abcdefgh"
    (d / "a").write_bytes(b"x")
    for n in names[1:]:
        os.link(d / "a", d / n)
    assert os.stat(d / "h").st_nlink == len(names)
    # every name is found where DHT looks for it: by a fresh gfuse mount (lookup-optimize: only on the
    # name's hashed subvolume, so a missing linkto file is a missing name) and by the native client
    native = native_mount(vol_distrep)
    fresh = gfuse_mount(vol_distrep)
    for n in names:
        assert os.stat(fresh.path / d.name / n).st_nlink == len(names), n
        assert os.stat(native.path / d.name / n).st_nlink == len(names), n
    for n in names:
        os.unlink(d / n)
    assert sorted(os.listdir(d)) == []
    assert sorted(os.listdir(native.path / d.name)) == []
    d.rmdir()


def test_blame_is_on_disk_while_the_writer_stays_busy(make_volume, gfuse_mount) -> None:
    """Issue 14 item 2: a writer that never pauses (4 KiB every 200 ms) must not keep the blame of a
    dead brick in memory only — within a second of the kill the survivors' changelog names it, so a
    gfuse crash then cannot leave only ``dirty`` behind."""
    vol = make_volume("replica3")
    g = gfuse_mount(vol)
    path = g.path / "busy.bin"
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with open(path, "wb", buffering=0) as f:
                off = 0
                while not stop.is_set():
                    f.write(os.urandom(4096))
                    off += 4096
                    time.sleep(0.2)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(1.0)
        vol.kill_brick(2)
        key = f"trusted.afr.{vol.name}-client-2"
        deadline = time.monotonic() + 1.5
        blamed = (0, 0, 0)
        while time.monotonic() < deadline:
            blamed = changelog(vol.brick_dir(0) / "busy.bin", key)
            if blamed[0] > 0:
                break
            time.sleep(0.05)
        assert blamed[0] > 0, f"brick 0 does not blame client-2 within 1.5 s of the kill: {blamed}"
        assert changelog(vol.brick_dir(1) / "busy.bin", key)[0] > 0
    finally:
        stop.set()
        t.join(10)
    assert not errors, errors


def test_arbiter_volume_reads_return_the_data(make_volume, gfuse_mount, native_mount) -> None:
    """On `replica 3 arbiter 1` the arbiter keeps no data: reads through gfuse must never come from it
    (measured: every third O_DIRECT read of a 1 MiB file written by the native client returned 0 bytes)."""
    vol = make_volume("arbiter")
    native = native_mount(vol)
    payload = os.urandom(MiB)
    (native.path / "arb.bin").write_bytes(payload)
    assert (vol.brick_dir(2) / "arb.bin").stat().st_size == 0  # the arbiter, as gluster made it
    g = gfuse_mount(vol)
    assert (g.path / "arb.bin").stat().st_size == MiB
    for i in range(6):
        fd = os.open(g.path / "arb.bin", os.O_RDONLY | os.O_DIRECT)
        try:
            buf = ctypes.create_string_buffer(MiB + 4096)
            addr = (ctypes.addressof(buf) + 4095) & ~4095
            view = (ctypes.c_char * MiB).from_address(addr)
            got = _libc.pread(fd, view, MiB, 0)
            assert got == MiB, f"read {i}: {got} bytes"
            assert bytes(view) == payload, f"read {i}: wrong bytes"
        finally:
            os.close(fd)
    # writes through gfuse keep the arbiter's shape: names and xattrs, no data
    (g.path / "arb2.bin").write_bytes(payload)
    assert (native.path / "arb2.bin").read_bytes() == payload
    assert (vol.brick_dir(2) / "arb2.bin").stat().st_size == 0


# ------------------------------------------------------------------------------------------ helpers

KiB = 1 << 10
NO_SHD = {"cluster.self-heal-daemon": "off"}  # a stale replica stays stale until the test heals it


def key(vol: tc.Volume, i: int) -> str:
    """The changelog xattr that blames brick ``i`` (volfile ``afr-pending-xattr``: VOL-client-i)."""
    return f"trusted.afr.{vol.name}-client-{i}"


def bricks_up(mount: tc.NativeMount) -> list[bool]:
    return [b["up"] for b in query_status(str(mount.path))["bricks"]]


def wait_bricks_seen(mount: tc.NativeMount, up: list[bool], timeout: float = 30) -> None:
    """Until the gfuse server behind ``mount`` has (or has lost) its session with each brick."""
    tc.wait_until(lambda: bricks_up(mount) == up, timeout, f"gfuse to see bricks {up}", ignore=(OSError,))


def heal_info(vol: tc.Volume) -> list[dict[str, Any]]:
    root = tc.gluster_xml("volume", "heal", vol.name, "info", timeout=60)
    out = []
    for b in root.iter("brick"):
        n = (b.findtext("numberOfEntries") or "").strip()
        out.append({"status": (b.findtext("status") or "").strip(), "entries": int(n) if n.isdigit() else None,
                    "files": [(f.text or "").strip() for f in b.findall("file")]})
    return out


def heal_and_wait(vol: tc.Volume, timeout: float = 120.0) -> None:
    """Self-heal on (if it was off), triggered again every 10 s until heal info is empty everywhere."""
    if vol.options.get("cluster.self-heal-daemon") == "off":
        vol.set_option("cluster.self-heal-daemon", "on")
    deadline = time.monotonic() + timeout
    next_trigger = 0.0
    while True:
        if time.monotonic() >= next_trigger:
            tc.gluster("volume", "heal", vol.name, timeout=60, check=False)
            next_trigger = time.monotonic() + 10
        info = heal_info(vol)
        if all(b["status"] == "Connected" and b["entries"] == 0 for b in info):
            return
        assert time.monotonic() < deadline, f"self-heal of {vol.name} did not finish within {timeout:g}s: {info}"
        time.sleep(1)


def copies(vol: tc.Volume, name: str, bricks: range | list[int] = range(3)) -> list[bytes]:
    return [(vol.brick_dir(i) / name).read_bytes() for i in bricks]


def assert_healed_or_marked(vol: tc.Volume, name: str) -> None:
    """Replicas that differ are named by gluster as needing heal (the survivors blame the stale one), and
    the self-heal daemon then makes all copies equal — never a silent difference heal info does not show."""
    data = copies(vol, name)
    if len(set(data)) > 1:
        listed = {f for b in heal_info(vol) for f in b["files"]}
        logs = [{k: changelog(vol.brick_dir(i) / name, key(vol, k)) for k in range(3)} for i in range(3)]
        assert f"/{name}" in listed, f"replicas of {name} differ ({[len(d) for d in data]} bytes) but heal info " \
                                     f"lists only {listed}: changelogs {logs}"
    heal_and_wait(vol)
    assert len(set(copies(vol, name))) == 1, "copies differ after the heal"


@contextlib.contextmanager
def bricks_on_tmpfs(vol: tc.Volume, bricks: list[int], size: str) -> Iterator[None]:
    """Start ``vol`` (made with start=False) with ``bricks`` on their own small tmpfs: a brick that runs
    out of space (ENOSPC, short writes) while the others do not. Stops the volume and unmounts at the end."""
    mounted: list[Path] = []
    try:
        for i in bricks:
            d = vol.brick_dir(i)
            saved = {k: os.getxattr(d, k) for k in os.listxattr(d) if k.startswith("trusted.")}
            stage = d.with_name(d.name + ".stage")
            subprocess.run(["cp", "-a", str(d), str(stage)], check=True)  # .glusterfs, made by volume create
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(d)], check=True)
            mounted.append(d)
            subprocess.run(["cp", "-a", f"{stage}/.", f"{d}/"], check=True)
            subprocess.run(["rm", "-rf", str(stage)], check=True)
            for k, v in saved.items():
                os.setxattr(d, k, v)
        vol.start()
        yield
    finally:
        with contextlib.suppress(tc.GlusterError):
            vol.stop()
        for d in mounted:
            subprocess.run(["umount", "-l", str(d)], check=False)


def fill(brick_dir: Path, leave: int) -> None:
    """Fill a brick's filesystem (a file in its .glusterfs, which nobody lists) until ``leave`` bytes are free."""
    st = os.statvfs(brick_dir)
    free = st.f_bavail * st.f_frsize
    with open(brick_dir / ".glusterfs" / "filler", "ab") as f:
        f.write(b"\0" * max(free - leave, 0))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ item 1


def test_concurrent_writes_and_fsyncs_across_a_brick_kill_lose_nothing(make_volume, gfuse_mount) -> None:
    """Issue 14 item 1: writes racing fsyncs (each fsync ends the eager lock) while a brick dies: every
    acknowledged write is on both survivors, and the dead brick is blamed by both (heal info lists it)."""
    vol = make_volume("replica3", options=NO_SHD)
    g = gfuse_mount(vol)
    name = "race.bin"
    fd = os.open(g.path / name, os.O_CREAT | os.O_RDWR, 0o644)
    expected = bytearray()
    errors: list[BaseException] = []
    stop = threading.Event()

    def fsyncer() -> None:
        try:
            while not stop.is_set():
                os.fsync(fd)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    t = threading.Thread(target=fsyncer)
    t.start()
    try:
        k = 0
        deadline = time.monotonic() + 4
        killed = False
        while time.monotonic() < deadline:
            block = bytes([65 + k % 26]) * (4 * KiB)
            assert os.pwrite(fd, block, k * 4 * KiB) == len(block)
            expected += block
            k += 1
            if not killed and time.monotonic() > deadline - 3:
                vol.kill_brick(2)
                killed = True
    finally:
        stop.set()
        t.join(30)
        os.close(fd)
    assert not errors, errors
    time.sleep(EAGER_WAIT)
    for i in (0, 1):
        assert (vol.brick_dir(i) / name).read_bytes() == bytes(expected), f"brick {i} lacks acknowledged writes"
        assert changelog(vol.brick_dir(i) / name, key(vol, 2))[0] > 0, f"brick {i} does not blame client-2"
    vol.start_force()
    heal_and_wait(vol)
    assert copies(vol, name) == [bytes(expected)] * 3


EAGER_WAIT = 2.5  # past gfuse's eager-lock delay (1 s) and its idle check


# ------------------------------------------------------------------------------------------ item 2


def test_blame_is_on_disk_when_a_failed_write_returns(make_volume, gfuse_mount) -> None:
    """Issue 14 item 2: the write that missed a dead brick is acknowledged only after the survivors'
    changelog blames it (AFR's post-op before unwind), not when the file next goes idle: a gfuse crash
    right after the write returns must leave the blame behind, not just ``dirty``."""
    vol = make_volume("replica3", options=NO_SHD)
    g = gfuse_mount(vol)
    fd = os.open(g.path / "f.bin", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"a" * 4096, 0)  # takes the eager lock (all three bricks)
        vol.kill_brick(2)
        wait_bricks_seen(g, [True, True, False])
        assert os.pwrite(fd, b"b" * 4096, 4096) == 4096
        seen = [changelog(vol.brick_dir(i) / "f.bin", key(vol, 2)) for i in (0, 1)]  # the fd is still open
        assert all(s[0] > 0 for s in seen), f"survivors' blame of client-2 right after the write returned: {seen}"
        os.kill(g.pid, signal.SIGKILL)  # no post-op, no unlock: the bricks keep what is on disk
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    for i in (0, 1):
        assert changelog(vol.brick_dir(i) / "f.bin", key(vol, 2))[0] > 0


# ------------------------------------------------------------------------------------------ item 3


def test_fd_opened_while_a_brick_was_down_misses_nothing_unmarked(make_volume, gfuse_mount) -> None:
    """Issue 14 item 3: an fd opened while a brick was down has no handle there; after the brick is back,
    a write through it must reach that brick too (AFR's fix-open) or blame it."""
    vol = make_volume("replica3", options=NO_SHD)
    g = gfuse_mount(vol)
    path = g.path / "f.bin"
    path.write_bytes(b"0" * 8192)
    vol.kill_brick(2)
    wait_bricks_seen(g, [True, True, False])
    fd2 = os.open(path, os.O_RDWR)
    vol.start_force()
    wait_bricks_seen(g, [True, True, True])
    fd1 = os.open(path, os.O_RDWR)
    os.pwrite(fd1, b"a" * 4096, 0)
    os.pwrite(fd2, b"b" * 4096, 4096)
    os.close(fd1)
    os.close(fd2)
    time.sleep(EAGER_WAIT)
    assert (vol.brick_dir(0) / "f.bin").read_bytes() == b"a" * 4096 + b"b" * 4096
    assert_healed_or_marked(vol, "f.bin")


# ------------------------------------------------------------------------------------------ item 4


def _pread_direct(fd: int, size: int) -> bytes:
    """``size`` bytes at 0 from an O_DIRECT fd, past any page the kernel kept: gfuse answers."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    buf = ctypes.create_string_buffer(size + 4096)
    addr = (ctypes.addressof(buf) + 4095) & ~4095
    view = (ctypes.c_char * size).from_address(addr)
    got = _libc.pread(fd, view, size, 0)
    assert got >= 0, os.strerror(ctypes.get_errno())
    return bytes(view)[:got]


def _direct_read(path: Path, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return _pread_direct(fd, size)
    finally:
        os.close(fd)


def test_no_stale_reads_after_a_brick_restart(make_volume, gfuse_mount) -> None:
    """Issue 14 item 4: a brick that missed writes while down is never read when it comes back — here while
    the writer still holds its eager lock (so the blame may not be on disk yet, and a lookup that re-learns
    readability from the disks must not forget it). AFR bumps an event generation on every up/down and
    refreshes what it knows of an inode before the next read. Read by the writer's mount and by another."""
    vol = make_volume("replica3", options=NO_SHD)
    g = gfuse_mount(vol)
    path = g.path / "f.bin"
    path.write_bytes(b"o" * 8192)
    fd = os.open(path, os.O_RDWR)
    # the writer's reads go through an fd open all along: closing one ends the eager lock (a flush)
    rfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    stop = threading.Event()
    errors: list[BaseException] = []
    size = [8192]

    def busy() -> None:  # appends 4 KiB every 100 ms: the eager lock is never idle
        k = 0
        try:
            while not stop.is_set():
                os.pwrite(fd, bytes([65 + k % 26]) * 4096, size[0])
                size[0] += 4096
                k += 1
                time.sleep(0.1)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    t = threading.Thread(target=busy)
    t.start()
    try:
        time.sleep(0.5)
        vol.kill_brick(1)
        wait_bricks_seen(g, [True, False, True])
        time.sleep(0.5)
        vol.start_force()
        wait_bricks_seen(g, [True, True, True])
        upto = size[0]
        want = (vol.brick_dir(0) / "f.bin").read_bytes()[:upto]
        stale = (vol.brick_dir(1) / "f.bin").read_bytes()[:upto]
        assert stale != want, "brick 1 should lack the appends made while it was down (no self-heal daemon)"
        other = gfuse_mount(vol)  # a second client learns the file from the disks only
        got = []
        for _ in range(8):
            got.append(_pread_direct(rfd, upto + 4096)[:upto])
            got.append(_direct_read(other.path / "f.bin", upto + 4096)[:upto])
    finally:
        stop.set()
        t.join(30)
        os.close(fd)
        os.close(rfd)
    assert not errors, errors
    bad = [k for k, x in enumerate(got) if x != want]
    assert not bad, f"reads {bad} of {len(got)} returned other bytes than the good replicas hold"


# ------------------------------------------------------------------------------------------ item 6


def test_short_write_on_one_replica_is_blamed(make_volume, gfuse_mount) -> None:
    """Issue 14 item 6: a brick that writes less than the others (its filesystem is full) is blamed, as AFR
    blames a replica whose write returned less than the best reply."""
    vol = make_volume("replica3", start=False)
    with bricks_on_tmpfs(vol, [2], "4m"):
        g = gfuse_mount(vol)
        fill(vol.brick_dir(2), 8 * KiB)
        fd = os.open(g.path / "short.bin", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            assert os.pwrite(fd, b"s" * (64 * KiB), 0) == 64 * KiB
        finally:
            os.close(fd)
        time.sleep(EAGER_WAIT)
        sizes = [(vol.brick_dir(i) / "short.bin").stat().st_size for i in range(3)]
        assert sizes[:2] == [64 * KiB] * 2 and sizes[2] < 64 * KiB, sizes
        for i in (0, 1):
            assert changelog(vol.brick_dir(i) / "short.bin", key(vol, 2))[0] > 0, \
                f"brick {i} does not blame the short-written brick 2"
        assert "/short.bin" in {f for b in heal_info(vol) for f in b["files"]}


# ------------------------------------------------------------------------------------------ item 7


def test_below_quorum_the_minority_does_not_blame_the_majority(make_volume, gfuse_mount) -> None:
    """Issue 14 item 7: writes refused for quorum (two bricks died under a busy writer, which holds the eager
    lock) leave the survivor dirty, never blaming the two that have every acknowledged byte — else the file
    is in split-brain when they return."""
    vol = make_volume("replica3", options=NO_SHD)
    g = gfuse_mount(vol)
    fd = os.open(g.path / "q.bin", os.O_CREAT | os.O_RDWR, 0o644)
    acked: list[int] = []
    refused: list[int] = []
    stop = threading.Event()

    def busy() -> None:
        k = 0
        while not stop.is_set():
            try:
                os.pwrite(fd, bytes([65 + k % 26]) * 4096, 0)
                acked.append(k)
            except OSError as e:
                refused.append(e.errno)
            k += 1
            time.sleep(0.05)

    t = threading.Thread(target=busy)
    t.start()
    try:
        time.sleep(0.5)
        vol.kill_brick(1)
        vol.kill_brick(2)
        wait_bricks_seen(g, [True, False, False])
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(30)
        os.close(fd)
    assert refused and set(refused) <= {errno.ENOTCONN, errno.EROFS}, refused
    time.sleep(EAGER_WAIT)
    # writes acknowledged between the two kills missed brick 1 (blamed, rightly); brick 2 has every one of
    # them, so nothing may blame it: the refused writes must not
    p = vol.brick_dir(0) / "q.bin"
    assert changelog(p, key(vol, 2)) == (0, 0, 0), \
        f"the minority blames the majority: {[changelog(p, key(vol, k)) for k in (1, 2)]}"
    last = bytes([65 + acked[-1] % 26]) * 4096
    vol.start_force()
    heal_and_wait(vol)
    assert copies(vol, "q.bin") == [last] * 3


# ------------------------------------------------------------------------------------------ item 8


def test_no_space_on_every_replica_is_enospc_and_the_file_stays_usable(make_volume, gfuse_mount) -> None:
    """Issue 14 item 8: ENOSPC on every replica is the user's ENOSPC — not EIO on the next read (no
    readable replica) nor ENOTCONN ("quorum not met") on the next write once there is space again."""
    vol = make_volume("replica3", start=False)
    with bricks_on_tmpfs(vol, [0, 1, 2], "6m"):
        g = gfuse_mount(vol)
        (g.path / "ballast.bin").write_bytes(os.urandom(MiB))
        fd = os.open(g.path / "full.bin", os.O_CREAT | os.O_RDWR, 0o644)
        acked = bytearray()
        try:
            with pytest.raises(OSError) as e:
                for _ in range(64):
                    block = os.urandom(256 * KiB)
                    n = os.pwrite(fd, block, len(acked))
                    acked += block[:n]
            assert e.value.errno in (errno.ENOSPC, errno.EDQUOT), e.value
            got = os.pread(fd, len(acked) + MiB, 0)
            assert got[:len(acked)] == bytes(acked), "acknowledged data unreadable after ENOSPC"
            os.unlink(g.path / "ballast.bin")
            time.sleep(1)
            assert os.pwrite(fd, b"z" * 4096, 0) == 4096, "no write after space was freed"
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ item 9


def _fop_calls(vol: tc.Volume, fop: str) -> list[int]:
    """Cumulative calls of ``fop`` per brick since ``volume profile start`` (io-stats on the bricks)."""
    root = tc.gluster_xml("volume", "profile", vol.name, "info", "cumulative", timeout=60)
    out = []
    for b in root.iter("brick"):
        n = 0
        for f in b.iter("fop"):
            if (f.findtext("name") or "").strip() == fop:
                n = int(f.findtext("hits") or 0)
        out.append(n)
    return out


def test_fsync_and_fsyncdir_reach_every_brick(make_volume, gfuse_mount) -> None:
    """Issue 14 item 9: fsync(2) of a file and of a directory are done on every brick (gfuse's fsyncdir was
    a no-op: a directory's new names were never made durable)."""
    vol = make_volume("replica3")
    tc.gluster("volume", "profile", vol.name, "start", timeout=60)
    g = gfuse_mount(vol)
    d = g.path / "d"
    d.mkdir()
    fd = os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"x" * 4096)
        before = _fop_calls(vol, "FSYNC")
        os.fsync(fd)
    finally:
        os.close(fd)
    mid = _fop_calls(vol, "FSYNC")
    assert all(m > b for m, b in zip(mid, before)), f"file fsync: {before} -> {mid}"
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    after = [a + b for a, b in zip(_fop_calls(vol, "FSYNC"), _fop_calls(vol, "FSYNCDIR"))]
    assert all(a > m for a, m in zip(after, mid)), f"fsyncdir reached no brick: {mid} -> {after}"


# ------------------------------------------------------------------------------------------ item 10

LOCKER = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
print("locked", flush=True)
for line in sys.stdin:
    try:
        os.pwrite(fd, b"mine", 0)
        print("wrote", flush=True)
    except OSError as e:
        print("error", e.errno, flush=True)
"""


def test_a_lock_lost_on_a_quorum_makes_the_fd_bad(make_volume, gfuse_mount, native_mount) -> None:
    """Issue 14 item 10: once a POSIX lock is held on fewer bricks than a quorum (two died), another client
    may take it when they return: the holder's fd is bad from then on (EBADFD), as AFR marks it — never
    a silent re-grant attempt that lets the application believe it still holds the lock."""
    vol = make_volume("replica3")
    g = gfuse_mount(vol)
    nm = native_mount(vol)
    (g.path / "l.bin").write_bytes(b"data")
    p = subprocess.Popen([os.sys.executable, "-c", LOCKER, str(g.path / "l.bin")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == "locked"
        vol.kill_brick(1)
        vol.kill_brick(2)
        wait_bricks_seen(g, [True, False, False])
        os.kill(g.pid, signal.SIGSTOP)  # the holder's gfuse is slow to come back
        try:
            vol.kill_brick(0)
            vol.start_force()
            deadline = time.monotonic() + 60
            fd = -1
            while True:  # the native client reconnects on its own schedule
                try:
                    if fd < 0:
                        fd = os.open(nm.path / "l.bin", os.O_RDWR)
                    fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
                    break
                except OSError as e:
                    assert time.monotonic() < deadline, f"the native client never got the free lock: {e!r}"
                    time.sleep(0.5)
        finally:
            os.kill(g.pid, signal.SIGCONT)
        wait_bricks_seen(g, [True, True, True])
        p.stdin.write("write\n")
        p.stdin.flush()
        answer = p.stdout.readline().split()
        assert answer == ["error", str(errno.EBADFD)], f"the holder, whose lock another client now holds: {answer}"
        os.close(fd)
    finally:
        p.kill()
        p.wait(10)


# ------------------------------------------------------------------------------------------ item 15


def test_no_call_fails_with_quorum_met_while_bricks_restart(make_volume, gfuse_mount) -> None:
    """Issue 14 item 15: a busy writer (writes, copy_file_range, reads) while one brick after another is
    SIGKILLed and restarted — two bricks are always up, and one of them has every write, so no call may fail
    (measured: copy_file_range ENOTCONN, EIO on open and on reads right after a heal). First bricks 0 and 1
    without self-heal in between (brick 2 stays good), then with glustershd healing after each restart."""
    vol = make_volume("replica3", options=NO_SHD)
    g = gfuse_mount(vol)
    src = g.path / "src.bin"
    src_data = os.urandom(64 * KiB)
    src.write_bytes(src_data)
    path = g.path / "busy.bin"
    expected = bytearray()
    errors: list[str] = []
    stop = threading.Event()

    def work() -> None:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        sfd = os.open(src, os.O_RDONLY)
        k = 0
        try:
            while not stop.is_set():
                k += 1
                try:
                    if k % 7 == 0:
                        n = os.copy_file_range(sfd, fd, 16 * KiB, 0, len(expected))
                        expected.extend(src_data[:n])
                    elif k % 5 == 0:  # through the writer's fd: a close would end its eager lock (flush)
                        got = os.pread(fd, len(expected) + 1, 0)
                        if got != bytes(expected):
                            errors.append(f"op {k}: read {len(got)} bytes ({sha(got)}), expected {len(expected)}")
                    else:
                        block = bytes([k % 251]) * (4 * KiB)
                        n = os.pwrite(fd, block, len(expected))
                        expected.extend(block[:n])
                except OSError as e:
                    errors.append(f"op {k}: {e!r}")
                time.sleep(0.02)
        finally:
            os.close(sfd)
            os.close(fd)

    t = threading.Thread(target=work)
    t.start()
    try:
        for b, heal in ((0, False), (1, True), (2, True)):
            time.sleep(1.0)
            vol.kill_brick(b)
            time.sleep(1.0)
            vol.start_force()
            wait_bricks_seen(g, [True, True, True])
            if heal:
                heal_and_wait(vol)  # the writer goes on meanwhile (glustershd's heal takes its data lock)
    finally:
        time.sleep(1.5)
        stop.set()
        t.join(60)
    assert not errors, errors[:10]
    heal_and_wait(vol)
    assert copies(vol, "busy.bin") == [bytes(expected)] * 3
