"""A replica that missed entry operations (it was down) is not believed until healed, as AFR does.

The self-heal daemon is off here, so the brick that missed a rename and an unlink keeps its stale
entries: a fresh gfuse mount must still show what the other two replicas agree on (the parent
directory's entry changelog blames the stale one).
"""

from __future__ import annotations

import errno
import os

import pytest

pytestmark = pytest.mark.timeout(180)


def test_stale_replica_entries_are_not_shown(make_volume, gfuse_mount, native_mount) -> None:
    vol = make_volume("replica3", options={"cluster.self-heal-daemon": "off"})
    g = gfuse_mount(vol)
    d = g.path / "d"
    d.mkdir()
    (d / "old").write_text("content")
    (d / "doomed").write_text("x")
    (d / "kept").write_text("kept")
    vol.kill_brick(2)
    os.rename(d / "old", d / "new")
    os.unlink(d / "doomed")
    vol.start_force()
    stale = vol.brick_dirs[2] / "d"
    assert (stale / "old").exists() and (stale / "doomed").exists()  # brick 2 missed both, nothing healed

    fresh = gfuse_mount(vol)  # a new client: knows nothing but what the bricks say
    fd = fresh.path / "d"
    for name in ("old", "doomed"):
        with pytest.raises(OSError) as e:
            os.stat(fd / name)
        assert e.value.errno == errno.ENOENT, name
    assert (fd / "new").read_text() == "content"
    for _ in range(3):  # readdir is spread over replicas: never from the stale one
        assert sorted(os.listdir(fd)) == ["kept", "new"]
    assert sorted(os.listdir(native_mount(vol).path / "d")) == ["kept", "new"]  # the reference agrees
