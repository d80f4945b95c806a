"""Acknowledged data is never lost or hidden (issue 14): one real-brick test per defect found.

Each test states what a user relies on. Where gfuse is still wrong, the test is a strict xfail naming
the issue item: it fails the suite the moment the fix lands (so the marker is removed with it), and it
documents the defect in the meantime. The native client is the reference where it is used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
import time
from pathlib import Path

import pytest

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


@pytest.mark.xfail(strict=True, reason="issue 14 item 13: ZERO_RANGE|KEEP_SIZE extends the file (ZEROFILL has no "
                                       "keep-size flag; gfuse does not clip to the size)")
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


@pytest.mark.xfail(strict=True, reason="issue 14 item 5: arbiter bricks are read as data bricks")
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
