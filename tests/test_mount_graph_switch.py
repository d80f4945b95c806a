"""A volfile change (add-brick) reaches a live gfuse mount without a remount, as with the native client.

Without it, files the native client places on a new brick would be invisible through gfuse and
gfuse could never use the brick. Files open across the change stay writable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gfuse import testcluster as tc

pytestmark = pytest.mark.timeout(240)


def _status(mountpoint: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "gfuse.cli", "status", "--json", str(mountpoint)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    data = json.loads(out)
    return data[0] if isinstance(data, list) else data


def _wait(pred, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_add_brick_is_picked_up_by_a_live_mount(make_volume, gfuse_mount, native_mount, tmp_path) -> None:
    vol = make_volume("dist1")
    log = tmp_path / "gfuse.log"
    g = gfuse_mount(vol, options=[f"log-file={log}"])
    n = native_mount(vol)
    assert len(_status(g.path)["bricks"]) == 1

    # a file open across the change
    fd = os.open(g.path / "open-across", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"before-")
        new_brick = vol.brick_root / "b-added"
        tc.gluster("volume", "add-brick", vol.name, f"{vol.host}:{new_brick}", "force")
        vol.brick_dirs.append(new_brick)
        _wait(lambda: len(_status(g.path)["bricks"]) == 2, "gfuse to connect the added brick")
        assert all(b["up"] for b in _status(g.path)["bricks"])
        os.write(fd, b"after")
    finally:
        os.close(fd)
    assert (n.path / "open-across").read_bytes() == b"before-after"
    _wait(lambda: "previous graph" in log.read_text(), "the old graph to be stopped once its file closed", 30)

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
