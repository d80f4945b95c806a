"""The gfuse command line as users and mount(8) run it: gfuse mount/status/umount, mount -t fuse.gfuse, fstab.

Errors must be one line on stderr with a non-zero exit and no traceback; a mount must really be
served by one background process that goes away with the mount.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gfuse.mounttable import mount_at
from testkit import cluster as tc

HELPER = Path("/sbin/mount.fuse.gfuse")


def gfuse_cmd() -> list[str]:
    exe = shutil.which("gfuse")
    return [exe] if exe else [sys.executable, "-m", "gfuse.cli"]


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def gfuse(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run([*gfuse_cmd(), *args], timeout=timeout)


def serving_pids(mountpoint: Path) -> list[int]:
    """gfuse processes whose command line names ``mountpoint`` (the daemonized server)."""
    out = []
    needle = str(mountpoint).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z":
            continue
        if any(b"gfuse" in a for a in argv[:3]) and needle in argv:
            out.append(int(entry.name))
    return out


def wait_for(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def assert_one_line_error(p: subprocess.CompletedProcess[str], *patterns: str) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0, f"exit 0; stdout {p.stdout!r} stderr {p.stderr!r}"
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{p.stderr}"
    for pat in patterns:
        assert re.search(pat, lines[0], re.IGNORECASE), f"{pat!r} not in {lines[0]!r}"
    return lines[0]


class Mounts:
    """Mount points of one test; whatever is still mounted or served at the end is cleaned up."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.made: list[Path] = []

    def new(self, name: str = "m") -> Path:
        p = self.base / f"{name}-{uuid.uuid4().hex[:6]}"
        p.mkdir(parents=True)
        self.made.append(p)
        return p

    def cleanup(self) -> list[str]:
        problems = []
        for p in reversed(self.made):
            if tc.is_mounted(p):
                problems.append(f"{p} was still mounted")
                subprocess.run(["umount", str(p)], capture_output=True, timeout=30)
                if tc.is_mounted(p):
                    subprocess.run(["umount", "-l", str(p)], capture_output=True, timeout=30)
            deadline = time.monotonic() + 10
            while serving_pids(p) and time.monotonic() < deadline:
                time.sleep(0.1)
            for pid in serving_pids(p):
                problems.append(f"gfuse process {pid} for {p} outlived its mount")
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            try:
                p.rmdir()
            except OSError:
                pass
        return problems


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    m = Mounts(tmp_path)
    yield m
    problems = m.cleanup()
    assert not problems, problems


def live_mount(vol: tc.Volume, mp: Path, *opts: str) -> int:
    """``gfuse mount`` and return the serving pid (from its message)."""
    args = ["mount", vol.source, str(mp)] + (["-o", ",".join(opts)] if opts else [])
    p = gfuse(*args)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    m = re.search(r"\(pid (\d+),", p.stdout)
    assert m, p.stdout
    assert tc.is_mounted(mp)
    return int(m.group(1))


# ------------------------------------------------------------------------------------------
# errors


def test_error_unknown_volume(vol_replica3: tc.Volume, mounts: Mounts) -> None:
    mp = mounts.new()
    p = gfuse("mount", f"{vol_replica3.host}:/gfuset_no_such_volume_{uuid.uuid4().hex[:6]}", str(mp), timeout=60)
    assert_one_line_error(p, r"no_such_volume|not found|no such")
    assert not tc.is_mounted(mp)
    wait_for(lambda: not serving_pids(mp), 10, "the mount process to exit")


def test_error_unreachable_glusterd(vol_replica3: tc.Volume, mounts: Mounts) -> None:
    mp = mounts.new()
    t0 = time.monotonic()
    p = gfuse("mount", f"127.0.0.1:1:/{vol_replica3.name}", str(mp), timeout=90)
    assert_one_line_error(p, r"127\.0\.0\.1")
    assert time.monotonic() - t0 < 45
    assert not tc.is_mounted(mp)
    wait_for(lambda: not serving_pids(mp), 10, "the mount process to exit")


def test_error_bad_option(vol_replica3: tc.Volume, mounts: Mounts) -> None:
    mp = mounts.new()
    p = gfuse("mount", vol_replica3.source, str(mp), "-o", "nosuchopt")
    assert_one_line_error(p, r"nosuchopt")
    p = gfuse("mount", vol_replica3.source, str(mp), "-o", "attribute-timeout=soon")
    assert_one_line_error(p, r"attribute-timeout")
    assert not tc.is_mounted(mp)


