"""The directory attributes gfuse answers from entry replies (xlators/mdcache.py) are right, and save
the brick STAT the kernel asks for after every create/unlink in a directory."""

from __future__ import annotations

import os
import re
import stat
import time

import pytest

from testkit import cluster as tc

pytestmark = pytest.mark.timeout(180)


def _stat_fops(vol: tc.Volume) -> int:
    out = tc.gluster("volume", "profile", vol.name, "info", "incremental")
    return sum(int(m.group(1)) for m in re.finditer(r"\s(\d+)\s+STAT\n", out))


@pytest.mark.parametrize("kind", ["replica3", "distrep"])
def test_parent_attributes_after_entry_changes(kind, make_volume, gfuse_mount) -> None:
    vol = make_volume(kind)
    g = gfuse_mount(vol)
    d = g.path / "d"
    d.mkdir(mode=0o755)
    before = os.stat(d)
    time.sleep(1.1)
    (d / "f").write_text("x")
    after = os.stat(d)
    assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns
    time.sleep(1.1)  # past every cache: what a brick says now
    fresh = os.stat(gfuse_mount(vol).path / "d")
    assert (fresh.st_mtime_ns, fresh.st_ctime_ns, fresh.st_mode) == (after.st_mtime_ns, after.st_ctime_ns,
                                                                      after.st_mode)
    os.chmod(d, 0o700)  # a change not made by an entry operation is never hidden by the cache
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    os.rename(d / "f", d / "g")
    assert os.stat(d).st_mtime_ns >= after.st_mtime_ns
    os.unlink(d / "g")
    assert os.stat(d).st_nlink == 2

    tc.gluster("volume", "profile", vol.name, "start")
    try:
        time.sleep(1.5)  # the profile changes the volfile: let gfuse switch graphs first
        _stat_fops(vol)  # reset the incremental counters
        for i in range(30):
            (d / f"n{i}").write_text("x")
        for i in range(30):
            os.unlink(d / f"n{i}")
        stats = _stat_fops(vol)
    finally:
        tc.gluster("volume", "profile", vol.name, "stop", check=False)
    assert stats < 10, f"{stats} brick STATs for 30 creates + 30 unlinks (the kernel asks ~60 times)"
