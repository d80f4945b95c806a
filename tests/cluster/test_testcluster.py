"""The real test cluster itself: volumes of each kind, fault injection, native mounts, cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testkit import cluster as tc
from testkit import procs

pytestmark = pytest.mark.cluster

EXPECTED = {
    # kind: (bricks, replica, dist, typeStr)
    "dist1": (1, 1, 1, "Distribute"),
    "replica3": (3, 3, 1, "Replicate"),
    "distrep": (6, 3, 2, "Distributed-Replicate"),
}


def _dead_pid() -> int:
    """The pid of a process that has exited (a stand-in for a crashed test run)."""
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=10)
    return proc.pid


def test_volume_kinds(volume: tc.Volume) -> None:
    bricks, replica, dist, type_str = EXPECTED[volume.kind]
    info = volume.info()
    assert info.name == volume.name
    assert info.name.startswith(tc.VOLUME_PREFIX)
    assert info.status == "Started"
    assert info.type == type_str
    assert info.brick_count == bricks == len(volume.bricks)
    assert info.replica_count == replica
    assert info.dist_count == dist
    assert list(info.bricks) == volume.bricks
    for spec, d in zip(volume.bricks, volume.brick_dirs, strict=True):
        host, _, path = spec.partition(":")
        assert host == tc.BRICK_HOST
        assert Path(path) == d
        assert (d / ".glusterfs").is_dir()
    for i, st in enumerate(volume.status()):
        assert st.online and st.port and st.pid == volume.brick_pid(i)
    assert volume.name in tc.list_volumes()
    assert volume.name in tc.our_volumes()


def test_brick_host_is_loopback(glusterd: tc.GlusterdProcess) -> None:
    import ipaddress
    import socket

    addr = socket.gethostbyname(tc.BRICK_HOST)
    assert ipaddress.ip_address(addr) in ipaddress.ip_network("127.0.0.0/8")
    assert glusterd.pid == tc.glusterd_pid()


@pytest.mark.parametrize("volume", ["replica3"], indirect=True)
def test_kill_brick_and_start_force(volume: tc.Volume) -> None:
    old = volume.brick_pid(1)
    assert old is not None
    killed = volume.kill_brick(1)
    assert killed == old
    assert not procs.alive(old)
    st = volume.status()
    assert not st[1].online
    assert st[0].online and st[2].online
    assert volume.brick_pid(1) is None
    assert not volume.looks_healthy()

    volume.start_force()
    new = volume.brick_pid(1)
    assert new is not None and new != old
    assert all(s.online for s in volume.status())
    assert volume.looks_healthy()


def test_pause_and_ensure_online(make_volume) -> None:
    vol = make_volume("dist1")
    pid = vol.pause_brick(0)
    assert procs.state(pid) in ("T", "t")
    assert not vol.looks_healthy()
    assert vol.ensure_online() is True
    assert procs.state(pid) not in ("T", "t", None)
    assert vol.looks_healthy()
    # killed behind the module's back: ensure_online restarts it
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while procs.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # signal delivery is asynchronous
    assert vol.ensure_online() is True
    assert vol.brick_pid(0) not in (None, pid)


def test_set_option(make_volume) -> None:
    vol = make_volume("dist1", options={"performance.quick-read": "off"})
    assert vol.get_option("performance.quick-read") == "off"
    assert vol.info().options["performance.quick-read"] == "off"
    vol.set_option("network.ping-timeout", 7)
    assert vol.get_option("network.ping-timeout") == "7"
    vol.reset_option("network.ping-timeout")
    assert vol.get_option("network.ping-timeout") == "42"


def test_native_mount_read_write(volume: tc.Volume, native_mount, tmp_path: Path) -> None:
    m = native_mount(volume)
    assert tc.is_mounted(m.path)
    name = f"rw-{tmp_path.name}"
    data = os.urandom(256 * 1024)
    (m.path / name).write_bytes(data)
    assert (m.path / name).read_bytes() == data
    # the file landed on exactly one replica set, on every brick of it
    holders = [d for d in volume.brick_dirs if (d / name).exists()]
    assert len(holders) == volume.replica
    for d in holders:
        assert (d / name).read_bytes() == data
    # a second mount sees it too
    with tc.NativeMount(volume) as m2:
        assert (m2.path / name).read_bytes() == data
    assert not tc.is_mounted(m2.path)
    (m.path / name).unlink()
    assert not any((d / name).exists() for d in volume.brick_dirs)


def test_cleanup_stale_leaves_foreign_volumes(glusterd: tc.GlusterdProcess, tmp_path: Path) -> None:
    host = tc.BRICK_HOST
    foreign = f"gfuseforeign_{os.getpid()}"  # not our prefix
    lookalike = tc.new_volume_name("foreign")  # our prefix, but no marker: not ours either
    for name in (foreign, lookalike):
        tc.gluster("volume", "create", name, f"{host}:{tmp_path / name}", "force")
    stale = tc.create_volume("dist1", owner_pid=_dead_pid())  # ours, owner dead
    alive = tc.create_volume("dist1")  # ours, owner (this process) alive
    try:
        deleted = tc.cleanup_stale()
        names = tc.list_volumes()
        assert stale.name in deleted and stale.name not in names
        assert not stale.brick_root.exists()
        assert stale.name not in tc.our_volumes()
        assert foreign in names and lookalike in names
        assert alive.name in names and alive.name not in deleted
        assert (tmp_path / foreign).is_dir()
    finally:
        for name in (foreign, lookalike):
            tc.gluster("volume", "delete", name, check=False)
        alive.delete()
        stale.delete()  # no-op if cleanup did it; robust when half gone
    assert foreign not in tc.list_volumes()


def test_delete_is_robust_when_half_gone(glusterd: tc.GlusterdProcess) -> None:
    vol = tc.create_volume("dist1")
    tc.gluster("volume", "stop", vol.name, "force")
    tc.gluster("volume", "delete", vol.name)
    vol.delete()  # volume already gone
    assert not vol.brick_root.exists()
    vol.delete()  # twice is fine too


def test_cli_up_down(glusterd: tc.GlusterdProcess) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    up = subprocess.run(
        [
            sys.executable,
            "-m",
            "testkit.cluster",
            "up",
            "--kind",
            "dist1",
            "--print-name",
            "--owner",
            str(os.getpid()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert up.returncode == 0, up.stderr
    name = up.stdout.strip()
    try:
        assert name.startswith(tc.VOLUME_PREFIX)
        assert tc.volume_info(name).status == "Started"
        assert tc.our_volumes()[name]["owner"]["pid"] == os.getpid()
        listing = subprocess.run(
            [sys.executable, "-m", "testkit.cluster", "list"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert f"{name}\tdist1\towner pid {os.getpid()} alive" in listing.stdout
        refused = subprocess.run(
            [sys.executable, "-m", "testkit.cluster", "down", "not_ours"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert refused.returncode == 2
    finally:
        down = subprocess.run(
            [sys.executable, "-m", "testkit.cluster", "down", name],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
    assert down.returncode == 0, down.stderr
    assert name not in tc.list_volumes()