def test_error_mountpoint_missing(vol_replica3: tc.Volume, mounts: Mounts, tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    p = gfuse("mount", vol_replica3.source, str(missing))
    assert_one_line_error(p, re.escape(str(missing)))
    assert not missing.exists()


def test_error_already_mounted(vol_replica3: tc.Volume, mounts: Mounts) -> None:
    mp = mounts.new()
    pid = live_mount(vol_replica3, mp)
    p = gfuse("mount", vol_replica3.source, str(mp))
    assert_one_line_error(p, r"already")
    assert serving_pids(mp) == [pid], "a second server was started"
    os.stat(mp)  # the first mount still works
    assert gfuse("umount", str(mp)).returncode == 0


def test_error_umount_not_a_gfuse_mount(mounts: Mounts) -> None:
    mp = mounts.new()
    p = gfuse("umount", str(mp))
    assert_one_line_error(p, r"not a gfuse mount")
    p = gfuse("status", str(mp))
    assert_one_line_error(p, r"not a gfuse mount")


# ------------------------------------------------------------------------------------------
# mount(8), fstab, options


@pytest.fixture
def mount_helper() -> Iterator[Path]:
    """/sbin/mount.fuse.gfuse (mount(8) runs it for fuse.gfuse); made for the test if missing."""
    made = False
    if not os.path.lexists(HELPER):
        target = shutil.which("mount.fuse.gfuse")
        if not target:
            pytest.skip("the mount.fuse.gfuse console script is not installed")
        HELPER.symlink_to(target)
        made = True
    try:
        yield HELPER
    finally:
        if made:
            HELPER.unlink()


def test_mount_t_fuse_gfuse_read_only(vol_replica3: tc.Volume, mounts: Mounts, mount_helper: Path) -> None:
    rw = mounts.new("rw")
    live_mount(vol_replica3, rw)
    name = f"cli-ro-{uuid.uuid4().hex[:8]}"
    (rw / name).write_bytes(b"readable")
    try:
        mp = mounts.new("ro")
        p = run(["mount", "-t", "fuse.gfuse", vol_replica3.source, str(mp), "-o", "ro"], timeout=90)
        assert p.returncode == 0, p.stderr
        assert tc.is_mounted(mp)
        top = mount_at(str(mp))
        assert top is not None and top.fstype == "fuse.gfuse" and top.readonly, top
        assert (mp / name).read_bytes() == b"readable"
        for op in (lambda: (mp / f"{name}-new").write_bytes(b"x"),
                   lambda: open(mp / name, "ab"),
                   lambda: os.mkdir(mp / f"{name}-dir"),
                   lambda: os.unlink(mp / name),
                   lambda: os.chmod(mp / name, 0o600),
                   lambda: os.setxattr(mp / name, "user.x", b"1")):
            with pytest.raises(OSError) as ei:
                op()
            assert ei.value.errno == errno.EROFS, ei.value
        assert (rw / name).read_bytes() == b"readable"
        pids = serving_pids(mp)
        assert len(pids) == 1, pids
        p = run(["umount", str(mp)])
        assert p.returncode == 0, p.stderr
        assert not tc.is_mounted(mp)
        wait_for(lambda: not serving_pids(mp), 10, "the serving process to exit after umount(8)")
    finally:
        os.unlink(rw / name)
        gfuse("umount", str(rw))


def test_fstab_line(vol_replica3: tc.Volume, mounts: Mounts, mount_helper: Path, tmp_path: Path) -> None:
    mp = mounts.new("fstab")
    fstab = tmp_path / "fstab"
    fstab.write_text("# test fstab\n"
                     f"{vol_replica3.source}  {mp}  fuse.gfuse  defaults,_netdev,attribute-timeout=2,log-level=WARNING"
                     "  0 0\n")
    p = run(["mount", "-T", str(fstab), str(mp)], timeout=90)
    assert p.returncode == 0, p.stderr
    assert tc.is_mounted(mp)
    name = f"cli-fstab-{uuid.uuid4().hex[:8]}"
    (mp / name).write_bytes(b"via fstab")
    try:
        assert (mp / name).read_bytes() == b"via fstab"
        assert any((b / name).exists() for b in vol_replica3.brick_dirs)
    finally:
        os.unlink(mp / name)
    assert run(["umount", str(mp)]).returncode == 0
    wait_for(lambda: not serving_pids(mp), 10, "the serving process to exit")


def test_subdir_mount(vol_replica3: tc.Volume, mounts: Mounts) -> None:
    full = mounts.new("full")
    live_mount(vol_replica3, full)
    top = f"cli-subdir-{uuid.uuid4().hex[:8]}"
    os.makedirs(full / top / "inner" / "deeper")
    (full / top / "parent-secret").write_bytes(b"not for the subdir mount")
    (full / top / "inner" / "visible").write_bytes(b"visible")
    try:
        sub = mounts.new("sub")
        live_mount(vol_replica3, sub, f"subdir=/{top}/inner")
        assert sorted(os.listdir(sub)) == ["deeper", "visible"]
        assert (sub / "visible").read_bytes() == b"visible"
        (sub / "deeper" / "new").write_bytes(b"new")
        assert (full / top / "inner" / "deeper" / "new").read_bytes() == b"new"
        # ".." of the mount root is the host's directory, never the volume's parent directory
        assert os.path.realpath(sub / "..") == str(sub.parent)
        assert not os.path.exists(sub / ".." / "parent-secret")
        assert os.stat(sub / "..").st_dev != os.stat(sub).st_dev
        assert gfuse("umount", str(sub)).returncode == 0
        # the same through the spec HOST:/VOL/DIR
        sub2 = mounts.new("sub2")
        p = gfuse("mount", f"{vol_replica3.source}/{top}/inner", str(sub2))
        assert p.returncode == 0, p.stderr
        assert sorted(os.listdir(sub2)) == ["deeper", "visible"]
        assert gfuse("umount", str(sub2)).returncode == 0
        # a subdirectory that does not exist: one line, no mount
        sub3 = mounts.new("sub3")
        p = gfuse("mount", vol_replica3.source, str(sub3), "-o", f"subdir=/{top}/nope")
        assert_one_line_error(p, r"nope")
        assert not tc.is_mounted(sub3)
    finally:
        shutil.rmtree(full / top)
        gfuse("umount", str(full))


def test_backup_volfile_server(vol_replica3: tc.Volume, mounts: Mounts) -> None:
    mp = mounts.new("backup")
    p = gfuse("mount", f"127.0.0.1:1:/{vol_replica3.name}", str(mp), "-o", "backup-volfile-servers=127.0.0.1",
              timeout=90)
    assert p.returncode == 0, p.stderr
    pid = int(re.search(r"\(pid (\d+),", p.stdout).group(1))
    time.sleep(1.0)  # the mount has to stay up, not only come up
    assert tc.is_mounted(mp), f"mounted, then gone (serving process alive: {os.path.exists(f'/proc/{pid}')})"
    name = f"cli-backup-{uuid.uuid4().hex[:8]}"
    (mp / name).write_bytes(b"backup")
    try:
        assert (mp / name).read_bytes() == b"backup"
    finally:
        os.unlink(mp / name)
    st = json.loads(gfuse("status", "--json", str(mp)).stdout)
    assert st[0]["pid"] == pid and st[0]["bricks"] and all(b["up"] for b in st[0]["bricks"])
    assert gfuse("umount", str(mp)).returncode == 0


# ------------------------------------------------------------------------------------------
# status and umount


def test_status_and_umount(make_volume, mounts: Mounts) -> None:
    vol = make_volume("replica3")
    mp = mounts.new("status")
    pid = live_mount(vol, mp)
    assert serving_pids(mp) == [pid]
    p = gfuse("status", str(mp))
    assert p.returncode == 0, p.stdout + p.stderr
    brick_lines = [ln for ln in p.stdout.splitlines() if ln.startswith("  ")]
    assert len(brick_lines) == 3, p.stdout
    assert all(ln.split()[-1] == "up" for ln in brick_lines), p.stdout
    assert "3/3 bricks up" in p.stdout
    st = json.loads(gfuse("status", "--json", str(mp)).stdout)
    assert st[0]["pid"] == pid and [b["up"] for b in st[0]["bricks"]] == [True, True, True]
    # one brick dies: status names it DOWN and exits 1
    vol.kill_brick(1)

    def down() -> subprocess.CompletedProcess[str] | None:
        q = gfuse("status", str(mp))
        return q if q.returncode == 1 else None

    q = wait_for(down, 30, "gfuse status to report the killed brick")
    lines = [ln for ln in q.stdout.splitlines() if ln.startswith("  ")]
    assert "DOWN" in lines[1] and "b1" in lines[1], q.stdout
    assert "DOWN" not in lines[0] and "DOWN" not in lines[2], q.stdout
    assert "2/3 bricks up" in q.stdout
    assert "Traceback" not in q.stderr
    # the mount keeps working on two of three (quorum)
    (mp / "still-writable").write_bytes(b"yes")
    assert (mp / "still-writable").read_bytes() == b"yes"
    # the plain listing shows the mount too
    all_status = gfuse("status")
    assert str(mp) in all_status.stdout
    # gfuse umount: unmounted, the serving process exits, nothing left behind
    p = gfuse("umount", str(mp))
    assert p.returncode == 0, p.stderr
    assert not tc.is_mounted(mp)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
             Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
             10, f"the serving process {pid} to exit")
    assert serving_pids(mp) == []
    assert str(mp) not in gfuse("status").stdout
