"""statfs is answered for the inode it is asked about: a directory with a quota (and quota-deem-statfs) shows
its limit as the file system's size, through gfuse as through the native client — also through a bind mount of
that directory, which is how the node agent serves a pooled subdir PV (df in the pod shows the PV's size)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from testkit import cluster as tc

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20


def _size(p: Path) -> int:
    st = os.statvfs(p)
    return st.f_blocks * st.f_frsize


def test_statfs_of_a_quota_directory_and_its_bind_mount(make_volume, gfuse_mount, native_mount, tmp_path: Path) -> None:
    vol = make_volume("replica3")
    g = gfuse_mount(vol)
    (g.path / "q").mkdir()
    tc.gluster("volume", "quota", vol.name, "enable")
    tc.gluster("volume", "quota", vol.name, "limit-usage", "/q", "8MB")
    tc.gluster("volume", "set", vol.name, "features.quota-deem-statfs", "on")
    n = native_mount(vol)
    tc.wait_until(lambda: _size(n.path / "q") == 8 * MiB, 30, "native: the quota as the size of q")
    tc.wait_until(lambda: _size(g.path / "q") == 8 * MiB, 30, "gfuse: the quota as the size of q")
    assert _size(g.path) == _size(n.path) > 8 * MiB  # the root: the bricks' size
    bind = tmp_path / "pv"
    bind.mkdir()
    subprocess.run(["mount", "--bind", str(g.path / "q"), str(bind)], check=True)
    try:
        assert _size(bind) == 8 * MiB  # pyfuse3's own statfs answered for the mount's root: the bricks' size
        out = subprocess.run(["df", "-B1", "--output=size", str(bind)], capture_output=True, text=True, check=True)
        assert out.stdout.split()[-1] == str(8 * MiB), out.stdout
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(bind)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
