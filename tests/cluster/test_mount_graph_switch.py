"""A volfile change (add-brick) reaches a live gfuse mount without a remount, as with the native client.

Without it, files the native client places on a new brick would be invisible through gfuse and
gfuse could never use the brick. Files open across the change stay writable.
"""

from __future__ import annotations

import os
import time

import pytest

from testkit import cluster as tc
from gfuse.status import query_status

pytestmark = pytest.mark.timeout(240)


def test_add_brick_is_picked_up_by_a_live_mount(make_volume, gfuse_mount, native_mount, tmp_path) -> None:
    vol = make_volume("dist1")
    log = tmp_path / "gfuse.log"
    g = gfuse_mount(vol, options=[f"log-file={log}"])
    n = native_mount(vol)
    assert len(query_status(str(g.path))["bricks"]) == 1

    # a file open across the change
    fd = os.open(g.path / "open-across", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"before-")
        new_brick = vol.brick_root / "b-added"
        tc.gluster("volume", "add-brick", vol.name, f"{vol.host}:{new_brick}", "force")
        vol.brick_dirs.append(new_brick)
        tc.wait_until(lambda: len(query_status(str(g.path))["bricks"]) == 2, 60, "gfuse to connect the added brick")
        assert all(b["up"] for b in query_status(str(g.path))["bricks"])
        os.write(fd, b"after")
    finally:
        os.close(fd)
    assert (n.path / "open-across").read_bytes() == b"before-after"
    tc.wait_until(lambda: "previous graph" in log.read_text(), 30, "the old graph to be stopped once its file closed")

    # a directory made after the change spans both bricks: the native client's files there are all
    # visible through gfuse, and gfuse's own files land on the new brick too
    (n.path / "nd").mkdir()
    names = [f"f{i:03d}" for i in range(40)]
    for name in names:
        (n.path / "nd" / name).write_text(name)
    on_new = [name for name in names if (new_brick / "nd" / name).exists()]
    assert on_new, "the native client placed nothing on the new brick (layout?)"
    assert sorted(os.listdir(g.path / "nd")) == names
    for name in on_new:
        assert (g.path / "nd" / name).read_text() == name

    (g.path / "gd").mkdir()
    for name in names:
        (g.path / "gd" / name).write_text(name)
    assert any((new_brick / "gd" / name).exists() for name in names), "gfuse never used the new brick"
    assert sorted(os.listdir(n.path / "gd")) == names
    for name in names:
        assert (n.path / "gd" / name).read_text() == name


def test_files_found_after_add_brick_and_fix_layout(make_volume, gfuse_mount, native_mount) -> None:
    """After add-brick + fix-layout (no data moved), old names hash to the new brick where nothing is:
    the layouts' commit hash no longer matches the volume's, so gfuse must look on every subvolume
    (gluster's lookup-optimize rule) — and must still skip that search where layouts are current."""
    vol = make_volume("dist1")
    g = gfuse_mount(vol)
    n = native_mount(vol)
    (g.path / "d").mkdir()
    names = [f"f{i:03d}" for i in range(40)]
    for name in names:
        (g.path / "d" / name).write_text(name)
    new_brick = vol.brick_root / "b-added"
    tc.gluster("volume", "add-brick", vol.name, f"{vol.host}:{new_brick}", "force")
    vol.brick_dirs.append(new_brick)
    tc.wait_until(lambda: len(query_status(str(g.path))["bricks"]) == 2, 60, "gfuse to connect the added brick")
    tc.gluster("volume", "rebalance", vol.name, "fix-layout", "start")
    tc.wait_until(lambda: "completed" in tc.gluster("volume", "rebalance", vol.name, "status"), 120, "fix-layout")
    assert not any((new_brick / "d" / name).exists() for name in names)  # nothing was moved
    for name in names:  # many of these now hash to the new, empty brick
        assert (g.path / "d" / name).read_text() == name
    assert sorted(os.listdir(g.path / "d")) == names
    # a fresh client too (no cached layouts), and the reference client agrees
    fresh = gfuse_mount(vol).path / "d"
    assert all((fresh / name).read_text() == name for name in names)
    assert sorted(os.listdir(n.path / "d")) == names


def test_volfile_changes_under_load_lose_no_call(make_volume, gfuse_mount) -> None:
    """Calls that started on a graph finish on it even when it is replaced meanwhile (an old graph is
    stopped only when no call and no open file is left on it): a busy client never sees an error."""
    import threading

    vol = make_volume("replica3")
    g = gfuse_mount(vol)
    (g.path / "w").mkdir()
    errors: list[BaseException] = []
    stop = threading.Event()

    def work() -> None:
        i = 0
        try:
            while not stop.is_set():
                p = g.path / "w" / f"f{i % 50}"
                p.write_text(str(i))
                assert p.read_text() == str(i)
                os.rename(p, p.with_suffix(".r"))
                os.unlink(p.with_suffix(".r"))
                os.listdir(g.path / "w")
                i += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    try:
        for value in ("off", "on", "off", "on"):
            tc.gluster("volume", "set", vol.name, "performance.stat-prefetch", value)
            time.sleep(0.7)
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    assert os.listdir(g.path / "w") == []
